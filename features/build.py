"""Offline feature tables, built per data interval from the validated landing partitions.

Tables (under ``Settings.offline_root``, one partition per table and day, replaced atomically
on rerun). Every row built for day D is a snapshot timestamped at the interval end (the next
midnight, exclusive), so every event of day D lies strictly before day D's snapshot: a
point-in-time join for an event of day D sees the snapshots of day D-1 and never the event.

- ``user_recent_products``: for each user with a history event that day, the user's history
  (``features.user_state``: the last ``HISTORY_LEN`` product events, oldest first, with the
  event type and the time in epoch seconds of each) and the all-time count of history events.
  It rolls forward from each user's previous snapshot. An extra column ``last_purchase_ts``
  (not a Feast feature) carries the user's last purchase for ``user_profile``.
- ``user_profile``: for each user with an event that day, the stored profile of
  ``features.user_state`` (``STORED_PROFILE_COLUMNS``, ``stored_profiles``: the days with an
  event among the last 30 and each one's counts by event type and basket value, the
  categories touched then, the last purchase's time, the country), from which every reader
  computes the profile (counts over 7 and 30 days, days since the last purchase, distinct
  categories, mean basket value, country) at its own time.
- ``product_stats``: for each product whose row changes that day (its attributes changed,
  or a view or purchase enters or leaves a window), views and purchases
  over 7 and 30 days, the 30-day conversion rate, price, category, brand and when it was
  first seen (epoch seconds; a reader counts the days since at its own time).
  The windows are sums of ``product_day_counts`` (each day's views and purchases per
  product, not a Feast view), kept from day to day (``features.product_windows``).
- ``product_text``: the item tower's text of products added or changed that day.
- ``product_catalog``: products added or changed that day, timestamped when they changed.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from core.settings import Settings
from features.contract import (
    Interval,
    parse_day,
    product_text,
    read_partition,
    read_range_table,
)
from features.latest_rows import LatestRows
from features.partitions import Part, partitions
from features.phases import Phases
from features.product_windows import (
    PRODUCT_DAY_COUNTS,
    PRODUCT_DAY_COUNTS_SCHEMA,
    changed_by_counts,
    product_count_columns,
    product_day_counts,
    store_sums,
    sums_of,
    today_counts,
    window_sums,
)
from features.profiles import previous_profiles, roll_profiles
from features.running import running_catalog, running_users
from features.upgrade import upgrade_partitions
from features.user_state import (
    ACTIVE_DAYS,
    BASKET_BY_DAY,
    CATEGORY_DAYS,
    COUNTRY,
    DAILY_COLUMNS,
    HISTORY_LEN,
    LAST_PURCHASE_TS,
    PROFILE_LOOKBACK_DAYS,
    PURCHASED,
    RECENT_CATEGORIES,
    epoch_seconds,
    first_purchases,
    history_events,
    snapshot_users,
    stored_profiles,
)

log = logging.getLogger(__name__)

# product_stats stores when a product was first seen (epoch seconds), not the days since: a
# row that changed every day for every product would be rewritten and materialized daily.
FIRST_SEEN = "first_seen_epoch_s"

TS = pa.timestamp("us", tz="UTC")

USER_RECENT_SCHEMA = pa.schema([
    ("user_id", pa.string()),
    ("recent_product_ids", pa.list_(pa.string())),
    ("recent_event_types", pa.list_(pa.string())),
    ("recent_timestamps", pa.list_(pa.int64())),
    (PURCHASED, pa.list_(pa.string())),
    ("n_events_total", pa.int64()),
    ("last_purchase_ts", TS),
    ("event_timestamp", TS),
])


USER_PROFILE_SCHEMA = pa.schema([  # the key, user_state.STORED_PROFILE_COLUMNS, the time
    ("user_id", pa.string()),
    (ACTIVE_DAYS, pa.list_(pa.int64())),
    *[(c, pa.list_(pa.int64())) for c in DAILY_COLUMNS.values()],
    (BASKET_BY_DAY, pa.list_(pa.float64())),
    (RECENT_CATEGORIES, pa.list_(pa.string())),
    (CATEGORY_DAYS, pa.list_(pa.int64())),
    (LAST_PURCHASE_TS, pa.int64()),
    (COUNTRY, pa.string()),
    ("event_timestamp", TS),
])

PRODUCT_STATS_SCHEMA = pa.schema([
    ("product_id", pa.string()),
    *[(c, pa.int64()) for c in product_count_columns()],
    ("conversion_rate_30d", pa.float64()),
    ("price", pa.float64()),
    ("category", pa.string()),
    ("brand", pa.string()),
    (FIRST_SEEN, pa.int64()),
    ("event_timestamp", TS),
])

PRODUCT_TEXT_SCHEMA = pa.schema([
    ("product_id", pa.string()),
    ("text", pa.string()),
    ("event_timestamp", TS),
])

PRODUCT_CATALOG_SCHEMA = pa.schema([
    ("product_id", pa.string()),
    ("title", pa.string()),
    ("category", pa.string()),
    ("brand", pa.string()),
    ("price", pa.float64()),
    ("event_timestamp", TS),
])

TABLE_SCHEMAS: dict[str, pa.Schema] = {
    "user_recent_products": USER_RECENT_SCHEMA,
    "user_profile": USER_PROFILE_SCHEMA,
    "product_stats": PRODUCT_STATS_SCHEMA,
    "product_text": PRODUCT_TEXT_SCHEMA,
    "product_catalog": PRODUCT_CATALOG_SCHEMA,
}


# The events' columns the month before the day is read for (profiles, product day counts).
WINDOW_COLUMNS = ("user_id", "product_id", "event_type", "quantity", "price", "ts")


def _partition_file(offline_root: Path, table: str, day: dt.date) -> Path:
    return offline_root / table / f"date={day.isoformat()}" / "part-0.parquet"


def _write(offline_root: Path, table: str, day: dt.date, table_data: pa.Table) -> str:
    target = _partition_file(offline_root, table, day)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    # without pandas' schema metadata: the same rows give the same bytes however built
    pq.write_table(table_data.replace_schema_metadata(None), tmp, compression="zstd")
    tmp.replace(target)  # atomic: a reader never sees half a partition
    return str(target)


def _latest_user_rows(previous: pa.Table | None, rows: pa.Table) -> pa.Table:
    """Each user's latest row by ``event_timestamp`` (on a tie the later row), sorted by
    user_id; in Arrow, since the state holds every user who ever had a history."""
    frame = rows if previous is None else pa.concat_tables([previous, rows],
                                                           promote_options="permissive")
    frame = frame.append_column("_row", pa.array(np.arange(frame.num_rows), pa.int64()))
    frame = frame.take(pc.sort_indices(frame, sort_keys=[
        ("user_id", "ascending"), ("event_timestamp", "ascending"), ("_row", "ascending")]))
    user = frame["user_id"].to_numpy(zero_copy_only=False)  # (N,) sorted
    last = np.append(user[1:] != user[:-1], True) if len(user) else np.zeros(0, bool)
    return frame.filter(pa.array(last)).drop_columns(["_row"])


def _read_user_state(parts: Sequence[Part]) -> pa.Table:
    files = [f"{p.path}/part-0.parquet" for p in parts]
    if not files:
        return USER_RECENT_SCHEMA.empty_table()
    return pads.dataset(files, schema=USER_RECENT_SCHEMA, format="parquet").to_table()


def previous_user_state(offline_root: Path, day: dt.date, snapshot_root: Path | None = None,
                        users: Iterable[str] | None = None) -> pd.DataFrame:
    """``previous_state``'s rows as pandas."""
    return previous_state(offline_root, day, snapshot_root, users).to_pandas()


