"""What the validation's drift checks need of an earlier day's events, kept per day.

The events suite compares a day with the days before it (``ValidationPolicy.history_days``):
their row counts (the volume band) and the category mix of their views and purchases (PSI).
Re-reading those partitions every day costs a week of events per validation (1.4 M rows at
200,000 events a day) for a few numbers per product. A day's *summary* holds exactly them:
the partition's row count and, per product, its view and purchase events. The category mix
is then mapped with today's catalogue, as when the events themselves are read, so the
figures are the same.

Summaries are cached under ``<snapshot_root>/event_summaries/date=YYYY-MM-DD.parquet``
with the stamp of the partition they summarise (``features.partitions``): a partition
rewritten, replaced or quarantined since makes its summary stale, and it is computed again.
Without a snapshot root, every summary is computed from its partition (the reference).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from features.contract import ContractError, read_partition
from features.partitions import partitions

log = logging.getLogger(__name__)

# The events counted in the category mix.
MIX_EVENT_TYPES = ("view", "purchase")
_STAMP, _ROWS = b"shoprec.stamp", b"shoprec.rows"
_SCHEMA = pa.schema([("product_id", pa.string()), ("events", pa.int64())])


@dataclass(frozen=True)
class DaySummary:
    """One day's events as the drift checks see them."""

    day: dt.date
    rows: int
    mix: pd.Series  # product_id -> view and purchase events of the product that day


def summarise(day: dt.date, events: pd.DataFrame) -> DaySummary:
    """A day's summary from its events (contract columns)."""
    seen = events.loc[events["event_type"].isin(MIX_EVENT_TYPES), "product_id"].dropna()
    mix = seen.astype(str).value_counts().sort_index().astype("int64")
    mix.index.name = "product_id"
    return DaySummary(day, len(events), mix)


def _cache_file(snapshot_root: Path, day: dt.date) -> Path:
    return snapshot_root / "event_summaries" / f"date={day.isoformat()}.parquet"


def _load(path: Path, day: dt.date, stamp: str) -> DaySummary | None:
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException):  # a torn write: compute it again
        return None
    meta = table.schema.metadata or {}
    if meta.get(_STAMP, b"").decode() != stamp:
        return None
    mix = pd.Series(table["events"].to_numpy(), index=pd.Index(
        table["product_id"].to_pylist(), name="product_id"), name="count")
    return DaySummary(day, int(meta[_ROWS]), mix)


def _store(path: Path, summary: DaySummary, stamp: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"product_id": pa.array(summary.mix.index.to_numpy(dtype=object),
                                             pa.string()),
                      "events": pa.array(summary.mix.to_numpy(), pa.int64())}, schema=_SCHEMA)
    table = table.replace_schema_metadata({_STAMP: stamp.encode(),
                                           _ROWS: str(summary.rows).encode()})
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def day_summaries(root: str, first: dt.date, day: dt.date,
                  snapshot_root: Path | None = None) -> list[DaySummary]:
    """Summaries of the events partitions from ``first`` up to the day before ``day``.

    A partition that cannot be read as the contract, or that has no rows, is left out (the
    drift checks count days with events). With ``snapshot_root``, a summary whose partition
    is unchanged since it was computed is read from its cache; others are computed and
    cached.
    """
    out: list[DaySummary] = []
    for part in partitions(f"{root.rstrip('/')}/events", day, before=True):
        if part.day < first:
            continue
        path = None if snapshot_root is None else _cache_file(snapshot_root, part.day)
        summary = None if path is None else _load(path, part.day, part.stamp)
        if summary is None:
            try:
                summary = summarise(part.day, read_partition(root, "events", part.day))
            except (ContractError, OSError, ValueError, pa.ArrowException) as exc:
                log.warning("events of %s left out of the drift history: %s", part.day, exc)
                continue
            if path is not None:
                _store(path, summary, part.stamp)
        if summary.rows:
            out.append(summary)
    return out


def category_mix(summaries: list[DaySummary], category: pd.Series) -> pd.Series:
    """Views and purchases per category over the days (products without a category in
    ``category``, product_id -> category, are left out)."""
    if not summaries:
        return pd.Series(dtype="int64")
    counts = pd.concat([s.mix for s in summaries])
    cats = category.reindex(counts.index)
    return counts.groupby(cats.to_numpy(), dropna=True).sum()
