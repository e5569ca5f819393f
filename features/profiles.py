"""``user_profile`` rows rolled forward: each user's previous stored row plus one partition.

A stored profile row (``features.user_state``: the days with an event among the last
``KEPT_DAYS``, each day's counts and basket value, the categories touched and the last day of
each) is a sum over days. The row of a user who acts today is therefore their latest earlier
row (an index, ``features.latest_rows``, of the ``user_profile`` partitions: the rows of
today's users only) with the days that left the window dropped, plus what today's partition
adds (``stored_profiles`` of its events), summed per day and per category. A day's build
thus reads its own partition, not the month of events before it: the month's read grew
from 0.4 s on day 2 to 2.4 s from day 31 on at full size, and the month's events of today's
users then went through pandas again every day.

It gives the rows re-reading the month gives (``tests/unit/test_running.py`` compares the
partitions byte for byte) with two differences by design, both towards what was known at
the time: a category is the product's category when the event's day was built (a product
moved to another category later does not move the earlier days' touches), and a basket
without an event price is valued at the catalogue's price of that day; and a user whose
only events in today's partition are late (stamped the day before) gets a row today, where
re-reading the month would fold them into their next active day's row.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from features.latest_rows import LatestRows
from features.partitions import partitions
from features.user_state import (
    ACTIVE_DAYS,
    BASKET_BY_DAY,
    CATEGORY_DAYS,
    COUNTRY,
    DAILY_COLUMNS,
    KEPT_DAYS,
    LAST_PURCHASE_TS,
    RECENT_CATEGORIES,
    stored_profiles,
)

PROFILE_INDEX = "user_profile.sqlite"  # under the running folder: each user's latest row
_DAY_S = 86_400


def previous_profiles(offline_root: Path, day: dt.date, snapshot_root: Path,
                      schema: pa.Schema, users: Any) -> pa.Table:
    """Each of ``users``' latest ``user_profile`` row from partitions before ``day`` (users
    without one are left out), sorted by user_id."""
    parts = partitions(str(offline_root / "user_profile"), day, before=True)
    with LatestRows(snapshot_root / PROFILE_INDEX, schema, "user_id") as index:
        index.sync(parts)
        return index.rows(pd.unique(np.asarray(list(users), dtype=object)))


def _epoch_day(when: Any) -> int:
    return int(pd.Timestamp(when).value // (_DAY_S * 10**9))


def _long(table: pa.Table, users: pd.Index, columns: list[str], by: str) -> pd.DataFrame:
    """A row per list entry of ``columns`` (aligned lists of the same length as ``by``'s),
    with the entry's user position in ``users``."""
    lists = table[by].combine_chunks()
    parent = pc.list_parent_indices(lists).to_numpy()
    owner = users.get_indexer(table["user_id"].to_numpy(zero_copy_only=False))
    frame = {"user": owner[parent].astype(np.int64)}
    for name in columns:
        frame[name] = pc.list_flatten(table[name].combine_chunks()).to_numpy(
            zero_copy_only=False)
    return pd.DataFrame(frame)


def _lists(owner: np.ndarray, values: np.ndarray, n: int, kind: pa.DataType) -> pa.ListArray:
    """A list per user 0..n-1 of the ``values`` they own (``owner`` sorted)."""
    offsets = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=n))])
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                    pa.array(values, kind, from_pandas=True))


def roll_profiles(previous: pa.Table, events: pd.DataFrame, catalog: pd.DataFrame,
                  users: pd.DataFrame | None, user_ids: pd.Index, day_end: Any,
                  last_purchase: Any, schema: pa.Schema) -> pa.Table:
    """The stored ``user_profile`` rows of ``user_ids`` at ``day_end``.

    Args:
        previous: their latest earlier rows (``previous_profiles``; a user without one
            starts empty).
        events: the events of today's partition stamped before ``day_end`` (late ones
            included), at least those of ``user_ids``.
        catalog, users, last_purchase: as ``features.user_state.stored_profiles`` takes them.
        user_ids: (U,) sorted.
        day_end: the day's end (the rows' time).
        schema: the ``user_profile`` partition schema (its columns, the time last).

    Returns:
        (U,) rows in ``user_ids`` order, ``schema`` without its time column.
    """
    n = len(user_ids)
    names = [c for c in schema.names if c != "event_timestamp"]
    if not n:
        return pa.schema([schema.field(c) for c in names]).empty_table()
    fresh = pa.Table.from_pandas(
        stored_profiles(events, catalog, users, user_ids, day_end, last_purchase)
        .assign(user_id=user_ids.to_numpy(dtype=object)),
        schema=pa.schema([schema.field(c) for c in names]),
        preserve_index=False)
    first = _epoch_day(day_end) - KEPT_DAYS  # the oldest day a row keeps
    daily_columns = [ACTIVE_DAYS, *DAILY_COLUMNS.values(), BASKET_BY_DAY]
    daily = pd.concat([_long(t, user_ids, daily_columns, ACTIVE_DAYS)
                       for t in (previous, fresh)], ignore_index=True)
    daily = (daily[daily[ACTIVE_DAYS] >= first]
             .groupby(["user", ACTIVE_DAYS], sort=True).sum().reset_index())
    touched = pd.concat([_long(t, user_ids, [RECENT_CATEGORIES, CATEGORY_DAYS],
                               RECENT_CATEGORIES) for t in (previous, fresh)],
                        ignore_index=True)
    touched = (touched[touched[CATEGORY_DAYS] >= first]
               .groupby(["user", RECENT_CATEGORIES], sort=True)[CATEGORY_DAYS].max()
               .reset_index())
    owner, cat_owner = daily["user"].to_numpy(), touched["user"].to_numpy()
    arrays = {"user_id": pa.array(user_ids.to_numpy(dtype=object), pa.string())}
    for name in daily_columns:
        arrays[name] = _lists(owner, daily[name].to_numpy(), n, schema.field(name).type.value_type)
    for name in (RECENT_CATEGORIES, CATEGORY_DAYS):
        arrays[name] = _lists(cat_owner, touched[name].to_numpy(), n,
                              schema.field(name).type.value_type)
    arrays[LAST_PURCHASE_TS] = fresh[LAST_PURCHASE_TS]
    arrays[COUNTRY] = fresh[COUNTRY]
    return pa.table([arrays[c] for c in names],
                    schema=pa.schema([schema.field(c) for c in names]))