def previous_state(offline_root: Path, day: dt.date, snapshot_root: Path | None = None,
                   users: Iterable[str] | None = None) -> pa.Table:
    """Each user's latest ``user_recent_products`` row from partitions before ``day``.

    With ``snapshot_root``, from the index ``<snapshot_root>/user_state.sqlite``
    (``features.latest_rows``: brought up to date with the partitions, then only the rows
    asked for are read), so a day's cost follows the users it builds, not the shop's size
    or age; without, by folding every partition. Partitions written before
    ``recent_timestamps``/``last_purchase_ts`` existed read as null there;
    ``build_user_recent_products`` fills them.

    Args:
        users: only these users' rows, or None: every user's.

    Returns:
        One row per user, sorted by user_id (``USER_RECENT_SCHEMA``).
    """
    parts = partitions(str(offline_root / "user_recent_products"), day, before=True)
    if snapshot_root is None:
        state = _latest_user_rows(None, _read_user_state(parts))
        if users is not None:
            wanted = pa.array(pd.unique(np.asarray(list(users), dtype=object)), pa.string())
            state = state.filter(pc.is_in(state["user_id"], value_set=wanted))
        return state
    # the running snapshots of this fold before the index: rebuilt into it, never read again
    shutil.rmtree(snapshot_root / "user_state", ignore_errors=True)
    with LatestRows(snapshot_root / "user_state.sqlite", USER_RECENT_SCHEMA,
                    "user_id") as index:
        index.sync(parts)
        wanted = None if users is None else pd.unique(np.asarray(list(users), dtype=object))
        return index.rows(wanted)


