"""The learning-to-rank stage: gradient-boosted trees with a ranking objective over the
candidates' features, and the per-shop choice of the stage that is served.

``TreeRanker`` is LightGBM's lambdarank (queries = users, label = bought in the window),
trained on the validation window like the pair scorer (``training.ranking.pair``). The trees
are a second stage: they re-rank the pair scorer's best ``TREE_TOP`` candidates of each user
(the rest keep the pair scorer's order below them), which keeps a request's cost at a few
hundred tree walks instead of one per candidate (100 full 31-leaf trees on 2 cores: ~2.8 ms
for 776 candidates, ~0.6 ms for 150). Which stage ranks a shop's candidates is chosen on that
shop's own validation users, per setting (``choose_stage``): the pair scorer alone
(``mlp``), the trees over its top (``trees``) or both there (``blend``: the sum of each
one's scores standardised over those candidates). Both learners are fitted
on three quarters of the validation users and compared on the remaining quarter, so trees,
which fit their training users closely, are not favoured by an in-sample figure; ties keep
the pair scorer. The choice and its figures are logged with the run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from training.metrics import tuning_metrics

log = logging.getLogger(__name__)

STAGES = ("mlp", "trees", "blend")
CHOICE_SHARE = 0.25  # validation users held out to choose the stage
MIN_CHOICE_USERS = 20  # fewer held-out users with a hit: keep the pair scorer
OBJECTIVE = ("recall_at_50", "ndcg_at_10")  # summed; the acceptance's two figures

# LightGBM's lambdarank, small and deterministic: a few hundred trees of 31 leaves.
TREE_PARAMS: dict[str, Any] = {
    "objective": "lambdarank", "metric": "ndcg", "eval_at": [10, 50],
    "lambdarank_truncation_level": 50, "learning_rate": 0.05, "num_leaves": 31,
    "min_data_in_leaf": 20, "feature_fraction": 0.9, "lambda_l2": 1.0,
    "deterministic": True, "force_row_wise": True, "verbose": -1,
}
TREE_ROUNDS = 100
TREE_TOP = 150  # the trees re-rank each user's best candidates by the pair scorer
BELOW = 1e6  # what the candidates outside that top lose, so that they rank after it

Scores = Callable[[np.ndarray], np.ndarray]  # (..., F) features -> (...) scores


class TreeRanker:
    """A trained lambdarank booster scoring (..., F) candidate features."""

    def __init__(self, booster: Any):
        self.booster = booster

    @classmethod
    def train(cls, features: np.ndarray, padding: np.ndarray, truth: np.ndarray, *,
              rounds: int = TREE_ROUNDS, seed: int = 0) -> TreeRanker:
        """Fit on (U, C, F) features; users without a hit among their candidates are left out.

        Args:
            features: (U, C, F) float32.
            padding: (U, C) bool, not a candidate (or excluded).
            truth: (U, C) bool, bought in the window.
            rounds: boosting rounds.
            seed: LightGBM's seed.
        """
        import lightgbm

        keep = (truth & ~padding).any(axis=1)  # (U,)
        valid = ~padding[keep]  # (u, C)
        x = features[keep][valid]  # (n, F)
        y = truth[keep][valid].astype(np.int32)  # (n,)
        groups = valid.sum(axis=1)  # (u,) candidates per user, in row order
        params = {**TREE_PARAMS, "seed": seed, "num_threads": min(2, os.cpu_count() or 1)}
        dataset = lightgbm.Dataset(x, label=y, group=groups, params={"verbose": -1})
        return cls(lightgbm.train(params, dataset, num_boost_round=rounds))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(..., F) float32 -> (...) float64 scores."""
        flat = x.reshape(-1, x.shape[-1])
        if not len(flat):
            return np.zeros(x.shape[:-1])
        return self.booster.predict(flat, num_threads=1).reshape(x.shape[:-1])

    @classmethod
    def train_over(cls, mlp: Scores, features: np.ndarray, padding: np.ndarray,
                   truth: np.ndarray, *, seed: int = 0) -> TreeRanker:
        """Fit on the pair scorer ``mlp``'s top ``TREE_TOP`` candidates of each user: what
        the trees will re-rank."""
        top = cascade_top(np.asarray(mlp(features), dtype=np.float64), padding)
        return cls.train(features, ~top, truth, seed=seed)

    def to_string(self) -> str:
        return self.booster.model_to_string()

    @classmethod
    def from_string(cls, text: str) -> TreeRanker:
        import lightgbm

        return cls(lightgbm.Booster(model_str=text))


