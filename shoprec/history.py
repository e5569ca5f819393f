"""Loading a long history fast: the daily DAG's data tasks for many days, without Airflow.

A shop that adopts shoprec arrives with months of history, and a backfill through Airflow
runs every task of every day: a scheduler round trip per task and one materialization per
day, most of whose rows the next day replaces. ``load_history`` runs the same functions the
DAG's data tasks call, in date order in this process: the validation (``check_partition``:
a bad day is quarantined and stops the load, as it stops a run), the feature build
(``build_interval``) of every day, then a materialization of those days in chunks of
``MATERIALIZE_CHUNK_DAYS`` (``materialize_interval`` with ``since``), oldest first, which
puts each entity's newest row online. The
landing and offline partitions are those that daily runs write, and the online store holds
what it holds after them (tested against one run per day); only the metadata DB has no
DagRuns for those days.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Any

from tqdm.auto import tqdm

from core.settings import Settings

log = logging.getLogger(__name__)

# Days materialized at once: each entity's newest row of those days goes online; a long
# history in one go would hold every row of it in memory.
MATERIALIZE_CHUNK_DAYS = 14


def load_history(settings: Settings, first: dt.date, last: dt.date, *, validate: bool = True,
                 online: bool = True, on_day: Callable[[dt.date, dict[str, float]], None] | None = None
                 ) -> dict[str, Any]:
    """Validate and build every day from ``first`` through ``last``, then materialize once.

    Args:
        settings: the profile's settings (landing zone, offline store, Feast repo).
        first: the first day to load.
        last: the last day to load (inclusive).
        validate: run each day's validation first (the DAG always does). Without it the
            partitions must already be known to be valid (e.g. a generated shop).
        online: materialize the days into the online store (without it only the offline
            partitions and the indexes are loaded: enough to train and evaluate, not to
            serve those days' users).
        on_day: called after each day with its seconds per step (for progress reports).

    Returns:
        Days loaded, seconds per step in total, and the materialization's result.

    Raises:
        features.validation.PartitionInvalid: a day failed validation (it is quarantined
            with its report; the days before it are built, nothing is materialized).
    """
    from features.build import build_interval
    from features.store import apply_repo, materialize_interval
    from features.validation import check_partition

    if last < first:
        raise ValueError(f"last day {last} is before the first {first}")
    days = [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]
    totals = {**({"validate": 0.0} if validate else {}), "build_features": 0.0}
    for day in tqdm(days, desc="history", unit="day"):
        seconds = {}
        if validate:
            t0 = time.perf_counter()
            check_partition(settings, day)
            seconds["validate"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        build_interval(settings, day)
        seconds["build_features"] = time.perf_counter() - t0
        for step, s in seconds.items():
            totals[step] += s
        if on_day is not None:
            on_day(day, seconds)
    if not online:
        log.info("history %s .. %s built (offline only): %d days, %s", first, last, len(days),
                 {k: round(v, 1) for k, v in totals.items()})
        return {"days": len(days), "seconds": totals, "materialized": None}
    t0 = time.perf_counter()
    apply_repo(settings)
    chunks = [materialize_interval(settings, days[at:at + MATERIALIZE_CHUNK_DAYS][-1],
                                   since=days[at])
              for at in range(0, len(days), MATERIALIZE_CHUNK_DAYS)]  # oldest first
    rows: dict[str, int] = {}
    for chunk in chunks:
        for view, n in chunk.get("rows", {}).items():
            rows[view] = rows.get(view, 0) + n
    materialized = {**chunks[-1], "start": chunks[0]["start"], "rows": rows,
                    "chunks": len(chunks)}
    totals["materialize"] = time.perf_counter() - t0
    log.info("history %s .. %s loaded: %d days, %s", first, last, len(days),
             {k: round(v, 1) for k, v in totals.items()})
    return {"days": len(days), "seconds": totals, "materialized": materialized}


def embed_catalog(settings: Settings, day: str | dt.date, *,
                  progress: bool = False) -> dict[str, Any]:
    """Fill the text-embedding cache with the catalogue as of ``day``'s end.

    Training reads every product's frozen text vector from this cache (keyed by content
    hash: a product whose text did not change is never encoded again). A shop trained daily
    finds yesterday's catalogue there already; after a bulk history load, or a long stretch
    of data-only days, this encodes the backlog once so the next trained day encodes only
    that day's new or changed texts.

    Returns:
        {"day", "products", "encoded"} (``encoded``: texts that were not in the cache).
    """
    from features.contract import parse_day, product_text
    from features.running import running_catalog
    from shoprec.pipeline import train_config
    from training.text_cache import fill_text_cache

    day = parse_day(day)
    config = train_config(settings)
    catalog = running_catalog(settings.landing_root, day, settings.home / "running")
    texts = product_text(catalog)
    missing = fill_text_cache(texts, config, settings.cache_dir / "text", progress=progress)
    log.info("text cache: %d of %d catalogue texts encoded for %s", missing, len(texts), day)
    return {"day": day.isoformat(), "products": len(texts), "encoded": missing}
