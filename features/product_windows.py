"""``product_stats``' window counters: each day's views and purchases per product, summed.

``product_day_counts`` (not a Feast view) holds each day's views and purchases per product,
one partition per day, written by that day's feature build. A day's counters over 7 and 30
days are sums of the last 30 such partitions: a million rows at 100,000 products, read,
converted and summed every day. ``window_sums`` keeps the sums instead: the sums as of the
day before (a snapshot under ``<snapshot_root>/product_windows``, with the stamps of the
partitions it summed, ``features.partitions``), plus today's counts, minus the counts of
the days that leave each window (the partitions 7 and 30 days back). A partition rewritten
or removed since, a missing one, or no snapshot for the day before, and the sums are taken
from every partition of the month as before (the reference, ``reference_sums``); either way
the counters are the same integers (tested against each other).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features.contract import Interval
from features.partitions import partitions
from features.running import KEEP_SNAPSHOTS
from features.user_state import PROFILE_LOOKBACK_DAYS, WINDOWS_DAYS

log = logging.getLogger(__name__)

PRODUCT_STAT_EVENT_TYPES = ("view", "purchase")
# Days after a product's view or purchase on which its product_stats row changes: the event
# enters every window, then leaves the 7-day and the 30-day ones.
CHANGE_OFFSETS: tuple[int, ...] = (0, *WINDOWS_DAYS)
# Not a Feast view: each day's views and purchases per product, summed by later days' builds.
PRODUCT_DAY_COUNTS = "product_day_counts"
PRODUCT_DAY_COUNTS_SCHEMA = pa.schema([("product_id", pa.string()),
                                       *[(t, pa.int64()) for t in PRODUCT_STAT_EVENT_TYPES]])
_DAY = pd.Timedelta(days=1)


def product_count_columns() -> list[str]:
    """``product_stats``' counter columns: ``product_<event_type>_count_<w>d``."""
    return [f"product_{t}_count_{w}d" for w in WINDOWS_DAYS for t in PRODUCT_STAT_EVENT_TYPES]


def counts_file(offline_root: Path, day: dt.date) -> Path:
    return offline_root / PRODUCT_DAY_COUNTS / f"date={day.isoformat()}" / "part-0.parquet"


def product_day_counts(events: pa.Table, end: pd.Timestamp) -> pd.DataFrame:
    """Views and purchases per product and day, counted in Arrow.

    Args:
        events: contract events (Arrow) of days before ``end``.
        end: the end of the last day.

    Returns:
        Columns ``product_id``, ``days_ago`` (0: the day ending at ``end``) and one count per
        ``PRODUCT_STAT_EVENT_TYPES``, one row per product and day with any, sorted.
    """
    mine = events.filter(pc.and_(pc.is_valid(events["product_id"]),
                                 pc.is_in(events["event_type"],
                                          value_set=pa.array(PRODUCT_STAT_EVENT_TYPES))))
    last = np.datetime64((end - _DAY).tz_convert(None).floor("D").to_datetime64(), "D")
    days_ago = (last - mine["ts"].to_numpy().astype("datetime64[D]")).astype(np.int64)
    keyed = pa.table({"product_id": mine["product_id"], "days_ago": days_ago,
                      "event_type": mine["event_type"]})
    grouped = (keyed.group_by(["product_id", "days_ago", "event_type"])
               .aggregate([("product_id", "count")]).to_pandas())
    wide = grouped.pivot_table(index=["product_id", "days_ago"], columns="event_type",
                               values="product_id_count", aggfunc="sum", fill_value=0)
    wide = wide.reindex(columns=list(PRODUCT_STAT_EVENT_TYPES), fill_value=0)
    out = wide.reset_index().sort_values(["product_id", "days_ago"], kind="stable")
    out.columns.name = None
    return out.astype({t: "int64" for t in PRODUCT_STAT_EVENT_TYPES}).reset_index(drop=True)