def build_user_recent_products(events: pd.DataFrame, previous: pd.DataFrame | pa.Table,
                               interval: Interval, history_len: int = HISTORY_LEN) -> pa.Table:
    """Roll each active user's history forward by one day of events: the previous entries,
    then the day's history events (``features.user_state``), the last ``history_len``
    kept. In Arrow and numpy: no Python object per history entry.

    Args:
        events: the day's events (contract columns).
        previous: each user's latest snapshot before the day (``previous_state``;
            Arrow or pandas, ``USER_RECENT_SCHEMA``); other users' rows are ignored.
        interval: the day.
        history_len: entries kept per user.

    Returns:
        One row per user with a history event that day, sorted by user_id
        (``USER_RECENT_SCHEMA``).
    """
    touched = history_events(events)  # each user's oldest first
    active = pd.Index(touched["user_id"].unique()).sort_values()
    snapshot_ts = pd.Timestamp(interval.end)
    if active.empty:
        return USER_RECENT_SCHEMA.empty_table()
    prev = previous if isinstance(previous, pa.Table) else pa.Table.from_pandas(
        previous, schema=USER_RECENT_SCHEMA, preserve_index=False)
    prev = prev.filter(pc.is_in(prev["user_id"], value_set=pa.array(active.to_numpy(),
                                                                      pa.string())))
    ids = prev["recent_product_ids"].combine_chunks()
    sizes = pc.fill_null(pc.list_value_length(ids), 0).to_numpy().astype(np.int64)  # (P,)
    # Snapshots written before recent_timestamps existed: their entries take the snapshot's
    # time (whole seconds) instead.
    stamps = prev["recent_timestamps"].combine_chunks()
    timed = pc.fill_null(pc.list_value_length(stamps), -1).to_numpy() == sizes  # (P,)
    flat_stamps = np.repeat(pc.cast(prev["event_timestamp"], pa.int64()).to_numpy(
        zero_copy_only=False) // 10**6, sizes)  # (E,) TS is microseconds
    flat_stamps[np.repeat(timed, sizes)] = pc.list_flatten(
        stamps.filter(pa.array(timed))).to_numpy(zero_copy_only=False)
    prev_user = active.get_indexer(prev["user_id"].to_numpy(zero_copy_only=False))  # (P,)
    today_user = active.get_indexer(touched["user_id"].to_numpy(dtype=object))  # (T,)
    today_s = epoch_seconds(touched["ts"])  # (T,)
    # Every entry, previous ones first, each user's oldest first: a stable sort by user,
    # or by user and time (whole seconds) when an event landed late, before earlier entries.
    user = np.concatenate([np.repeat(prev_user, sizes), today_user])  # (E + T,)
    newest = np.full(len(active), np.iinfo(np.int64).min)  # (A,) each user's last entry
    newest[prev_user[sizes > 0]] = flat_stamps[np.cumsum(sizes)[sizes > 0] - 1]
    order = (np.lexsort((np.arange(len(user)), np.concatenate([flat_stamps, today_s]), user))
             if (today_s < newest[today_user]).any() else np.argsort(user, kind="stable"))
    counts = np.bincount(user, minlength=len(active))  # (A,) every active user has one
    ends = np.cumsum(counts)
    keep = ends[user[order]] - np.arange(len(order)) - 1 < history_len  # the last entries
    chosen = pa.array(order[keep])
    offsets = pa.array(np.concatenate([[0], np.cumsum(np.minimum(counts, history_len))])
                       .astype(np.int32))

    def entries(earlier: pa.Array, today: Any, kind: pa.DataType) -> pa.ListArray:
        values = pa.concat_arrays([earlier.cast(kind), pa.array(today, kind, from_pandas=True)])
        return pa.ListArray.from_arrays(offsets, values.take(chosen))

    prev_frame = pd.DataFrame({
        "user_id": prev["user_id"].to_numpy(zero_copy_only=False),
        "n_events_total": prev["n_events_total"].to_pandas(),
        "last_purchase_ts": prev["last_purchase_ts"].to_pandas()}).set_index("user_id")
    total = (touched.groupby("user_id").size().reindex(active)
             + prev_frame["n_events_total"].reindex(active).fillna(0).astype("int64"))
    buys = touched[touched["event_type"] == "purchase"].groupby("user_id")["ts"].max()
    # A purchase of the day is later than any earlier one.
    last_purchase = pd.to_datetime(buys.reindex(active), utc=True).fillna(
        pd.to_datetime(prev_frame["last_purchase_ts"].reindex(active), utc=True))
    return pa.Table.from_arrays([
        pa.array(active.to_numpy(), pa.string()),
        entries(pc.list_flatten(ids), touched["product_id"].to_numpy(), pa.string()),
        entries(pc.list_flatten(prev["recent_event_types"].combine_chunks()),
                touched["event_type"].to_numpy(), pa.string()),
        entries(pa.array(flat_stamps, pa.int64()), today_s, pa.int64()),
        _purchased(prev, prev_user, touched, today_user, len(active)),
        pa.array(total.to_numpy(dtype=np.int64), pa.int64()),
        pa.array(last_purchase, TS, from_pandas=True),
        pa.array([snapshot_ts] * len(active), TS),
    ], schema=USER_RECENT_SCHEMA)


def _purchased(prev: pa.Table, prev_user: np.ndarray, touched: pd.DataFrame,
               today_user: np.ndarray, n: int) -> pa.ListArray:
    """(n,) each active user's ``purchased_product_ids``: their previous list, then the
    day's purchases of products not in it (``features.user_state.first_purchases``). A
    previous row written before the list existed starts from its history's purchases."""
    lists = prev[PURCHASED].combine_chunks()
    rows = pc.list_parent_indices(lists).to_numpy()  # (E,) the previous row of each entry
    products = pc.list_flatten(lists).to_numpy(zero_copy_only=False)
    missing = np.flatnonzero(lists.is_null().to_numpy(zero_copy_only=False))
    if len(missing):  # the best known: the purchases among the row's recent entries
        ids = prev["recent_product_ids"].combine_chunks().take(pa.array(missing))
        types = prev["recent_event_types"].combine_chunks().take(pa.array(missing))
        bought = pc.equal(pc.list_flatten(types), "purchase").to_numpy(zero_copy_only=False)
        rows = np.concatenate([rows, missing[pc.list_parent_indices(ids).to_numpy()][bought]])
        products = np.concatenate([products, pc.list_flatten(ids).to_numpy(
            zero_copy_only=False)[bought]])
    bought = (touched["event_type"] == "purchase").to_numpy()
    user = np.concatenate([prev_user[rows], today_user[bought]]).astype(np.int64)
    product = np.concatenate([products, touched["product_id"].to_numpy(dtype=object)[bought]])
    order = np.argsort(user, kind="stable")  # each user's previous list, then the day's
    owner, kept = first_purchases(user[order], product[order].astype(object))
    offsets = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=n))])
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                    pa.array(kept, pa.string()))


