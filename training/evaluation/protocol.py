"""The offline evaluation protocol: one temporal split, two settings, every method alike.

The DAG, ``shoprec model evaluate`` and ``benchmarks/quality.py`` all measure through
``run_protocol``, so their figures compare like with like. The split and its rules are
``training.data.temporal_split``; methods are fitted on ``TrainData``.

Settings.

- ``all`` (a): every catalogue product is a candidate; repeat purchases count.
- ``new`` (b): the user's pre-cut purchases are removed from both the candidates (passed to
  ``recommend`` as ``exclude``) and the truth; users whose truth becomes empty are dropped.

Metrics at each K (default 10 and 50): Recall, binary NDCG, HitRate (``training.metrics``),
catalogue coverage and the Gini coefficient of exposure (``training.evaluation.metrics``).
Segments: ``cold_users`` (at most ``COLD_USER_EVENTS`` events before the cut) and
``new_products`` (truth restricted to products first seen in the ``NEW_PRODUCT_DAYS`` before
the cut). Hyper-parameters and blend weights are chosen on ``validation_split(train)``.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from core.settings import min_test_users
from training.data import SETTINGS, TEST_DAYS, Split, temporal_split
from training.evaluation.blends import standard_recommenders
from training.evaluation.metrics import setting_metrics
from training.evaluation.report import ProtocolResult
from training.evaluation.uncertainty import interval, per_user_accuracy
from training.metrics import DEFAULT_KS, recall_curve
from training.recommender import Recommender

log = logging.getLogger(__name__)

DEFAULT_MAX_USERS = 20_000  # the test-user budget (Settings.eval_max_users in the DAG)


def evaluate_recommender(
    recommender: Recommender, split: Split, ks: Iterable[int] = DEFAULT_KS,
    curves: dict[str, list[float]] | None = None, curve_k: int = 100,
    per_user: dict[str, dict[str, np.ndarray]] | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Ask a fitted recommender for both settings' users and measure it.

    Args:
        recommender: a fitted method.
        split: the split it was fitted on.
        ks: cut-offs.
        curves: when given, filled with setting -> Recall@K for K = 1..``curve_k``.
        curve_k: the longest list asked for when ``curves`` is given.
        per_user: when given, filled with setting -> metric -> (U,) Recall and NDCG of each
            test user (``split.users(setting)`` order).

    Returns:
        setting -> segment -> metric -> value.
    """
    ks = tuple(ks)
    top = max(max(ks), curve_k) if curves is not None else max(ks)
    out = {}
    for setting in SETTINGS:
        users = split.users(setting)
        lists = recommender.recommend(users, top, exclude=split.exclusions(setting))
        ranked = dict(zip(users, lists, strict=True))
        out[setting] = setting_metrics(split, setting, ranked, ks)
        truth = [split.truth[setting][u] for u in users]
        if curves is not None:
            curves[setting] = [float(v) for v in recall_curve(lists, truth, curve_k)]
        if per_user is not None:
            per_user[setting] = per_user_accuracy(lists, truth, ks)
    return out


def run_protocol(
    events: pd.DataFrame,
    catalog: pd.DataFrame,
    recommenders: Sequence[Recommender],
    cut: Any = None,
    ks: Iterable[int] = DEFAULT_KS,
    test_days: int = TEST_DAYS,
    *,
    progress: bool = False,
    max_users: int | None = DEFAULT_MAX_USERS,
    bootstrap: int = 0,
    confidence: float = 0.95,
    min_users: int | None = None,
) -> ProtocolResult:
    """Fit every method on the data before the cut and measure it in both settings.

    Methods are fitted in order (a blend may reuse sources fitted before it).

    Args:
        events: contract events.
        catalog: product rows (history or snapshot).
        recommenders: the methods; names must be unique.
        cut: the test cut (None: last event - ``test_days``).
        ks: cut-offs.
        test_days: test window.
        progress: a progress bar over methods.
        max_users: test-user budget (``evaluate_split``).
        bootstrap: resamples for the intervals (0: none).
        confidence: the intervals' level.
        min_users: fewer test users warn (``ProtocolResult.warning_lines``; None:
            ``SHOPREC_MIN_TEST_USERS``).

    Returns:
        The table. Raises ValueError when there is no test user.
    """
    split = temporal_split(events, catalog, cut, test_days)
    if not split.truth["all"]:
        raise ValueError(f"no test users: nobody with an event before {split.cut} purchased "
                         f"in the {test_days} days after it")
    return evaluate_split(split, recommenders, ks, test_days=test_days, progress=progress,
                          max_users=max_users, bootstrap=bootstrap, confidence=confidence,
                          min_users=min_users)


