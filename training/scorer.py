"""The served ranking: candidate sources computed from a user's recent events, then blended.

What the server knows about a user at request time is a bounded event history: Feast's
``user_recent_products`` (product, event type and time of the last ``HISTORY_LEN`` product
events, most recent last). ``Scorer`` turns such histories into one score per catalogue
product, from

- the two-tower model: user tower over the history · item embeddings;
- text similarity: the mean text vector of the history's products · each product's;
- item co-occurrence: cosine between products' buyer sets (each product's top neighbours),
  summed over the products in the history;
- ALS item factors: the user's factors solved in closed form from the history's counts;
- purchase facts (``FACT_NAMES``): whether, how often and how lately the history bought the
  product, the product's repurchase rate, popularity over 7 and 30 days, trend and newness,
  and how active the user is;

combined by a small network (``training.blend.PairScorer``) trained on the validation window
only, one per setting: "all" (repeat buying counts) and "new" (the user's purchases left
out). Users with no history get the facts alone: popularity, trend and newness.

The item side (``ItemState``) is fitted on the data before a cut; the learned parts (the
two-tower weights and the pair scorers) are the model. Evaluation fits the item side at the
test cut and serving at the end of the interval, through the same code, with the histories
truncated the way Feast truncates them, so what is measured is what is served.
"""

from __future__ import annotations

import copy
import logging
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import sparse

from features.build import HISTORY_EVENT_TYPES, HISTORY_LEN
from training.config import TrainConfig
from training.protocol import (
    INTERACTION_EVENTS,
    ScoredRecommender,
    Split,
    TrainData,
    ranked_ids,
    validation_split,
)

log = logging.getLogger(__name__)

SOURCE_NAMES = ("two_tower", "text_cosine", "co_occurrence", "als")
FACT_NAMES = ("own", "log_count", "log_count_30d", "recency_30d", "recency_180d",
              "repurchase_rate", "own_x_repurchase_rate", "popularity_7d", "popularity_30d",
              "trend", "newness", "user_occasions", "own_x_user_occasions")
FEATURE_NAMES = (*SOURCE_NAMES, *FACT_NAMES)
SETTINGS = ("all", "new")
DAY_SECONDS = 86_400.0


@dataclass(frozen=True)
class ScorerConfig:
    """Hyper-parameters of the served ranking (logged with the run's params).

    Attributes:
        history_len: events per user the scorer reads (Feast's ``HISTORY_LEN``).
        neighbours: co-occurrence neighbours kept per product.
        als_factors, als_regularization, als_alpha, als_iterations: the ALS item side.
        repurchase_prior: smoothing (pseudo-buyers) of the repurchase rate.
        hidden: width of the pair scorer's hidden layer.
        epochs: pair-scorer passes over the validation users.
        max_users: at most this many validation users (a seeded sample) per setting.
        seed: sampling and initialisation seed.
    """

    history_len: int = HISTORY_LEN
    neighbours: int = 100
    als_factors: int = 64
    als_regularization: float = 0.05
    als_alpha: float = 5.0
    als_iterations: int = 15
    repurchase_prior: float = 5.0
    hidden: int = 32
    epochs: int = 20
    max_users: int = 2000
    seed: int = 0

    def to_params(self) -> dict[str, Any]:
        return {f"scorer.{k}": v for k, v in asdict(self).items()}


# ---------------------------------------------------------------------------------------
# What the scorer reads about users
# ---------------------------------------------------------------------------------------


