"""The Feast feature store of shoprec: apply the repo, materialize an interval, read features.

The declarations live in ``features/feature_repo`` (what ``feast apply`` would read there);
this module is the typed entry point the DAG, training and serving call.
"""

from __future__ import annotations

import datetime as dt
import importlib
import logging
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from core.settings import FEATURE_REPO, Settings
from features.contract import Interval, parse_day
from features.online_write import write_online
from features.partitions import partitions
from features.user_state import PURCHASED, STORED_PROFILE_COLUMNS, VECTORS, read_profiles

if TYPE_CHECKING:
    import pyarrow as pa
    from feast import FeatureStore

log = logging.getLogger(__name__)

DECLARATION_MODULES = ("entities", "data_sources", "feature_views", "feature_services")
# The feature views that the daily pipeline materializes (every online view).
# Rows per online-store write: Feast turns a whole frame into protobuf rows at once.
WRITE_CHUNK_ROWS = 50_000
MATERIALIZED_VIEWS = ("user_recent_products", "user_profile", "product_stats", "product_text",
                      "product_catalog")
# Every user and item feature, point in time, for (user_id, product_id, event_timestamp).
TRAINING_SERVICE = "two_tower_training_v1"
# The user-tower inputs: the history (user_recent_products) and the profile (user_profile),
# read point in time for training and evaluation, online per request for serving.
SERVING_SERVICE = "two_tower_serving_v1"
# The user-side vectors of the served bundle, written online when a user's row changes
# (``serving.user_vectors``) and read with the serving row (``OnlineUserReader``).
VECTORS_SERVICE = "user_vectors_v1"


def feature_store(settings: Settings) -> FeatureStore:
    """Open the Feast store configured by ``feature_store.yaml`` for these settings."""
    from feast import FeatureStore

    settings.prepare()
    return FeatureStore(repo_path=str(FEATURE_REPO), fs_yaml_file=settings.feast_yaml)


def _declarations() -> list[Any]:
    """Import the repo's declaration modules afresh and collect their Feast objects.

    Imported afresh (not from ``sys.modules``) because the data sources read their paths
    from the environment at import time, and one process may serve several state folders
    (tests do). ``feast.repo_operations.apply_total`` would ``chdir`` the process instead.
    """
    from feast import Entity, FeatureService, FeatureView
    from feast.data_source import DataSource

    saved = {name: sys.modules.pop(name) for name in DECLARATION_MODULES if name in sys.modules}
    sys.path.insert(0, str(FEATURE_REPO))
    try:
        objects: dict[int, Any] = {}
        for name in DECLARATION_MODULES:
            module = importlib.import_module(name)
            for value in vars(module).values():
                if isinstance(value, Entity | FeatureView | FeatureService | DataSource):
                    objects[id(value)] = value
        return list(objects.values())
    finally:
        sys.path.remove(str(FEATURE_REPO))
        for name in DECLARATION_MODULES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def apply_repo(settings: Settings) -> list[str]:
    """Register the repo's entities, sources, views and services (``feast apply``).

    Returns:
        The names of the applied objects.
    """
    store = feature_store(settings)
    objects = _declarations()
    store.apply(objects)
    names = sorted(o.name for o in objects)
    log.info("feast apply: %s", ", ".join(names))
    return names