def build_user_profile(window_events: pd.DataFrame, catalog: pd.DataFrame,
                       users: pd.DataFrame, state: pd.DataFrame,
                       interval: Interval, user_ids: pd.Index | None = None) -> pa.Table:
    """The day's ``user_profile`` rows: ``features.user_state.stored_profiles`` at the
    interval end, for the users with an event that day (``snapshot_users``).

    Args:
        window_events: events of the last ``PROFILE_LOOKBACK_DAYS`` days up to the interval
            end (contract columns).
        catalog: each product's latest row (``category``, ``price``).
        users: ``features.running.users_merge``'s row of (at least) each user with an
            event that day.
        state: each user's latest ``user_recent_products`` row as of the interval end
            (``last_purchase_ts``: purchases older than the lookback count too).
        interval: the day.
        user_ids: the users to build (sorted; default: ``snapshot_users``).

    Returns:
        One row per such user, sorted (``USER_PROFILE_SCHEMA``).
    """
    end = pd.Timestamp(interval.end)
    index = snapshot_users(window_events, end) if user_ids is None else user_ids
    if index.empty:
        return USER_PROFILE_SCHEMA.empty_table()
    mine = window_events[window_events["user_id"].isin(index)]
    last_buy = state.set_index("user_id")["last_purchase_ts"].reindex(index)
    out = stored_profiles(mine, catalog, users, index, end, last_buy)
    out.insert(0, "user_id", index.to_numpy(dtype=object))
    out["event_timestamp"] = end
    return pa.Table.from_pandas(out, schema=USER_PROFILE_SCHEMA, preserve_index=False)


