"""The served ranking: candidate sources computed from a user's recent events, then scored.

What the server knows about a user at request time is a bounded event history
(``training.ranking.histories``). ``Scorer`` retrieves candidates from the two-tower, text,
ALS and sequence indexes, item co-occurrence and popularity, describes each candidate by

- the two-tower model: user tower over the history · item embeddings;
- text similarity: the mean text vector of the history's products · each product's;
- item co-occurrence: cosine between products' buyer sets, summed over the history;
- ALS item factors: the user's factors solved in closed form from the history's counts;
- the sequence encoder (``training.ranking.sequence``): a causal transformer's vector of the
  ordered history · the product's vector (plus its bias);
- purchase facts (``FACT_NAMES``): whether, how often and how lately the history bought the
  product, its repurchase rate, popularity over 7 and 30 days, trend and newness, and how
  active the user is;

and ranks them with a stage trained on the validation window only, one per setting: "all"
(repeat buying counts) and "new" (the user's purchases left out). The stage is the pair
scorer (``training.ranking.pair``), lambdarank trees or both, chosen per shop and setting on
held-out validation users (``training.ranking.ltr``). Users with no history get the facts
alone.

The item side (``training.ranking.items``) is fitted on the data before a cut; the learned
parts (the two-tower weights and the pair scorers) are the model. Evaluation fits the item
side at the test cut and serving at the end of the interval, through the same code, with
the histories truncated the way Feast truncates them, so what is measured is what is
served.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import sparse

from features.user_state import TARGET_EVENT_TYPES
from training.config import TrainConfig
from training.data import SETTINGS, Split, TrainData
from training.index import EXACT_MAX
from training.metrics import tuning_metrics
from training.ranking.config import (
    FEATURE_NAMES,
    LEGACY_FEATURE_NAMES,
    SOURCE_NAMES,
    ScorerConfig,
)
from training.ranking.context import context_features
from training.ranking.histories import SPACE_VECTORS, Histories, StoredVectors, UserView
from training.ranking.items import ItemState
from training.ranking.ltr import STAGES, TreeRanker, choose_stage, stage_scores
from training.ranking.pair import PairScorer, train_scorer
from training.ranking.rows import summed_rows

log = logging.getLogger(__name__)

# Up to this many users at once (a request's), ``views`` reads the co-occurrence sums row by
# row (``training.ranking.rows``); above, as one sparse product (evaluation's batches).
FEW_USERS = 8


class Scorer:
    """Two-tower model + pair scorers (the model) over an ``ItemState`` (fitted at a cut).

    Args:
        config: scorer hyper-parameters.
        model: the trained two-tower model (None: the co-occurrence, ALS and facts only).
        model_config: its ``TrainConfig``.
        index_exact_max: retrieval indexes built here (evaluation) are exact up to this many
            products, HNSW above (``training.index``).
    """

    def __init__(self, config: ScorerConfig, model: Any = None,
                 model_config: TrainConfig | None = None, *, index_exact_max: int = EXACT_MAX):
        self.config = config
        self.index_exact_max = index_exact_max
        self.model = model
        self.model_config = model_config
        self.pair_scorers: dict[str, Any] = {}
        # the pair scorers as numpy (``NumpyPairScorer``), each with the module it was made of
        self._numpy_scorers: dict[str, tuple[Any, Any]] = {}
        self.validation: dict[str, dict[str, float]] = {}
        # the ranking stage of each setting, its trees, and the held-out figures it won with
        self.stages: dict[str, str] = {}
        self.tree_rankers: dict[str, TreeRanker] = {}
        self.stage_choice: dict[str, dict[str, dict[str, float]]] = {}
        # the features the stages read, in ``FEATURE_NAMES`` columns (a loaded older bundle
        # reads fewer: ``_model_columns``)
        self.feature_names: tuple[str, ...] = (FEATURE_NAMES if config.context
                                               else LEGACY_FEATURE_NAMES)
        self.state: ItemState | None = None

    # -- the item side -------------------------------------------------------------------

    def fit_items(self, data: TrainData, cache_dir: str | os.PathLike[str] | None = None,
                  users: pd.DataFrame | None = None) -> Scorer:
        """Fit the item side on ``data`` (``users``: rows with country); returns self."""
        self.state = ItemState.fit(data, self.config, self.model, self.model_config, cache_dir,
                                   users)
        return self

    # -- features ------------------------------------------------------------------------

    def views(self, histories: Histories, now: float | None = None,
              stored: Sequence[StoredVectors | None] | None = None) -> list[UserView]:
        """What ``rank`` computes of each user before retrieving (``_views``): the user's
        vectors and co-occurrence sums. The same history gives the same views on the same
        day (a server may keep them)."""
        return self._views(histories, now, stored)

    def _views(self, histories: Histories, now: float | None = None,
               stored: Sequence[StoredVectors | None] | None = None) -> list[UserView]:
        """What the candidates and features of each user are computed from, at ``now``
        (epoch seconds; default: the cut or the histories' latest event, whichever is later:
        the profiles' days since the last purchase count to that day).

        Args:
            stored: per user, vectors and retrieval answers this item side computed for
                the same row before (``StoredVectors``, written when the row changed), used
                instead of encoding and solving again; None where there are none.
        """
        from training.embeddings import encode_users

        state, config = self.state, self.config
        index = state.item_index
        n = len(state.product_ids)
        views = []
        inter_r, inter_c = [], []
        for row, (products, types, stamps) in enumerate(zip(
                histories.products, histories.event_types, histories.timestamps, strict=True)):
            cols = [index.get(p, -1) for p in products]
            known = np.asarray([c for c in cols if c >= 0], dtype=np.int64)
            interaction = [c for c, t in zip(cols, types, strict=True)
                           if c >= 0 and t in TARGET_EVENT_TYPES]
            buys = [(c, ts) for c, t, ts in zip(cols, types, stamps, strict=True)
                    if c >= 0 and t == "purchase"]
            inter_r.extend([row] * len(interaction))
            inter_c.extend(interaction)
            views.append(UserView(known=known, interactions=np.asarray(interaction, np.int64),
                                  buy_cols=np.asarray([c for c, _ in buys], np.int64),
                                  buy_times=np.asarray([t for _, t in buys], np.float64)))
        # co-occurrence: the (binary) interacted products' neighbour rows, summed -- sparse;
        # for a request's few users straight from the arrays (the same bits, without
        # scipy's ~1 ms of building and checking matrices), for a batch as one product
        together = None
        if len(histories) > FEW_USERS:
            indicator = sparse.csr_matrix((np.ones(len(inter_r), np.float32),
                                           (inter_r, inter_c)), shape=(len(histories), n))
            indicator.sum_duplicates()
            indicator.data[:] = 1.0
            together = sparse.csr_matrix(indicator @ state.neighbours)  # (b, N) sparse
            together.sort_indices()
        kept = list(stored) if stored is not None else [None] * len(histories)
        todo = (list(range(len(histories))) if stored is None  # one batch, as always
                else [r for r, v in enumerate(views) if kept[r] is None and len(v.known)])
        users: dict[int, np.ndarray] = {}
        sequences: dict[int, np.ndarray | None] = {}
        some = histories if len(todo) == len(histories) else histories.take(todo)
        if self.model is not None and state.embeddings is not None and todo:
            if now is None:
                stamps = np.concatenate([np.zeros(0), *histories.timestamps])
                now = max(state.cut.timestamp(),
                          float(stamps[np.isfinite(stamps)].max(initial=0.0)))
            encoded = encode_users(self.model, some.products, some.event_types, index,
                                   state.embeddings, user_features=some.profile_values_at(now))
            users = dict(zip(todo, encoded, strict=True))
        if state.sequence is not None and todo:
            sequences = dict(zip(todo, state.sequence.encode(
                some.products, some.event_types, some.timestamps, index), strict=True))
        for row, view in enumerate(views):
            if together is None:
                view.together_cols, view.together_vals = summed_rows(
                    state.neighbours, np.unique(view.interactions))
            else:
                start, stop = together.indptr[row], together.indptr[row + 1]
                view.together_cols = together.indices[start:stop].astype(np.int64)
                view.together_vals = together.data[start:stop]
            if not len(view.known):
                continue
            if kept[row] is not None:  # computed when the row was written
                for attribute, vector in kept[row].vectors.items():
                    setattr(view, attribute, vector)
                view.retrieved = dict(kept[row].retrieved)
                continue
            if row in users:
                view.user_vector = users[row]
            view.sequence_vector = sequences.get(row)
            if state.text_vectors is not None:
                mean = state.text_vectors[view.known].mean(axis=0)  # (H,)
                view.text_vector = mean / max(float(np.linalg.norm(mean)), 1e-9)
            if len(view.interactions):
                view.als_vector = self._als_factors(view.interactions)
        del config
        return views

    def _als_factors(self, cols: np.ndarray) -> np.ndarray:
        """(F,) a user's ALS factors solved from the history's counts: the implicit-feedback
        normal equations (Hu, Koren and Volinsky 2008), confidence 1 + alpha · log1p(count),
        as ``training.ranking.als.ALS`` fits them."""
        state, config = self.state, self.config
        unique, counts = np.unique(cols, return_counts=True)
        items = state.als_items[unique].astype(np.float64)  # (n, F)
        extra = config.als_alpha * np.log1p(counts.astype(np.float64))  # (n,) C - 1
        eye = config.als_regularization * np.eye(items.shape[1])  # (F, F)
        lhs = state.als_gram + (items.T * extra) @ items + eye  # (F, F)
        rhs = items.T @ (1.0 + extra)  # (F,)
        return np.linalg.solve(lhs, rhs).astype(np.float32)

    def candidates(self, histories: Histories, *, views: list[UserView] | None = None,
                   exclude: Sequence[np.ndarray] | None = None,
                   allowed: np.ndarray | None = None) -> list[np.ndarray]:
        """Per user, the catalogue columns worth scoring (sorted, no duplicates): the
        history's products, their co-occurrence neighbours, the nearest products of the
        two-tower, text, ALS and sequence vectors (``config.candidates`` each) and the most
        popular products; topped up by popularity to ``config.min_candidates``.

        Args:
            histories: the users' histories.
            views: ``_views(histories)`` when already computed.
            exclude: per user, columns never to return.
            allowed: (N,) bool, the only columns that may be returned (None: all).
        """
        state, config = self.state, self.config
        views = views if views is not None else self._views(histories)
        found = self.retrieve(views)
        popular = state.popular_rows(config.popular_candidates)
        order = state.popularity_order()
        out = []
        for row, view in enumerate(views):
            together = view.together_cols
            if len(together) > config.neighbour_candidates:
                keep = np.argpartition(-view.together_vals, config.neighbour_candidates - 1)[
                    : config.neighbour_candidates]
                together = together[keep]
            parts = [view.known, together, popular,
                     *(f[row] for f in found.values() if f[row] is not None)]
            cols = np.unique(np.concatenate(parts))
            keep = np.ones(len(cols), dtype=bool)
            if allowed is not None:
                keep &= allowed[cols]
            if exclude is not None and len(exclude[row]):
                keep &= ~np.isin(cols, exclude[row])
            cols = cols[keep]
            if len(cols) < config.min_candidates:  # e.g. a narrow category: top up
                ok = np.ones(len(order), dtype=bool) if allowed is None else allowed[order]
                if exclude is not None and len(exclude[row]):
                    ok &= ~np.isin(order, exclude[row])
                extra = order[ok & ~np.isin(order, cols)][: config.min_candidates - len(cols)]
                cols = np.unique(np.concatenate([cols, extra]))
            out.append(cols)
        return out

    def retrieve(self, views: list[UserView]) -> dict[str, list[np.ndarray | None]]:
        """The nearest products of each view's two-tower, text, ALS and sequence vectors
        (``config.candidates`` each, one batched search per space), kept on the views
        (``UserView.retrieved``: a kept or stored view is not searched for again).

        Returns:
            space -> per view, the columns found (None: no vector, or no such index).
        """
        retrievers = self.state.indexes(self.index_exact_max)
        found: dict[str, list[np.ndarray | None]] = {}
        for name, attribute in SPACE_VECTORS.items():
            found[name] = [(v.retrieved or {}).get(name) for v in views]
            rows = [r for r, v in enumerate(views) if getattr(v, attribute) is not None
                    and found[name][r] is None]
            if name in retrievers and rows:
                queries = np.stack([getattr(views[r], attribute) for r in rows])
                for r, top in zip(rows, retrievers[name].top(queries, self.config.candidates),
                                  strict=True):
                    found[name][r] = top
                    views[r].retrieved = {**(views[r].retrieved or {}), name: top}
        return found

    def features(self, histories: Histories, now: float,
                 candidates: Sequence[np.ndarray] | None = None,
                 views: list[UserView] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Features (``FEATURE_NAMES``) of each user's candidates.

        Args:
            histories: the users' histories.
            now: epoch seconds of the moment of scoring (the cut, or the request time).
            candidates: per user, the columns to describe (default: ``candidates``).
            views: ``_views(histories)`` when already computed.

        Returns:
            (b, C, F) float32 features and (b, C) int64 columns, C the longest candidate
            list; shorter lists are padded with column -1 (and zero features).
        """
        state = self.state
        views = views if views is not None else self._views(histories, now)
        if candidates is None:
            candidates = self.candidates(histories, views=views)
        width = max((len(c) for c in candidates), default=0)
        out = np.zeros((len(views), width, len(FEATURE_NAMES)), dtype=np.float32)
        columns = np.full((len(views), width), -1, dtype=np.int64)
        facts = state.facts
        for row, (view, cols) in enumerate(zip(views, candidates, strict=True)):
            c = len(cols)
            if c == 0:
                continue
            columns[row, :c] = cols
            sources = np.zeros((len(SOURCE_NAMES), c), dtype=np.float64)
            if view.user_vector is not None:
                sources[0] = state.embeddings[cols] @ view.user_vector
            if view.text_vector is not None:
                sources[1] = state.text_vectors[cols] @ view.text_vector
            if len(view.together_cols):
                at = np.searchsorted(view.together_cols, cols).clip(max=len(view.together_cols) - 1)
                hit = view.together_cols[at] == cols
                sources[2] = np.where(hit, view.together_vals[at], 0.0)
            if view.als_vector is not None:
                sources[3] = state.als_items[cols] @ view.als_vector
            if view.sequence_vector is not None:
                sources[4] = state.sequence.items_matrix()[cols] @ view.sequence_vector
            low = sources.min(axis=1, keepdims=True)  # (S, 1) minmax over the candidates
            span = sources.max(axis=1, keepdims=True) - low
            sources = (sources - low) / np.where(span > 0, span, 1.0)
            count, recent, age = view.purchase_facts(cols, now)
            own = (count > 0).astype(np.float32)
            occ = np.float32(np.log1p(len(set(view.buy_times_or(now)))) / 5.0)
            with np.errstate(over="ignore"):
                block = [
                    *sources, own, np.log1p(count), np.log1p(recent),
                    own * np.exp(-np.where(own > 0, age, 0.0) / 30.0),
                    own * np.exp(-np.where(own > 0, age, 0.0) / 180.0),
                    facts["repurchase_rate"][cols], own * facts["repurchase_rate"][cols],
                    facts["popularity_7d"][cols], facts["popularity_30d"][cols],
                    facts["trend"][cols], facts["newness"][cols],
                    np.full(c, occ), own * occ,
                ]
            block += context_features(view, cols, now, state, sources, count, age)
            out[row, :c] = np.stack(block, axis=-1)
        return out, columns

    def histories(self, data: TrainData, user_ids: Sequence[str],
                  users: pd.DataFrame | None = None) -> Histories:
        """The users' histories and profiles at ``data``'s cut, as Feast would serve them."""
        return Histories.from_events(data.events, list(user_ids), self.config.history_len,
                                     catalog=data.catalog if self.model is not None else None,
                                     user_table=users, at=data.cut)

    # -- the pair scorers ----------------------------------------------------------------

    def tune(self, split: Split, users: pd.DataFrame | None = None) -> dict[str, dict]:
        """Train the pair scorer of each setting on a validation split.

        Args:
            split: the validation split; the item side must be fitted on ``split.train``.
            users: user rows (country) for the profiles, or None.

        Returns:
            setting -> in-sample validation metrics (recall/ndcg at 10 and 50 over the
            whole truth, so what the candidates miss counts as missed; the candidates'
            own recall as ``candidate_recall``; n_users).
        """
        state = self.state
        if state is None or state.cut != split.cut:
            raise ValueError("fit the item side on the validation split's training data first")
        now = split.cut.timestamp()
        user_table = users
        for setting in SETTINGS:
            users = split.users(setting)
            if len(users) > self.config.max_users:
                rng = np.random.default_rng(self.config.seed)
                users = sorted(rng.choice(users, self.config.max_users, replace=False).tolist())
            if not users:
                self.validation[setting] = {"n_users": 0.0}
                continue
            histories = self.histories(split.train, users, user_table)
            exclusions = split.exclusions(setting) or {}
            exclude = [np.asarray(sorted(state.item_index[p] for p in exclusions.get(u, ())
                                         if p in state.item_index), dtype=np.int64)
                       for u in users]
            views = self._views(histories)
            candidates = self.candidates(histories, views=views, exclude=exclude)
            features, columns = self.features(histories, now, candidates, views)
            padding = columns < 0  # (U, C)
            truth = np.zeros(columns.shape, dtype=bool)  # (U, C)
            sizes = np.zeros(len(users), dtype=np.int64)
            for row, user in enumerate(users):
                wanted = [state.item_index[p] for p in split.truth[setting][user]
                          if p in state.item_index]
                sizes[row] = len(split.truth[setting][user])
                truth[row] = np.isin(columns[row], wanted) & ~padding[row]
            self._train_stage(setting, features, padding, truth, sizes)
            self.validation[setting] = {
                **tuning_metrics(self._apply(setting, features, padding), truth, sizes),
                "candidate_recall": float((truth.sum(axis=1) / sizes).mean()),
                "candidates_mean": float((~padding).sum(axis=1).mean()),
                "n_users": float(len(users))}
            log.info("scorer %s: validation %s", setting,
                     {k: round(v, 4) for k, v in self.validation[setting].items()})
        return self.validation

    def _model_columns(self) -> list[int]:
        columns = self.__dict__.get("_columns")
        if columns is None:
            columns = self.__dict__["_columns"] = [FEATURE_NAMES.index(n)
                                                   for n in self.feature_names]
        return columns

    def _train_stage(self, setting: str, features: np.ndarray, padding: np.ndarray,
                     truth: np.ndarray, sizes: np.ndarray) -> None:
        """Choose the setting's stage (``config.stage``, or on held-out users when "auto")
        and train it on every validation user."""
        config = self.config
        if self.feature_names != FEATURE_NAMES:
            features = features[..., self._model_columns()]

        def mlp(f: np.ndarray, p: np.ndarray, t: np.ndarray) -> Any:
            return train_scorer(f, p, t, hidden=config.hidden, epochs=config.epochs,
                                seed=config.seed).as_numpy()

        if config.stage == "auto":
            stage, self.stage_choice[setting] = choose_stage(features, padding, truth, sizes,
                                                             mlp, seed=config.seed)
        elif config.stage in STAGES:
            stage = config.stage
        else:
            raise ValueError(f"scorer.stage {config.stage!r} not in auto, {', '.join(STAGES)}")
        self.stages[setting] = stage
        self.pair_scorers[setting] = train_scorer(features, padding, truth, hidden=config.hidden,
                                                  epochs=config.epochs, seed=config.seed)
        self.tree_rankers.pop(setting, None)
        if stage != "mlp" and (truth & ~padding).any():
            self.tree_rankers[setting] = TreeRanker.train_over(
                self.pair_scorers[setting].as_numpy(), features, padding, truth,
                seed=config.seed)

    def _apply(self, setting: str, features: np.ndarray, excluded: np.ndarray) -> np.ndarray:
        """(b, C) scores of (b, C, F) features; -inf where ``excluded`` (b, C)."""
        if setting not in self.pair_scorers:
            setting = "all"
        if self.feature_names != FEATURE_NAMES:
            features = features[..., self._model_columns()]
        scorer = self.pair_scorers.get(setting)
        if scorer is None:  # untuned: rank by the sources and popularity
            scores = features[..., : len(SOURCE_NAMES)].sum(axis=-1) \
                + features[..., FEATURE_NAMES.index("popularity_30d")] * 1e-3
        else:
            fast = self._numpy_scorers.get(setting)
            if fast is None or fast[0] is not scorer:  # tuned or loaded since: convert again
                fast = self._numpy_scorers[setting] = (scorer, scorer.as_numpy())
            scores = stage_scores(self.stages.get(setting, "mlp"), features, excluded, fast[1],
                                  self.tree_rankers.get(setting))  # (b, C)
        scores = np.asarray(scores, dtype=np.float64)
        scores[excluded] = -np.inf
        return scores

    # -- scoring -------------------------------------------------------------------------

    def _excluded_columns(self, histories: Histories, exclude_purchased: bool,
                          exclude: Sequence[set[str]] | None) -> list[np.ndarray]:
        index = self.state.item_index
        out = []
        for row in range(len(histories)):
            drop = set(exclude[row]) if exclude is not None else set()
            if exclude_purchased:  # however long ago: the purchased list, where known
                drop |= histories.bought(row)
            out.append(np.asarray(sorted(index[p] for p in drop if p in index), np.int64))
        return out

    def rank(self, histories: Histories, now: float, k: int, *,
             exclude_purchased: bool = False, exclude: Sequence[set[str]] | None = None,
             allowed: np.ndarray | None = None, setting: str | None = None,
             views: list[UserView] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per user, the top ``k`` catalogue columns and their scores, best first (ties by
        column).

        Args:
            histories: the users' histories.
            now: epoch seconds of the moment of scoring.
            k: how many per user.
            exclude_purchased: leave out what the user ever bought (``Histories.bought``;
                and, unless ``setting`` says otherwise, rank with the "new products" scorer).
            exclude: per user, more products to leave out.
            allowed: (N,) bool, the only columns that may be returned (a category).
            setting: the pair scorer to rank with, "all" or "new" (default: "new" when
                ``exclude_purchased``, else "all").
            views: ``views(histories, now)`` when already computed (a server's cache).
        """
        setting = setting or ("new" if exclude_purchased else "all")
        views = views if views is not None else self._views(histories, now)
        candidates = self.candidates(
            histories, views=views, allowed=allowed,
            exclude=self._excluded_columns(histories, exclude_purchased, exclude))
        features, columns = self.features(histories, now, candidates, views)
        scores = self._apply(setting, features, columns < 0)  # (b, C)
        out = []
        for row in range(len(views)):
            valid = np.isfinite(scores[row])
            cols, vals = columns[row][valid], scores[row][valid]
            order = np.lexsort((cols, -vals))[:k]
            out.append((cols[order], vals[order]))
        return out

    def scores(self, histories: Histories, now: float, *, exclude_purchased: bool = False,
               exclude: Sequence[set[str]] | None = None,
               setting: str | None = None) -> np.ndarray:
        """(b, N) scores of the catalogue (-inf: excluded or not a candidate); see ``rank``
        for the arguments."""
        n = len(self.state.product_ids)
        out = np.full((len(histories), n), -np.inf)
        for row, (cols, vals) in enumerate(self.rank(
                histories, now, n, exclude_purchased=exclude_purchased, exclude=exclude,
                setting=setting)):
            out[row, cols] = vals
        return out

    def params(self) -> dict[str, Any]:
        return {**self.config.to_params(), "scorer.features": list(self.feature_names),
                "scorer.validation": self.validation, "scorer.stages": self.stages,
                "scorer.stage_choice": self.stage_choice,
                "scorer.sequence": (self.state.sequence.report if self.state is not None
                                    and self.state.sequence is not None else None)}

    # -- persistence ---------------------------------------------------------------------

    def save(self, folder: os.PathLike[str] | str) -> Path:
        """Write the pair scorers, config and item state (the two-tower model is saved by
        ``training.checkpoint`` beside it)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({s: m.state_dict() for s, m in self.pair_scorers.items()},
                   folder / "pair_scorers.pt")
        with (folder / "scorer.pkl").open("wb") as fh:
            pickle.dump({"config": asdict(self.config), "validation": self.validation,
                         "state": self.state, "hidden": self.config.hidden,
                         "stages": self.stages, "stage_choice": self.stage_choice,
                         "features": list(self.feature_names)}, fh)
        if self.tree_rankers:
            (folder / "tree_rankers.json").write_text(json.dumps(
                {s: t.to_string() for s, t in self.tree_rankers.items()}))
        return folder

    @classmethod
    def load(cls, folder: os.PathLike[str] | str, model: Any = None,
             model_config: TrainConfig | None = None, *,
             index_exact_max: int = EXACT_MAX) -> Scorer:
        folder = Path(folder)
        with (folder / "scorer.pkl").open("rb") as fh:
            saved = pickle.load(fh)  # noqa: S301 - our own checksummed bundle file
        known = {f.name for f in fields(ScorerConfig)}  # a bundle's retired settings dropped
        config = ScorerConfig(**{k: v for k, v in saved["config"].items() if k in known})
        scorer = cls(config, model, model_config, index_exact_max=index_exact_max)
        scorer.validation = saved["validation"]
        scorer.state = saved["state"]
        names = tuple(saved.get("features", LEGACY_FEATURE_NAMES))
        unknown = sorted(set(names) - set(FEATURE_NAMES))
        if unknown:
            raise ValueError(f"{folder}: the scorer reads features this code does not compute "
                             f"({', '.join(unknown)}); serve it with the version that trained it")
        scorer.feature_names = names
        scorer.stages = saved.get("stages", {})  # a bundle from before the stages: the MLP
        scorer.stage_choice = saved.get("stage_choice", {})
        trees = folder / "tree_rankers.json"
        if trees.is_file():
            scorer.tree_rankers = {s: TreeRanker.from_string(text)
                                   for s, text in json.loads(trees.read_text()).items()}
        weights = torch.load(folder / "pair_scorers.pt", weights_only=True)
        for setting, state_dict in weights.items():
            module = PairScorer(len(names), saved["hidden"])
            module.load_state_dict(state_dict)
            scorer.pair_scorers[setting] = module.eval()
        return scorer
