"""The learned models as protocol methods: the two-tower model trained from events, the
two-tower model alone, and the served ranking (``training.ranking.scorer.Scorer``).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from features.user_state import HISTORY_LEN
from training.config import TrainConfig
from training.data import TrainData, popularity_scores, validation_split
from training.event_examples import examples_from_events
from training.ranking.config import ScorerConfig
from training.ranking.histories import Histories
from training.ranking.items import embed_catalog
from training.ranking.scorer import Scorer
from training.recommender import ScoredRecommender, unit_fill

log = logging.getLogger(__name__)


class TwoTowerRecommender(ScoredRecommender):
    """The two-tower model trained on the training period, scoring by user · item.

    With ``config.user_features`` (the default) the examples carry each user's profile as
    of the end of the day before the example, and scoring uses the profile at the cut by
    the same rule (``features.user_state.profiles_as_of``): what Feast's daily
    ``user_profile`` snapshots would have held.

    Args:
        config: hyper-parameters (``text_encoder``: "minilm" for real runs, "tiny" in tests).
        cache_dir: text-embedding cache folder.
        progress: training progress bars.
        name: method name.
        users: user rows (``user_id``, ``country``, e.g. the landing ``users`` table) for
            the profile's country; None: country unknown (``TrainData`` has no users table).
    """

    def __init__(self, config: TrainConfig | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, *, progress: bool = False,
                 name: str = "two_tower", users: pd.DataFrame | None = None):
        self.config = config or TrainConfig()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.progress = progress
        self.name = name
        self.users = users

    def _fit(self, data: TrainData) -> None:
        from features.user_state import profiles_as_of
        from training.train import NotEnoughData, train

        profiled = self.config.user_features
        examples = examples_from_events(data.events, set(data.product_ids),
                                        history_len=self.config.history_len,
                                        catalog=data.catalog if profiled else None,
                                        users=self.users)
        # Each user's profile at the cut, keyed by user_id, for scoring.
        self.profiles = (profiles_as_of(data.events, data.catalog, self.users, data.users,
                                        [data.cut] * len(data.users)).set_axis(data.users)
                         if profiled else None)
        self.n_examples = len(examples)
        self.skipped: str | None = None
        self.result = None
        self.popularity = popularity_scores(data).astype(np.float32)  # (N,)
        try:
            self.result = train(self.config, data.catalog, examples, cache_dir=self.cache_dir,
                                progress=self.progress)
        except NotEnoughData as exc:  # a tiny shop: say so, rank by popularity
            self.skipped = str(exc)
            log.warning("%s not trained (%s); it ranks by popularity", self.name, exc)
            return
        index = self.result.item_index
        columns = np.array([index[p] for p in data.product_ids], dtype=np.int64)  # (N,)
        self.item_embeddings = np.asarray(self.result.item_embeddings,
                                          dtype=np.float32)[columns]  # (N, D)

    def scores(self, user_ids: Sequence[str]) -> np.ndarray:
        from training.embeddings import encode_users
        from training.user_features import align_to_users

        data = self.fitted
        if self.result is None:
            return np.tile(self.popularity, (len(user_ids), 1))  # (b, N)
        histories, types = data.histories(user_ids)
        profiles = (align_to_users(self.profiles, user_ids)
                    if self.profiles is not None else None)  # (b, len(PROFILE_COLUMNS))
        users = encode_users(self.result.model, histories, types, data.item_index,
                             self.item_embeddings, user_features=profiles)  # (b, D)
        return users @ self.item_embeddings.T  # (b, N)

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.config.to_params(), "examples": self.n_examples}
        if self.result is None:
            return {**out, "skipped": self.skipped}
        return {**out, "train_seconds": round(self.result.seconds, 1),
                "losses": [round(v, 4) for v in self.result.losses]}


class ServedRecommender(ScoredRecommender):
    """The served ranking under the evaluation protocol.

    Fitting on ``data``: the two-tower model is trained on the validation split's training
    part (unless given, e.g. by the pipeline from Feast), the pair scorers on its validation
    window, then the item side is refitted on all of ``data``. Histories are truncated to
    ``config.history_len`` as Feast truncates them.

    Args:
        config: scorer hyper-parameters.
        two_tower: the two-tower ``TrainConfig`` (None: no two-tower source).
        cache_dir: text-embedding cache.
        model: an already trained two-tower model (skips training it).
        scorer: an already tuned ``Scorer`` (e.g. a registered version's): fitting only
            refits its item side on the data; its model and pair scorers stay.
        users: user rows (country) for the profiles the two-tower model reads.
        validation_days: the validation window.
        progress: training progress bars.
        name: method name.
    """

    def __init__(self, config: ScorerConfig | None = None, two_tower: TrainConfig | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, *, model: Any = None,
                 scorer: Scorer | None = None, users: pd.DataFrame | None = None,
                 validation_days: int = 30, progress: bool = False, name: str = "served"):
        self.config = scorer.config if scorer is not None else config or ScorerConfig()
        self.two_tower = scorer.model_config if scorer is not None else two_tower
        self.cache_dir = cache_dir
        self.model = scorer.model if scorer is not None else model
        self.tuned = scorer
        self.users = users
        self.validation_days = validation_days
        self.progress = progress
        self.name = name

    def _fit(self, data: TrainData) -> None:
        if self.tuned is not None:
            self.scorer = copy.copy(self.tuned).fit_items(data, self.cache_dir)
            return
        split = validation_split(data, self.validation_days)
        model = self.model
        if model is None and self.two_tower is not None:
            tower = TwoTowerRecommender(self.two_tower, self.cache_dir, progress=self.progress,
                                        users=self.users)
            tower.fit(split.train)
            model = tower.result.model if tower.result is not None else None
        self.scorer = Scorer(self.config, model, self.two_tower)
        self.scorer.fit_items(split.train, self.cache_dir).tune(split, self.users)
        self.scorer.fit_items(data, self.cache_dir)

    def _rank(self, user_ids: Sequence[str], histories: Histories, k: int,
              exclude: Mapping[str, set[str]] | None) -> list[tuple[np.ndarray, np.ndarray]]:
        data = self.fitted
        if exclude is None:
            return self.scorer.rank(histories, data.cut.timestamp(), k)
        # Setting (b) as served: ``exclude_purchased`` leaves out the histories' purchased
        # lists (every purchase before the cut, as Feast serves them); the protocol's
        # ``exclude`` (the same purchases) adds nothing unless a user bought more than
        # ``PURCHASED_LEN`` distinct products.
        return self.scorer.rank(histories, data.cut.timestamp(), k, exclude_purchased=True,
                                exclude=[exclude.get(u, set()) for u in user_ids])

    def scores(self, user_ids: Sequence[str]) -> np.ndarray:
        """(U, N) scores (-inf: not a candidate)."""
        data = self.fitted
        histories = self.scorer.histories(data, user_ids, self.users)
        return self.scorer.scores(histories, data.cut.timestamp())

    def recommend(self, user_ids: Sequence[str], k: int, *,
                  exclude: Mapping[str, set[str]] | None = None,
                  batch_size: int = 256) -> list[list[str]]:
        """Top ``k`` per user; with ``exclude`` the new-products scorer is used.

        Every user's history is computed in one pass over the training events, then the
        users are ranked a batch at a time."""
        data = self.fitted
        ids = data.product_ids
        everyone = self.scorer.histories(data, list(user_ids), self.users)
        out: list[list[str]] = []
        for start in range(0, len(user_ids), batch_size):
            rows = range(start, min(start + batch_size, len(user_ids)))
            batch = [user_ids[r] for r in rows]
            out.extend([ids[c] for c in cols]
                       for cols, _ in self._rank(batch, everyone.take(rows), k, exclude))
        return out

    def params(self) -> dict[str, Any]:
        return {**self.scorer.params(), "validation_days": self.validation_days,
                "two_tower": self.model is not None or self.two_tower is not None}


class TwoTowerRanker(ScoredRecommender):
    """A trained two-tower model alone (user · item over the Feast-length history), for the
    comparison table.

    Args:
        model: the trained model; config: its ``TrainConfig``.
        cache_dir: text-embedding cache.
        history_len: history entries read per user.
        users: user rows (country) for the profiles.
        name: method name.
    """

    def __init__(self, model: Any, config: TrainConfig,
                 cache_dir: str | os.PathLike[str] | None = None,
                 history_len: int = HISTORY_LEN, users: pd.DataFrame | None = None,
                 name: str = "two_tower"):
        self.model = model
        self.config = config
        self.cache_dir = cache_dir
        self.history_len = history_len
        self.users = users
        self.name = name

    def _fit(self, data: TrainData) -> None:
        self.embeddings, _ = embed_catalog(self.model, self.config, data.catalog,
                                           data.product_ids, self.cache_dir)  # (N, D)
        self.fill = unit_fill(popularity_scores(data))  # (N,)

    def recommend(self, user_ids: Sequence[str], k: int, *,
                  exclude: Mapping[str, set[str]] | None = None,
                  batch_size: int | None = None) -> list[list[str]]:
        """``ScoredRecommender.recommend``, with every user's history computed in one pass
        over the training events rather than one per batch."""
        self._histories = (self._history_of(list(user_ids)),
                           {u: i for i, u in enumerate(user_ids)})
        try:
            return super().recommend(user_ids, k, exclude=exclude, batch_size=batch_size)
        finally:
            self._histories = None

    def _history_of(self, user_ids: list[str]) -> Histories:
        data = self.fitted
        return Histories.from_events(data.events, user_ids, self.history_len,
                                     catalog=data.catalog, user_table=self.users, at=data.cut)

    def scores(self, user_ids: Sequence[str]) -> np.ndarray:
        from training.embeddings import encode_users

        data = self.fitted
        known_rows = getattr(self, "_histories", None)
        if known_rows is not None and all(u in known_rows[1] for u in user_ids):
            hist = known_rows[0].take([known_rows[1][u] for u in user_ids])
        else:
            hist = self._history_of(list(user_ids))
        users = encode_users(self.model, hist.products, hist.event_types, data.item_index,
                             self.embeddings, user_features=hist.profiles)  # (b, D)
        scores = users @ self.embeddings.T  # (b, N)
        known = np.array([any(p in data.item_index for p in h) for h in hist.products])
        scores[~known] = self.fill  # cold users: popularity
        return scores.astype(np.float32)


class SequenceRanker(ScoredRecommender):
    """The sequence encoder alone (``training.ranking.sequence``): fitted on the data before
    the cut, each user's vector over the Feast-length history · every product, for the
    comparison table. Cold users get popularity.

    Args:
        config: scorer hyper-parameters (the ``sequence_*`` fields).
        text: the text encoder whose product vectors start the item table (None: random).
        cache_dir: text-embedding cache.
        name: method name.
    """

    def __init__(self, config: ScorerConfig | None = None, text: TrainConfig | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, name: str = "sequence"):
        self.config = config or ScorerConfig()
        self.text = text
        self.cache_dir = cache_dir
        self.name = name
        self.state: Any = None

    def _fit(self, data: TrainData) -> None:
        from features.contract import product_text
        from training.ranking.sequence import fit_sequence
        from training.text_cache import embed_texts

        vectors = None
        if self.text is not None:
            vectors = embed_texts(product_text(data.catalog), self.text, self.cache_dir,
                                  progress=False)
        self.state = fit_sequence(data.events, data.product_ids, vectors, self.config)
        self.fill = unit_fill(popularity_scores(data))  # (N,)

    def scores(self, user_ids: Sequence[str]) -> np.ndarray:
        data = self.fitted
        out = np.tile(self.fill, (len(user_ids), 1)).astype(np.float32)  # (U, N)
        if self.state is None:
            return out
        hist = Histories.from_events(data.events, list(user_ids), self.config.history_len)
        vectors = self.state.encode(hist.products, hist.event_types, hist.timestamps,
                                    data.item_index)
        rows = [r for r, v in enumerate(vectors) if v is not None]
        if rows:
            out[rows] = np.stack([vectors[r] for r in rows]) @ self.state.items_matrix().T
        return out

    def params(self) -> dict[str, Any]:
        return {**self.config.to_params(),
                "report": self.state.report if self.state is not None else None}