def materialize_interval(settings: Settings, day: dt.date, *, incremental: bool = True,
                         since: dt.date | None = None) -> dict[str, Any]:
    """Load exactly one interval (plus the allowed lateness before it) into the online store.

    ``feast materialize-incremental`` would start at now - ttl on a fresh repo and skip
    historical data silently; explicit bounds make backfills and reruns exact.

    Feast's file offline store reads *every* partition of a view and filters afterwards, so
    its ``materialize`` costs in proportion to the shop's age. With ``incremental`` (the
    default) only the partitions this run's window has not already put online are read: the
    interval's own (its rows are stamped within its day, the allowed lateness before it and
    its end) and, for a rerun of an earlier interval, the later ones up to the window's end. Their rows in the window, the latest per entity (what
    Feast selects), go to the online store as ``FeatureStore.write_to_online_store`` would
    write them (``features.online_write``: the same values, without Feast's per-entry
    conversion) and the window is
    recorded on the view as Feast's ``materialize`` records it. The online rows are the same
    as Feast's (tested against it).

    With ``since``, the intervals from that day through ``day`` at once (a history loaded
    in bulk, ``shoprec.history``): each entity's newest row of those days goes online, as
    it would after materializing them one by one.

    Returns:
        The window materialized, the views it covered and the rows written per view.
    """
    interval = Interval.for_day(day)
    first_day = min(since or day, day)
    start = (Interval.for_day(first_day).start
             - dt.timedelta(hours=settings.allowed_lateness_hours))
    store = feature_store(settings)
    # The online write keeps the last row written, not the newest: rerunning an earlier
    # interval alone would put older snapshots back online. Extending such a rerun up to
    # the latest interval already materialized lets the newest rows win again.
    end = max([interval.end, *(_materialized_until(store, v) for v in MATERIALIZED_VIEWS)])
    out: dict[str, Any] = {"start": start.isoformat(), "end": end.isoformat(),
                           "views": list(MATERIALIZED_VIEWS)}
    if not incremental:
        store.materialize(start_date=start, end_date=end, feature_views=list(MATERIALIZED_VIEWS))
        return out
    # The interval's own partition holds every row its build wrote, all within the window.
    # Earlier partitions' rows within it (the day before's snapshots, stamped at this
    # interval's start, and its late catalogue rows) were put online by their own interval's
    # run, whose materialize follows its build; reading them again would write them twice.
    slack = dt.timedelta(days=1) + dt.timedelta(hours=settings.allowed_lateness_hours)
    first, last = first_day, (end + slack).date()
    written = {}
    for name in MATERIALIZED_VIEWS:
        view = store.get_feature_view(name)
        rows = _window_rows(settings, name, first, last, view, start, end)
        # Feast's write_to_online_store converts list entries one Python object at a time;
        # online_write builds the same rows in bulk and hands them to the same provider.
        written[name] = write_online(store, name, rows, WRITE_CHUNK_ROWS)
        store.registry.apply_materialization(view, store.project, start, end, commit=True)
    log.info("materialized %s .. %s from partitions %s .. %s: %s", start, end, first, last,
             written)
    return {**out, "rows": written}


def _window_rows(settings: Settings, table: str, first: dt.date, last: dt.date, view: Any,
                 start: dt.datetime, end: dt.datetime) -> pa.Table:
    """The view's offline rows stamped within [start, end] from the partitions of days
    ``first`` .. ``last``, the latest per entity (partition order breaks ties)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files = [str(f) for part in partitions(str(settings.offline_root / table), last)
             if part.day >= first for f in sorted(Path(part.path).glob("*.parquet"))]
    if not files:
        return pa.table({})
    stamp = view.batch_source.timestamp_field
    [key] = [column.name for column in view.entity_columns]
    # In Arrow until the rows are chosen (a bulk history reads many days: pandas objects of
    # every row of them would not fit); one file at a time: partitions written before a
    # column existed lack it (null here).
    table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive")
    table = table.append_column("_order", pa.array(np.arange(table.num_rows)))
    times = table[stamp]
    table = table.filter(pc.and_(
        pc.greater_equal(times, pa.scalar(pd.Timestamp(start).to_pydatetime(), times.type)),
        pc.less_equal(times, pa.scalar(pd.Timestamp(end).to_pydatetime(), times.type))))
    if not table.num_rows:
        return table
    # the latest row per entity: sorted by (entity, time, file order), the last of each
    order = pc.sort_indices(table, sort_keys=[(key, "ascending"), (stamp, "ascending"),
                                              ("_order", "ascending")])
    keys = table[key].take(order).to_numpy(zero_copy_only=False)
    last = np.append(keys[1:] != keys[:-1], True)  # (n,) the last row of each entity
    return table.take(order.filter(pa.array(last))).drop_columns(["_order"])


def _materialized_until(store: FeatureStore, view: str) -> dt.datetime:
    """The end of the latest window materialized for a view (Feast records them)."""
    from feast.errors import FeatureViewNotFoundException

    try:
        intervals = store.get_feature_view(view).materialization_intervals
    except FeatureViewNotFoundException:
        return dt.datetime.min.replace(tzinfo=dt.UTC)
    ends = [end if end.tzinfo else end.replace(tzinfo=dt.UTC) for _, end in intervals]
    return max(ends, default=dt.datetime.min.replace(tzinfo=dt.UTC))


def materialize_day(settings: Settings, day: str | dt.date) -> dict[str, Any]:
    """The pipeline's materialize step: apply the repo, then load the interval online."""
    applied = apply_repo(settings)
    return {"applied": applied, **materialize_interval(settings, parse_day(day))}