def evaluate_split(
    split: Split,
    recommenders: Sequence[Recommender],
    ks: Iterable[int] = DEFAULT_KS,
    *,
    test_days: int = TEST_DAYS,
    fit: bool = True,
    curve_k: int = 0,
    progress: bool = False,
    max_users: int | None = None,
    bootstrap: int = 0,
    confidence: float = 0.95,
    min_users: int | None = None,
) -> ProtocolResult:
    """Fit (unless ``fit`` is False: already fitted on ``split.train``) and measure methods.

    With ``max_users``, every method is measured on one seeded uniform sample of the test
    users (``Split.sample``); with ``bootstrap``, Recall and NDCG get percentile bootstrap
    intervals (the same resamples for every method) and the per-user values are kept for
    paired comparisons (``ProtocolResult.paired``).

    Args:
        split: the temporal split.
        recommenders: the methods, fitted in order; names must be unique.
        ks: cut-offs.
        test_days: the split's test window (recorded).
        fit: fit each method on ``split.train`` first.
        curve_k: also record Recall@K for K = 1..curve_k per method and setting (0: no).
        progress: a progress bar over methods.
        max_users: the test-user budget (None or 0: every test user).
        bootstrap: resamples for the intervals (0: no intervals, no per-user values).
        confidence: the intervals' level.
        min_users: fewer test users warn (None: ``SHOPREC_MIN_TEST_USERS``).

    Returns:
        The table.
    """
    ks = tuple(sorted(set(ks)))
    population = {s: len(split.truth[s]) for s in SETTINGS}
    split = split.sample(max_users)
    names = [r.name for r in recommenders]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique: {names}")
    result = ProtocolResult(
        cut=split.cut.isoformat(), end=split.end.isoformat(), test_days=test_days, ks=ks,
        n_products=len(split.train.product_ids), n_train_events=len(split.train.events),
        n_users={s: len(split.truth[s]) for s in SETTINGS},
        confidence=confidence, bootstrap=bootstrap,
        min_users=min_test_users() if min_users is None else min_users,
    )
    for line in result.warning_lines():
        log.warning(line)
    if any(len(split.truth[s]) < n for s, n in population.items()):
        result.sampled_from = population
        log.info("evaluating on a sample of %s test users (of %s)", result.n_users, population)
    bar = tqdm(recommenders, desc="methods", unit="method", disable=not progress)
    for rec in bar:
        bar.set_postfix_str(rec.name)
        started = time.perf_counter()
        if fit:
            rec.fit(split.train)
        curves: dict[str, list[float]] | None = {} if curve_k else None
        per_user: dict[str, dict[str, np.ndarray]] | None = {} if bootstrap else None
        result.metrics[rec.name] = evaluate_recommender(rec, split, ks, curves, curve_k,
                                                        per_user)
        if curves is not None:
            result.curves[rec.name] = curves
        if per_user is not None:
            result.per_user[rec.name] = per_user
            result.intervals[rec.name] = {
                setting: {metric: list(interval(values, confidence, bootstrap))
                          for metric, values in by_metric.items()}
                for setting, by_metric in per_user.items()}
        result.seconds[rec.name] = time.perf_counter() - started
        result.peak_rss_mb[rec.name] = peak_rss_mb()
        params = getattr(rec, "params", None)
        if callable(params):
            result.params[rec.name] = params()
        log.info("%s: R@%d all %.3f, new %.3f (%.1fs)", rec.name, max(ks),
                 result.value(rec.name, "all", f"recall_at_{max(ks)}"),
                 result.value(rec.name, "new", f"recall_at_{max(ks)}"),
                 result.seconds[rec.name])
    return result


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, MB (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def evaluate_root(
    root: str,
    cut: Any = None,
    *,
    test_days: int = TEST_DAYS,
    ks: Iterable[int] = DEFAULT_KS,
    text_encoder: str | None = None,
    cache_dir: str | Path | None = None,
    epochs: int | None = None,
    two_tower: bool = True,
    progress: bool = True,
    blends: bool = False,
    min_users: int | None = None,
) -> ProtocolResult:
    """The protocol on a landing root: every baseline (tuned), the two-tower model, [the
    blends,] and the served ranking.

    Tuning and the served ranking's stage use a validation window as long as the test
    window, just before the cut.

    Args:
        root: landing-zone root (what the importers and the synthetic shop write).
        cut: test cut (None: the last event - ``test_days``).
        test_days: test window.
        ks: cut-offs.
        text_encoder: overrides ``TrainConfig().text_encoder`` ("minilm", "tiny", a path).
        cache_dir: text-embedding cache.
        epochs: overrides the two-tower's epochs.
        two_tower: include the two-tower model (alone and as a blend source).
        progress: progress bars.
        blends: include the two blends (``standard_recommenders``).
        min_users: fewer test users warn (None: ``SHOPREC_MIN_TEST_USERS``).

    Returns:
        The table.
    """
    from features.contract import list_days, read_upto
    from training.config import TrainConfig

    days = list_days(root, "events")
    if not days:
        raise ValueError(f"{root}: no event partitions")
    events = read_upto(root, "events", days[-1])
    product_days = list_days(root, "products")
    catalog = read_upto(root, "products", product_days[-1]) if product_days else None
    if catalog is None or catalog.empty:
        raise ValueError(f"{root}: no product partitions")
    config = TrainConfig()
    if text_encoder:
        config = config.replace(text_encoder=text_encoder)
    if epochs is not None:
        config = config.replace(epochs=epochs)
    user_days = list_days(root, "users")
    users = read_upto(root, "users", user_days[-1]) if user_days else None
    recommenders = standard_recommenders(config, cache_dir=cache_dir, progress=progress,
                                         two_tower=two_tower, validation_days=test_days,
                                         users=users, blends=blends)
    return run_protocol(events, catalog, recommenders, cut, ks, test_days, progress=progress,
                        min_users=min_users)
