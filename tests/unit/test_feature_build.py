"""Offline feature tables: rolling user histories, windowed user and product features,
item text, snapshot timestamps, idempotent reruns, and the Feast schemas that read them."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.build import (
    FIRST_SEEN,
    PRODUCT_DAY_COUNTS,
    PRODUCT_DAY_COUNTS_SCHEMA,
    TABLE_SCHEMAS,
    USER_RECENT_SCHEMA,
    build_features,
    build_product_catalog,
    build_product_stats,
    build_user_recent_products,
    previous_user_state,
)
from features.contract import Interval, product_text, read_range_table, write_partition
from features.running import running_catalog
from features.user_state import HISTORY_LEN, LAST_PURCHASE_TS, read_profiles

pytestmark = pytest.mark.fast

DAY1 = dt.date(2026, 1, 1)
DAY2 = dt.date(2026, 1, 2)
DAY3 = dt.date(2026, 1, 3)


def _ts(day: dt.date, clock: str) -> pd.Timestamp:
    return pd.Timestamp(f"{day.isoformat()} {clock}", tz="UTC")


def _epoch(day: dt.date, clock: str) -> int:
    return int(_ts(day, clock).timestamp())


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
    assert rows["u1"]["recent_timestamps"] == [_epoch(DAY1, c) for c in ("10:00", "11:00",
                                                                         "12:00")]
    assert rows["u1"]["n_events_total"] == 3
    assert rows["u1"]["last_purchase_ts"] == _ts(DAY1, "12:00")
    assert rows["u2"]["recent_product_ids"] == ["P3", "P4", "P5"]
    assert rows["u2"]["last_purchase_ts"] is None
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


def test_purchased_lists_keep_every_purchase_once_beyond_the_history() -> None:
    """``purchased_product_ids`` holds every product bought, in order of first purchase,
    even after the purchases left the history; a row written before the list existed
    starts from its history's purchases."""
    empty = USER_RECENT_SCHEMA.empty_table().to_pandas()
    day1 = build_user_recent_products(_day1(), empty, Interval.for_day(DAY1))
    assert _rows(day1)["u1"]["purchased_product_ids"] == ["P2"]
    day2 = _events([("b2", "u1", "P2", "purchase", _ts(DAY2, "09:00")),  # out of order
                    ("b1", "u1", "P7", "purchase", _ts(DAY2, "08:00")),
                    ("b3", "u1", "P8", "view", _ts(DAY2, "10:00"))])
    rows = _rows(build_user_recent_products(day2, day1, Interval.for_day(DAY2),
                                            history_len=2))
    assert rows["u1"]["recent_product_ids"] == ["P2", "P8"]  # P7's purchase left the history
    assert rows["u1"]["purchased_product_ids"] == ["P2", "P7"]
    old = day1.to_pandas()
    old["purchased_product_ids"] = None  # written before the column existed
    rows = _rows(build_user_recent_products(day2, pa.Table.from_pandas(
        old, schema=USER_RECENT_SCHEMA, preserve_index=False), Interval.for_day(DAY2)))
    assert rows["u1"]["purchased_product_ids"] == ["P2", "P7"]


def test_entries_of_a_snapshot_without_timestamps_take_the_snapshots_time() -> None:
    empty = USER_RECENT_SCHEMA.empty_table().to_pandas()
    day1 = build_user_recent_products(_day1(), empty, Interval.for_day(DAY1)).to_pandas()
    day1["recent_timestamps"] = None  # written before the column existed
    day1.loc[day1["user_id"] == "u1", "last_purchase_ts"] = pd.NaT
    rows = _rows(build_user_recent_products(_day2(), pa.Table.from_pandas(
        day1, schema=USER_RECENT_SCHEMA, preserve_index=False), Interval.for_day(DAY2)))
    snapshot = int(pd.Timestamp(Interval.for_day(DAY1).end).timestamp())
    assert rows["u1"]["recent_timestamps"][:3] == [snapshot] * 3
    assert rows["u1"]["recent_timestamps"][3:] == [_epoch(DAY2, "08:00"), _epoch(DAY2, "08:10")]
    assert rows["u1"]["last_purchase_ts"] is None