@dataclass
class Histories:
    """Users' recent product events, most recent LAST, one entry per user.

    Attributes:
        products: product ids.
        event_types: event type of each entry.
        timestamps: epoch seconds of each entry, (L,) float64 arrays (NaN: unknown, taken
            as the moment of scoring).
        profiles: the users' ``user_profile`` features (``training.user_features``), one row
            per user in the same order, or None (unknown).
    """

    products: list[list[str]]
    event_types: list[list[str]]
    timestamps: list[np.ndarray]
    profiles: pd.DataFrame | None = None

    def __len__(self) -> int:
        return len(self.products)

    @classmethod
    def empty(cls, n: int) -> Histories:
        return cls([[] for _ in range(n)], [[] for _ in range(n)],
                   [np.zeros(0) for _ in range(n)])

    @classmethod
    def from_events(cls, events: pd.DataFrame, users: Sequence[str],
                    limit: int = HISTORY_LEN, *, catalog: pd.DataFrame | None = None,
                    user_table: pd.DataFrame | None = None,
                    at: pd.Timestamp | None = None) -> Histories:
        """The histories (and profiles) Feast would hold for ``users`` after ``events``: the
        rule of ``features.build.build_user_recent_products`` (product events of
        ``HISTORY_EVENT_TYPES`` in (ts, event_id) order, the last ``limit`` kept) and, with
        ``catalog`` and ``at``, of the daily ``user_profile`` snapshots
        (``training.user_features.profiles_as_of``).

        Args:
            events: contract events before the moment of interest.
            users: users, in output order (unknown users get empty histories).
            limit: entries kept per user.
            catalog: product rows, for the profiles (None: profiles unknown).
            user_table: user rows (country), for the profiles.
            at: the moment of interest, for the profiles.
        """
        profiles = None
        if catalog is not None and at is not None:
            from training.user_features import profiles_as_of

            profiles = profiles_as_of(events, catalog, user_table, list(users),
                                      [at] * len(users)).reset_index(drop=True)
        ev = events[events["event_type"].isin(HISTORY_EVENT_TYPES) & events["product_id"].notna()]
        ev = ev[ev["user_id"].isin(set(users))]
        ev = ev.sort_values(["user_id", "ts", "event_id"], kind="stable")
        ev = ev[ev.groupby("user_id", sort=False).cumcount(ascending=False) < limit]
        epoch = (ev["ts"].dt.tz_convert("UTC").dt.tz_localize(None).to_numpy()
                 .astype("datetime64[s]").astype(np.int64).astype(np.float64))  # (E,)
        frame = pd.DataFrame({"user_id": ev["user_id"].to_numpy(),
                              "product_id": ev["product_id"].to_numpy(),
                              "event_type": ev["event_type"].to_numpy(), "epoch": epoch})
        groups = frame.groupby("user_id", sort=False)
        products = groups["product_id"].agg(list).to_dict()
        types = groups["event_type"].agg(list).to_dict()
        stamps = groups["epoch"].agg(list).to_dict()
        return cls([products.get(u, []) for u in users], [types.get(u, []) for u in users],
                   [np.asarray(stamps.get(u, []), dtype=np.float64) for u in users], profiles)

    @classmethod
    def from_feast(cls, frame: pd.DataFrame) -> Histories:
        """Histories from rows of ``user_recent_products`` (missing rows: empty), with the
        ``user_profile`` columns when the frame has them."""
        from training.user_features import PROFILE_COLUMNS

        def listed(value: Any) -> list:
            return [] if value is None or (isinstance(value, float) and np.isnan(value)) \
                else list(value)

        products = [listed(v) for v in frame["recent_product_ids"]]
        types = [listed(v) for v in frame["recent_event_types"]]
        stamps = [np.asarray(listed(v), dtype=np.float64)
                  for v in frame.get("recent_timestamps", [None] * len(frame))]
        types = [t if len(t) == len(p) else ["view"] * len(p)
                 for t, p in zip(types, products, strict=True)]
        stamps = [s if len(s) == len(p) else np.full(len(p), np.nan)  # unknown: "now"
                  for s, p in zip(stamps, products, strict=True)]
        profiles = (frame[list(PROFILE_COLUMNS)].reset_index(drop=True)
                    if set(PROFILE_COLUMNS) <= set(frame.columns) else None)
        return cls(products, types, stamps, profiles)


# ---------------------------------------------------------------------------------------
# The item side, fitted at a cut
# ---------------------------------------------------------------------------------------


