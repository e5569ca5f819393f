"""The GX suites accept a good partition and name what is wrong with a bad one."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pandas as pd
import pytest

from features.contract import write_partition
from features.synth import generate_shop
from features.validation import PartitionInvalid, require_valid, validate_day

START = dt.date(2026, 1, 1)


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("landing"))
    generate_shop(root, days=3, users=40, products=30, seed=3, start=START)
    return root


def _raw_events(root: str, day: dt.date) -> pd.DataFrame:
    return pd.read_parquet(Path(root) / "events" / f"date={day}" / "part-0.parquet")


def _overwrite(root: str, day: dt.date, frame: pd.DataFrame) -> None:
    folder = Path(root) / "events" / f"date={day}"
    for f in folder.glob("*.parquet"):
        f.unlink()
    frame.to_parquet(folder / "part-0.parquet", index=False)


def test_good_partition_passes(shop: str, tmp_path: Path) -> None:
    report = validate_day(shop, START + dt.timedelta(days=1), tmp_path)
    assert report.success, report.summary()
    assert report.tables["events"].rows > 0
    assert (tmp_path / "date=2026-01-02" / "events.json").exists()


@pytest.mark.parametrize(
    ("name", "breaks", "expected"),
    [
        ("negative quantity", lambda e: e.assign(quantity=-e["quantity"]),
         "expect_column_values_to_be_between column=quantity"),
        ("duplicate event ids", lambda e: e.assign(event_id="E1"),
         "expect_column_values_to_be_unique column=event_id"),
        ("unknown event type", lambda e: e.assign(event_type="teleport"),
         "expect_column_values_to_be_in_set column=event_type"),
        ("timestamps of another day", lambda e: e.assign(ts=e["ts"] + pd.Timedelta(days=2)),
         "expect_column_values_to_be_between column=ts"),
        ("missing user ids", lambda e: e.assign(user_id=None),
         "expect_column_values_to_not_be_null column=user_id"),
        ("a PII column", lambda e: e.assign(email="someone@example.com"),
         "unexpected columns ['email']"),
    ],
)
def test_bad_partition_is_refused_with_its_reason(shop: str, tmp_path: Path, name: str,
                                                   breaks, expected: str) -> None:
    root = str(tmp_path / "landing")
    day = START + dt.timedelta(days=1)
    events = _raw_events(shop, day)
    write_partition(root, "events", day, events)
    _overwrite(root, day, breaks(events))
    report = validate_day(root, day, tmp_path / "reports")
    assert not report.success, name
    with pytest.raises(PartitionInvalid) as err:
        require_valid(report)
    assert expected in str(err.value)
    assert "report:" in str(err.value)


def test_missing_events_partition_is_refused(shop: str, tmp_path: Path) -> None:
    report = validate_day(shop, START + dt.timedelta(days=30), tmp_path)
    assert not report.success
    assert "shoprec_partition_exists" in report.summary()