def build_product_stats(window_events: pa.Table | pd.DataFrame | None, catalog: pd.DataFrame,
                        interval: Interval, changed: Sequence[str] | None = None, *,
                        sums: tuple[pd.DataFrame, set[str]] | None = None) -> pa.Table:
    """Windowed product features as of the interval end, of the products whose row changes
    that day (its attributes changed, or ``changed_by_counts``), or of every catalogue product (``changed`` None).

    Args:
        window_events: events of the last days up to the interval end (contract columns;
            Arrow, or pandas), or None with ``sums``.
        catalog: ``features.running.catalog_merge`` as of the interval end.
        interval: the day.
        changed: the products whose attributes changed or appeared that day (the day's
            products partition); None: every catalogue product.
        sums: the counters as of the day and the products whose counters change that day
            (``features.product_windows.window_sums``), instead of counting the events.

    Returns:
        One row per such product, sorted (``PRODUCT_STATS_SCHEMA``).
    """
    end = pd.Timestamp(interval.end)
    if sums is None:
        if isinstance(window_events, pd.DataFrame):
            window_events = pa.Table.from_pandas(
                window_events[["product_id", "event_type", "ts"]], preserve_index=False)
        day_counts = product_day_counts(window_events, end)
        sums = sums_of(day_counts), changed_by_counts(day_counts)
    counters, counted = sums
    index = pd.Index(catalog["product_id"], name="product_id").sort_values()
    if changed is not None:
        index = index[index.isin(counted | {str(p) for p in changed})]
    out = counters.reindex(index, fill_value=0).astype("int64")
    views, buys = out["product_view_count_30d"], out["product_purchase_count_30d"]
    out["conversion_rate_30d"] = np.where(views > 0, buys / views.where(views > 0, 1), 0.0)
    attrs = catalog.set_index("product_id").reindex(index)
    out["price"] = attrs["price"].astype(float)
    out["category"] = attrs["category"]
    out["brand"] = attrs["brand"]
    out[FIRST_SEEN] = epoch_seconds(attrs["first_seen"])
    out["event_timestamp"] = end
    return pa.Table.from_pandas(out.reset_index(), schema=PRODUCT_STATS_SCHEMA,
                                preserve_index=False)