def today_counts(today: pa.Table, day: dt.date) -> pd.DataFrame:
    """The day's ``product_day_counts`` (``days_ago`` 0) from its events partition; a late
    event counts on the day it landed (its own day's counts were written already)."""
    interval = Interval.for_day(day)
    start = pa.scalar(pd.Timestamp(interval.start).to_pydatetime(), type=today["ts"].type)
    clamped = today.set_column(today.schema.get_field_index("ts"), "ts",
                               pc.if_else(pc.less(today["ts"], start), start, today["ts"]))
    return product_day_counts(clamped, pd.Timestamp(interval.end))


def stored_day_counts(offline_root: Path, window: Callable[[], pa.Table],
                      counted_today: pd.DataFrame, day: dt.date) -> tuple[pd.DataFrame, bool]:
    """The month's ``product_day_counts`` (today's, and each earlier day's from the partition
    its build wrote, else counted from its events), in no particular order; and whether
    every day with counts has its partition (then a day without one counted nothing)."""
    end = pd.Timestamp(Interval.for_day(day).end)
    stored, missing = [], []
    for ago in range(1, PROFILE_LOOKBACK_DAYS):
        path = counts_file(offline_root, day - dt.timedelta(days=ago))
        if path.exists():
            part = pq.read_table(path, schema=PRODUCT_DAY_COUNTS_SCHEMA)
            stored.append(part.append_column("days_ago", pa.array(
                np.full(part.num_rows, ago, dtype=np.int64))))
        else:
            missing.append(ago)
    frames = [counted_today]
    if stored:
        frames.append(pa.concat_tables(stored).to_pandas())
    complete = True
    if missing:
        counted = product_day_counts(window(), end)  # read only when a day lacks its counts
        frames.append(counted[counted["days_ago"].isin(missing)])
        complete = not len(frames[-1])
    return pd.concat(frames, ignore_index=True)[counted_today.columns], complete


def sums_of(day_counts: pd.DataFrame, index: pd.Index | None = None) -> pd.DataFrame:
    """Views and purchases per product over each of ``WINDOWS_DAYS`` from
    ``product_day_counts`` rows, for the products of ``index`` (unique; missing = 0), or of
    every product with a count (sorted)."""
    if index is None:
        index = pd.Index(np.unique(day_counts["product_id"].to_numpy(dtype=object)),
                         name="product_id")
    at = index.get_indexer(day_counts["product_id"].to_numpy(dtype=object))  # (R,) -1: none
    mine = at >= 0
    at, ago = at[mine], day_counts["days_ago"].to_numpy()[mine]
    columns = {}
    for w in WINDOWS_DAYS:
        inside = ago < w
        for t in PRODUCT_STAT_EVENT_TYPES:
            counts = day_counts[t].to_numpy(dtype=np.float64)[mine][inside]
            columns[f"product_{t}_count_{w}d"] = np.bincount(
                at[inside], weights=counts, minlength=len(index)).astype(np.int64)
    return pd.DataFrame(columns, index=index)[product_count_columns()]


def changed_by_counts(day_counts: pd.DataFrame) -> set[str]:
    """Products with a view or purchase ``CHANGE_OFFSETS`` days back: their counters change
    (an event enters a window, or leaves the 7- or 30-day ones)."""
    return set(day_counts.loc[day_counts["days_ago"].isin(CHANGE_OFFSETS),
                              "product_id"].tolist())


def _stamps(offline_root: Path, first: dt.date, last: dt.date) -> dict[str, str]:
    """Each day's ``product_day_counts`` stamp from ``first`` to ``last`` ("" when absent)."""
    found = {p.day: p.stamp for p in partitions(str(offline_root / PRODUCT_DAY_COUNTS), last)
             if p.day >= first}
    days = (last - first).days + 1
    return {(first + dt.timedelta(days=i)).isoformat():
            found.get(first + dt.timedelta(days=i), "") for i in range(days)}


