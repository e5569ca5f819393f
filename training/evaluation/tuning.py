"""Baselines tuned per shop: each chooses its hyper-parameters on the validation window.

An untuned baseline is a weak bar: a served ranking tuned on validation can beat an ALS with
default settings and still lose to the ALS a user would tune in an afternoon. ``Tuned``
wraps a baseline with a small grid and chooses, **per setting**, the grid point with the best
validation Recall@K (``training.data.validation_split``: the ``validation_days`` before the
test cut, from the training data alone, so the test window is never seen). The search is
coordinate-wise from the baseline's defaults (each parameter in turn over its values, the
others held at their best so far, ``rounds`` times): ``sum(len(values))`` fits a round
instead of the grid's product. Each grid point is fitted once and measured in both settings;
ties keep the earlier point (the defaults first), so a choice is reproducible.

``tuned_baselines`` is the set every report and the promotion gate compare with: popularity
(window), repeat (recency half-life), item-kNN (neighbours, shrinkage), ALS (factors,
regularisation, alpha, iterations) and text cosine (profile weighting). ``params()`` holds
the grids, every measured point and the choices; the evaluation logs them to MLflow.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from training.config import TrainConfig
from training.data import SETTINGS, VALIDATION_DAYS, Split, TrainData, validation_split
from training.evaluation.baselines import ItemKNN, Popularity, Repeat, TextCosine
from training.evaluation.report import tuned_params
from training.metrics import recall_at_k
from training.ranking.als import ALS
from training.recommender import ScoredRecommender

log = logging.getLogger(__name__)

TUNING_USERS = 2_000  # validation users each grid point is measured on (seeded sample)
TUNING_K = 50  # the objective: validation Recall@TUNING_K

# The grids: small, around each baseline's defaults, wide enough for shops unlike the demo.
GRIDS: dict[str, dict[str, tuple[Any, ...]]] = {
    "popularity": {"days": (30, 7, 14, 90, None)},
    "repeat": {"half_life_days": (None, 7.0, 30.0, 90.0, 365.0)},
    "item_knn": {"neighbours": (None, 20, 50, 200), "shrink": (0.0, 10.0, 100.0),
                 "self_similarity": (False, True),
                 "weight": ("binary", "count")},
    "als": {"factors": (64, 32, 128), "regularization": (0.05, 0.01, 0.5, 5.0),
            "alpha": (5.0, 1.0, 20.0, 60.0), "iterations": (15, 30)},
    "text_cosine": {"weight": ("count", "binary")},
}


def _key(point: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(point.items()))


class Tuned(ScoredRecommender):
    """A baseline whose parameters are chosen per setting on the validation window.

    Args:
        make: builds the baseline from keyword parameters (its defaults for the rest).
        grid: parameter -> candidate values; the baseline's defaults start the search.
        name: method name (the baseline's, so reports and metric names stay the same).
        validation_days: validation window before the test cut.
        rounds: coordinate-search rounds.
        max_users: validation users a point is measured on (seeded sample; 0: all).
        k: the objective's cut-off (validation Recall@k).
    """

    def __init__(self, make: Callable[..., ScoredRecommender],
                 grid: Mapping[str, Sequence[Any]], *, name: str,
                 validation_days: int = VALIDATION_DAYS, rounds: int = 1,
                 max_users: int = TUNING_USERS, k: int = TUNING_K):
        self.make = make
        self.grid = {p: tuple(v) for p, v in grid.items()}
        self.name = name
        self.validation_days = validation_days
        self.rounds = rounds
        self.max_users = max_users
        self.k = k
        self.chosen: dict[str, dict[str, Any]] = {}
        self.trials: list[dict[str, Any]] = []
        self.models: dict[str, ScoredRecommender] = {}
        self.seconds = 0.0

    # -- tuning ----------------------------------------------------------------------------

    def defaults(self) -> dict[str, Any]:
        """The baseline's own values of the grid's parameters (where the search starts)."""
        base = self.make()
        return {p: getattr(base, p) for p in self.grid}

    def _measure(self, split: Split, users: dict[str, list[str]],
                 point: dict[str, Any]) -> dict[str, float]:
        """Fit one point on the validation split's training part; Recall@k per setting."""
        started = time.perf_counter()
        model = self.make(**point).fit(split.train)
        out = {}
        for setting in SETTINGS:
            if not users[setting]:
                out[setting] = 0.0
                continue
            lists = model.recommend(users[setting], self.k, exclude=split.exclusions(setting))
            truth = [split.truth[setting][u] for u in users[setting]]
            out[setting] = recall_at_k(lists, truth, (self.k,))[f"recall_at_{self.k}"]
        self.trials.append({"params": dict(point), **out,
                            "seconds": round(time.perf_counter() - started, 2)})
        return out

    def tune(self, data: TrainData) -> dict[str, dict[str, Any]]:
        """Choose each setting's parameters on ``data``'s validation split.

        Returns:
            setting -> chosen parameters (the defaults where there is no validation user).
        """
        memo = data.memo.setdefault(f"validation:{self.validation_days}",
                                    {"split": None, "fits": {}})
        if memo["split"] is None:
            memo["split"] = validation_split(data, self.validation_days)
        split: Split = memo["split"].sample(self.max_users or None)
        users = {s: split.users(s) for s in SETTINGS}
        measured: dict[tuple, dict[str, float]] = {}

        def value(point: dict[str, Any], setting: str) -> float:
            key = _key(point)
            if key not in measured:
                measured[key] = self._measure(split, users, point)
            return measured[key][setting]

        self.trials = []
        chosen = {}
        for setting in SETTINGS:
            best = self.defaults()
            if not users[setting]:
                chosen[setting] = best
                continue
            best_value = value(best, setting)
            for _ in range(self.rounds):
                for param, values in self.grid.items():
                    for v in values:
                        point = {**best, param: v}
                        got = value(point, setting)
                        if got > best_value + 1e-12:
                            best, best_value = point, got
            chosen[setting] = best
            log.info("%s %s: chose %s (validation R@%d %.4f of %d points)", self.name,
                     setting, best, self.k, best_value, len(measured))
        return chosen

    def _fit(self, data: TrainData) -> None:
        started = time.perf_counter()
        self.chosen = self.tune(data)
        self.models = {}
        fitted: dict[tuple, ScoredRecommender] = {}
        for setting, point in self.chosen.items():
            key = _key(point)
            if key not in fitted:
                fitted[key] = self.make(**point).fit(data)
            self.models[setting] = fitted[key]
        self.seconds = time.perf_counter() - started

    # -- answering -------------------------------------------------------------------------

    def scores(self, user_ids: Sequence[str]) -> np.ndarray:
        """(U, N) scores of the all-products setting's choice."""
        return self.models["all"].scores(user_ids)

    def recommend(self, user_ids: Sequence[str], k: int, *,
                  exclude: Mapping[str, set[str]] | None = None,
                  batch_size: int | None = None) -> list[list[str]]:
        """Top ``k``; with ``exclude`` (setting "new") the new-products choice answers."""
        self.fitted  # noqa: B018 - raises before fit
        model = self.models["all" if exclude is None else "new"]
        return model.recommend(user_ids, k, exclude=exclude, batch_size=batch_size)

    def params(self) -> dict[str, Any]:
        return {
            "tuned": True, "objective": f"validation recall_at_{self.k}",
            "validation_days": self.validation_days, "max_users": self.max_users,
            "grid": {p: list(v) for p, v in self.grid.items()},
            "chosen": self.chosen,
            "models": {s: m.params() for s, m in self.models.items()},
            "trials": self.trials, "tuning_seconds": round(self.seconds, 1),
        }


def tuned_baselines(config: TrainConfig | None = None,
                    cache_dir: str | os.PathLike[str] | None = None, *,
                    validation_days: int = VALIDATION_DAYS,
                    max_users: int = TUNING_USERS) -> list[Tuned]:
    """Popularity, repeat, item-kNN, ALS and text cosine, each tuned on validation (``GRIDS``).

    Args:
        config: the text encoder of text cosine.
        cache_dir: text-embedding cache folder.
        validation_days: the validation window.
        max_users: validation users per grid point.
    """
    makers: dict[str, Callable[..., ScoredRecommender]] = {
        "popularity": Popularity,
        "repeat": Repeat,
        "item_knn": ItemKNN,
        "als": ALS,
        "text_cosine": lambda **kw: TextCosine(config, cache_dir, **kw),
    }
    return [Tuned(make, GRIDS[name], name=name, validation_days=validation_days,
                  max_users=max_users) for name, make in makers.items()]


def tuning_tags(params: Mapping[str, Any]) -> dict[str, str]:
    """``tuned.<baseline>.<setting>`` -> the parameters the baseline chose on validation,
    e.g. ``tuned.als.new: factors=32, regularization=0.5, ...``: MLflow tags, so that a
    re-evaluation against another champion may write them again."""
    return {f"tuned.{method}.{setting}": ", ".join(f"{k}={v}" for k, v in chosen.items())
            for method, p in tuned_params(params).items()
            for setting, chosen in p["chosen"].items()}