def cosine_neighbours(matrix: sparse.csr_matrix, neighbours: int,
                      chunk: int = 1024) -> sparse.csr_matrix:
    """Each product's top ``neighbours`` by cosine of its user column (itself excluded).

    Computed in row chunks so memory stays O(chunk · N) for large catalogues.

    Args:
        matrix: (U, N) non-negative user × product matrix.
        neighbours: entries kept per row.
        chunk: rows computed at once.

    Returns:
        (N, N) CSR float32.
    """
    items = sparse.csc_matrix(matrix, dtype=np.float32)  # (U, N)
    norms = np.sqrt(np.asarray(items.multiply(items).sum(axis=0)).ravel())  # (N,)
    inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)  # (N,)
    unit = sparse.csr_matrix(items @ sparse.diags(inv.astype(np.float32)))  # (U, N)
    unit_t = sparse.csr_matrix(unit.T)  # (N, U)
    n = matrix.shape[1]
    keep = min(neighbours, max(n - 1, 0))
    rows, cols, vals = [], [], []
    for start in range(0, n, chunk):
        block = (unit_t[start : start + chunk] @ unit).toarray()  # (c, N)
        block[np.arange(len(block)), np.arange(start, start + len(block))] = 0.0
        if keep == 0:
            continue
        top = np.argpartition(-block, keep - 1, axis=1)[:, :keep]  # (c, keep)
        values = np.take_along_axis(block, top, axis=1)  # (c, keep)
        r, c = np.nonzero(values > 0)
        rows.append(r + start)
        cols.append(top[r, c])
        vals.append(values[r, c])
    if not rows:
        return sparse.csr_matrix((n, n), dtype=np.float32)
    return sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                             shape=(n, n), dtype=np.float32)


def item_facts(data: TrainData, prior: float) -> dict[str, np.ndarray]:
    """Per-product purchase facts before the cut, each (N,) float32 in ``data.product_ids``
    order: repurchase_rate (share of buyers who bought on 2+ occasions, smoothed towards the
    overall share with ``prior`` pseudo-buyers), popularity_7d / popularity_30d (log purchases,
    scaled to [0, 1]), trend (log of the 7-day over the 30-day rate, / 3), newness
    (1 / (1 + days since first sale / 30)) and popularity (raw 30-day purchases)."""
    from training.baselines import popularity_scores

    buys = data.purchases
    occasions = buys.drop_duplicates(["user_id", "product_id", "ts"])
    per_pair = occasions.groupby(["user_id", "product_id"]).size()
    buyers = per_pair.groupby(level="product_id").size()
    repeaters = (per_pair > 1).groupby(level="product_id").sum()
    overall = float((per_pair > 1).mean()) if len(per_pair) else 0.0
    rate = (repeaters + prior * overall) / (buyers + prior)
    raw7 = popularity_scores(data, 7)  # (N,)
    raw30 = popularity_scores(data, 30)  # (N,)
    pop7, pop30 = np.log1p(raw7), np.log1p(raw30)
    first = buys.groupby("product_id")["ts"].min()
    first_age = ((data.cut - first).dt.total_seconds() / DAY_SECONDS).reindex(data.product_ids)
    return {
        "repurchase_rate": rate.reindex(data.product_ids).fillna(overall).to_numpy(np.float32),
        "popularity_7d": (pop7 / max(pop7.max(initial=0.0), 1e-9)).astype(np.float32),
        "popularity_30d": (pop30 / max(pop30.max(initial=0.0), 1e-9)).astype(np.float32),
        "trend": (np.log((raw7 + 1.0) / (raw30 * 7.0 / 30.0 + 1.0)) / 3.0).astype(np.float32),
        "newness": (1.0 / (1.0 + first_age.fillna(1e4).to_numpy() / 30.0)).astype(np.float32),
        "popularity": raw30.astype(np.float32),
    }