def build_product_text(products: pd.DataFrame, interval: Interval) -> pa.Table:
    """Text rows of the day's new or changed products, timestamped at the interval end."""
    frame = products.sort_values(["product_id", "updated_at"], kind="stable")
    frame = frame.drop_duplicates("product_id", keep="last")
    return pa.Table.from_pydict({
        "product_id": list(frame["product_id"]),
        "text": product_text(frame),
        "event_timestamp": [pd.Timestamp(interval.end)] * len(frame),
    }, schema=PRODUCT_TEXT_SCHEMA)


def build_product_catalog(products: pd.DataFrame) -> pa.Table:
    """The day's new or changed products, timestamped when they changed."""
    frame = products.sort_values("product_id", kind="stable")
    return pa.Table.from_pydict({
        "product_id": list(frame["product_id"]),
        "title": list(frame["title"]),
        "category": list(frame["category"]),
        "brand": list(frame["brand"]),
        "price": list(frame["price"].astype(float)),
        "event_timestamp": list(frame["updated_at"]),
    }, schema=PRODUCT_CATALOG_SCHEMA)


def _rolled_profiles(offline_root: Path, day: dt.date, snapshot_root: Path, own: pa.Table,
                     wanted: pa.Array, catalog: pd.DataFrame, users: pd.DataFrame,
                     state: pd.DataFrame, snapshot: pd.Index) -> pa.Table:
    """``build_user_profile``'s rows from the users' previous rows (``features.profiles``)."""
    end = pd.Timestamp(Interval.for_day(day).end)  # the rows' time
    rows = roll_profiles(
        previous_profiles(offline_root, day, snapshot_root, USER_PROFILE_SCHEMA, snapshot),
        own.filter(pc.is_in(own["user_id"], value_set=wanted)).select(WINDOW_COLUMNS)
        .to_pandas(), catalog, users, snapshot, end,
        state.set_index("user_id")["last_purchase_ts"].reindex(snapshot), USER_PROFILE_SCHEMA)
    return rows.append_column("event_timestamp", pa.array([end] * rows.num_rows, TS))


def _state_after(previous: pa.Table, today: pa.Table) -> pd.DataFrame:
    """Each user's ``last_purchase_ts`` once the day's history rows are added."""
    columns = ["user_id", "last_purchase_ts"]
    frame = pa.concat_tables([previous.select(columns), today.select(columns)]).to_pandas()
    return frame.drop_duplicates("user_id", keep="last")


def _scalar(when: dt.datetime, like: pa.ChunkedArray) -> pa.Scalar:
    """A time as an Arrow scalar of a column's type, to compare the column with."""
    return pa.scalar(pd.Timestamp(when).to_pydatetime(), type=like.type)