def test_history_is_truncated_to_the_most_recent_but_the_total_accumulates() -> None:
    empty = USER_RECENT_SCHEMA.empty_table().to_pandas()
    day1 = build_user_recent_products(_day1(), empty, Interval.for_day(DAY1), history_len=4)
    assert _rows(day1)["u1"]["recent_product_ids"] == ["P1", "P2", "P2"]
    rows = _rows(build_user_recent_products(_day2(), day1.to_pandas(), Interval.for_day(DAY2),
                                            history_len=4))
    # The oldest entry (P1 view) falls out; product, event type and time stay aligned.
    assert rows["u1"]["recent_product_ids"] == ["P2", "P2", "P6", "P7"]
    assert rows["u1"]["recent_event_types"] == ["add_to_cart", "purchase", "view", "add_to_cart"]
    assert rows["u1"]["recent_timestamps"] == [
        _epoch(DAY1, "11:00"), _epoch(DAY1, "12:00"), _epoch(DAY2, "08:00"),
        _epoch(DAY2, "08:10")]
    assert rows["u1"]["n_events_total"] == 5
    # No purchase on day 2: the day-1 purchase is still the last one.
    assert rows["u1"]["last_purchase_ts"] == _ts(DAY1, "12:00")


def test_default_history_len_keeps_the_last_history_len() -> None:
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
    assert row["recent_timestamps"] == [int((start + pd.Timedelta(minutes=i)).timestamp())
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
    """Every partition file's digest (not ``features.upgrade``'s schema markers)."""
    return {str(p.relative_to(offline)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(offline.rglob("*"))
            if p.is_file() and p.relative_to(offline).parts[0] != ".schemas"}


def test_build_features_writes_one_partition_per_table_and_day(tmp_path: Path) -> None:
    landing, offline = _landing(tmp_path), tmp_path / "features"
    out1 = build_features(landing, offline, DAY1)
    out2 = build_features(landing, offline, DAY2)
    assert (out1["users"], out1["products"]) == (2, 7)
    assert (out2["users"], out2["products"]) == (2, 0)
    written = {**TABLE_SCHEMAS, PRODUCT_DAY_COUNTS: PRODUCT_DAY_COUNTS_SCHEMA}
    assert sorted(_digests(offline)) == [
        f"{table}/date={day}/part-0.parquet"
        for table in sorted(written) for day in (DAY1, DAY2)
    ]
    for table, schema in written.items():
        assert pq.read_schema(out1[table]).remove_metadata() == schema, table
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


# --- windowed features: user_profile and product_stats over a month ---------------------

def _day(n: int) -> dt.date:
    """Day ``n`` of the month-long history (day 1 = DAY1)."""
    return DAY1 + dt.timedelta(days=n - 1)


def _month_landing(root: Path) -> str:
    """A month of history, landing-zone shaped.

    u1 buys twice on day 1 (basket 2*3.0 + 1*4.0 = 10.0) and once on day 5 (no event price:
    the catalogue's 6.0); u2 only searches on day 1; u3 views P2 twice on day 5. P1's price
    changes on day 3; P4 arrives on day 5. u1 moves from FR to DE on day 5.
    """
    landing = str(root / "landing")
    rows = [  # event_id, user, product, type, quantity, price, ts
        ("a1", "u1", "P1", "purchase", 2, 3.0, _ts(_day(1), "10:00")),
        ("a2", "u1", "P2", "purchase", 1, 4.0, _ts(_day(1), "11:00")),
        ("a3", "u1", "P3", "view", 1, 5.0, _ts(_day(1), "12:00")),
        ("a4", "u2", None, "search", 1, None, _ts(_day(1), "13:00")),
        ("b1", "u1", "P1", "purchase", 1, None, _ts(_day(5), "09:00")),
        ("b2", "u1", "P2", "add_to_cart", 1, 4.0, _ts(_day(5), "10:00")),
        ("b3", "u3", "P2", "view", 1, 4.0, _ts(_day(5), "11:00")),
        ("b4", "u3", "P2", "view", 1, 4.0, _ts(_day(5), "11:05")),
    ]
    events = pd.DataFrame({
        "event_id": [r[0] for r in rows], "user_id": [r[1] for r in rows],
        "product_id": [r[2] for r in rows], "event_type": [r[3] for r in rows],
        "query": ["candle" if r[3] == "search" else None for r in rows],
        "quantity": [r[4] for r in rows], "price": [r[5] for r in rows],
        "ts": pd.to_datetime([r[6] for r in rows], utc=True),
    })
    for n in (1, 5):
        write_partition(landing, "events", _day(n),
                        events[events["ts"].dt.date == _day(n)].reset_index(drop=True))
    catalog = pd.DataFrame({
        "product_id": ["P1", "P2", "P3"], "title": ["Candle", "Mug", "Lamp"],
        "category": ["candles", "mugs", "candles"], "brand": ["Lumo", None, "Lumo"],
        "price": [5.0, 4.0, 20.0], "updated_at": [_ts(_day(1), "06:00")] * 3,
    })
    write_partition(landing, "products", _day(1), catalog)
    write_partition(landing, "products", _day(3), catalog.iloc[[0]].assign(
        price=6.0, updated_at=_ts(_day(3), "08:00")))
    write_partition(landing, "products", _day(5), pd.DataFrame({
        "product_id": ["P4"], "title": ["Clock"], "category": ["clocks"], "brand": ["Tick"],
        "price": [30.0], "updated_at": [_ts(_day(5), "06:00")]}))
    write_partition(landing, "users", _day(1), pd.DataFrame({
        "user_id": ["u1", "u2", "u3"], "country": ["FR", None, "GB"]}))
    write_partition(landing, "users", _day(5), pd.DataFrame({
        "user_id": ["u1", "u3"], "country": ["DE", None]}))  # u3's null keeps GB
    return landing


@pytest.fixture(scope="module")
def month(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, dict[str, dict]]]:
    """day -> table -> key -> row, for the built days of ``_month_landing``."""
    root = tmp_path_factory.mktemp("month")
    landing, offline = _month_landing(root), root / "features"
    built: dict[int, dict[str, dict[str, dict]]] = {}
    latest: dict[str, dict] = {}  # user -> their latest stored user_profile row
    for n in (1, 3, 5, 8, 12, 30, 31, 32):  # days without events need no earlier build
        out = build_features(landing, offline, _day(n))
        built[n] = {}
        for table in ("user_profile", "product_stats", "product_text"):
            key = "user_id" if table == "user_profile" else "product_id"
            built[n][table] = {r[key]: r for r in pq.read_table(out[table]).to_pylist()}
        # What a reader sees at the end of day n: each user's latest row, read then.
        rows = built[n]["stored_profile"] = built[n].pop("user_profile")
        latest.update(rows)
        read = read_profiles(pd.DataFrame(list(latest.values())),
                             Interval.for_day(_day(n)).end)
        built[n]["user_profile"] = {r["user_id"]: r for r in read.to_dict("records")}
    return built


def _counts(row: dict, window: int) -> dict[str, int]:
    return {t: row[f"{t}_count_{window}d"] for t in ("view", "add_to_cart", "purchase",
                                                      "search")}


def test_user_counts_per_window_as_of_the_interval_end(month: dict) -> None:
    day1 = month[1]["user_profile"]
    assert sorted(day1) == ["u1", "u2"]  # u3 has no event yet
    assert _counts(day1["u1"], 7) == _counts(day1["u1"], 30) == {
        "view": 1, "add_to_cart": 0, "purchase": 2, "search": 0}
    assert _counts(day1["u2"], 7) == {"view": 0, "add_to_cart": 0, "purchase": 0, "search": 1}
    day5 = month[5]["user_profile"]
    assert _counts(day5["u1"], 7) == {"view": 1, "add_to_cart": 1, "purchase": 3, "search": 0}
    assert _counts(day5["u3"], 30) == {"view": 2, "add_to_cart": 0, "purchase": 0, "search": 0}
    assert {r["event_timestamp"] for r in month[5]["stored_profile"].values()} == {
        pd.Timestamp(Interval.for_day(_day(5)).end)}


def test_seven_day_counts_decay_when_the_user_stops(month: dict) -> None:
    # Day 8's 7-day window is days 2..8: day 1 has left it, day 5 has not.
    u1 = month[8]["user_profile"]["u1"]
    assert _counts(u1, 7) == {"view": 0, "add_to_cart": 1, "purchase": 1, "search": 0}
    assert _counts(u1, 30) == {"view": 1, "add_to_cart": 1, "purchase": 3, "search": 0}
    assert _counts(month[8]["user_profile"]["u2"], 7)["search"] == 0
    assert _counts(month[8]["user_profile"]["u2"], 30)["search"] == 1
    assert _counts(month[12]["user_profile"]["u1"], 7) == dict.fromkeys(
        ("view", "add_to_cart", "purchase", "search"), 0)


def test_rows_only_on_the_days_a_user_acts(month: dict) -> None:
    assert {n: sorted(month[n]["stored_profile"]) for n in month} == {
        1: ["u1", "u2"], 3: [], 5: ["u1", "u3"], 8: [], 12: [], 30: [], 31: [], 32: []}
    row = month[5]["stored_profile"]["u1"]  # days 1 and 5, as the reader's windows need
    first, fifth = (_day(n) - dt.date(1970, 1, 1) for n in (1, 5))
    assert row["active_days"] == [first.days, fifth.days]
    assert (row["view_by_day"], row["purchase_by_day"], row["add_to_cart_by_day"]) == (
        [1, 0], [2, 1], [0, 1])
    assert row["basket_value_by_day"] == [10.0, 6.0]
    assert (row["recent_categories"], row["recent_category_days"]) == (
        ["candles", "mugs"], [fifth.days, fifth.days])


def test_a_lapsed_user_reads_all_zero_once_the_month_has_passed(month: dict) -> None:
    # u2's only event is on day 1: inside the 30-day window through day 30.
    assert _counts(month[30]["user_profile"]["u2"], 30)["search"] == 1
    last = month[31]["user_profile"]["u2"]  # the window has moved past day 1
    assert _counts(last, 30) == _counts(last, 7) == dict.fromkeys(
        ("view", "add_to_cart", "purchase", "search"), 0)


def test_days_since_last_purchase(month: dict) -> None:
    assert month[1]["user_profile"]["u1"]["days_since_last_purchase"] == 0
    assert month[3]["user_profile"]["u1"]["days_since_last_purchase"] == 2
    assert month[5]["user_profile"]["u1"]["days_since_last_purchase"] == 0
    # Last purchase day 5 09:00, read at day 9 00:00: 3 whole days.
    assert month[8]["user_profile"]["u1"]["days_since_last_purchase"] == 3
    assert month[32]["user_profile"]["u1"]["days_since_last_purchase"] == 27
    assert month[1]["user_profile"]["u2"]["days_since_last_purchase"] == -1  # never
    assert month[5]["user_profile"]["u3"]["days_since_last_purchase"] == -1
    assert month[1]["stored_profile"]["u2"][LAST_PURCHASE_TS] == -1  # stored: a time


def test_categories_baskets_and_country(month: dict) -> None:
    day1, day5 = month[1]["user_profile"], month[5]["user_profile"]
    assert day1["u1"]["distinct_categories_30d"] == 2  # candles (P1, P3), mugs (P2)
    assert day1["u2"]["distinct_categories_30d"] == 0  # searches touch no product
    assert day1["u1"]["mean_basket_value_30d"] == 10.0  # 2 * 3.0 + 1 * 4.0
    assert day5["u1"]["mean_basket_value_30d"] == 8.0  # (10.0 + 1 * 6.0) / 2 baskets
    assert day1["u2"]["mean_basket_value_30d"] == 0.0
    assert month[31]["user_profile"]["u1"]["mean_basket_value_30d"] == 6.0  # day 1 left
    assert day1["u1"]["country"] == "FR"
    assert day5["u1"]["country"] == "DE"  # latest known
    assert day5["u3"]["country"] == "GB"  # a later null does not erase it
    assert day1["u2"]["country"] is None


def test_product_stats_only_on_the_days_a_row_changes(month: dict) -> None:
    # Attribute changes (P1, P2, P3 on day 1, P1 on day 3, P4 on day 5) and views or
    # purchases entering a window (days 1 and 5) or leaving one (+7, +30 days).
    assert {n: sorted(month[n]["product_stats"]) for n in month} == {
        1: ["P1", "P2", "P3"], 3: ["P1"], 5: ["P1", "P2", "P4"], 8: ["P1", "P2", "P3"],
        12: ["P1", "P2"], 30: [], 31: ["P1", "P2", "P3"], 32: []}
    p1 = month[1]["product_stats"]["P1"]
    assert (p1["product_view_count_7d"], p1["product_purchase_count_7d"]) == (0, 1)
    assert p1["conversion_rate_30d"] == 0.0  # no views
    assert p1["price"] == 5.0 and p1["category"] == "candles" and p1["brand"] == "Lumo"
    first_seen = int(pd.Timestamp(_ts(_day(1), "06:00")).timestamp())
    assert p1[FIRST_SEEN] == first_seen  # stored as a time: the row need not change daily
    assert month[3]["product_stats"]["P1"]["price"] == 6.0  # changed on day 3
    assert month[3]["product_stats"]["P1"][FIRST_SEEN] == first_seen
    p2 = month[5]["product_stats"]["P2"]
    assert (p2["product_view_count_7d"], p2["product_purchase_count_30d"]) == (2, 1)
    assert p2["conversion_rate_30d"] == 0.5
    assert p2["brand"] is None
    assert month[5]["product_stats"]["P4"][FIRST_SEEN] == int(
        pd.Timestamp(_ts(_day(5), "06:00")).timestamp())
    p2 = month[12]["product_stats"]["P2"]  # day 12: 7-day counts gone, 30-day kept
    assert (p2["product_view_count_7d"], p2["product_view_count_30d"]) == (0, 2)
    # ... and that row holds until day 5 leaves the 30-day window on day 35


def test_product_stats_of_every_product_are_the_change_days_rows(month: dict,
                                                                   tmp_path: Path) -> None:
    """Built for the whole catalogue, any day's stats are the latest change-day rows."""
    landing = _month_landing(tmp_path)
    for n in (4, 9, 32):
        day = _day(n)
        catalog = running_catalog(landing, day)
        window = read_range_table(landing, "events", [day - dt.timedelta(days=i)
                                                      for i in range(31)])
        whole = build_product_stats(window, catalog, Interval.for_day(day)).to_pylist()
        for row in whole:
            latest = max((m for m in month if m <= n and row["product_id"] in
                          month[m]["product_stats"]), default=None)
            assert latest is not None, (n, row["product_id"])
            kept = month[latest]["product_stats"][row["product_id"]]
            assert {k: v for k, v in kept.items() if k != "event_timestamp"} == {
                k: v for k, v in row.items() if k != "event_timestamp"}, (n, latest)


def test_day_counts_are_read_from_earlier_builds_and_counted_where_missing(
        tmp_path: Path) -> None:
    """product_stats summed from the earlier days' product_day_counts partitions are the
    counts of the window's events; a day without a partition is counted from its events."""
    landing = _month_landing(tmp_path)
    offline = tmp_path / "features"
    for n in (1, 3):
        build_features(landing, offline, _day(n))
    (offline / PRODUCT_DAY_COUNTS / f"date={_day(3)}" / "part-0.parquet").unlink()
    for n in (5, 8):  # day 5 reads day 1's partition, and counts days 2..4 from events
        out = build_features(landing, offline, _day(n))
        day = _day(n)
        window = read_range_table(landing, "events", [day - dt.timedelta(days=i)
                                                      for i in range(31)])
        every = build_product_stats(window, running_catalog(landing, day),
                                    Interval.for_day(day)).to_pylist()
        every = {r["product_id"]: r for r in every}
        for row in pq.read_table(out["product_stats"]).to_pylist():
            assert row == every[row["product_id"]], (n, row["product_id"])
    views = pq.read_table(out[PRODUCT_DAY_COUNTS]).to_pylist()  # day 8: nothing happened
    assert views == []
    day5 = pq.read_table(offline / PRODUCT_DAY_COUNTS / f"date={_day(5)}" / "part-0.parquet")
    assert day5.to_pylist() == [{"product_id": "P1", "view": 0, "purchase": 1},
                                {"product_id": "P2", "view": 2, "purchase": 0}]


def test_product_text_rows_are_the_days_changes(month: dict) -> None:
    assert month[1]["product_text"] == {
        "P1": {"product_id": "P1", "text": "Candle | candles | Lumo",
               "event_timestamp": pd.Timestamp(Interval.for_day(_day(1)).end)},
        "P2": {"product_id": "P2", "text": "Mug | mugs",
               "event_timestamp": pd.Timestamp(Interval.for_day(_day(1)).end)},
        "P3": {"product_id": "P3", "text": "Lamp | candles | Lumo",
               "event_timestamp": pd.Timestamp(Interval.for_day(_day(1)).end)},
    }
    assert sorted(month[3]["product_text"]) == ["P1"]  # the price change
    assert month[8]["product_text"] == {}


@pytest.mark.parametrize(
    "catalog",
    [
        pd.DataFrame({"title": ["Mug", " Mug ", "Mug", "", None],
                      "category": ["Kitchen", "", "Kitchen", "Kitchen", "Garden"],
                      "brand": ["Acme", "Acme", None, "  ", "Hoe & Co"],
                      "description": ["Blue", float("nan"), "  ", "Big | bold", None]}),
        pd.DataFrame({"title": ["Mug", "Hose"], "category": ["Kitchen", "Garden"]}),
        pd.DataFrame({"title": pd.Series([], dtype=object)}),
    ],
)
def test_product_text_is_the_item_towers_rule(catalog: pd.DataFrame) -> None:
    pytest.importorskip("torch")
    import numpy as np

    from training.embeddings import ItemFeatures

    rows = catalog.assign(product_id=[str(i) for i in range(len(catalog))], price=0.0)
    tower = ItemFeatures.from_catalog(rows, np.zeros((len(rows), 1), np.float32))
    assert product_text(catalog) == tower.texts
    if len(catalog) == 5:
        assert product_text(catalog)[:2] == ["Mug | Kitchen | Acme | Blue", "Mug | Acme"]


def test_feast_views_declare_the_built_columns(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from feast import FeatureView
    from feast.types import from_value_type

    from features.store import MATERIALIZED_VIEWS, _declarations

    monkeypatch.setenv("SHOPREC_OFFLINE_ROOT", str(tmp_path))
    views = {o.name: o for o in _declarations() if isinstance(o, FeatureView)}
    # user_vectors is written online only (serving.user_vectors), never built offline
    assert views.pop("user_vectors").tags["written_by"] == "serving.user_vectors"
    assert set(MATERIALIZED_VIEWS) == set(views) == set(TABLE_SCHEMAS)
    arrow_to_feast = {"string": "String", "int64": "Int64", "double": "Float64",
                      "list<item: string>": "Array(String)", "list<item: int64>": "Array(Int64)",
                      "list<item: double>": "Array(Float64)"}
    for name, view in views.items():
        schema = TABLE_SCHEMAS[name]
        key = view.entity_columns[0].name
        built = {f.name: arrow_to_feast[str(f.type)] for f in schema
                 if f.name not in (key, "event_timestamp", "last_purchase_ts")}
        declared = {f.name: str(from_value_type(f.dtype.to_value_type())) for f in view.features}
        assert declared == built, name
        assert view.batch_source.path.startswith(str(tmp_path / name))