def _window(day: dt.date) -> tuple[dt.date, dt.date]:
    """The days whose counts the sums as of ``day`` hold (the 30-day window's)."""
    return day - dt.timedelta(days=max(WINDOWS_DAYS) - 1), day


def _folder(snapshot_root: Path) -> Path:
    return snapshot_root / "product_windows"


def _load(snapshot_root: Path, offline_root: Path, through: dt.date) -> pd.DataFrame | None:
    path = _folder(snapshot_root) / f"through={through.isoformat()}.parquet"
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException):
        return None
    consumed = json.loads((table.schema.metadata or {}).get(b"shoprec.consumed", b"{}"))
    if consumed != _stamps(offline_root, *_window(through)):
        log.info("product window sums through %s: a partition changed since", through)
        return None
    return table.to_pandas().set_index("product_id")


def store_sums(snapshot_root: Path, offline_root: Path, day: dt.date,
               sums: pd.DataFrame) -> None:
    """Keep the day's sums (after its ``product_day_counts`` partition is written), with
    the stamps of the partitions they hold."""
    folder = _folder(snapshot_root)
    folder.mkdir(parents=True, exist_ok=True)
    kept = sums[(sums.to_numpy() != 0).any(axis=1)]  # a product out of every window: no row
    table = pa.Table.from_pandas(kept.reset_index(), preserve_index=False)
    consumed = json.dumps(_stamps(offline_root, *_window(day)), sort_keys=True)
    table = table.replace_schema_metadata({b"shoprec.consumed": consumed.encode()})
    path = folder / f"through={day.isoformat()}.parquet"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    for old in sorted(folder.glob("through=*.parquet"), reverse=True)[KEEP_SNAPSHOTS:]:
        old.unlink(missing_ok=True)


def window_sums(offline_root: Path, day: dt.date, counted_today: pd.DataFrame,
                window: Callable[[], pa.Table],
                snapshot_root: Path | None) -> tuple[pd.DataFrame, set[str], bool]:
    """Every product's counters as of the day (``sums_of``' columns, products with any
    count, sorted), the products whose counters change that day (``changed_by_counts``),
    and whether the sums may be kept for the next day (``store_sums``, once the day's
    partition is written).

    From the sums as of the day before when a valid snapshot of them is kept, else from the
    month's partitions. A snapshot is only kept when every day it holds counts of has its
    partition, so a day without one, leaving a window, held nothing.
    """
    previous = None if snapshot_root is None else _load(
        snapshot_root, offline_root, day - dt.timedelta(days=1))
    if previous is None:
        day_counts, complete = stored_day_counts(offline_root, window, counted_today, day)
        return sums_of(day_counts), changed_by_counts(day_counts), complete
    rows = [counted_today]
    for w in WINDOWS_DAYS:  # the partitions whose counts leave a window today
        path = counts_file(offline_root, day - dt.timedelta(days=w))
        if path.exists():
            rows.append(pq.read_table(path, schema=PRODUCT_DAY_COUNTS_SCHEMA).to_pandas()
                        .assign(days_ago=w))
    delta = pd.concat(rows, ignore_index=True)
    index = previous.index.union(pd.Index(np.unique(delta["product_id"].to_numpy(dtype=object)),
                                          name="product_id"))
    sums = previous.reindex(index, fill_value=0) + sums_of(counted_today, index)
    for w in WINDOWS_DAYS:
        left = delta[delta["days_ago"] == w]
        at = index.get_indexer(left["product_id"].to_numpy(dtype=object))
        for t in PRODUCT_STAT_EVENT_TYPES:
            column = sums[f"product_{t}_count_{w}d"].to_numpy().copy()
            np.subtract.at(column, at, left[t].to_numpy(dtype=np.int64))
            sums[f"product_{t}_count_{w}d"] = column
    return sums.astype("int64"), changed_by_counts(delta), True