_MEMORY = re.compile(r"^\d+(\.\d+)?\s*(KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")


def bound_offline_join(settings: Settings) -> None:
    """Cap the memory of the DuckDB behind Feast's offline store (ibis' default backend,
    which the point-in-time joins run in) at ``Settings.offline_join_memory``, spilling to
    ``<cache>/duckdb``: unbounded, the join of 500,000 training targets with 180 days of
    history partitions held 19.6 GB (250,000: 11.8 GB; 4.6 GB with a 4 GB cap, at about
    1.7 times the time). Empty or "0": DuckDB's default (80 % of the machine's memory).

    Raises:
        ValueError: the setting is not a size such as "6GB" or "512MiB".
    """
    limit = settings.offline_join_memory
    if limit in ("", "0"):
        return
    if not _MEMORY.match(limit):
        raise ValueError(f"SHOPREC_OFFLINE_JOIN_MEMORY={limit!r}: expected a size such as "
                         f"6GB or 512MiB (empty or 0: no cap)")
    import ibis

    spill = settings.cache_dir / "duckdb"
    spill.mkdir(parents=True, exist_ok=True)
    backend = ibis.get_backend()
    backend.raw_sql(f"SET memory_limit = '{limit}'")
    # DuckDB refuses to move its spill folder once it has spilled (the second join of a
    # process, e.g. train's validation set after its examples, failed): set it only when it
    # differs, and a process that already spilled elsewhere keeps spilling there
    current = backend.raw_sql("SELECT current_setting('temp_directory')").fetchone()[0]
    if current != str(spill):
        try:
            backend.raw_sql(f"SET temp_directory = '{str(spill).replace(chr(39), chr(39) * 2)}'")
        except Exception as exc:  # duckdb.NotImplementedException
            if "temporary directory" not in str(exc):
                raise
            log.info("offline joins keep spilling to %s (DuckDB cannot move it now)", current)
    # rows come back in the entity frame's order anyway (sorted by _row below)
    backend.raw_sql("SET preserve_insertion_order = false")


def historical_features(settings: Settings, entity_df: pd.DataFrame,
                        service: str = TRAINING_SERVICE) -> pd.DataFrame:
    """Point-in-time features of a feature service, in the entity frame's row order.

    Args:
        settings: where the store lives.
        entity_df: the service's join keys (``user_id`` and/or ``product_id``) and
            ``event_timestamp`` (UTC); other columns are carried through.
        service: a feature service name, e.g. ``TRAINING_SERVICE``.

    Returns:
        ``entity_df`` joined with the service's features as they stood at each row's
        timestamp (the latest snapshot at or before it; null where there is none). Rows are
        in the entity frame's original order (Feast returns them in its own order).
    """
    from features.build import TABLE_SCHEMAS
    from features.upgrade import upgrade_partitions

    upgrade_partitions(settings.offline_root, TABLE_SCHEMAS)  # a release's new columns
    store = feature_store(settings)
    bound_offline_join(settings)
    frame = entity_df.copy()
    frame["_row"] = range(len(frame))
    out = store.get_historical_features(
        entity_df=frame, features=store.get_feature_service(service)
    ).to_df()
    return out.sort_values("_row").drop(columns="_row").reset_index(drop=True)


