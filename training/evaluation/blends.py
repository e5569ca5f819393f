"""Research blends: candidate sources combined into one score per (user, product).

``Blend`` combines sources (the two-tower model, repeat, item co-occurrence, ALS, popularity,
...) tuned on the validation split only (``training.data.validation_split``), separately
for the two settings. Two learners:

- ``weights``: a weighted sum of per-user normalised scores, weights by coordinate search;
- ``mlp``: the pair scorer (``training.ranking.pair``) over the normalised scores plus
  purchase facts, trained with a listwise softmax on the validation window's purchases.

The served ranking (``training.ranking``) grew out of the mlp blend; these stay as the
experiments it is compared with.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import sparse

from training.config import TrainConfig
from training.data import VALIDATION_DAYS, Split, TrainData, popularity_scores, validation_split
from training.evaluation.baselines import ItemKNN, Popularity, Repeat, TextCosine
from training.evaluation.models import ServedRecommender, TwoTowerRecommender
from training.metrics import top_k, tuning_metrics
from training.ranking.als import ALS
from training.ranking.pair import PairScorer, train_scorer
from training.recommender import Recommender, ScoredRecommender, mask_excluded, ranked_ids

log = logging.getLogger(__name__)


DEFAULT_GRID = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)


# What the weight search maximises on validation: the sum of these metrics.
DEFAULT_OBJECTIVE = ("recall_at_50", "ndcg_at_10")


def normalise_scores(scores: np.ndarray, method: str = "minmax") -> np.ndarray:
    """Per-user normalisation, so sources on different scales can be summed.

    Args:
        scores: (U, N); -inf marks excluded products (they stay -inf).
        method: "minmax" (to [0, 1] over each user's finite scores) or "rank"
            (reciprocal rank, 1 / (10 + rank), rank from 0; ties by column).

    Returns:
        (U, N) float32.
    """
    scores = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(scores)  # (U, N)
    if method == "minmax":
        low = np.where(finite, scores, np.inf).min(axis=1, keepdims=True)  # (U, 1)
        high = np.where(finite, scores, -np.inf).max(axis=1, keepdims=True)  # (U, 1)
        span = np.where(high > low, high - low, 1.0)  # (U, 1)
        out = (scores - np.where(np.isfinite(low), low, 0.0)) / span  # (U, N)
    elif method == "rank":
        order = top_k(np.where(finite, scores, -np.inf), scores.shape[1])  # (U, N) best first
        ranks = np.empty_like(order)
        np.put_along_axis(ranks, order, np.arange(scores.shape[1])[None, :], axis=1)
        out = 1.0 / (10.0 + ranks)  # (U, N)
    else:
        raise ValueError(f"normalisation {method!r} not in minmax/rank")
    return np.where(finite, out, -np.inf).astype(np.float32)


def search_weights(
    sources: Sequence[np.ndarray],
    truth: np.ndarray,
    truth_sizes: np.ndarray,
    *,
    grid: Sequence[float] = DEFAULT_GRID,
    rounds: int = 3,
    objective: Sequence[str] = DEFAULT_OBJECTIVE,
) -> tuple[list[float], dict[str, float]]:
    """Coordinate search for the weights of a sum of normalised score matrices.

    Starts from the best single source (weight 1, others 0); then, round after round,
    sets each weight to the grid value that maximises the objective with the others fixed,
    until a round changes nothing.

    Args:
        sources: S matrices (U, N), normalised, -inf = excluded.
        truth: (U, N) bool.
        truth_sizes: (U,) int.
        grid: candidate weights.
        rounds: at most this many sweeps.
        objective: metrics (of ``tuning_metrics``) whose sum is maximised.

    Returns:
        The weights, and the validation metrics they reach.
    """
    ks = sorted({int(m.rsplit("_", 1)[1]) for m in objective} | {10, 50})

    def evaluate(weights: Sequence[float]) -> tuple[float, dict[str, float]]:
        total = np.zeros_like(sources[0], dtype=np.float32)  # (U, N)
        for w, s in zip(weights, sources, strict=True):
            if w:
                total += np.float32(w) * s
        if not any(weights):
            total = sources[0].copy()
        metrics = tuning_metrics(total, truth, truth_sizes, ks)
        return sum(metrics[m] for m in objective), metrics

    singles = [evaluate([1.0 if j == i else 0.0 for j in range(len(sources))])
               for i in range(len(sources))]
    best_i = int(np.argmax([v for v, _ in singles]))
    weights = [1.0 if j == best_i else 0.0 for j in range(len(sources))]
    best, metrics = singles[best_i]
    for _ in range(rounds):
        changed = False
        for i in range(len(sources)):
            for value in grid:
                if value == weights[i]:
                    continue
                trial = [*weights[:i], value, *weights[i + 1:]]
                if not any(trial):
                    continue
                score, trial_metrics = evaluate(trial)
                if score > best + 1e-9:
                    best, metrics, weights, changed = score, trial_metrics, trial, True
        if not changed:
            break
    return weights, metrics


class PurchaseContext:
    """Per (user, product) facts of the purchase history that the learned blend reads.

    Scores of sources say how well a product matches a user; these say how purchases of it
    behave: whether the user bought it, how often and how lately, whether buyers of it come
    back for more, whether it is selling right now, how active the user is.

    ``features(user_ids)`` returns (U, N, C) float32 with, in order (``NAMES``):
    own (bought before, 0/1), log1p purchases, log1p purchases in the last 30 days,
    recency exp(-days since last purchase / 30), long recency (/ 180), the product's
    repurchase rate (share of its buyers who bought it on 2+ occasions, smoothed), own ×
    repurchase rate, log popularity over 7 and 30 days (scaled to [0, 1]), trend (log of
    the 7-day over the 30-day rate), newness 1 / (1 + days since first sale / 30), the user's
    log1p purchase occasions / 5, and own × that.
    """

    NAMES = ("own", "log_count", "log_count_30d", "recency_30d", "recency_180d",
             "repurchase_rate", "own_x_repurchase_rate", "popularity_7d", "popularity_30d",
             "trend", "newness", "user_occasions", "own_x_user_occasions")

    def __init__(self, prior: float = 5.0):
        self.prior = prior

    def fit(self, data: TrainData) -> PurchaseContext:
        """Compute the product and user facts of ``data``; returns self."""
        self.data = data
        self.count = data.interactions(event_types=("purchase",), weight="count")  # (U, N)
        self.count_30d = data.interactions(event_types=("purchase",), weight="count",
                                           since=data.cut - pd.Timedelta(days=30))  # (U, N)
        buys = data.purchases
        last = buys.groupby(["user_id", "product_id"])["ts"].max()
        age = (data.cut - last).dt.total_seconds().to_numpy() / 86_400.0  # (P,) days
        rows = last.index.get_level_values(0).map(data.user_index).to_numpy()
        cols = last.index.get_level_values(1).map(data.item_index).to_numpy()
        shape = (len(data.users), len(data.product_ids))
        self.age = sparse.csr_matrix((age + 1e-3, (rows, cols)), shape=shape)  # (U, N) days
        # occasions: distinct purchase times (baskets)
        occasions = buys.drop_duplicates(["user_id", "product_id", "ts"])
        per_pair = occasions.groupby(["user_id", "product_id"]).size()
        buyers = per_pair.groupby(level="product_id").size()
        repeaters = (per_pair > 1).groupby(level="product_id").sum()
        overall = float((per_pair > 1).mean()) if len(per_pair) else 0.0
        rate = (repeaters + self.prior * overall) / (buyers + self.prior)
        self.rate = rate.reindex(data.product_ids).fillna(overall).to_numpy(np.float32)  # (N,)
        pop7 = np.log1p(popularity_scores(data, 7))  # (N,)
        pop30 = np.log1p(popularity_scores(data, 30))  # (N,)
        self.pop7 = (pop7 / max(pop7.max(), 1e-9)).astype(np.float32)  # (N,)
        self.pop30 = (pop30 / max(pop30.max(), 1e-9)).astype(np.float32)  # (N,)
        raw7, raw30 = np.expm1(pop7), np.expm1(pop30)
        self.trend = (np.log((raw7 + 1.0) / (raw30 * 7.0 / 30.0 + 1.0)) / 3.0).astype(np.float32)
        first = buys.groupby("product_id")["ts"].min()
        first_age = ((data.cut - first).dt.total_seconds() / 86_400.0).reindex(data.product_ids)
        self.newness = (1.0 / (1.0 + first_age.fillna(1e4).to_numpy() / 30.0)).astype(np.float32)
        per_user = buys.drop_duplicates(["user_id", "ts"]).groupby("user_id").size()
        self.occasions = (np.log1p(per_user.reindex(data.users).fillna(0).to_numpy())
                          / 5.0).astype(np.float32)  # (U,)
        return self

    def features(self, user_ids: Sequence[str]) -> np.ndarray:
        """(U, N, C) float32 facts for ``user_ids`` (unknown users: no history)."""
        data = self.data
        index = np.array([data.user_index.get(u, -1) for u in user_ids], dtype=np.int64)  # (U,)
        known = (index >= 0)[:, None]  # (U, 1)
        pick = np.maximum(index, 0)

        def rows(matrix: sparse.csr_matrix) -> np.ndarray:
            return np.where(known, matrix[pick].toarray(), 0.0).astype(np.float32)  # (U, N)

        count, count_30d, age = rows(self.count), rows(self.count_30d), rows(self.age)
        own = (count > 0).astype(np.float32)  # (U, N)
        users = np.where(known[:, 0], self.occasions[pick], 0.0)[:, None]  # (U, 1)
        shape = own.shape

        def wide(values: np.ndarray) -> np.ndarray:
            return np.broadcast_to(values[None, :], shape)  # (U, N)

        columns = [
            own, np.log1p(count), np.log1p(count_30d),
            own * np.exp(-age / 30.0), own * np.exp(-age / 180.0),
            wide(self.rate), own * self.rate[None, :],
            wide(self.pop7), wide(self.pop30), wide(self.trend), wide(self.newness),
            np.broadcast_to(users, shape), own * users,
        ]
        return np.stack(columns, axis=-1).astype(np.float32)  # (U, N, C)


class Blend(ScoredRecommender):
    """Candidate sources combined into one score per (user, product), tuned on validation.

    Two ways of combining, both tuned on the validation split only, per setting:

    - ``learner="weights"``: a weighted sum of per-user normalised source scores, the
      weights chosen by coordinate search (``search_weights``) to maximise the objective.
    - ``learner="mlp"``: a small network (``PairScorer``) over the min-max normalised source
      scores and the purchase facts of ``PurchaseContext``, trained with a listwise softmax
      on the validation window's purchases: a learned blend that can, e.g., rank a product
      bought once a year ago below a strong co-purchase suggestion.

    Args:
        sources: blendable methods (``ScoredRecommender``). Copies are fitted on the
            validation split (shared between blends of the same ``TrainData``); then the
            originals are fitted on the training data (reused if already fitted on it).
        learner: "weights" or "mlp".
        validation_days: validation window before the test cut.
        normalise: "weights" learner: "minmax", "rank" or "auto" (the better on validation).
        grid: "weights" learner: candidate weights.
        rounds: "weights" learner: coordinate-search sweeps.
        objective: "weights" learner: validation metrics whose sum is maximised.
        hidden: "mlp" learner: hidden width.
        epochs: "mlp" learner: passes over the validation users.
        max_users: "mlp" learner: at most this many validation users (a seeded sample),
            bounding memory on large shops.
        seed: "mlp" learner: seed.
        name: method name.

    ``params()`` reports what was chosen and the validation metrics it reached (for the
    "mlp" learner these are in-sample: it was trained on that window).
    """

    def __init__(self, sources: Sequence[ScoredRecommender], *, learner: str = "weights",
                 validation_days: int = VALIDATION_DAYS, normalise: str = "auto",
                 grid: Sequence[float] = DEFAULT_GRID, rounds: int = 3,
                 objective: Sequence[str] = DEFAULT_OBJECTIVE, hidden: int = 32,
                 epochs: int = 20, max_users: int = 2000, seed: int = 0,
                 name: str = "blend"):
        names = [s.name for s in sources]
        if not sources or len(set(names)) != len(names):
            raise ValueError(f"a blend needs sources with unique names, got {names}")
        if learner not in ("weights", "mlp"):
            raise ValueError(f"learner {learner!r} not in weights/mlp")
        self.sources = list(sources)
        self.learner = learner
        self.validation_days = validation_days
        self.normalise = normalise
        self.grid = tuple(grid)
        self.rounds = rounds
        self.objective = tuple(objective)
        self.hidden = hidden
        self.epochs = epochs
        self.max_users = max_users
        self.seed = seed
        self.name = name
        self.weights: dict[str, dict[str, float]] = {}
        self.normalisation: dict[str, str] = {}
        self.scorers: dict[str, PairScorer] = {}
        self.validation: dict[str, dict[str, float]] = {}
        self.validation_cut: pd.Timestamp | None = None

    # -- fitting -------------------------------------------------------------------------

    def _fit(self, data: TrainData) -> None:
        split, tuned = validation_fits(self.sources, data, self.validation_days)
        self.validation_cut = split.cut
        self.tune(split, tuned)
        for source in self.sources:
            if source.data is not data:
                source.fit(data)
        if self.learner == "mlp":
            self.context = PurchaseContext().fit(data)

    def tune(self, split: Split, fitted: Sequence[ScoredRecommender]) -> None:
        """Choose each setting's combination on ``split`` (a validation split).

        Args:
            split: the validation split.
            fitted: the sources fitted on ``split.train``, in ``self.sources`` order.
        """
        data = split.train
        context = PurchaseContext().fit(data) if self.learner == "mlp" else None
        for setting in ("all", "new"):
            users = split.users(setting)
            if self.learner == "mlp" and len(users) > self.max_users:
                rng = np.random.default_rng(self.seed)
                users = sorted(rng.choice(users, self.max_users, replace=False).tolist())
            if not users:
                self._untuned(setting)
                continue
            exclude = split.exclusions(setting)
            truth = np.zeros((len(users), len(data.product_ids)), dtype=bool)  # (U, N)
            sizes = np.zeros(len(users), dtype=np.int64)  # (U,)
            for row, user in enumerate(users):
                products = split.truth[setting][user]
                sizes[row] = len(products)
                truth[row, [data.item_index[p] for p in products if p in data.item_index]] = True
            raw = [self._source_scores(source, users, exclude, data) for source in fitted]
            if self.learner == "weights":
                self._tune_weights(setting, raw, truth, sizes)
            else:
                assert context is not None
                excluded = excluded_matrix(users, exclude, data.item_index)  # (U, N)
                features = self._features(raw, context, users)  # (U, N, F)
                self.scorers[setting] = train_scorer(
                    features, excluded, truth & ~excluded, hidden=self.hidden,
                    epochs=self.epochs, seed=self.seed)
                scores = self._apply(self.scorers[setting], features, excluded)
                self.validation[setting] = tuning_metrics(scores, truth, sizes)
            self.validation[setting]["n_users"] = float(len(users))
            log.info("%s %s: validation %s", self.name, setting,
                     {k: round(v, 4) for k, v in self.validation[setting].items()})

    def _untuned(self, setting: str) -> None:
        """No validation user: fall back to the first source alone."""
        self.weights[setting] = {s.name: float(i == 0) for i, s in enumerate(self.sources)}
        self.normalisation[setting] = "minmax"
        self.validation[setting] = {"n_users": 0.0}

    def _tune_weights(self, setting: str, raw: list[np.ndarray], truth: np.ndarray,
                      sizes: np.ndarray) -> None:
        methods = ("minmax", "rank") if self.normalise == "auto" else (self.normalise,)
        best: tuple[float, str, list[float], dict[str, float]] | None = None
        for method in methods:
            normalised = [normalise_scores(s, method) for s in raw]
            weights, metrics = search_weights(normalised, truth, sizes, grid=self.grid,
                                              rounds=self.rounds, objective=self.objective)
            value = sum(metrics[m] for m in self.objective)
            if best is None or value > best[0]:
                best = (value, method, weights, metrics)
        assert best is not None
        _, method, weights, metrics = best
        self.normalisation[setting] = method
        self.weights[setting] = {s.name: w for s, w in zip(self.sources, weights, strict=True)}
        self.validation[setting] = dict(metrics)

    # -- scoring -------------------------------------------------------------------------

    @staticmethod
    def _source_scores(source: ScoredRecommender, users: Sequence[str],
                       exclude: Mapping[str, set[str]] | None, data: TrainData) -> np.ndarray:
        scores = np.asarray(source.scores(users), dtype=np.float64)  # (U, N)
        mask_excluded(scores, users, exclude, data.item_index)
        return scores

    @staticmethod
    def _features(raw: Sequence[np.ndarray], context: PurchaseContext,
                  users: Sequence[str]) -> np.ndarray:
        """(U, N, S + C): min-max normalised source scores, then the purchase facts."""
        scores = [np.nan_to_num(normalise_scores(s, "minmax"), neginf=0.0) for s in raw]
        return np.concatenate([np.stack(scores, axis=-1), context.features(users)],
                              axis=-1).astype(np.float32)  # (U, N, F)

    @staticmethod
    def _apply(scorer: PairScorer, features: np.ndarray, excluded: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            scores = scorer(torch.from_numpy(features)).double().numpy()  # (U, N)
        scores[excluded] = -np.inf
        return scores

    def _blend(self, user_ids: Sequence[str], setting: str,
               exclude: Mapping[str, set[str]] | None) -> np.ndarray:
        data = self.fitted
        if self.learner == "mlp" and setting in self.scorers:
            raw = [self._source_scores(s, user_ids, exclude, data) for s in self.sources]
            excluded = excluded_matrix(user_ids, exclude, data.item_index)  # (b, N)
            features = self._features(raw, self.context, user_ids)  # (b, N, F)
            return self._apply(self.scorers[setting], features, excluded)
        weights = self.weights.get(setting) or {s.name: float(i == 0)
                                                for i, s in enumerate(self.sources)}
        total = np.zeros((len(user_ids), len(data.product_ids)), dtype=np.float64)  # (b, N)
        for source in self.sources:
            weight = weights[source.name]
            if weight:
                scores = self._source_scores(source, user_ids, exclude, data)  # (b, N)
                total += weight * normalise_scores(scores, self.normalisation.get(setting,
                                                                                  "minmax"))
        mask_excluded(total, user_ids, exclude, data.item_index)
        return total

    def scores(self, user_ids: Sequence[str]) -> np.ndarray:
        """(U, N) blended scores of the all-products setting."""
        return self._blend(user_ids, "all", None)

    def recommend(
        self,
        user_ids: Sequence[str],
        k: int,
        *,
        exclude: Mapping[str, set[str]] | None = None,
        batch_size: int = 256,
    ) -> list[list[str]]:
        """Top ``k`` of the blend; with ``exclude`` the new-products combination is used.

        Args:
            user_ids: users.
            k: list length.
            exclude: user -> products never to recommend (setting "new").
            batch_size: users scored at once.

        Returns:
            Per user, up to ``k`` product ids best first.
        """
        data = self.fitted
        setting = "all" if exclude is None else "new"
        ids = np.asarray(data.product_ids, dtype=object)
        out: list[list[str]] = []
        for start in range(0, len(user_ids), batch_size):
            batch = list(user_ids[start : start + batch_size])
            out.extend(ranked_ids(self._blend(batch, setting, exclude), ids, k))
        return out

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "learner": self.learner, "sources": [s.name for s in self.sources],
            "validation_days": self.validation_days,
            "validation_cut": None if self.validation_cut is None
            else self.validation_cut.isoformat(),
            "validation": self.validation,
        }
        if self.learner == "weights":
            out.update(weights=self.weights, normalisation=self.normalisation)
        else:
            out.update(features=[*(s.name for s in self.sources), *PurchaseContext.NAMES],
                       hidden=self.hidden, epochs=self.epochs)
        return out


def excluded_matrix(
    user_ids: Sequence[str], exclude: Mapping[str, set[str]] | None, item_index: Mapping[str, int]
) -> np.ndarray:
    """(U, N) bool: True where ``exclude`` forbids recommending the product to the user."""
    out = np.zeros((len(user_ids), len(item_index)), dtype=bool)
    for row, user in enumerate(user_ids):
        out[row, [item_index[p] for p in (exclude or {}).get(user, ()) if p in item_index]] = True
    return out


def validation_fits(
    sources: Sequence[ScoredRecommender], data: TrainData, days: int
) -> tuple[Split, list[ScoredRecommender]]:
    """The validation split of ``data`` and a copy of each source fitted on its training part.

    Memoised on ``data.memo`` per source, so blends of the same sources fit each only once.

    Args:
        sources: the sources.
        data: the (test split's) training data.
        days: validation window.

    Returns:
        The split, and the fitted copies in ``sources`` order.
    """
    memo = data.memo.setdefault(f"validation:{days}", {"split": None, "fits": {}})
    if memo["split"] is None:
        memo["split"] = validation_split(data, days)
    split: Split = memo["split"]
    fitted = []
    for source in sources:
        if id(source) not in memo["fits"]:
            twin = copy.copy(source)  # shallow: fit() replaces every learned attribute
            twin.data = None
            memo["fits"][id(source)] = (source, twin.fit(split.train))
        fitted.append(memo["fits"][id(source)][1])
    return split, fitted


def standard_recommenders(
    config: TrainConfig | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    two_tower: bool = True,
    validation_days: int = VALIDATION_DAYS,
    users: pd.DataFrame | None = None,
    tuned: bool = True,
    blends: bool = False,
) -> list[Recommender]:
    """Every baseline, the two-tower model, [both blends] and the served ranking, in fitting
    order.

    The baselines are tuned on the validation window (``training.evaluation.tuning``): they
    are what every report compares with. The blends combine the untuned baselines (each
    tunes its own weights on the same window) and share the two-tower model, trained once.

    Args:
        config: two-tower and text-encoder hyper-parameters.
        cache_dir: text-embedding cache folder.
        progress: training progress bars.
        two_tower: include the two-tower model (alone and in the blends).
        validation_days: the validation window of the tuning and the blends.
        users: user rows (country) for the two-tower model's user profiles.
        tuned: tune the baselines (False: their default parameters, as before tuning).
        blends: also the two blends (reference methods from before the served ranking; they
            score every user against the whole catalogue per source, so they cost most of
            an evaluation's time and memory: 220 of 280 s and 5.4 of 5.8 GB at 25,000
            products).

    Returns:
        popularity, repeat, item_knn, als, text_cosine, [two_tower,] [blend_weights, blend,]
        served (``training.evaluation.models.ServedRecommender``: what the pipeline trains and serves).
    """
    from training.evaluation.tuning import tuned_baselines

    config = config or TrainConfig()

    sources: list[ScoredRecommender] = [Popularity(), Repeat(), ItemKNN(), ALS(),
                                        TextCosine(config, cache_dir)]
    methods: list[ScoredRecommender] = (
        list(tuned_baselines(config, cache_dir, validation_days=validation_days)) if tuned
        else sources)
    if two_tower:
        model = TwoTowerRecommender(config, cache_dir, progress=progress, users=users)
        methods.append(model)
        sources = [*sources, model]
    sources = [*sources, Popularity(days=7, name="popularity_7d")]
    if blends:
        methods += [Blend(sources, learner="weights", validation_days=validation_days,
                          name="blend_weights"),
                    Blend(sources, learner="mlp", validation_days=validation_days,
                          name="blend")]
    return [*methods,
            ServedRecommender(two_tower=config if two_tower else None, cache_dir=cache_dir,
                              users=users, validation_days=validation_days,
                              progress=progress)]
