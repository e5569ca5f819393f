"""Offline feature tables, built per data interval from the validated landing partition.

Tables (under ``Settings.offline_root``, one partition per day, replaced on rerun):

- ``user_recent_products``: for each user active that day, the last ``HISTORY_LEN``
  products they touched (oldest first) and the event types, as of the end of the day.
  ``event_timestamp`` is the interval end (exclusive), so every event of day D lies strictly
  before day D's snapshot: a point-in-time join for an event of day D sees the snapshot of
  day D-1 and never the event itself.
- ``product_catalog``: products added or changed that day.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from features.contract import Interval, parse_day, read_partition
from shoprec.settings import Settings

log = logging.getLogger(__name__)

HISTORY_LEN = 50
HISTORY_EVENT_TYPES = ("view", "add_to_cart", "purchase")

USER_RECENT_SCHEMA = pa.schema([
    ("user_id", pa.string()),
    ("recent_product_ids", pa.list_(pa.string())),
    ("recent_event_types", pa.list_(pa.string())),
    ("n_events_total", pa.int64()),
    ("event_timestamp", pa.timestamp("us", tz="UTC")),
])

PRODUCT_CATALOG_SCHEMA = pa.schema([
    ("product_id", pa.string()),
    ("title", pa.string()),
    ("category", pa.string()),
    ("brand", pa.string()),
    ("price", pa.float64()),
    ("event_timestamp", pa.timestamp("us", tz="UTC")),
])


def _partition_file(offline_root: Path, table: str, day: dt.date) -> Path:
    return offline_root / table / f"date={day.isoformat()}" / "part-0.parquet"


def _write(offline_root: Path, table: str, day: dt.date, table_data: pa.Table) -> str:
    target = _partition_file(offline_root, table, day)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    pq.write_table(table_data, tmp, compression="zstd")
    tmp.replace(target)  # atomic: a reader never sees half a partition
    return str(target)


def previous_user_state(offline_root: Path, day: dt.date) -> pd.DataFrame:
    """Each user's latest ``user_recent_products`` row from partitions before ``day``."""
    folder = offline_root / "user_recent_products"
    files = sorted(
        str(p) for p in folder.glob("date=*/part-0.parquet")
        if dt.date.fromisoformat(p.parent.name.removeprefix("date=")) < day
    )
    if not files:
        return USER_RECENT_SCHEMA.empty_table().to_pandas()
    data = pads.dataset(files, schema=USER_RECENT_SCHEMA, format="parquet").to_table()
    frame = data.to_pandas().sort_values(["user_id", "event_timestamp"], kind="stable")
    return frame.drop_duplicates("user_id", keep="last")


def build_user_recent_products(events: pd.DataFrame, previous: pd.DataFrame,
                               interval: Interval, history_len: int = HISTORY_LEN) -> pa.Table:
    """Roll each active user's history forward by one day of events.

    Args:
        events: the day's events (contract columns).
        previous: each user's latest snapshot before the day.
        interval: the day.
        history_len: products kept per user.

    Returns:
        One row per user with a product event that day.
    """
    touched = events[events["event_type"].isin(HISTORY_EVENT_TYPES) & events["product_id"].notna()]
    touched = touched.sort_values(["user_id", "ts", "event_id"], kind="stable")
    prev = previous.set_index("user_id") if len(previous) else None
    snapshot_ts = pd.Timestamp(interval.end)
    rows: dict[str, list[Any]] = {name: [] for name in USER_RECENT_SCHEMA.names}
    for user_id, group in touched.groupby("user_id", sort=True):
        products = list(group["product_id"])
        types = list(group["event_type"])
        total = len(group)
        if prev is not None and user_id in prev.index:
            before = prev.loc[user_id]
            products = list(before["recent_product_ids"]) + products
            types = list(before["recent_event_types"]) + types
            total += int(before["n_events_total"])
        rows["user_id"].append(user_id)
        rows["recent_product_ids"].append(products[-history_len:])
        rows["recent_event_types"].append(types[-history_len:])
        rows["n_events_total"].append(total)
        rows["event_timestamp"].append(snapshot_ts)
    return pa.Table.from_pydict(rows, schema=USER_RECENT_SCHEMA)


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


def build_features(landing_root: str, offline_root: Path, day: dt.date) -> dict[str, Any]:
    """Write the day's offline feature partitions, replacing any earlier run's.

    Depends on the ``user_recent_products`` partitions of earlier days, so intervals are
    built in date order (a backfill does that; a rerun of one day reads the same earlier
    partitions and writes the same bytes).

    Returns:
        Paths written and row counts, for XCom and logs.
    """
    interval = Interval.for_day(day)
    events = read_partition(landing_root, "events", day)
    products = read_partition(landing_root, "products", day)
    users = build_user_recent_products(events, previous_user_state(offline_root, day), interval)
    catalog = build_product_catalog(products)
    out = {
        "user_recent_products": _write(offline_root, "user_recent_products", day, users),
        "product_catalog": _write(offline_root, "product_catalog", day, catalog),
        "users": users.num_rows,
        "products": catalog.num_rows,
    }
    log.info("features for %s: %d user snapshots, %d products", day, users.num_rows,
             catalog.num_rows)
    return out


def build_interval(settings: Settings, day: str | dt.date) -> dict[str, Any]:
    """The pipeline's feature step for one interval (see ``build_features``)."""
    return build_features(settings.landing_root, settings.offline_root, parse_day(day))
