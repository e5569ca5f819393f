"""Running snapshots give exactly what re-reading every partition gives: day after day, after
an earlier partition is rewritten or removed, and for the whole feature build."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pandas as pd
import pytest

from features.build import build_features, previous_user_state
from features.contract import read_partition, read_upto, write_partition
from features.running import catalog_merge, running_catalog, running_users, users_merge
from features.synth import generate_shop

pytestmark = pytest.mark.fast

START = dt.date(2026, 1, 1)
DAYS = 10


@pytest.fixture(scope="module")
def landing(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("running") / "landing")
    generate_shop(root, days=DAYS, users=120, products=60, seed=4, start=START)
    return root


def _days(n: int = DAYS) -> list[dt.date]:
    return [START + dt.timedelta(days=i) for i in range(n)]


def _full_catalog(root: str, day: dt.date) -> pd.DataFrame:
    return catalog_merge(None, read_upto(root, "products", day))


def _full_users(root: str, day: dt.date) -> pd.DataFrame:
    return users_merge(None, read_upto(root, "users", day))


def test_day_by_day_equals_the_full_read(landing: str, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    snapshots = tmp_path / "running"
    caplog.set_level("INFO", logger="features.running")
    for day in _days():
        pd.testing.assert_frame_equal(running_catalog(landing, day, snapshots),
                                      _full_catalog(landing, day))
        pd.testing.assert_frame_equal(running_users(landing, day, snapshots),
                                      _full_users(landing, day))
    # each day read one new partition on top of the day before's snapshot
    assert f"catalog: through={_days()[-2].isoformat()} + 1 partition(s) of {DAYS}" \
        in caplog.text
    kept = sorted(p.name for p in (snapshots / "catalog").iterdir())
    assert kept[-1] == f"through={_days()[-1].isoformat()}" and len(kept) == 3
    # a rerun of an older day (a backfill) reads from the start again and is still exact
    pd.testing.assert_frame_equal(running_catalog(landing, _days()[4], snapshots),
                                  _full_catalog(landing, _days()[4]))


def test_a_rewritten_or_removed_partition_is_noticed(landing: str, tmp_path: Path) -> None:
    root = str(tmp_path / "landing")
    shutil.copytree(landing, root)
    snapshots = tmp_path / "running"
    last = _days()[-1]
    before = running_catalog(root, last, snapshots)
    first = read_partition(root, "products", START)
    first.loc[first.index[0], "title"] = "Corrected title"
    write_partition(root, "products", START, first)  # a correction of day 1, landed later
    after = running_catalog(root, last, snapshots)
    pd.testing.assert_frame_equal(after, _full_catalog(root, last))
    assert "Corrected title" in set(after["title"]) and not before.equals(after)
    # a partition moved away (quarantined) leaves the snapshots that consumed it unused
    shutil.rmtree(Path(root) / "users" / f"date={_days()[2].isoformat()}")
    running_users(root, last, snapshots)
    shutil.rmtree(Path(root) / "users" / f"date={_days()[3].isoformat()}")
    pd.testing.assert_frame_equal(running_users(root, last, snapshots),
                                  _full_users(root, last))


def test_the_feature_build_writes_the_same_bytes_with_snapshots(landing: str,
                                                               tmp_path: Path) -> None:
    full, running = tmp_path / "full", tmp_path / "with_snapshots"
    for day in _days():
        build_features(landing, full, day)
        build_features(landing, running, day, tmp_path / "running")
    build_features(landing, running, _days()[3], tmp_path / "running")  # a rerun in between
    build_features(landing, running, _days()[4], tmp_path / "running")
    files = sorted(p.relative_to(full) for p in full.rglob("*.parquet"))
    assert len(files) == 6 * DAYS  # the five Feast tables and product_day_counts
    for name in files:
        assert (full / name).read_bytes() == (running / name).read_bytes(), name
    assert (tmp_path / "running" / "user_state.sqlite").is_file()  # features.latest_rows
    pd.testing.assert_frame_equal(
        previous_user_state(running, _days()[-1], tmp_path / "running"),
        previous_user_state(full, _days()[-1]))
    # Only the users asked for are converted: the same rows as the whole state's.
    everyone = previous_user_state(full, _days()[-1])
    some = everyone["user_id"].iloc[::3].tolist() + ["nobody"]
    pd.testing.assert_frame_equal(
        previous_user_state(running, _days()[-1], tmp_path / "running", users=some),
        everyone[everyone["user_id"].isin(some)].reset_index(drop=True))
    assert everyone["user_id"].is_monotonic_increasing and everyone["user_id"].is_unique


@pytest.mark.parametrize("undo_days", [14, 0])  # folded day by day, or in one rebuild chunk
def test_a_later_row_without_a_country_keeps_the_known_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, undo_days: int) -> None:
    import features.latest_rows as latest_rows

    monkeypatch.setattr(latest_rows, "UNDO_DAYS", undo_days)
    root = str(tmp_path / "landing")
    rows = {0: [("u1", "FR"), ("u3", None)], 1: [("u1", None), ("u2", None)],
            2: [("u2", "DE"), ("u1", None), ("u2", None), ("u3", "IT"), ("u3", "ES")]}
    for offset, users in rows.items():
        write_partition(root, "users", _days()[offset], pd.DataFrame(
            {"user_id": [u for u, _ in users], "country": [c for _, c in users],
             "signup_date": [_days()[0]] * len(users)}))
    for day in _days()[:3] if undo_days else _days()[2:3]:
        pd.testing.assert_frame_equal(running_users(root, day, tmp_path / "running"),
                                      _full_users(root, day))
    found = running_users(root, _days()[2], tmp_path / "running", user_ids=["u3", "u1", "x"])
    assert found[["user_id", "country"]].values.tolist() == [["u1", "FR"], ["u3", "ES"]]


def test_late_events_count_the_same_in_both_builds(landing: str, tmp_path: Path) -> None:
    """An event stamped before its partition's day (allowed lateness) of a user with no
    other event that day: both builds give that user a profile row that day counting it,
    and write the same bytes (the month re-read, and the previous rows rolled forward)."""
    import numpy as np
    import pyarrow.parquet as pq

    root = str(tmp_path / "landing")
    shutil.copytree(landing, root)
    day3 = _days()[2]
    part = read_partition(root, "events", day3)
    late = part[part["event_type"] == "purchase"].iloc[[0]].assign(
        event_id="late-1", user_id="late-user", quantity=2, price=2.5,
        ts=pd.Timestamp(day3, tz="UTC") - pd.Timedelta(minutes=30))
    write_partition(root, "events", day3, pd.concat([part, late], ignore_index=True))
    full, running = tmp_path / "full", tmp_path / "with_snapshots"
    for day in _days(5):
        build_features(root, full, day)
        build_features(root, running, day, tmp_path / "running")
    for name in sorted(p.relative_to(full) for p in full.rglob("*.parquet")):
        assert (full / name).read_bytes() == (running / name).read_bytes(), name
    rows = pq.read_table(full / "user_profile" / f"date={day3.isoformat()}" / "part-0.parquet")
    [row] = [r for r in rows.to_pylist() if r["user_id"] == "late-user"]
    day2 = int((pd.Timestamp(_days()[1]) - pd.Timestamp(0)) / pd.Timedelta(days=1))
    assert (row["active_days"], row["purchase_by_day"], row["basket_value_by_day"]) == (
        [day2], [1], [5.0])
    assert np.isclose(row["basket_value_by_day"][0], 2 * 2.5)
    # in the user's history, and in the product's purchases (counted on the day it landed)
    def rows_of(table: str, day: dt.date) -> list[dict]:
        return pq.read_table(full / table / f"date={day.isoformat()}" / "part-0.parquet"
                             ).to_pylist()

    [history] = [r for r in rows_of("user_recent_products", day3) if r["user_id"] == "late-user"]
    product = late["product_id"].iloc[0]
    assert (history["recent_product_ids"], history["recent_event_types"]) == (
        [product], ["purchase"])
    landed = {r["product_id"]: r["purchase"] for r in rows_of("product_day_counts", day3)}
    on_time = part[(part["product_id"] == product) & (part["event_type"] == "purchase")]
    assert landed[product] == len(on_time) + 1