@dataclass
class ItemState:
    """The item side of the scorer at a cut: everything except the user's history.

    Attributes:
        cut: the cut it was fitted at.
        product_ids: candidates (the catalogue at the cut), the columns of every score.
        embeddings: (N, D) two-tower item embeddings (None: no two-tower model).
        neighbours: (N, N) sparse co-occurrence cosine.
        als_items: (N, F) ALS item factors; als_gram: (F, F) their Gram matrix.
        facts: per-product facts of ``item_facts``.
        text_vectors: (N, H) unit vectors of the products' text under the shared (frozen)
            text encoder, for search (None: no two-tower model).
        country_popularity: country -> (N,) purchases in the last 30 days by its users.
    """

    cut: pd.Timestamp
    product_ids: list[str]
    embeddings: np.ndarray | None
    neighbours: sparse.csr_matrix
    als_items: np.ndarray
    als_gram: np.ndarray
    facts: dict[str, np.ndarray]
    text_vectors: np.ndarray | None = None
    country_popularity: dict[str, np.ndarray] = field(default_factory=dict)
    item_index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.item_index = {p: i for i, p in enumerate(self.product_ids)}

    @classmethod
    def fit(cls, data: TrainData, config: ScorerConfig, model: Any = None,
            model_config: TrainConfig | None = None,
            cache_dir: str | os.PathLike[str] | None = None,
            users: pd.DataFrame | None = None) -> ItemState:
        """Fit the item side on ``data`` (and embed its catalogue with ``model``); ``users``
        (user rows with country) gives the per-country popularity."""
        from training.baselines import ALS

        matrix = data.interactions(event_types=INTERACTION_EVENTS, weight="binary")  # (U, N)
        als = ALS(factors=config.als_factors, regularization=config.als_regularization,
                  alpha=config.als_alpha, iterations=config.als_iterations, seed=config.seed)
        als.fit(data)
        embeddings = text_vectors = None
        if model is not None:
            embeddings, text_vectors = embed_catalog(model, model_config, data.catalog,
                                                     data.product_ids, cache_dir)
        items = als.item_factors.astype(np.float64)  # (N, F)
        return cls(cut=data.cut, product_ids=list(data.product_ids), embeddings=embeddings,
                   neighbours=cosine_neighbours(matrix, config.neighbours),
                   als_items=als.item_factors, als_gram=items.T @ items,
                   facts=item_facts(data, config.repurchase_prior), text_vectors=text_vectors,
                   country_popularity=country_popularity(data, users))


def country_popularity(data: TrainData, users: pd.DataFrame | None,
                       days: int = 30) -> dict[str, np.ndarray]:
    """Country -> (N,) float32 purchases in the ``days`` before the cut by users of that
    country (each user's latest known country)."""
    if users is None or users.empty or "country" not in users:
        return {}
    known = users.dropna(subset=["country"]).drop_duplicates("user_id", keep="last")
    country = known.set_index("user_id")["country"]
    buys = data.purchases[data.purchases["ts"] >= data.cut - pd.Timedelta(days=days)]
    buys = buys.assign(country=buys["user_id"].map(country)).dropna(subset=["country"])
    out = {}
    for name, group in buys.groupby("country"):
        counts = group["product_id"].map(data.item_index).value_counts()
        vector = np.zeros(len(data.product_ids), np.float32)
        vector[counts.index.to_numpy(dtype=np.int64)] = counts.to_numpy(dtype=np.float32)
        out[str(name)] = vector
    return out


def embed_catalog(model: Any, config: TrainConfig | None, catalog: pd.DataFrame,
                  product_ids: Sequence[str], cache_dir: str | os.PathLike[str] | None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) item embeddings of ``product_ids`` (rows of ``catalog``) under ``model``, and
    (N, H) the frozen text encoder's vectors of their text."""
    from training.text import embed_texts, product_text
    from training.towers import ItemFeatures, encode_items
    from training.train import unique_products

    rows = unique_products(catalog).set_index("product_id").loc[list(product_ids)].reset_index()
    text = embed_texts(product_text(rows), config, cache_dir, progress=False)
    return encode_items(model, ItemFeatures.from_catalog(rows, text)).astype(np.float32), text


# ---------------------------------------------------------------------------------------
# The scorer
# ---------------------------------------------------------------------------------------


