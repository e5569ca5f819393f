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
    validation_split,
)
from training.retrieval import EXACT_MAX, Retrieval

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
        candidates: candidates per dense source (two-tower, text, ALS) and user.
        neighbour_candidates: co-occurrence candidates per user (the strongest).
        popular_candidates: the most popular products over 30 and over 7 days, each.
        min_candidates: candidate lists shorter than this (a narrow category, an unknown
            user) are topped up by popularity.
        exact_max: catalogues up to this size retrieve candidates exactly; larger ones
            through HNSW (``training.retrieval``).
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
    candidates: int = 200
    neighbour_candidates: int = 300
    popular_candidates: int = 100
    min_candidates: int = 100
    exact_max: int = EXACT_MAX

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
    def from_row(cls, row: Mapping[str, Any]) -> Histories:
        """One user's history from an online-store row (``features.store.OnlineUserReader``
        / ``online_user_history``): ``from_feast`` of a one-row frame, without building it
        (a request's hot path)."""
        from training.user_features import PROFILE_COLUMNS

        products = [str(p) for p in row.get("recent_product_ids") or []]
        types = [str(t) for t in row.get("recent_event_types") or []]
        stamps = np.asarray(row.get("recent_timestamps") or [], dtype=np.float64)
        if len(types) != len(products):
            types = ["view"] * len(products)
        if len(stamps) != len(products):
            stamps = np.full(len(products), np.nan)  # unknown: "now"
        profiles = None
        if all(c in row for c in PROFILE_COLUMNS):
            profiles = pd.DataFrame({c: [row[c]] for c in PROFILE_COLUMNS})
        return cls([products], [types], [stamps], profiles)

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

    def retrieval(self, exact_max: int) -> dict[str, Retrieval]:
        """The candidate retrievers of the dense sources ("two_tower", "text", "als"), built
        on first use (and kept, pickled with the state)."""
        built = self.__dict__.get("retrievers")
        if built is None or built.get("exact_max") != exact_max:
            matrices = {"two_tower": self.embeddings, "text": self.text_vectors,
                        "als": self.als_items}
            built = {"exact_max": exact_max,
                     "by_source": {name: Retrieval(m, exact_max)
                                   for name, m in matrices.items() if m is not None}}
            self.__dict__["retrievers"] = built
        return built["by_source"]

    def popularity_order(self) -> np.ndarray:
        """(N,) every column, most purchased in the last 30 days (then 7 days) first."""
        order = self.__dict__.get("_popularity_order")
        if order is None:
            n = len(self.product_ids)
            order = np.lexsort((np.arange(n), -self.facts["popularity_7d"],
                                -self.facts["popularity_30d"])).astype(np.int64)
            self.__dict__["_popularity_order"] = order
        return order

    def popular_rows(self, k: int) -> np.ndarray:
        """The ``k`` most popular columns over 30 days and the ``k`` over 7 days (sorted)."""
        cached = self.__dict__.setdefault("_popular_rows", {})
        if k not in cached:
            n = len(self.product_ids)
            k_ = min(k, n)
            if k_ == 0:
                cached[k] = np.zeros(0, np.int64)
            else:
                week = np.argpartition(-self.facts["popularity_7d"], k_ - 1)[:k_]
                cached[k] = np.unique(np.concatenate([self.popularity_order()[:k_], week])
                                      ).astype(np.int64)
        return cached[k]

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


