"""Real-time ingest latency: one event per call into the online store, as ``POST /events``
does (validate, read the user's rows, fold, push both views).

Builds a small synthetic shop (3 days, materialized) in a temporary state folder, then times
N single-event ingests and prints p50/p95 of the whole call, of its online read and of its
push, one JSON line per figure and a summary line.

    .venv/bin/python benchmarks/realtime_push.py                  # local profile (SQLite)
    .venv/bin/python benchmarks/realtime_push.py --profile prod   # Redis at SHOPREC_REDIS_URL
    .venv/bin/python benchmarks/realtime_push.py -n 500

The production profile needs PostgreSQL and Redis on 127.0.0.1 (like the tests); it writes
to Redis database 14 and flushes it first.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REDIS_DB = 14
START = dt.date(2026, 1, 1)
DAYS = 3


def _event(event_id: str, user_id: str, product_id: str, ts: pd.Timestamp) -> dict:
    return {"event_id": event_id, "user_id": user_id, "product_id": product_id,
            "event_type": "view", "query": None, "quantity": 1, "price": 9.5,
            "ts": ts.isoformat()}


def _percentiles(seconds: list[float]) -> dict[str, float]:
    p95 = statistics.quantiles(seconds, n=20)[-1]
    return {"p50_ms": round(1000 * statistics.median(seconds), 2),
            "p95_ms": round(1000 * p95, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=200, help="single-event ingests to time")
    parser.add_argument("--profile", choices=("local", "prod"), default="local")
    args = parser.parse_args(argv)

    home = Path(tempfile.mkdtemp(prefix="shoprec-bench-push-")) / "state"
    os.environ.update({"SHOPREC_HOME": str(home), "SHOPREC_LANDING_ROOT": str(home / "landing"),
                       "SHOPREC_TEXT_ENCODER": "tiny", "HF_HUB_OFFLINE": "1"})
    if args.profile == "prod":
        import redis

        redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()
        os.environ.update({
            "SHOPREC_PROFILE": "prod",
            "SHOPREC_FEAST_REGISTRY_URL": os.environ.get(
                "SHOPREC_FEAST_REGISTRY_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
            "SHOPREC_REDIS_URL": f"127.0.0.1:6379,db={REDIS_DB}",
            "SHOPREC_FEAST_PROJECT": f"bench_push_{os.getpid()}"})
    from core.settings import Settings
    from features.build import build_interval
    from features.contract import Interval
    from features.realtime import ingest_events, read_user_rows
    from features.store import feature_store, materialize_day
    from features.synth import generate_shop

    settings = Settings.from_env().prepare()
    generate_shop(settings.landing_root, days=DAYS, users=30, products=20, seed=11, start=START)
    for i in range(DAYS):
        build_interval(settings, START + dt.timedelta(days=i))
        materialize_day(settings, START + dt.timedelta(days=i))
    after = pd.Timestamp(Interval.for_day(START + dt.timedelta(days=DAYS - 1)).end)
    store = feature_store(settings)
    day = pd.read_parquet(settings.offline_root / "user_recent_products"
                          / f"date={START + dt.timedelta(days=DAYS - 1)}")
    user = sorted(day["user_id"])[0]
    before = read_user_rows(store, [user])[user]["user_recent_products"][0]["n_events_total"]
    ingest_events(store, [_event("warm", "U-warm", "P000001", after)],
                  now=after + pd.Timedelta(seconds=1))  # the first call loads the registry
    total, reads, pushes = [], [], []
    for i in range(args.n):
        ts = after + pd.Timedelta(seconds=10 + i)
        started = time.perf_counter()
        result = ingest_events(store, [_event(f"lat-{i}", user, f"P{i % 20:06d}", ts)],
                               now=ts + pd.Timedelta(seconds=1))
        total.append(time.perf_counter() - started)
        reads.append(result.read_seconds)
        pushes.append(result.push_seconds)
    landed = read_user_rows(store, [user])[user]["user_recent_products"][0]["n_events_total"]
    figures = {"ingest": _percentiles(total), "online_read": _percentiles(reads),
               "push_2_views": _percentiles(pushes)}
    for name, value in figures.items():
        print(json.dumps({"benchmark": "realtime_push", "profile": args.profile,
                          "figure": name, "n": args.n, **value}))
    print(f"realtime ingest ({args.profile}, {args.n} single events): "
          + "; ".join(f"{k} p50 {v['p50_ms']} ms, p95 {v['p95_ms']} ms"
                      for k, v in figures.items())
          + f"; {landed - before} of {args.n} landed")
    return 0 if landed - before == args.n else 1


if __name__ == "__main__":
    sys.exit(main())
