"""User-side vectors computed when a user's row changes, and read with the row on a request.

A row's first request used to pay for most of its own view (``Scorer.views``): the user
tower over the history, the mean text vector, the ALS factors solved from it, and the three
index searches for them. None of it depends on the request: a bundle computes a row's view
at ``Bundle.view_time`` (the cut, or the row's latest event), so the same row and the same
bundle always give the same vectors. They are therefore computed where the row changes and
stored online in the ``user_vectors`` view, bound to the bundle (``bundle_identity``) and
to the row (``training.ranking.histories.row_digest``):

- daily, after materialization (the DAG's ``user_vectors`` task, ``refresh_interval``): the
  users whose rows the interval changed, with the champion;
- before a promotion moves the alias (``before_promotion``): the users of the last
  ``SHOPREC_USER_VECTORS_DAYS`` days, with the version about to serve, so that a swap does
  not find every row new;
- in real time (``POST /events``): the users the events changed, with the bundle the
  worker serves.

A request whose row carries vectors of its bundle and of that very row uses them (the
co-occurrence sums, cheap, are still read from the row); any other request computes its
view as before. Missing or stale vectors cost time, never a wrong answer.
``SHOPREC_USER_VECTORS_DAYS=0`` turns the writes off.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.settings import Settings
from features.online_write import write_online
from features.partitions import partitions
from training.ranking.histories import (
    RETRIEVED_FEATURES,
    VECTOR_FEATURES,
    Histories,
    MalformedHistory,
    StoredVectors,
    row_digest,
)

log = logging.getLogger(__name__)

VIEW = "user_vectors"
BATCH_USERS = 256  # users per batched view computation
READ_USERS = 2_000  # users per online read (and write)


def bundle_identity(bundle: Any) -> str:
    """What stored vectors are bound to: the model name, version and run of a bundle
    (``Bundle.identity``)."""
    return bundle.identity


def _table(user_ids: list[str], stored: list[StoredVectors]) -> pa.Table:
    when = dt.datetime.now(dt.UTC)
    values = [s.values() for s in stored]
    columns: dict[str, pa.Array] = {
        "user_id": pa.array(user_ids, pa.string()),
        "vectors_bundle": pa.array([v["vectors_bundle"] for v in values], pa.string()),
        "vectors_row": pa.array([v["vectors_row"] for v in values], pa.string()),
    }
    for name in VECTOR_FEATURES.values():
        columns[name] = pa.array([np.asarray(v[name], np.float32) for v in values],
                                 pa.list_(pa.float32()))
    for name in RETRIEVED_FEATURES.values():
        columns[name] = pa.array([np.asarray(v[name], np.int64) for v in values],
                                 pa.list_(pa.int64()))
    columns["event_timestamp"] = pa.array([when] * len(user_ids), pa.timestamp("us", tz="UTC"))
    return pa.table(columns)


def compute(bundle: Any, rows: Mapping[str, Mapping[str, Any]]) -> tuple[list[str],
                                                                        list[StoredVectors]]:
    """The vectors ``bundle`` computes for these online rows (``OnlineUserReader.read``),
    as ``Bundle.recommend`` would on a request: users whose history holds no catalogue
    product have none (they are served without a view) and are left out, as are malformed
    rows (logged).

    Returns:
        (user ids, their ``StoredVectors``), in the same order.
    """
    identity = bundle_identity(bundle)
    groups: dict[float, list[tuple[str, Histories, str]]] = defaultdict(list)
    for user, row in rows.items():
        try:
            history = Histories.from_row(row)
        except MalformedHistory as exc:
            log.error("user vectors: malformed online row for %r skipped: %s", user, exc)
            continue
        if not any(p in bundle.item_row for p in history.products[0]):
            continue
        # a view is computed at one moment for a batch: group the users by theirs
        groups[bundle.view_time(history)].append((user, history, row_digest(row)))
    users: list[str] = []
    out: list[StoredVectors] = []
    scorer = bundle.scorer
    for now, members in groups.items():
        for at in range(0, len(members), BATCH_USERS):
            part = members[at:at + BATCH_USERS]
            batch = Histories.concat([h for _, h, _ in part])
            views = scorer.views(batch, now)
            scorer.retrieve(views)
            users.extend(u for u, _, _ in part)
            out.extend(StoredVectors.of_view(v, identity, digest)
                       for v, (_, _, digest) in zip(views, part, strict=True))
    return users, out


def write_user_vectors(store: Any, reader: Any, bundle: Any, user_ids: Iterable[str], *,
                       progress: bool = False,
                       guard: Callable[[], AbstractContextManager] = contextlib.nullcontext
                       ) -> dict[str, Any]:
    """Compute and store the vectors of ``bundle`` for these users' current online rows.

    Args:
        store: the Feast store (its online store receives the rows).
        reader: a ``features.store.OnlineUserReader`` on it.
        bundle: the bundle the vectors are for (``serving.bundle.Bundle``).
        user_ids: the users.
        progress: show a tqdm bar.
        guard: held around each read and write of the store, not while computing (a
            server's store lock: its requests read meanwhile).

    Returns:
        {"users": asked, "written": rows written, "seconds": ...}.
    """
    from tqdm.auto import tqdm

    wanted = list(dict.fromkeys(user_ids))
    start = time.perf_counter()
    written = 0
    bar = tqdm(total=len(wanted), desc="user vectors", unit="user", disable=not progress)
    for at in range(0, len(wanted), READ_USERS):
        chunk = wanted[at:at + READ_USERS]
        with guard():
            rows = reader.read(chunk, vectors=False)
        users, stored = compute(bundle, rows)
        if users:
            table = _table(users, stored)
            with guard():
                written += write_online(store, VIEW, table, READ_USERS)
        bar.update(len(chunk))
    bar.close()
    return {"users": len(wanted), "written": written,
            "seconds": round(time.perf_counter() - start, 3)}


def changed_users(settings: Settings, first: dt.date, last: dt.date) -> list[str]:
    """The users whose ``user_recent_products`` rows the intervals ``first`` .. ``last``
    wrote (their partitions' user ids), sorted."""
    root = Path(settings.offline_root) / "user_recent_products"
    users: set[str] = set()
    for part in partitions(str(root), last):
        if part.day < first:
            continue
        for file in sorted(Path(part.path).glob("*.parquet")):
            users.update(pq.read_table(file, columns=["user_id"])["user_id"].to_pylist())
    return sorted(users)


def _write_for(settings: Settings, bundle: Any, first: dt.date, last: dt.date) -> dict[str, Any]:
    from features.store import OnlineUserReader, feature_store

    store = feature_store(settings)
    users = changed_users(settings, first, last)
    result = write_user_vectors(store, OnlineUserReader(store), bundle, users, progress=True)
    log.info("user vectors of %s v%s for the users of %s .. %s: %d of %d users in %.1f s",
             bundle.name, bundle.version, first, last, result["written"], result["users"],
             result["seconds"])
    return {"version": bundle.version, "first": first.isoformat(), "last": last.isoformat(),
            **result}


def refresh_interval(settings: Settings, day: dt.date | str) -> dict[str, Any]:
    """The DAG's ``user_vectors`` step: the champion's vectors for the users whose rows the
    interval changed (skipped, with the reason, without a champion or when turned off)."""
    from features.contract import parse_day
    from serving.bundle import BundleError
    from serving.publish import load_version_bundle

    day = parse_day(day)
    if settings.user_vectors_days <= 0:
        return {"skipped": "SHOPREC_USER_VECTORS_DAYS=0"}
    try:
        bundle = load_version_bundle(settings)
    except BundleError as exc:  # no champion yet: requests compute their views
        log.info("user vectors not written: %s", exc)
        return {"skipped": str(exc)}
    return _write_for(settings, bundle, day, day)


def before_promotion(settings: Settings, version: str, day: dt.date | str) -> dict[str, Any]:
    """Before the champion alias moves to ``version``: its vectors for the users of the
    last ``settings.user_vectors_days`` intervals up to ``day``, so that the servers that
    follow the alias find them."""
    from features.contract import parse_day
    from serving.publish import load_version_bundle

    day = parse_day(day)
    if settings.user_vectors_days <= 0:
        return {"skipped": "SHOPREC_USER_VECTORS_DAYS=0"}
    bundle = load_version_bundle(settings, version=str(version))
    first = day - dt.timedelta(days=settings.user_vectors_days - 1)
    return _write_for(settings, bundle, first, day)
