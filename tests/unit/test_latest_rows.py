"""The user-state index holds exactly the fold over the partitions: day after day, after a
rerun, a backfill older than its undo log, a rewritten, removed or late partition, a killed
fold, and with every value a row can hold encoded exactly."""

from __future__ import annotations

import datetime as dt
import shutil
import sqlite3
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import features.latest_rows as latest_rows
from features.build import USER_RECENT_SCHEMA, build_features, previous_user_state
from features.latest_rows import LatestRows
from features.partitions import partitions
from features.synth import generate_shop

pytestmark = pytest.mark.fast

START = dt.date(2026, 1, 1)
DAYS = 9


def _days() -> list[dt.date]:
    return [START + dt.timedelta(days=i) for i in range(DAYS)]


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("latest")
    landing = str(base / "landing")
    generate_shop(landing, days=DAYS, users=150, products=50, seed=11, start=START)
    root = base / "offline"
    for day in _days():
        build_features(landing, root, day)
    return root


def _parts(root: Path, day: dt.date) -> list:
    return partitions(str(root / "user_recent_products"), day, before=True)


def _index(path: Path) -> LatestRows:
    return LatestRows(path, USER_RECENT_SCHEMA, "user_id")


def _check(index: LatestRows, root: Path, day: dt.date) -> dict[str, int]:
    figures = index.sync(_parts(root, day))
    pd.testing.assert_frame_equal(index.rows().to_pandas(), previous_user_state(root, day))
    return figures


def test_day_by_day_reruns_and_an_old_backfill(offline: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(latest_rows, "UNDO_DAYS", 3)
    monkeypatch.setattr(latest_rows, "REBUILD_CHUNK_DAYS", 2)
    with _index(tmp_path / "state.sqlite") as index:
        for day in _days()[1:]:
            figures = _check(index, offline, day)
        assert figures == {"kept": DAYS - 2, "rolled_back": 0, "folded": 1, "rebuilt": 0}
        # a rerun of the day before rolls one day back, then forward again
        assert _check(index, offline, _days()[-2])["rolled_back"] == 1
        assert _check(index, offline, _days()[-1])["folded"] == 1
        # a backfill further back than the undo log rebuilds, in chunks, and is still exact
        assert _check(index, offline, _days()[2])["rebuilt"] == 1
        assert _check(index, offline, _days()[-1]) == {
            "kept": 2, "rolled_back": 0, "folded": DAYS - 3, "rebuilt": 0}
        assert sum(undo for _, _, undo in index.folded()) == 3
        # rolled back again: the rows before come from days folded in chunks, read again
        # from their own partitions (the undo log keeps their days, not copies)
        assert _check(index, offline, _days()[-3])["rolled_back"] == 2
        assert index._db.execute("SELECT COUNT(*) FROM pragma_table_info('undo')"
                                 ).fetchone()[0] == 3  # day, key, the row's day before


def test_rewritten_removed_and_late_partitions(offline: Path, tmp_path: Path) -> None:
    root = tmp_path / "offline"
    shutil.copytree(offline / "user_recent_products", root / "user_recent_products")
    last = _days()[-1]
    with _index(tmp_path / "state.sqlite") as index:
        _check(index, root, last)
        # a rewritten day: the first row of day 6 loses its history
        path = root / "user_recent_products" / f"date={_days()[5]}" / "part-0.parquet"
        table = pq.read_table(path).to_pandas()
        table.at[0, "recent_product_ids"] = []
        table.at[0, "recent_event_types"] = []
        table.at[0, "recent_timestamps"] = []
        pq.write_table(pa.Table.from_pandas(table, schema=USER_RECENT_SCHEMA,
                                            preserve_index=False), path)
        assert _check(index, root, last)["rolled_back"] == DAYS - 1 - 5
        # a removed (quarantined) day
        moved = tmp_path / "moved"
        shutil.move(root / "user_recent_products" / f"date={_days()[3]}", moved)
        assert _check(index, root, last)["kept"] == 3
        # the day comes back (a late delivery)
        shutil.move(moved, root / "user_recent_products" / f"date={_days()[3]}")
        assert _check(index, root, last)["kept"] == 3


def test_a_killed_fold_leaves_the_index_as_it_was(offline: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.sqlite"
    with _index(path) as index:
        _check(index, offline, _days()[4])
        before = index.rows().to_pandas()
        real = latest_rows._encode

        def broken(*args: object) -> list[tuple]:
            rows = real(*args)
            return rows[:-1] + [rows[-1][:-1]]  # the last row short of a column: SQL fails

        monkeypatch.setattr(latest_rows, "_encode", broken)
        with pytest.raises(Exception, match="binding"):
            index.sync(_parts(offline, _days()[5]))
        pd.testing.assert_frame_equal(index.rows().to_pandas(), before)
        monkeypatch.setattr(latest_rows, "_encode", real)
    with _index(path) as index:  # a later process picks up where it stopped
        assert _check(index, offline, _days()[-1])["kept"] == 4


def test_every_value_round_trips_exactly(tmp_path: Path) -> None:
    folder = tmp_path / "table" / "date=2026-01-01"
    folder.mkdir(parents=True)
    stamp = pd.Timestamp("2026-01-02", tz="UTC")
    table = pa.Table.from_pylist([
        {"user_id": "u1", "recent_product_ids": ["p1", "", "ünï\u00a0code ✓"],
         "recent_event_types": ["view", "purchase", "view"],
         "recent_timestamps": [1, -2, 2**40], "n_events_total": 3,
         "last_purchase_ts": stamp, "event_timestamp": stamp},
        {"user_id": "u0 é", "recent_product_ids": [], "recent_event_types": [],
         "recent_timestamps": None, "n_events_total": 0, "last_purchase_ts": None,
         "event_timestamp": stamp},
        {"user_id": "u2", "recent_product_ids": None, "recent_event_types": None,
         "recent_timestamps": [], "n_events_total": None, "last_purchase_ts": None,
         "event_timestamp": stamp},
    ], schema=USER_RECENT_SCHEMA)
    pq.write_table(table, folder / "part-0.parquet")
    parts = partitions(str(tmp_path / "table"), dt.date(2026, 1, 2))
    with _index(tmp_path / "state.sqlite") as index:
        index.sync(parts)
        assert index.rows().equals(table.sort_by("user_id"))
        assert index.rows(["u2", "nobody", "u1", "u1"]).equals(
            table.filter(pa.array([True, False, True])))
        assert index.rows([]).num_rows == 0


def test_another_layout_is_rebuilt(offline: Path, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.sqlite"
    with _index(path) as index:
        _check(index, offline, _days()[-1])
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE marker (x)")
    monkeypatch.setattr(latest_rows, "FORMAT", latest_rows.FORMAT + 1)
    with _index(path) as index:
        assert index.folded() == []
        # a new file: nothing of the old one (its pages) is kept
        assert index._db.execute("SELECT name FROM sqlite_master WHERE name = 'marker'"
                                 ).fetchone() is None
        assert _check(index, offline, _days()[-1])["folded"] == DAYS - 1


def test_an_unreadable_index_is_rebuilt(offline: Path, tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "state.sqlite"
    path.write_bytes(b"not a database, e.g. after an OS crash" * 100)
    with _index(path) as index:
        assert _check(index, offline, _days()[-1])["folded"] == DAYS - 1
    assert "is unreadable" in caplog.text
    with _index(path) as index:  # and the rebuilt file is a good one
        assert _check(index, offline, _days()[-1])["kept"] == DAYS - 1
