"""Materialization throughput: N users x 10 features into the online stores.

Prints rows/s and wall time for Feast materializing one day of user features into
(1) the SQLite online store (local profile) and (2) Redis (production profile), and, as the
ceiling, (3) a raw redis-py pipelined HSET of the same rows. One JSON line per figure, then
a table.

    .venv/bin/python benchmarks/materialize.py                 # 1,000,000 users
    .venv/bin/python benchmarks/materialize.py --users 100000  # quicker

Needs Redis at $SHOPREC_REDIS_URL (default 127.0.0.1:6379); it writes to database 14 and
flushes it before and after.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

N_FEATURES = 10
REDIS_DB = 14
DAY = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def user_features(n: int, seed: int = 0) -> pd.DataFrame:
    """n users x 10 numeric features, one snapshot each, timestamped inside one day."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"user_id": [f"U{i:08d}" for i in range(n)]})
    for j in range(N_FEATURES // 2):
        frame[f"count_{j}"] = rng.integers(0, 100, n, dtype=np.int64)
        frame[f"ratio_{j}"] = rng.random(n)
    frame["event_timestamp"] = DAY + pd.to_timedelta(rng.integers(0, 86_399, n), unit="s")
    return frame


def feature_objects(parquet: Path):
    from feast import Entity, FeatureView, Field, FileSource, ValueType
    from feast.data_format import ParquetFormat
    from feast.types import Float64, Int64, String

    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING)
    schema = [Field(name="user_id", dtype=String)]
    for j in range(N_FEATURES // 2):
        schema += [Field(name=f"count_{j}", dtype=Int64), Field(name=f"ratio_{j}", dtype=Float64)]
    source = FileSource(name="bench_source", path=str(parquet), file_format=ParquetFormat(),
                        timestamp_field="event_timestamp")
    view = FeatureView(name="bench_user_features", entities=[user], schema=schema,
                       source=source, ttl=dt.timedelta(days=30), online=True)
    return user, view


def feast_materialize(workdir: Path, online_store: dict, parquet: Path, n: int) -> dict:
    """Apply a one-view repo and time ``materialize`` of the whole day."""
    from feast import FeatureStore, RepoConfig

    config = RepoConfig(project="bench", provider="local",
                        registry=str(workdir / f"registry-{online_store['type']}.db"),
                        online_store=online_store, offline_store={"type": "duckdb"},
                        entity_key_serialization_version=3, repo_path=str(workdir))
    store = FeatureStore(config=config)
    user, view = feature_objects(parquet)
    store.apply([user, view])
    started = time.perf_counter()
    store.materialize(start_date=DAY - dt.timedelta(hours=1), end_date=DAY + dt.timedelta(days=1),
                      feature_views=[view.name])
    seconds = time.perf_counter() - started
    # read a sample back: the figures only count if the rows arrived
    sample = [{"user_id": f"U{i:08d}"} for i in (0, n // 2, n - 1)]
    got = store.get_online_features(features=[f"{view.name}:count_0"], entity_rows=sample)
    if any(v is None for v in got.to_dict()["count_0"]):
        raise RuntimeError(f"{online_store['type']}: materialized rows not readable")
    return {"seconds": seconds, "rows_per_s": n / seconds}


def raw_redis_pipeline(frame: pd.DataFrame, url: str, batch: int = 10_000) -> dict:
    """The ceiling: HSET each user's 10 fields with redis-py pipelines, no Feast."""
    import redis

    host, _, port = url.split(",")[0].partition(":")
    client = redis.Redis(host=host, port=int(port or 6379), db=REDIS_DB)
    columns = [c for c in frame.columns if c not in ("user_id", "event_timestamp")]
    values = frame[columns].to_numpy(dtype=object)
    keys = frame["user_id"].tolist()
    started = time.perf_counter()
    for start in range(0, len(keys), batch):
        with client.pipeline(transaction=False) as pipe:
            for key, row in zip(keys[start:start + batch], values[start:start + batch],
                                strict=True):
                pipe.hset(f"raw:{key}", mapping=dict(zip(columns, map(str, row), strict=True)))
            pipe.execute()
    seconds = time.perf_counter() - started
    if client.hget(f"raw:{keys[-1]}", "count_0") is None:
        raise RuntimeError("raw redis rows not readable")
    return {"seconds": seconds, "rows_per_s": len(keys) / seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--skip-sqlite", action="store_true")
    args = parser.parse_args()
    url = os.environ.get("SHOPREC_REDIS_URL", "127.0.0.1:6379").split(",")[0]
    import redis

    host, _, port = url.partition(":")
    client = redis.Redis(host=host, port=int(port or 6379), db=REDIS_DB)
    client.flushdb()

    frame = user_features(args.users)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        parquet = workdir / "user_features.parquet"
        frame.to_parquet(parquet, index=False)
        if not args.skip_sqlite:
            results["feast_sqlite"] = feast_materialize(
                workdir, {"type": "sqlite", "path": str(workdir / "online.db")}, parquet,
                args.users)
            print(json.dumps({"figure": "feast_sqlite", "users": args.users,
                              **results["feast_sqlite"]}), flush=True)
        results["feast_redis"] = feast_materialize(
            workdir, {"type": "redis", "connection_string": f"{url},db={REDIS_DB}"}, parquet,
            args.users)
        print(json.dumps({"figure": "feast_redis", "users": args.users,
                          **results["feast_redis"]}), flush=True)
    results["raw_redis_pipeline"] = raw_redis_pipeline(frame, url)
    print(json.dumps({"figure": "raw_redis_pipeline", "users": args.users,
                      **results["raw_redis_pipeline"]}), flush=True)
    client.flushdb()

    print(f"\n{args.users:,} users x {N_FEATURES} features")
    print(f"{'writer':<22}{'wall s':>10}{'rows/s':>12}")
    for name, r in results.items():
        print(f"{name:<22}{r['seconds']:>10.1f}{r['rows_per_s']:>12,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