@dataclass
class UserView:
    """One user's history as the scorer reads it, in catalogue columns.

    Attributes:
        known: columns of the history's catalogue products, oldest first.
        interactions: columns of its purchase/add-to-cart entries.
        buy_cols, buy_times: columns and epoch seconds (NaN: unknown) of its purchases.
        together_cols, together_vals: the co-occurrence source, sparse (sorted columns).
        user_vector: (D,) two-tower user embedding (None: no model or no known product).
        text_vector: (H,) unit mean text vector of the history's products.
        als_vector: (F,) ALS user factors solved from the history.
    """

    known: np.ndarray
    interactions: np.ndarray
    buy_cols: np.ndarray
    buy_times: np.ndarray
    together_cols: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    together_vals: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    user_vector: np.ndarray | None = None
    text_vector: np.ndarray | None = None
    als_vector: np.ndarray | None = None

    def buy_times_or(self, now: float) -> np.ndarray:
        """Purchase times, unknown ones taken as ``now``."""
        return np.where(np.isnan(self.buy_times), now, self.buy_times)

    def purchase_facts(self, cols: np.ndarray, now: float
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For ``cols`` (sorted): purchases in the history, purchases in the 30 days before
        ``now``, and days since the last purchase (inf: never), each (C,) float32."""
        count = np.zeros(len(cols), np.float32)
        recent = np.zeros(len(cols), np.float32)
        age = np.full(len(cols), np.inf, np.float32)
        if len(self.buy_cols):
            days = ((now - self.buy_times_or(now)) / DAY_SECONDS).clip(min=1e-3)  # (P,)
            at = np.searchsorted(cols, self.buy_cols).clip(max=len(cols) - 1)  # cols sorted
            hit = cols[at] == self.buy_cols  # (P,) purchases among the candidates
            at, days = at[hit], days[hit].astype(np.float32)
            np.add.at(count, at, 1.0)
            np.add.at(recent, at, (days <= 30.0).astype(np.float32))
            np.minimum.at(age, at, days)
        return count, recent, age


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
        self.state.retrieval(self.config.exact_max)  # built now, saved with the state
        return self

    # -- features ------------------------------------------------------------------------

    def _views(self, histories: Histories) -> list[UserView]:
        """What the candidates and features of each user are computed from."""
        from training.towers import encode_users

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
                           if c >= 0 and t in INTERACTION_EVENTS]
            buys = [(c, ts) for c, t, ts in zip(cols, types, stamps, strict=True)
                    if c >= 0 and t == "purchase"]
            inter_r.extend([row] * len(interaction))
            inter_c.extend(interaction)
            views.append(UserView(known=known, interactions=np.asarray(interaction, np.int64),
                                  buy_cols=np.asarray([c for c, _ in buys], np.int64),
                                  buy_times=np.asarray([t for _, t in buys], np.float64)))
        # co-occurrence: the (binary) interacted products' neighbour rows, summed -- sparse
        indicator = sparse.csr_matrix((np.ones(len(inter_r), np.float32), (inter_r, inter_c)),
                                      shape=(len(histories), n))
        indicator.sum_duplicates()
        indicator.data[:] = 1.0
        together = sparse.csr_matrix(indicator @ state.neighbours)  # (b, N) sparse
        together.sort_indices()
        users = None
        if self.model is not None and state.embeddings is not None:
            users = encode_users(self.model, histories.products, histories.event_types,
                                 index, state.embeddings, user_features=histories.profiles)
        for row, view in enumerate(views):
            start, stop = together.indptr[row], together.indptr[row + 1]
            view.together_cols = together.indices[start:stop].astype(np.int64)
            view.together_vals = together.data[start:stop]
            if not len(view.known):
                continue
            if users is not None:
                view.user_vector = users[row]
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
        as ``training.baselines.ALS`` fits them."""
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
        two-tower, text and ALS vectors (``config.candidates`` each) and the most popular
        products; topped up by popularity to ``config.min_candidates``.

        Args:
            histories: the users' histories.
            views: ``_views(histories)`` when already computed.
            exclude: per user, columns never to return.
            allowed: (N,) bool, the only columns that may be returned (None: all).
        """
        state, config = self.state, self.config
        views = views if views is not None else self._views(histories)
        retrievers = state.retrieval(config.exact_max)
        wanted = {"two_tower": "user_vector", "text": "text_vector", "als": "als_vector"}
        found: dict[str, list[np.ndarray | None]] = {}
        for name, attribute in wanted.items():
            rows = [r for r, v in enumerate(views) if getattr(v, attribute) is not None]
            found[name] = [None] * len(views)
            if name in retrievers and rows:
                queries = np.stack([getattr(views[r], attribute) for r in rows])
                for r, top in zip(rows, retrievers[name].top(queries, config.candidates),
                                  strict=True):
                    found[name][r] = top
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
        views = views if views is not None else self._views(histories)
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
        from training.blend import train_scorer, tuning_metrics

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
            scorer = train_scorer(features, padding, truth, hidden=self.config.hidden,
                                  epochs=self.config.epochs, seed=self.config.seed)
            self.pair_scorers[setting] = scorer
            self.validation[setting] = {
                **tuning_metrics(self._apply(setting, features, padding), truth, sizes),
                "candidate_recall": float((truth.sum(axis=1) / sizes).mean()),
                "candidates_mean": float((~padding).sum(axis=1).mean()),
                "n_users": float(len(users))}
            log.info("scorer %s: validation %s", setting,
                     {k: round(v, 4) for k, v in self.validation[setting].items()})
        return self.validation

    def _apply(self, setting: str, features: np.ndarray, excluded: np.ndarray) -> np.ndarray:
        """(b, C) scores of (b, C, F) features; -inf where ``excluded`` (b, C)."""
        scorer = self.pair_scorers.get(setting) or self.pair_scorers.get("all")
        if scorer is None:  # untuned: rank by the sources and popularity
            scores = features[..., : len(SOURCE_NAMES)].sum(axis=-1) \
                + features[..., FEATURE_NAMES.index("popularity_30d")] * 1e-3
        else:
            with torch.inference_mode():
                scores = scorer(torch.from_numpy(features)).double().numpy()  # (b, C)
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
            if exclude_purchased:
                drop |= {p for p, t in zip(histories.products[row], histories.event_types[row],
                                           strict=True) if t == "purchase"}
            out.append(np.asarray(sorted(index[p] for p in drop if p in index), np.int64))
        return out

    def rank(self, histories: Histories, now: float, k: int, *,
             exclude_purchased: bool = False, exclude: Sequence[set[str]] | None = None,
             allowed: np.ndarray | None = None,
             setting: str | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per user, the top ``k`` catalogue columns and their scores, best first (ties by
        column).

        Args:
            histories: the users' histories.
            now: epoch seconds of the moment of scoring.
            k: how many per user.
            exclude_purchased: leave out what the history bought (and, unless ``setting``
                says otherwise, rank with the "new products" scorer).
            exclude: per user, more products to leave out.
            allowed: (N,) bool, the only columns that may be returned (a category).
            setting: the pair scorer to rank with, "all" or "new" (default: "new" when
                ``exclude_purchased``, else "all").
        """
        setting = setting or ("new" if exclude_purchased else "all")
        views = self._views(histories)
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
        scorer.state.retrieval(scorer.config.exact_max)  # a state saved before retrieval
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

    def _rank(self, user_ids: Sequence[str], k: int,
              exclude: Mapping[str, set[str]] | None) -> list[tuple[np.ndarray, np.ndarray]]:
        data = self.fitted
        histories = self.scorer.histories(data, user_ids, self.users)
        if exclude is None:
            return self.scorer.rank(histories, data.cut.timestamp(), k)
        return self.scorer.rank(histories, data.cut.timestamp(), k, setting="new",
                                exclude=[exclude.get(u, set()) for u in user_ids])

    def scores(self, user_ids: Sequence[str]) -> np.ndarray:
        """(U, N) scores (-inf: not a candidate)."""
        data = self.fitted
        histories = self.scorer.histories(data, user_ids, self.users)
        return self.scorer.scores(histories, data.cut.timestamp())

    def recommend(self, user_ids: Sequence[str], k: int, *,
                  exclude: Mapping[str, set[str]] | None = None,
                  batch_size: int = 256) -> list[list[str]]:
        """Top ``k`` per user; with ``exclude`` the new-products scorer is used."""
        ids = self.fitted.product_ids
        out: list[list[str]] = []
        for start in range(0, len(user_ids), batch_size):
            batch = list(user_ids[start : start + batch_size])
            out.extend([ids[c] for c in cols] for cols, _ in self._rank(batch, k, exclude))
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