def historical_user_history(settings: Settings, entity_df: pd.DataFrame) -> pd.DataFrame:
    """Point-in-time user histories and profiles for (user_id, event_timestamp) rows.

    Args:
        entity_df: at least ``user_id`` and ``event_timestamp`` (UTC); other columns are
            carried through.

    Returns:
        ``entity_df`` joined with ``recent_product_ids``, ``recent_event_types``,
        ``purchased_product_ids``
        (lists, empty without history), ``n_events_total`` (0 without history),
        ``recent_timestamps``, and the ``user_profile`` columns as readers see them
        (``features.user_state.PROFILE_COLUMNS``, ``read_profiles`` of the stored row at each
        row's time; under their plain names, e.g.
        ``purchase_count_30d``, ``country``; null where the user had no profile yet), as
        they stood at each row's timestamp (``SERVING_SERVICE``). Rows are sorted by the
        entity frame's original order (Feast returns them in its own order).
    """
    out = historical_features(settings, entity_df, SERVING_SERVICE)
    out = read_profiles(out, out["event_timestamp"])
    for col in ("recent_product_ids", "recent_event_types", PURCHASED):
        out[col] = out[col].map(_as_list)
    out["n_events_total"] = out["n_events_total"].fillna(0).astype("int64")
    return out


def online_user_history(store: FeatureStore, user_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Read users' recent products and profiles from the online store (``SERVING_SERVICE``).

    Returns:
        user_id -> {"recent_product_ids": [...], "recent_event_types": [...],
        "recent_timestamps": [epoch seconds, ...], "purchased_product_ids": [...] (None
        for a row written before the list existed), and each of
        ``STORED_PROFILE_COLUMNS``: its value}; users the store does not know map to empty
        lists and None values. The ranking turns the stored profile into the profile at its
        own time (``training.ranking.histories.Histories.profiles_at``).
    """
    if not user_ids:
        return {}
    data = store.get_online_features(
        features=store.get_feature_service(SERVING_SERVICE),
        entity_rows=[{"user_id": u} for u in user_ids],
    ).to_dict()
    return {
        u: {"recent_product_ids": _as_list(data["recent_product_ids"][i]),
            "recent_event_types": _as_list(data["recent_event_types"][i]),
            "recent_timestamps": [int(t) for t in data["recent_timestamps"][i] or []],
            PURCHASED: _maybe_list(data.get(PURCHASED, [None] * len(user_ids))[i]),
            **{c: data[c][i] for c in STORED_PROFILE_COLUMNS}}
        for i, u in enumerate(data["user_id"])
    }


class OnlineUserReader:
    """``online_user_history`` for one request at a time, without Feast's per-call overhead.

    ``FeatureStore.get_online_features`` resolves the feature service, builds request
    protos and a response table on every call (about 6 ms per user on this machine); the
    server needs one user's row per request. This reads the serving service's views through
    the provider's ``online_read`` (the online store's own lookup, the same rows: a test
    checks them field by field against ``online_user_history``) in well under a
    millisecond. The views are looked up again every ``refresh_seconds`` so that a
    ``feast apply`` is picked up. Each row also carries, under ``VECTORS``, the user's
    stored vectors (``VECTORS_SERVICE``: the ``user_vectors`` values, None without), which
    ``online_user_history`` does not read.

    Args:
        store: the Feast store.
        refresh_seconds: how long the resolved views are reused.
    """

    def __init__(self, store: FeatureStore, refresh_seconds: float = 60.0):
        self.store = store
        self.refresh_seconds = refresh_seconds
        self._views: list[tuple[Any, list[str]]] = []
        self._vectors: list[tuple[Any, list[str]]] = []
        self._resolved_at = -float("inf")

    def _resolve(self) -> list[tuple[Any, list[str]]]:
        import time

        from feast.errors import FeatureServiceNotFoundException

        now = time.monotonic()
        if now - self._resolved_at > self.refresh_seconds:
            def views(name: str) -> list[tuple[Any, list[str]]]:
                service = self.store.get_feature_service(name, allow_cache=True)
                return [(self.store.get_feature_view(p.name), [f.name for f in p.features])
                        for p in service.feature_view_projections]

            self._views = views(SERVING_SERVICE)
            try:  # a registry applied before the service existed: no stored vectors
                self._vectors = views(VECTORS_SERVICE)
            except FeatureServiceNotFoundException:
                self._vectors = []
            self._resolved_at = now
        return self._views

    def read(self, user_ids: list[str], *, vectors: bool = True) -> dict[str, dict[str, Any]]:
        """The rows ``online_user_history`` returns for ``user_ids``, with the stored
        vectors under ``VECTORS`` (without them, and without reading them, with
        ``vectors=False``: ``read_vectors`` reads them when needed)."""
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value
        from feast.type_map import feast_value_type_to_python_type

        if not user_ids:
            return {}
        keys = [EntityKey(join_keys=["user_id"], entity_values=[Value(string_val=u)])
                for u in user_ids]
        provider = self.store._get_provider()  # noqa: SLF001 - the online store's own read
        values: list[dict[str, Any]] = [{} for _ in user_ids]
        for view, names in self._resolve():
            rows = provider.online_read(self.store.config, view, keys, names)
            for out, (_, row) in zip(values, rows, strict=True):
                for name in names:
                    proto = (row or {}).get(name)
                    out[name] = None if proto is None else feast_value_type_to_python_type(proto)
        stored = self._read_vectors(provider, keys) if vectors else None
        return {
            u: {"recent_product_ids": _as_list(v.get("recent_product_ids")),
                "recent_event_types": _as_list(v.get("recent_event_types")),
                "recent_timestamps": [int(t) for t in v.get("recent_timestamps") or []],
                PURCHASED: _maybe_list(v.get(PURCHASED)),
                **{c: v.get(c) for c in STORED_PROFILE_COLUMNS},
                **({VECTORS: stored[at]} if stored is not None else {})}
            for at, (u, v) in enumerate(zip(user_ids, values, strict=True))
        }

    def read_vectors(self, user_ids: list[str]) -> list[dict[str, Any] | None]:
        """The users' stored vectors (``VECTORS_SERVICE``'s values; None: none stored)."""
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        keys = [EntityKey(join_keys=["user_id"], entity_values=[Value(string_val=u)])
                for u in user_ids]
        self._resolve()
        return self._read_vectors(self.store._get_provider(), keys)  # noqa: SLF001

    def _read_vectors(self, provider: Any, keys: list[Any]) -> list[dict[str, Any] | None]:
        from feast.type_map import feast_value_type_to_python_type

        out: list[dict[str, Any] | None] = [None] * len(keys)
        for view, names in self._vectors:
            rows = provider.online_read(self.store.config, view, keys, names)
            for at, (_, row) in enumerate(rows):
                found = {n: feast_value_type_to_python_type(row[n])
                         for n in names if row and row.get(n) is not None}
                # Redis answers a key it does not hold with every field null
                out[at] = found if found.get("vectors_bundle") else None
        return out


def _maybe_list(value: Any) -> list[str] | None:
    """A list feature that may be absent (a row written before it existed): None then."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return None
    return [str(v) for v in value]


def _as_list(value: Any) -> list[str]:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return []
    return [str(v) for v in value]
