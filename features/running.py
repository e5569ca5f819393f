"""Running snapshots: "each key's latest row so far" kept from day to day.

The catalogue as of a day (each product's latest row, with the day it was first seen) is a
fold over every partition since the shop opened. (The users, each one's last known country,
and each user's latest history row are such folds too, but ones that a day reads and
touches only a few rows of: ``features.latest_rows`` keeps them in indexes updated in place.) Re-read
every day, they cost in proportion to the shop's age (day 180 reads 180 partitions). Here
the fold's result is stored after each day (``<snapshot_root>/<name>/through=YYYY-MM-DD``)
together with what it consumed: each source partition's day and *stamp* (its files' names,
sizes and modification times). The next day starts from the newest snapshot whose consumed
partitions are still there, unchanged, as the first partitions of today's list, and folds in
only the partitions after them. A partition rewritten, removed (quarantined) or added before
the snapshot's end makes that snapshot unusable, and an older one (or the full re-read) is
used instead: the result is always exactly the full fold's (tested against it).

The fold itself is the caller's ``merge(previous, new_rows)``; it must be associative in
that sense: merging partition by partition gives the same rows as merging them all at once.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from features.contract import USERS, read_range, read_range_table
from features.latest_rows import LatestRows
from features.partitions import Part, partitions
from features.user_state import COUNTRY

log = logging.getLogger(__name__)

KEEP_SNAPSHOTS = 3


def _consumed(parts: Sequence[Part]) -> list[list[str]]:
    return [[p.day.isoformat(), p.stamp] for p in parts]


def _snapshots(folder: Path) -> list[Path]:
    """Stored snapshots, newest first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.glob("through=*") if (p / "manifest.json").is_file()),
                  reverse=True)


Frame = pd.DataFrame | pa.Table


def running_fold(
    name: str,
    snapshot_root: Path | None,
    parts: Sequence[Part],
    read: Callable[[Sequence[Part]], Frame],
    merge: Callable[[Frame | None, Frame], Frame],
    *,
    arrow: bool = False,
) -> Frame:
    """``merge(None, read(parts))``, computed from the newest usable snapshot.

    Args:
        name: the fold's name (its folder under ``snapshot_root``).
        snapshot_root: where snapshots live; None: no snapshots (the full fold).
        parts: today's source partitions, oldest first.
        read: reads some partitions into one frame (rows in partition order).
        merge: folds new rows into the previous result (None: nothing before).
        arrow: ``read`` and ``merge`` work on Arrow tables (a snapshot is loaded as one),
            else on pandas frames.

    Returns:
        The fold over every partition of ``parts``; stored as the snapshot through the
        last one.
    """
    if snapshot_root is None or not parts:
        return merge(None, read(parts))
    folder = snapshot_root / name
    wanted = _consumed(parts)
    base, done, used = None, 0, None
    for snapshot in _snapshots(folder):
        consumed = json.loads((snapshot / "manifest.json").read_text())["consumed"]
        if consumed == wanted[:len(consumed)]:
            base = pq.read_table(snapshot / "part-0.parquet")
            base = base if arrow else base.to_pandas()
            done, used = len(consumed), snapshot.name
            break
    rest = parts[done:]
    result = base if not rest else merge(base, read(rest))
    log.info("%s: %s + %d partition(s) of %d", name, used or "no snapshot", len(rest),
             len(parts))
    if rest:
        _store(folder, parts[-1].day, result, wanted)
    return result


def _store(folder: Path, through: dt.date, frame: Frame, consumed: list[list[str]]) -> None:
    """Write a snapshot atomically (a temporary folder renamed), keep the newest few."""
    target = folder / f"through={through.isoformat()}"
    tmp = folder / f".tmp-{through.isoformat()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    table = frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(
        frame, preserve_index=False)
    pq.write_table(table, tmp / "part-0.parquet")
    (tmp / "manifest.json").write_text(json.dumps({"consumed": consumed}))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    for old in _snapshots(folder)[KEEP_SNAPSHOTS:]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in folder.glob(".tmp-*"):  # left by a killed writer (one run at a time)
        shutil.rmtree(stale, ignore_errors=True)


# --- The catalogue --------------------------------------------------------------------------


def catalog_merge(previous: pd.DataFrame | None, rows: pd.DataFrame) -> pd.DataFrame:
    """Each product's latest row (by ``updated_at``; on a tie the later row) plus
    ``first_seen``, its earliest ``updated_at``; one row per product, sorted by product_id.

    Args:
        previous: an earlier result (None: none).
        rows: product rows of later partitions, in partition order.
    """
    if "first_seen" not in rows.columns:
        rows = rows.assign(first_seen=rows["updated_at"])
    frame = rows if previous is None else pd.concat([previous, rows], ignore_index=True)
    if frame.empty:
        return frame.reset_index(drop=True)
    ordered = frame.sort_values(["product_id", "updated_at"], kind="stable")
    latest = ordered.drop_duplicates("product_id", keep="last").set_index("product_id")
    latest["first_seen"] = ordered.groupby("product_id")["first_seen"].min()
    return latest.reset_index()


def running_catalog(landing_root: str, day: dt.date,
                    snapshot_root: Path | None = None) -> pd.DataFrame:
    """The catalogue as of the end of ``day`` with ``first_seen`` (``catalog_merge`` over
    every products partition so far), from the newest usable snapshot under
    ``snapshot_root`` plus the partitions after it."""
    parts = partitions(f"{landing_root.rstrip('/')}/products", day)
    return running_fold("catalog", snapshot_root, parts,
                        lambda some: read_range(landing_root, "products",
                                                [p.day for p in some]),
                        catalog_merge)


# --- The users ------------------------------------------------------------------------------


def users_merge(previous: pd.DataFrame | None, rows: pd.DataFrame) -> pd.DataFrame:
    """One row per user, sorted by user_id: the last row with a country, else the last row.

    ``features.user_state.latest_countries`` of it equals that of every row, and its ids
    are every user seen (what the feature build and the validation read of the users).
    """
    frame = rows if previous is None else pd.concat([previous, rows], ignore_index=True)
    if frame.empty:
        return frame.reset_index(drop=True)
    ordered = frame.assign(_known=frame[COUNTRY].notna()).sort_values("_known", kind="stable")
    latest = ordered.drop_duplicates("user_id", keep="last").drop(columns="_known")
    return latest.sort_values("user_id", kind="stable").reset_index(drop=True)


def running_users(landing_root: str, day: dt.date, snapshot_root: Path | None = None,
                  user_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """``users_merge`` over every users partition up to ``day``: all its rows, or those of
    ``user_ids`` (in user_id order; unknown ids left out).

    With ``snapshot_root``, from the index ``<snapshot_root>/users.sqlite``
    (``features.latest_rows``, where a row without a country does not replace one with a
    country: ``users_merge``'s rule), so that a day that asks for its own users reads
    those rows only, not a million; without, by folding every partition.
    """
    parts = partitions(f"{landing_root.rstrip('/')}/users", day)
    if snapshot_root is None:
        frame = users_merge(None, read_range(landing_root, "users", [p.day for p in parts]))
        if user_ids is not None:
            frame = frame[frame["user_id"].isin(set(user_ids))].reset_index(drop=True)
        return frame
    shutil.rmtree(snapshot_root / "users", ignore_errors=True)  # the snapshots before it
    with LatestRows(snapshot_root / "users.sqlite", USERS, "user_id",
                    read=lambda some: read_range_table(landing_root, "users",
                                                       [p.day for p in some]),
                    keep_set=COUNTRY) as index:
        index.sync(parts)
        return index.rows(user_ids).to_pandas()
