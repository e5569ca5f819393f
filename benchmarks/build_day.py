"""One day's user-side feature build against a young or an old shop's state, in seconds.

``benchmarks/scale.py`` measures whole days of a generated shop, which takes an hour to reach
day 180. This isolates what grows with the shop's age in ``features.build.build_features``: the
rows of the day's users are longer on an old shop (histories filled up to ``HISTORY_LEN``
entries, a month of active days in each profile, a list of every purchased product) while their
number is the same. It writes synthetic ``user_recent_products`` and ``user_profile`` partitions
(one holding every user the shop has, then yesterday's users), then times the build's user
phases for today's users as ``build_features`` runs them (the index sync of yesterday, the rows
read, the roll forward, the partition written). Synthetic rows, real code paths.

    .venv/bin/python benchmarks/build_day.py --age 2     # a young shop: short rows
    .venv/bin/python benchmarks/build_day.py --age 180   # an old one: full rows
    .venv/bin/python benchmarks/build_day.py --age 180 --profile 25   # cProfile's top 25

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from features.build import (  # noqa: E402
    TS,
    USER_PROFILE_SCHEMA,
    USER_RECENT_SCHEMA,
    _rolled_profiles,
    _state_after,
    _write,
    build_user_recent_products,
    previous_state,
)
from features.contract import Interval  # noqa: E402
from features.profiles import previous_profiles  # noqa: E402
from features.user_state import HISTORY_LEN, KEPT_DAYS, PURCHASED_LEN  # noqa: E402

TYPES = np.array(["view", "add_to_cart", "purchase"], dtype=object)
MIX = (0.8, 0.12, 0.08)
DAY_S = 86_400


def _offsets(lengths: np.ndarray) -> pa.Array:
    return pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))


def recent_rows(rng: np.random.Generator, users: np.ndarray, products: np.ndarray,
                mean_events: float, end: pd.Timestamp) -> pa.Table:
    """``user_recent_products`` rows whose users had ~``mean_events`` history events each."""
    n = len(users)
    total = rng.geometric(1 / max(mean_events, 1.0), n).astype(np.int64)  # (n,)
    lengths = np.minimum(total, HISTORY_LEN)
    e = int(lengths.sum())
    kinds = rng.choice(TYPES, e, p=MIX)
    end_s = int(end.value // 10**9)
    stamps = end_s - rng.integers(1, 180 * DAY_S, e)
    order = np.lexsort((stamps, np.repeat(np.arange(n), lengths)))
    bought = np.minimum(rng.binomial(total, MIX[2]), PURCHASED_LEN)
    return pa.table({
        "user_id": pa.array(users, pa.string()),
        "recent_product_ids": pa.ListArray.from_arrays(
            _offsets(lengths), pa.array(rng.choice(products, e), pa.string())),
        "recent_event_types": pa.ListArray.from_arrays(
            _offsets(lengths), pa.array(kinds, pa.string())),
        "recent_timestamps": pa.ListArray.from_arrays(
            _offsets(lengths), pa.array(stamps[order], pa.int64())),
        "purchased_product_ids": pa.ListArray.from_arrays(
            _offsets(bought), pa.array(rng.choice(products, int(bought.sum())), pa.string())),
        "n_events_total": pa.array(total, pa.int64()),
        "last_purchase_ts": pa.array(np.where(bought > 0, end_s - DAY_S, 0) * 10**6,
                                     pa.int64()).cast(TS),
        "event_timestamp": pa.array([end] * n, TS),
    }, schema=USER_RECENT_SCHEMA)


def profile_rows(rng: np.random.Generator, users: np.ndarray, mean_days: float,
                 end: pd.Timestamp) -> pa.Table:
    """``user_profile`` rows with ~``mean_days`` active days of the kept month each."""
    n = len(users)
    days = np.minimum(rng.geometric(1 / max(mean_days, 1.0), n), KEPT_DAYS)  # (n,)
    last = int(end.value // (DAY_S * 10**9)) - 1
    active = np.concatenate([np.sort(rng.choice(KEPT_DAYS, d, replace=False)) for d in days]
                            ) + last - KEPT_DAYS + 1
    k = int(days.sum())
    cats = np.minimum(days, 12)
    categories = np.concatenate([rng.choice(40, c, replace=False) for c in cats])
    columns = {
        "user_id": pa.array(users, pa.string()),
        "active_days": pa.ListArray.from_arrays(_offsets(days), pa.array(active, pa.int64())),
    }
    for name, mean in (("view_by_day", 4.0), ("add_to_cart_by_day", 0.6),
                       ("purchase_by_day", 0.4), ("search_by_day", 1.0)):
        columns[name] = pa.ListArray.from_arrays(_offsets(days),
                                                 pa.array(rng.poisson(mean, k), pa.int64()))
    columns["basket_value_by_day"] = pa.ListArray.from_arrays(
        _offsets(days), pa.array(rng.gamma(2.0, 20.0, k), pa.float64()))
    columns["recent_categories"] = pa.ListArray.from_arrays(
        _offsets(cats), pa.array([f"cat-{c}" for c in categories], pa.string()))
    columns["recent_category_days"] = pa.ListArray.from_arrays(
        _offsets(cats), pa.array(last - rng.integers(0, KEPT_DAYS, int(cats.sum())), pa.int64()))
    columns["last_purchase_epoch_s"] = pa.array(np.full(n, -1), pa.int64())
    columns["country"] = pa.array(["GB"] * n, pa.string())
    columns["event_timestamp"] = pa.array([end] * n, TS)
    return pa.table(columns, schema=USER_PROFILE_SCHEMA)


def day_events(rng: np.random.Generator, users: np.ndarray, products: np.ndarray, n: int,
               day: dt.date) -> pd.DataFrame:
    """``n`` contract events of ``day`` by ``users``."""
    start = int(pd.Timestamp(day, tz="UTC").value // 10**9)
    kinds = rng.choice(np.array(["view", "add_to_cart", "purchase", "search"], dtype=object),
                       n, p=(0.72, 0.11, 0.07, 0.10))
    ts = pd.to_datetime(np.sort(start + rng.integers(0, DAY_S, n)), unit="s", utc=True)
    product = rng.choice(products, n).astype(object)
    product[kinds == "search"] = None
    return pd.DataFrame({
        "event_id": [f"e{i}" for i in range(n)], "user_id": rng.choice(users, n),
        "session_id": None, "product_id": product, "event_type": kinds, "query": None,
        "quantity": np.ones(n, np.int64), "price": np.where(kinds == "purchase", 9.5, np.nan),
        "ts": ts})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--age", type=int, default=180, help="the shop's age in days")
    parser.add_argument("--users", type=int, default=1_000_000, help="users the shop has")
    parser.add_argument("--day-users", type=int, default=46_000, help="users active today")
    parser.add_argument("--events", type=int, default=200_000, help="events today")
    parser.add_argument("--products", type=int, default=100_000)
    parser.add_argument("--profile", type=int, default=0, help="print cProfile's top N")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the generated state here and reuse it on the next run with the "
                             "same arguments (each run measures a copy)")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    # Today's users are the shop's active ones: ~1.1 history events and ~0.2 active days per
    # day of age for them (the full preset's figures), saturating at the rows' limits.
    mean_events = 1 + 1.1 * (args.age - 1)
    mean_days = 1 + 0.2 * (args.age - 1)
    products = np.array([f"P{i:06d}" for i in range(args.products)], dtype=object)
    users = np.array([f"U{i:07d}" for i in range(args.users)], dtype=object)
    today = dt.date(2026, 6, 30)
    yesterday = today - dt.timedelta(days=1)
    first = today - dt.timedelta(days=2)
    day_users = users[np.sort(rng.choice(min(args.users, 3 * args.day_users), args.day_users,
                                         replace=False))]
    kept = None
    if args.keep is not None:
        kept = args.keep / (f"age{args.age}-u{args.users}-d{args.day_users}-p{args.products}"
                            f"-s{args.seed}")
    with tempfile.TemporaryDirectory(prefix="build-day-") as tmp:
        offline, running = Path(tmp) / "offline", Path(tmp) / "running"
        t0 = time.perf_counter()
        if kept is not None and (kept / "ready").exists():
            shutil.copytree(kept / "offline", offline)
            shutil.copytree(kept / "running", running)
            rng = np.random.default_rng([args.seed, 1])
        else:
            for day, who in ((first, users), (yesterday, day_users[::2])):
                end = pd.Timestamp(Interval.for_day(day).end)
                _write(offline, "user_recent_products", day,
                       recent_rows(rng, who, products, mean_events, end))
                _write(offline, "user_profile", day, profile_rows(rng, who, mean_days, end))
            # the indexes as they stand before yesterday's partition: folded through ``first``
            previous_state(offline, yesterday, running, users=day_users[:1])
            previous_profiles(offline, yesterday, running, USER_PROFILE_SCHEMA, day_users[:1])
            if kept is not None:
                shutil.rmtree(kept, ignore_errors=True)
                shutil.copytree(offline, kept / "offline")
                shutil.copytree(running, kept / "running")
                (kept / "ready").touch()
            rng = np.random.default_rng([args.seed, 1])
        events = day_events(rng, day_users, products, args.events, today)
        print(f"setup: {time.perf_counter() - t0:.1f} s ({args.users:,} users, age "
              f"{args.age} days, {args.day_users:,} users today)", flush=True)

        own = pa.Table.from_pandas(events, preserve_index=False)
        snapshot = pd.Index(np.sort(events["user_id"].unique()), name="user_id")
        wanted = pa.array(snapshot.to_numpy(dtype=object), pa.string())
        catalog = pd.DataFrame({"product_id": products,
                                "category": [f"cat-{i % 40}" for i in range(len(products))],
                                "price": 9.5})
        users_today = pd.DataFrame({"user_id": snapshot.to_numpy(), "country": "GB"})
        times: dict[str, float] = {}
        profiler = cProfile.Profile() if args.profile else None

        def timed(name: str, fn, *a):
            start = time.perf_counter()
            if profiler:
                profiler.enable()
            out = fn(*a)
            if profiler:
                profiler.disable()
            times[name] = time.perf_counter() - start
            return out

        previous = timed("user state", previous_state, offline, today, running,
                         snapshot.to_numpy(dtype=object))
        recent = timed("user_recent_products", build_user_recent_products, events, previous,
                       Interval.for_day(today))
        state = _state_after(previous, recent)
        profile = timed("user_profile", _rolled_profiles, offline, today, running, own, wanted,
                        catalog, users_today, state, snapshot)
        timed("write", lambda: [_write(offline, n, today, t) for n, t in
                                (("user_recent_products", recent), ("user_profile", profile))])
    entries = int(pa.compute.sum(pa.compute.list_value_length(recent["recent_product_ids"])
                                 ).as_py())
    print(f"today: {recent.num_rows:,} histories ({entries / max(recent.num_rows, 1):.0f} "
          f"entries each), {profile.num_rows:,} profiles")
    for name, seconds in times.items():
        print(f"  {name:<22} {seconds:6.2f} s")
    print(f"  {'total':<22} {sum(times.values()):6.2f} s")
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.profile)


if __name__ == "__main__":
    main()
