"""product_stats' window counters kept from day to day (``features.product_windows``) are
the sums of the month's ``product_day_counts`` partitions: every day for 40 days, after an
earlier partition is rewritten, and when a day lacks its partition."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features import product_windows as pw

pytestmark = pytest.mark.fast

START = dt.date(2026, 1, 1)
PRODUCTS = [f"p{i:03d}" for i in range(60)]


def _counts(rng: np.random.Generator) -> pd.DataFrame:
    """One day's views and purchases of a random third of the products."""
    ids = sorted(rng.choice(PRODUCTS, size=20, replace=False))
    return pd.DataFrame({"product_id": ids, "days_ago": 0,
                         "view": rng.integers(1, 9, size=20),
                         "purchase": rng.integers(0, 3, size=20)})


def _write(offline: Path, day: dt.date, counted: pd.DataFrame) -> None:
    path = pw.counts_file(offline, day)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(counted.drop(columns="days_ago"),
                                        schema=pw.PRODUCT_DAY_COUNTS_SCHEMA,
                                        preserve_index=False), path)


def _no_events() -> pa.Table:
    return pa.table({"product_id": pa.array([], pa.string()),
                     "event_type": pa.array([], pa.string()),
                     "ts": pa.array([], pa.timestamp("us", tz="UTC"))})


def _nonzero(sums: pd.DataFrame) -> pd.DataFrame:
    return sums[(sums.to_numpy() != 0).any(axis=1)]


def _day(offline: Path, running: Path, day: dt.date, counted: pd.DataFrame) -> tuple:
    """Both paths for one day, then the day's partition and the kept sums, as a build does."""
    kept = pw.window_sums(offline, day, counted, _no_events, running)
    reference = pw.window_sums(offline, day, counted, _no_events, None)
    _write(offline, day, counted)
    if kept[2]:
        pw.store_sums(running, offline, day, kept[0])
    return kept, reference


def test_kept_sums_equal_the_month_of_partitions(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    offline, running = tmp_path / "offline", tmp_path / "running"
    full_reads = []
    monkeypatch.setattr(pw, "stored_day_counts", lambda *a, _f=pw.stored_day_counts:
                        full_reads.append(a[3]) or _f(*a))
    for i in range(40):
        day = START + dt.timedelta(days=i)
        (sums, changed, keep), (ref_sums, ref_changed, _) = _day(offline, running, day,
                                                                  _counts(rng))
        pd.testing.assert_frame_equal(_nonzero(sums), _nonzero(ref_sums), check_names=False)
        assert changed == ref_changed and keep
    days = [START + dt.timedelta(days=i) for i in range(40)]
    assert [d for d in full_reads if d != days[0]] == days[1:]  # the reference's own calls
    assert len(full_reads) == 41  # 40 reference calls, and the first day's (no sums kept)
    assert len(list((running / "product_windows").glob("through=*.parquet"))) == pw.KEEP_SNAPSHOTS

    # a correction of a day inside the month: the kept sums are not used, and match again
    fixed = START + dt.timedelta(days=30)
    _write(offline, fixed, _counts(rng))
    full_reads.clear()
    day = START + dt.timedelta(days=40)
    (sums, changed, keep), (ref_sums, ref_changed, _) = _day(offline, running, day, _counts(rng))
    assert full_reads == [day, day]
    pd.testing.assert_frame_equal(_nonzero(sums), _nonzero(ref_sums), check_names=False)
    assert changed == ref_changed and keep


def test_a_day_counted_from_its_events_is_not_kept(tmp_path: Path) -> None:
    """A day in the month without its partition is counted from its events (a shop whose
    earlier days were built before the partitions existed); sums holding such a day are not
    kept, since the day leaving a window later could not be subtracted."""
    offline, running = tmp_path / "offline", tmp_path / "running"
    day = START + dt.timedelta(days=3)

    def events() -> pa.Table:  # one view two days before the day
        return pa.table({"product_id": ["p001"], "event_type": ["view"],
                         "ts": pa.array([pd.Timestamp(START + dt.timedelta(days=1), tz="UTC")],
                                        pa.timestamp("us", tz="UTC"))})

    counted = _counts(np.random.default_rng(1))
    sums, changed, keep = pw.window_sums(offline, day, counted, events, running)
    assert not keep
    assert sums.loc["p001", "product_view_count_7d"] == 1 + counted.set_index(
        "product_id")["view"].get("p001", 0)