class Scorer:
    """Two-tower model + pair scorers (the model) over an ``ItemState`` (fitted at a cut).

    Args:
        config: scorer hyper-parameters.
        model: the trained two-tower model (None: the co-occurrence, ALS and facts only).
        model_config: its ``TrainConfig``.
    """

    def __init__(self, config: ScorerConfig, model: Any = None,
                 model_config: TrainConfig | None = None):
        self.config = config
        self.model = model
        self.model_config = model_config
        self.pair_scorers: dict[str, Any] = {}
        self.validation: dict[str, dict[str, float]] = {}
        self.state: ItemState | None = None

    # -- the item side -------------------------------------------------------------------

    def fit_items(self, data: TrainData, cache_dir: str | os.PathLike[str] | None = None,
                  users: pd.DataFrame | None = None) -> Scorer:
        """Fit the item side on ``data`` (``users``: rows with country); returns self."""
        self.state = ItemState.fit(data, self.config, self.model, self.model_config, cache_dir,
                                   users)
        return self

    # -- features ------------------------------------------------------------------------

    def _user_rows(self, histories: Histories, now: float
                   ) -> tuple[sparse.csr_matrix, sparse.csr_matrix, np.ndarray, np.ndarray,
                              np.ndarray]:
        """Per-user sparse facts of the histories, in ``state.product_ids`` columns.

        Returns:
            interactions (b, N) counts of purchase/add-to-cart entries; purchases (b, N)
            counts; purchases in the 30 days before ``now`` (b, N) dense; days since the
            last purchase (b, N) dense (inf: never); purchase occasions (b,).
        """
        index = self.state.item_index
        n = len(self.state.product_ids)
        inter_r, inter_c, buy_r, buy_c, buy_t = [], [], [], [], []
        occasions = np.zeros(len(histories), dtype=np.float32)  # (b,)
        for row, (products, types, stamps) in enumerate(zip(
                histories.products, histories.event_types, histories.timestamps, strict=True)):
            times = set()
            for product, kind, ts in zip(products, types, stamps, strict=True):
                col = index.get(product)
                if col is None or kind not in INTERACTION_EVENTS:
                    continue
                inter_r.append(row)
                inter_c.append(col)
                if kind == "purchase":
                    buy_r.append(row)
                    buy_c.append(col)
                    when = now if np.isnan(ts) else float(ts)
                    buy_t.append(when)
                    times.add(when)
            occasions[row] = len(times)
        shape = (len(histories), n)
        ones = np.ones(len(inter_r), dtype=np.float32)
        interactions = sparse.csr_matrix((ones, (inter_r, inter_c)), shape=shape)
        buy_r_a, buy_c_a = np.asarray(buy_r, np.int64), np.asarray(buy_c, np.int64)
        buy_t_a = np.asarray(buy_t, np.float64)
        purchases = sparse.csr_matrix((np.ones(len(buy_r_a), np.float32), (buy_r_a, buy_c_a)),
                                      shape=shape)
        age = np.full(shape, np.inf, dtype=np.float32)  # (b, N)
        recent = np.zeros(shape, dtype=np.float32)  # (b, N)
        if len(buy_r_a):
            days = ((now - buy_t_a) / DAY_SECONDS).clip(min=1e-3).astype(np.float32)  # (P,)
            np.minimum.at(age, (buy_r_a, buy_c_a), days)
            in_month = days <= 30.0
            np.add.at(recent, (buy_r_a[in_month], buy_c_a[in_month]), 1.0)
        return interactions, purchases, recent, age, occasions

    def _two_tower(self, histories: Histories) -> np.ndarray:
        from training.towers import encode_users

        state = self.state
        n = len(state.product_ids)
        if self.model is None or state.embeddings is None:
            return np.zeros((len(histories), n), dtype=np.float32)
        users = encode_users(self.model, histories.products, histories.event_types,
                             state.item_index, state.embeddings,
                             user_features=histories.profiles)  # (b, D)
        scores = users @ state.embeddings.T  # (b, N)
        known = np.array([any(p in state.item_index for p in h) for h in histories.products])
        scores[~known] = 0.0
        return scores.astype(np.float32)

    def _text_cosine(self, histories: Histories) -> np.ndarray:
        """(b, N) cosine between the mean text vector of the history's products and each
        product's (zeros without text vectors or history)."""
        state = self.state
        n = len(state.product_ids)
        if state.text_vectors is None:
            return np.zeros((len(histories), n), dtype=np.float32)
        out = np.zeros((len(histories), n), dtype=np.float32)
        for row, products in enumerate(histories.products):
            cols = [state.item_index[p] for p in products if p in state.item_index]
            if cols:
                mean = state.text_vectors[cols].mean(axis=0)  # (H,)
                out[row] = state.text_vectors @ (mean / max(np.linalg.norm(mean), 1e-9))
        return out

    def _als(self, interactions: sparse.csr_matrix) -> np.ndarray:
        """(b, N) ALS scores with each user's factors solved from their history: the
        implicit-feedback normal equations (Hu, Koren and Volinsky 2008), confidence
        1 + alpha · log1p(count), as ``training.baselines.ALS`` fits them."""
        state, config = self.state, self.config
        items = state.als_items.astype(np.float64)  # (N, F)
        eye = config.als_regularization * np.eye(items.shape[1])  # (F, F)
        out = np.zeros((interactions.shape[0], items.shape[0]), dtype=np.float32)  # (b, N)
        for row in range(interactions.shape[0]):
            start, stop = interactions.indptr[row], interactions.indptr[row + 1]
            if start == stop:
                continue
            cols = interactions.indices[start:stop]  # (n,)
            extra = config.als_alpha * np.log1p(interactions.data[start:stop])  # (n,) C - 1
            y = items[cols]  # (n, F)
            lhs = state.als_gram + (y.T * extra) @ y + eye  # (F, F)
            rhs = y.T @ (1.0 + extra)  # (F,)
            out[row] = items @ np.linalg.solve(lhs, rhs)
        return out

    def features(self, histories: Histories, now: float) -> np.ndarray:
        """(b, N, F) float32 features (``FEATURE_NAMES``) of every (user, candidate) pair.

        Args:
            histories: the users' histories.
            now: epoch seconds of the moment of scoring (the cut, or the request time).
        """
        from training.blend import normalise_scores

        facts = self.state.facts
        interactions, purchases, recent, age, occasions = self._user_rows(histories, now)
        sources = [
            self._two_tower(histories),
            self._text_cosine(histories),
            (sparse.csr_matrix((np.ones_like(interactions.data), interactions.indices,
                                interactions.indptr), shape=interactions.shape)
             @ self.state.neighbours).toarray(),
            self._als(interactions),
        ]
        columns = [np.nan_to_num(normalise_scores(s, "minmax"), neginf=0.0) for s in sources]
        count = purchases.toarray()  # (b, N)
        own = (count > 0).astype(np.float32)  # (b, N)
        shape = own.shape
        occ = (np.log1p(occasions) / 5.0)[:, None]  # (b, 1)

        def wide(values: np.ndarray) -> np.ndarray:
            return np.broadcast_to(values[None, :], shape)  # (b, N)

        with np.errstate(over="ignore"):
            columns += [
                own, np.log1p(count), np.log1p(recent),
                own * np.exp(-np.where(own > 0, age, 0.0) / 30.0),
                own * np.exp(-np.where(own > 0, age, 0.0) / 180.0),
                wide(facts["repurchase_rate"]), own * facts["repurchase_rate"][None, :],
                wide(facts["popularity_7d"]), wide(facts["popularity_30d"]),
                wide(facts["trend"]), wide(facts["newness"]),
                np.broadcast_to(occ, shape), own * occ,
            ]
        return np.stack(columns, axis=-1).astype(np.float32)  # (b, N, F)

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
            setting -> in-sample validation metrics (recall/ndcg at 10 and 50, n_users).
        """
        from training.blend import excluded_matrix, train_scorer, tuning_metrics

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
            features = self.features(self.histories(split.train, users, user_table), now)
            excluded = excluded_matrix(users, split.exclusions(setting), state.item_index)
            truth = np.zeros(excluded.shape, dtype=bool)  # (U, N)
            sizes = np.zeros(len(users), dtype=np.int64)
            for row, user in enumerate(users):
                products = split.truth[setting][user]
                sizes[row] = len(products)
                truth[row, [state.item_index[p] for p in products if p in state.item_index]] = True
            scorer = train_scorer(features, excluded, truth & ~excluded,
                                  hidden=self.config.hidden, epochs=self.config.epochs,
                                  seed=self.config.seed)
            self.pair_scorers[setting] = scorer
            self.validation[setting] = {**tuning_metrics(self._apply(setting, features,
                                                                     excluded), truth, sizes),
                                        "n_users": float(len(users))}
            log.info("scorer %s: validation %s", setting,
                     {k: round(v, 4) for k, v in self.validation[setting].items()})
        return self.validation

    def _apply(self, setting: str, features: np.ndarray, excluded: np.ndarray) -> np.ndarray:
        scorer = self.pair_scorers.get(setting) or self.pair_scorers.get("all")
        if scorer is None:  # untuned: rank by the sources and popularity
            scores = features[..., : len(SOURCE_NAMES)].sum(axis=-1) \
                + features[..., FEATURE_NAMES.index("popularity_30d")] * 1e-3
        else:
            with torch.inference_mode():
                scores = scorer(torch.from_numpy(features)).double().numpy()  # (b, N)
        scores = np.asarray(scores, dtype=np.float64)
        scores[excluded] = -np.inf
        return scores

    # -- scoring -------------------------------------------------------------------------

    def scores(self, histories: Histories, now: float, *, exclude_purchased: bool = False,
               exclude: Sequence[set[str]] | None = None,
               setting: str | None = None) -> np.ndarray:
        """(b, N) scores of every candidate (-inf: excluded).

        Args:
            histories: the users' histories.
            now: epoch seconds of the moment of scoring.
            exclude_purchased: leave out what the history bought (and, unless ``setting``
                says otherwise, rank with the "new products" scorer).
            exclude: per user, more products to leave out.
            setting: the pair scorer to rank with, "all" or "new" (default: "new" when
                ``exclude_purchased``, else "all").
        """
        index = self.state.item_index
        excluded = np.zeros((len(histories), len(index)), dtype=bool)  # (b, N)
        for row in range(len(histories)):
            drop = set(exclude[row]) if exclude is not None else set()
            if exclude_purchased:
                drop |= {p for p, t in zip(histories.products[row], histories.event_types[row],
                                           strict=True) if t == "purchase"}
            excluded[row, [index[p] for p in drop if p in index]] = True
        setting = setting or ("new" if exclude_purchased else "all")
        return self._apply(setting, self.features(histories, now), excluded)

    def params(self) -> dict[str, Any]:
        return {**self.config.to_params(), "scorer.features": list(FEATURE_NAMES),
                "scorer.validation": self.validation}

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
                         "state": self.state, "hidden": self.config.hidden}, fh)
        return folder

    @classmethod
    def load(cls, folder: os.PathLike[str] | str, model: Any = None,
             model_config: TrainConfig | None = None) -> Scorer:
        from training.blend import PairScorer

        folder = Path(folder)
        with (folder / "scorer.pkl").open("rb") as fh:
            saved = pickle.load(fh)  # noqa: S301 - our own checksummed bundle file
        scorer = cls(ScorerConfig(**saved["config"]), model, model_config)
        scorer.validation = saved["validation"]
        scorer.state = saved["state"]
        weights = torch.load(folder / "pair_scorers.pt", weights_only=True)
        for setting, state_dict in weights.items():
            module = PairScorer(len(FEATURE_NAMES), saved["hidden"])
            module.load_state_dict(state_dict)
            scorer.pair_scorers[setting] = module.eval()
        return scorer


# ---------------------------------------------------------------------------------------
# The served ranking as a protocol method
# ---------------------------------------------------------------------------------------


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
        from training.blend import TwoTowerRecommender

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

    def _score(self, user_ids: Sequence[str], exclude: Mapping[str, set[str]] | None
               ) -> np.ndarray:
        data = self.fitted
        histories = self.scorer.histories(data, user_ids, self.users)
        if exclude is None:
            return self.scorer.scores(histories, data.cut.timestamp())
        return self.scorer.scores(histories, data.cut.timestamp(), setting="new",
                                  exclude=[exclude.get(u, set()) for u in user_ids])

    def scores(self, user_ids: Sequence[str]) -> np.ndarray:
        return self._score(user_ids, None)

    def recommend(self, user_ids: Sequence[str], k: int, *,
                  exclude: Mapping[str, set[str]] | None = None,
                  batch_size: int = 256) -> list[list[str]]:
        """Top ``k`` per user; with ``exclude`` the new-products scorer is used."""
        ids = np.asarray(self.fitted.product_ids, dtype=object)
        out: list[list[str]] = []
        for start in range(0, len(user_ids), batch_size):
            batch = list(user_ids[start : start + batch_size])
            out.extend(ranked_ids(self._score(batch, exclude), ids, k))
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
        from training.baselines import _unit_fill, popularity_scores

        self.embeddings, _ = embed_catalog(self.model, self.config, data.catalog,
                                           data.product_ids, self.cache_dir)  # (N, D)
        self.fill = _unit_fill(popularity_scores(data))  # (N,)

    def scores(self, user_ids: Sequence[str]) -> np.ndarray:
        from training.towers import encode_users

        data = self.fitted
        hist = Histories.from_events(data.events, list(user_ids), self.history_len,
                                     catalog=data.catalog, user_table=self.users, at=data.cut)
        users = encode_users(self.model, hist.products, hist.event_types, data.item_index,
                             self.embeddings, user_features=hist.profiles)  # (b, D)
        scores = users @ self.embeddings.T  # (b, N)
        known = np.array([any(p in data.item_index for p in h) for h in hist.products])
        scores[~known] = self.fill  # cold users: popularity
        return scores.astype(np.float32)
