"""The scale benchmark's shop: ``features.synth.generate_shop`` at a chosen daily volume.

``generate_shop`` already draws each day with whole-array numpy operations (sessions, views,
carts and purchases are arrays; only search sessions loop, a few per cent of the sessions),
about 1 s per 100,000 events on one core. What it does not take is a volume: every user
keeps the activity ``_build_users`` draws (a mean of ~0.33 sessions a day), so 1,000,000
users would make ~1.5 million events a day. Here the users are the same users, each with
their activity multiplied by one factor chosen so that an average day has about
``events_per_day`` events; everything else (catalogue, tastes, new products and sign-ups
every day, the mix of views, carts, purchases and searches, the contract) is generate_shop's.

Run in a child process by ``benchmarks/scale.py`` so that the generator's memory is not
counted in the DAG run's peak RSS.
"""

from __future__ import annotations

import datetime as dt
import resource
import threading
import time
from unittest import mock

import numpy as np
from tqdm.auto import tqdm

from features import synth

# Events per session at the synth's default knobs (views 1 + Poisson(2.5), carts, purchases,
# search views; measured: 22,861 events from 4,970 expected sessions on a 20,000-user day 0).
EVENTS_PER_SESSION = 4.6


def activity_factor(activity: np.ndarray, signup_day: np.ndarray, days: int,
                    events_per_day: int) -> float:
    """The factor on every user's sessions per day that gives ~``events_per_day`` a day.

    Args:
        activity: (U,) each user's expected sessions a day, as drawn.
        signup_day: (U,) the day each user arrives (present from then on).
        days: days simulated.
        events_per_day: the target mean over the days.

    Returns:
        The multiplier (never above 1: the synth's users are the most active this gets).
    """
    present_days = np.clip(days - signup_day, 0, days)  # (U,) days each user is present
    sessions_per_day = float((activity * present_days).sum()) / days
    return min(1.0, events_per_day / (sessions_per_day * EVENTS_PER_SESSION))


def generate(root: str, *, products: int, users: int, days: int, events_per_day: int,
             seed: int, start: dt.date) -> dict:
    """Write the shop's landing partitions under ``root``; return what was written and the
    generator's own wall time, CPU time and peak RSS (this process's)."""
    build_users = synth._build_users
    factor: list[float] = []

    def scaled_users(rng: np.random.Generator, n_users: int, n_days: int) -> synth._Users:
        people = build_users(rng, n_users, n_days)
        factor.append(activity_factor(people.activity, people.signup_day, n_days,
                                      events_per_day))
        people.activity = people.activity * factor[0]
        return people

    # a thread lock for the progress bar: tqdm's default multiprocessing lock leaks a
    # semaphore when this runs in a pool's child
    tqdm.set_lock(threading.RLock())
    started, cpu0 = time.perf_counter(), time.process_time()
    # The only change to generate_shop: its users, less active (same draws, same order).
    with mock.patch.object(synth, "_build_users", scaled_users):
        summary = synth.generate_shop(root, days=days, users=users, products=products,
                                      seed=seed, start=start, progress=True)
    return {
        "root": root, "days": days, "first_day": start.isoformat(),
        "products": summary.n_products, "users": summary.n_users,
        "new_products_after_day0": summary.new_products_after_day0,
        "events": summary.n_events, "events_per_day": round(summary.n_events / days),
        "purchases": summary.n_purchases, "searches": summary.n_searches,
        "activity_factor": round(factor[0], 4),
        "wall_s": round(time.perf_counter() - started, 2),
        "cpu_s": round(time.process_time() - cpu0, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
