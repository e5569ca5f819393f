"""Offline feature tables: rolling user histories, snapshot timestamps, idempotent reruns."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from features.build import (
    HISTORY_LEN,
    USER_RECENT_SCHEMA,
    build_features,
    build_product_catalog,
    build_user_recent_products,
    previous_user_state,
)
from features.contract import Interval, write_partition

DAY1 = dt.date(2026, 1, 1)
DAY2 = dt.date(2026, 1, 2)
DAY3 = dt.date(2026, 1, 3)


def _ts(day: dt.date, clock: str) -> pd.Timestamp:
    return pd.Timestamp(f"{day.isoformat()} {clock}", tz="UTC")


def _events(rows: list[tuple[str, str, str | None, str, pd.Timestamp]]) -> pd.DataFrame:
    """Contract-shaped events from (event_id, user_id, product_id, event_type, ts) tuples."""
    return pd.DataFrame({
        "event_id": [r[0] for r in rows],
        "user_id": [r[1] for r in rows],
        "product_id": [r[2] for r in rows],
        "event_type": [r[3] for r in rows],
        "query": ["red candle" if r[3] == "search" else None for r in rows],
        "quantity": [1] * len(rows),
        "price": [None if r[3] == "search" else 2.5 for r in rows],
        "ts": pd.to_datetime([r[4] for r in rows], utc=True),
    })


def _day1() -> pd.DataFrame:
    # Deliberately out of time order: the builder must sort by (ts, event_id) itself.
    return _events([
        ("e04", "u1", "P2", "purchase", _ts(DAY1, "12:00")),
        ("e01", "u1", "P1", "view", _ts(DAY1, "10:00")),
        ("e02", "u1", None, "search", _ts(DAY1, "10:30")),
        ("e03", "u1", "P2", "add_to_cart", _ts(DAY1, "11:00")),
        ("e05", "u2", "P3", "view", _ts(DAY1, "09:00")),
        # Same timestamp as e06: event_id breaks the tie.
        ("e07", "u2", "P5", "view", _ts(DAY1, "09:30")),
        ("e06", "u2", "P4", "view", _ts(DAY1, "09:30")),
        ("e08", "u9", None, "search", _ts(DAY1, "13:00")),  # only searched: not active
    ])


def _day2() -> pd.DataFrame:
    return _events([
        ("f01", "u1", "P6", "view", _ts(DAY2, "08:00")),
        ("f02", "u1", None, "search", _ts(DAY2, "08:05")),
        ("f03", "u1", "P7", "add_to_cart", _ts(DAY2, "08:10")),
        ("f04", "u3", "P1", "view", _ts(DAY2, "23:59:59.999")),
        ("f05", "u2", None, "search", _ts(DAY2, "10:00")),  # u2 only searches on day 2
    ])


def _rows(table) -> dict[str, dict]:
    assert table.schema == USER_RECENT_SCHEMA
    return {r["user_id"]: r for r in table.to_pylist()}


def test_one_day_from_nothing_keeps_product_events_oldest_first() -> None:
    empty = USER_RECENT_SCHEMA.empty_table().to_pandas()
    rows = _rows(build_user_recent_products(_day1(), empty, Interval.for_day(DAY1)))
    assert sorted(rows) == ["u1", "u2"]  # u9 only searched
    assert rows["u1"]["recent_product_ids"] == ["P1", "P2", "P2"]
    assert rows["u1"]["recent_event_types"] == ["view", "add_to_cart", "purchase"]
    assert rows["u1"]["n_events_total"] == 3
    assert rows["u2"]["recent_product_ids"] == ["P3", "P4", "P5"]
    assert rows["u2"]["n_events_total"] == 3


def test_history_rolls_forward_across_two_days() -> None:
    empty = USER_RECENT_SCHEMA.empty_table().to_pandas()
    day1 = build_user_recent_products(_day1(), empty, Interval.for_day(DAY1))
    rows = _rows(build_user_recent_products(_day2(), day1.to_pandas(), Interval.for_day(DAY2)))
    # u2 only searched on day 2: no new snapshot (its day-1 snapshot stays the latest).
    assert sorted(rows) == ["u1", "u3"]
    assert rows["u1"]["recent_product_ids"] == ["P1", "P2", "P2", "P6", "P7"]
    assert rows["u1"]["recent_event_types"] == [
        "view", "add_to_cart", "purchase", "view", "add_to_cart"]
    assert rows["u1"]["n_events_total"] == 5
    assert rows["u3"]["recent_product_ids"] == ["P1"]
    assert rows["u3"]["recent_event_types"] == ["view"]
    assert rows["u3"]["n_events_total"] == 1


def test_history_is_truncated_to_the_most_recent_but_the_total_accumulates() -> None:
    empty = USER_RECENT_SCHEMA.empty_table().to_pandas()
    day1 = build_user_recent_products(_day1(), empty, Interval.for_day(DAY1), history_len=4)
    assert _rows(day1)["u1"]["recent_product_ids"] == ["P1", "P2", "P2"]
    rows = _rows(build_user_recent_products(_day2(), day1.to_pandas(), Interval.for_day(DAY2),
                                            history_len=4))
    # The oldest entry (P1 view) falls out; product and event type stay aligned.
    assert rows["u1"]["recent_product_ids"] == ["P2", "P2", "P6", "P7"]
    assert rows["u1"]["recent_event_types"] == ["add_to_cart", "purchase", "view", "add_to_cart"]
    assert rows["u1"]["n_events_total"] == 5


def test_default_history_len_keeps_the_last_fifty() -> None:
    n = HISTORY_LEN + 7
    start = _ts(DAY1, "00:00")
    events = _events([
        (f"e{i:03d}", "u1", f"P{i:03d}", ("view", "add_to_cart", "purchase")[i % 3],
         start + pd.Timedelta(minutes=i))
        for i in range(n)
    ])
    empty = USER_RECENT_SCHEMA.empty_table().to_pandas()
    row = _rows(build_user_recent_products(events, empty, Interval.for_day(DAY1)))["u1"]
    assert row["recent_product_ids"] == [f"P{i:03d}" for i in range(7, n)]
    assert row["recent_event_types"] == [("view", "add_to_cart", "purchase")[i % 3]
                                         for i in range(7, n)]
    assert row["n_events_total"] == n


def test_snapshot_timestamp_is_after_the_day_and_before_the_next() -> None:
    empty = USER_RECENT_SCHEMA.empty_table().to_pandas()
    interval = Interval.for_day(DAY2)
    events = _day2()
    table = build_user_recent_products(events, empty, interval)
    stamps = set(table.column("event_timestamp").to_pylist())
    assert len(stamps) == 1
    stamp = pd.Timestamp(stamps.pop())
    assert stamp == pd.Timestamp(interval.end) == _ts(DAY3, "00:00")
    assert stamp > events["ts"].max()  # the 23:59:59.999 event included


def test_snapshot_is_after_an_event_at_the_last_microsecond() -> None:
    last = pd.Timestamp(Interval.for_day(DAY1).end) - pd.Timedelta(microseconds=1)
    events = _events([("e1", "u1", "P1", "purchase", last)])
    empty = USER_RECENT_SCHEMA.empty_table().to_pandas()
    table = build_user_recent_products(events, empty, Interval.for_day(DAY1))
    assert pd.Timestamp(table.column("event_timestamp")[0].as_py()) > last


def test_product_catalog_is_sorted_and_timestamped_by_update() -> None:
    products = pd.DataFrame({
        "product_id": ["P2", "P1"],
        "title": ["Blue Mug", "Red Candle"],
        "category": ["mugs", "candles"],
        "brand": [None, "Lumo"],
        "price": [7, 3.5],
        "updated_at": pd.to_datetime(["2026-01-01 11:00", "2026-01-01 10:00"], utc=True),
    })
    rows = build_product_catalog(products).to_pylist()
    assert [r["product_id"] for r in rows] == ["P1", "P2"]
    assert [r["price"] for r in rows] == [3.5, 7.0]
    assert [r["brand"] for r in rows] == ["Lumo", None]
    assert [pd.Timestamp(r["event_timestamp"]) for r in rows] == [
        _ts(DAY1, "10:00"), _ts(DAY1, "11:00")]


# --- build_features: partitions on disk -------------------------------------------------


def _landing(root: Path) -> str:
    landing = str(root / "landing")
    products = pd.DataFrame({
        "product_id": [f"P{i}" for i in range(1, 8)],
        "title": [f"Product {i}" for i in range(1, 8)],
        "category": ["candles"] * 7,
        "price": [1.0 + i for i in range(7)],
        "updated_at": [_ts(DAY1, "06:00")] * 7,
    })
    write_partition(landing, "products", DAY1, products)
    write_partition(landing, "products", DAY2, products.iloc[:0])
    write_partition(landing, "events", DAY1, _day1())
    write_partition(landing, "events", DAY2, _day2())
    return landing


def _digests(offline: Path) -> dict[str, str]:
    return {str(p.relative_to(offline)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(offline.rglob("*")) if p.is_file()}


def test_build_features_writes_one_partition_per_table_and_day(tmp_path: Path) -> None:
    landing, offline = _landing(tmp_path), tmp_path / "features"
    out1 = build_features(landing, offline, DAY1)
    out2 = build_features(landing, offline, DAY2)
    assert (out1["users"], out1["products"]) == (2, 7)
    assert (out2["users"], out2["products"]) == (2, 0)
    assert sorted(_digests(offline)) == [
        f"{table}/date={day}/part-0.parquet"
        for table in ("product_catalog", "user_recent_products") for day in (DAY1, DAY2)
    ]
    day2 = _rows(pq.read_table(out2["user_recent_products"]))
    assert day2["u1"]["recent_product_ids"] == ["P1", "P2", "P2", "P6", "P7"]

    # The state before day 3: each user's latest snapshot, u2's from day 1.
    state = previous_user_state(offline, DAY3).set_index("user_id")
    assert sorted(state.index) == ["u1", "u2", "u3"]
    assert state.loc["u2", "event_timestamp"] == pd.Timestamp("2026-01-02 00:00",
                                                              tz="UTC")
    assert state.loc["u1", "n_events_total"] == 5
    # ... and before day 2 only day 1 counts.
    assert previous_user_state(offline, DAY2).set_index("user_id").loc["u1",
                                                                      "n_events_total"] == 3
    assert previous_user_state(offline, DAY1).empty


def test_rerun_gives_identical_bytes_and_no_duplicate_rows(tmp_path: Path) -> None:
    landing, offline = _landing(tmp_path), tmp_path / "features"
    build_features(landing, offline, DAY1)
    build_features(landing, offline, DAY2)
    first = _digests(offline)

    # Rerun day 2 (reads day 1's partition again) and then day 1 (after day 2 exists).
    build_features(landing, offline, DAY2)
    build_features(landing, offline, DAY1)
    assert _digests(offline) == first  # same files, same bytes, no leftovers (.tmp)

    whole = pq.ParquetDataset(str(offline / "user_recent_products")).read().to_pandas()
    assert len(whole) == 4  # u1, u2 on day 1; u1, u3 on day 2
    assert not whole.duplicated(["user_id", "event_timestamp"]).any()
    # Day 2's histories were not rolled forward twice.
    state = previous_user_state(offline, DAY3).set_index("user_id")
    assert state.loc["u1", "n_events_total"] == 5
    assert len(state.loc["u1", "recent_product_ids"]) == 5