def standardised(scores: np.ndarray, padding: np.ndarray) -> np.ndarray:
    """(b, C) scores as z-scores over each row's candidates (0 where padding)."""
    valid = ~padding
    n = np.maximum(valid.sum(axis=1, keepdims=True), 1)
    mean = np.where(valid, scores, 0.0).sum(axis=1, keepdims=True) / n
    centred = np.where(valid, scores - mean, 0.0)
    std = np.sqrt((centred**2).sum(axis=1, keepdims=True) / n)
    return centred / np.where(std > 0, std, 1.0)


def cascade_top(scores: np.ndarray, padding: np.ndarray, top: int = TREE_TOP) -> np.ndarray:
    """(b, C) bool: each row's ``top`` best non-padding entries of ``scores``."""
    if scores.shape[1] <= top:
        return ~padding
    masked = np.where(padding, -np.inf, scores)
    best = np.argpartition(-masked, top - 1, axis=1)[:, :top]  # (b, top)
    out = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(out, best, True, axis=1)
    return out & ~padding


def stage_scores(stage: str, features: np.ndarray, padding: np.ndarray, mlp: Scores,
                 trees: Scores | None) -> np.ndarray:
    """(b, C) float64 scores of a stage (the pair scorer where there are no trees): the
    trees score only the pair scorer's top ``TREE_TOP`` of each row, the rest rank below."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} not in {STAGES}")
    first = np.asarray(mlp(features), dtype=np.float64)
    if stage == "mlp" or trees is None:
        return first
    top = cascade_top(first, padding)
    rows, cols = np.nonzero(top)
    second = np.zeros(first.shape)
    second[rows, cols] = trees(features[rows, cols])
    if stage == "blend":
        second = standardised(first, ~top) + standardised(second, ~top)
    return np.where(top, second, first - BELOW)


def choose_stage(features: np.ndarray, padding: np.ndarray, truth: np.ndarray,
                 sizes: np.ndarray, train_mlp: Callable[..., Scores], *,
                 seed: int = 0) -> tuple[str, dict[str, dict[str, float]]]:
    """The stage with the best held-out validation figures (``OBJECTIVE``, summed).

    Args:
        features: (U, C, F) validation users' candidate features.
        padding: (U, C) bool, not a candidate (or excluded).
        truth: (U, C) bool, bought in the validation window.
        sizes: (U,) each user's whole truth (what the candidates miss counts as missed).
        train_mlp: ``(features, padding, truth) -> scores function``: the pair scorer's fit.
        seed: the users' split and the learners' seed.

    Returns:
        The stage, and stage -> held-out metrics (with ``n_users``); only "mlp" when too few
        held-out users have a hit.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(features))
    held = np.sort(order[: int(round(len(order) * CHOICE_SHARE))])
    fit = np.sort(order[len(held):])
    hits = (truth & ~padding).any(axis=1)
    if hits[held].sum() < MIN_CHOICE_USERS or hits[fit].sum() < MIN_CHOICE_USERS:
        return "mlp", {"mlp": {"n_users": float(len(held))}}
    mlp = train_mlp(features[fit], padding[fit], truth[fit])
    trees = TreeRanker.train_over(mlp, features[fit], padding[fit], truth[fit], seed=seed)
    table = {}
    for stage in STAGES:
        scores = stage_scores(stage, features[held], padding[held], mlp, trees)
        scores[padding[held]] = -np.inf
        table[stage] = {**tuning_metrics(scores, truth[held], sizes[held]),
                        "n_users": float(len(held))}
    best = max(STAGES, key=lambda s: (sum(table[s][m] for m in OBJECTIVE), -STAGES.index(s)))
    log.info("ranking stage: %s (held-out %s)", best,
             {s: round(sum(v[m] for m in OBJECTIVE), 4) for s, v in table.items()})
    return best, table