def build_features(landing_root: str, offline_root: Path, day: dt.date,
                   snapshot_root: Path | None = None) -> dict[str, Any]:
    """Write the day's offline feature partitions, replacing any earlier run's.

    Depends on the partitions of earlier days, so intervals are built in date order (a
    backfill does that; a rerun of one day writes the same bytes). With ``snapshot_root``
    it reads the day's own events partition and, under that folder, a running catalogue
    and indexes of each user's latest row (``features.running``, ``features.latest_rows``,
    ``features.profiles``): the rows re-reading every partition and the month of events
    gives, at a cost that follows the day's users, not the shop's age; without, it reads
    them all (the reference the tests compare with).

    Returns:
        Paths written and row counts, for XCom and logs.
    """
    interval = Interval.for_day(day)
    phases = Phases()
    upgrade_partitions(offline_root, TABLE_SCHEMAS)  # once after an upgrade: a marker later
    with phases("read events"):
        # The day's partition: nothing after the day, maybe events stamped up to the allowed
        # lateness before it (they count: histories, profiles, product counts).
        own = read_range_table(landing_root, "events", [day])
        own = own.filter(pc.less(own["ts"], _scalar(interval.end, own["ts"])))
        events = own.to_pandas()
        snapshot = pd.Index(np.sort(events["user_id"].unique()), name="user_id")  # all changed
        wanted = pa.array(snapshot.to_numpy(dtype=object), pa.string())

        def window() -> pa.Table:  # the month before the day, and the day (Arrow)
            earlier = [day - dt.timedelta(days=i) for i in range(PROFILE_LOOKBACK_DAYS - 1, 0, -1)]
            return pa.concat_tables([read_range_table(landing_root, "events", earlier,
                                                      columns=WINDOW_COLUMNS),
                                     own.select(WINDOW_COLUMNS)])
    with phases("catalogue and users"):
        products_today = read_partition(landing_root, "products", day)
        catalog = running_catalog(landing_root, day, snapshot_root)
        users = running_users(landing_root, day, snapshot_root,  # today's users only
                              user_ids=snapshot.to_numpy(dtype=object))
    with phases("user state"):  # of the users whose rows are built today
        previous = previous_state(offline_root, day, snapshot_root,
                                  users=snapshot.to_numpy(dtype=object))
    tables: dict[str, pa.Table] = {}
    with phases("user_recent_products"):
        recent = tables["user_recent_products"] = build_user_recent_products(
            events, previous, interval)
    with phases("user_profile"):
        state = _state_after(previous, recent)
        if snapshot_root is None:  # from the month of events
            month = window()
            tables["user_profile"] = build_user_profile(
                month.filter(pc.is_in(month["user_id"], value_set=wanted)).to_pandas(),
                catalog, users, state, interval, user_ids=snapshot)
        else:  # each user's previous row, rolled forward by the day's partition
            tables["user_profile"] = _rolled_profiles(
                offline_root, day, snapshot_root, own, wanted, catalog, users, state, snapshot)
    with phases("product tables"):
        counted = today_counts(own, day)
        tables[PRODUCT_DAY_COUNTS] = pa.Table.from_pandas(
            counted.drop(columns="days_ago"), schema=PRODUCT_DAY_COUNTS_SCHEMA,
            preserve_index=False)
        counters, hit, keep = window_sums(offline_root, day, counted, window, snapshot_root)
        tables["product_stats"] = build_product_stats(None, catalog, interval,
                                                      changed=products_today["product_id"],
                                                      sums=(counters, hit))
        tables["product_text"] = build_product_text(products_today, interval)
        tables["product_catalog"] = build_product_catalog(products_today)
    with phases("write"):
        out: dict[str, Any] = {name: _write(offline_root, name, day, data)
                               for name, data in tables.items()}
        if snapshot_root is not None and keep:  # the next day starts from today's sums
            store_sums(snapshot_root, offline_root, day, counters)
    log.info("feature build phases for %s (s): %s", day, phases)
    out.update({
        "users": recent.num_rows,
        "products": tables["product_catalog"].num_rows,
        "user_profiles": tables["user_profile"].num_rows,
        "product_stats_rows": tables["product_stats"].num_rows,
        "product_texts": tables["product_text"].num_rows,
    })
    log.info("features for %s: %d user histories, %d user profiles, %d product stats, "
             "%d changed products", day, recent.num_rows, out["user_profiles"],
             out["product_stats_rows"], out["products"])
    return out


def build_interval(settings: Settings, day: str | dt.date) -> dict[str, Any]:
    """The pipeline's feature step for one interval (see ``build_features``)."""
    return build_features(settings.landing_root, settings.offline_root, parse_day(day),
                          settings.home / "running")
