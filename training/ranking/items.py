"""The item side of the served ranking, fitted at a cut: everything except the user.

Item co-occurrence neighbours, ALS item factors, per-product purchase facts (repurchase
rate, popularity, trend, newness), per-country popularity, the sequence encoder
(``training.ranking.sequence``) and, with a two-tower model, the item embeddings and text
vectors; and the retrieval index of each vector space (``training.index``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from features.user_state import TARGET_EVENT_TYPES
from training.config import TrainConfig, resolve_device
from training.data import TrainData, popularity_scores
from training.index import EXACT_MAX, VectorIndex, build_indexes
from training.ranking.als import ALS
from training.ranking.config import ScorerConfig
from training.ranking.sequence import SequenceState, fit_sequence

DAY_SECONDS = 86_400.0
BLOCK_ENTRIES = 2**24  # co-occurrence entries of one cosine block, at most (~200 MB)


def cosine_blocks(matrix: sparse.csr_matrix, max_entries: int = BLOCK_ENTRIES,
                  shrink: float = 0.0) -> Iterator[tuple[int, sparse.csr_matrix]]:
    """Product × product cosine of the columns of a user × product matrix, a block of rows
    at a time: (first row, (c, N) CSR float32 block of the non-zero similarities).

    Sparse throughout: a product's row holds only the products that share a user with it,
    never N dense cells, and a block's rows are chosen so that an upper bound of its
    entries (each product's users' interaction counts summed) stays within
    ``max_entries``, so memory is bounded whatever the catalogue size and density.

    Args:
        matrix: (U, N) non-negative user × product matrix.
        max_entries: entries of one block, at most (a single product over it gets a
            block of its own).
        shrink: shrinkage ``s``: each cosine becomes ``dot / (|a| |b| + s)``, pulling the
            similarities of products with few interactions towards 0 (0: plain cosine).
    """
    items = sparse.csc_matrix(matrix, dtype=np.float32)  # (U, N)
    norms = np.sqrt(np.asarray(items.multiply(items).sum(axis=0)).ravel())  # (N,)
    inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)  # (N,)
    unit = sparse.csr_matrix(items @ sparse.diags(inv.astype(np.float32)))  # (U, N)
    unit_t = sparse.csr_matrix(unit.T)  # (N, U)
    n = matrix.shape[1]
    degree = np.diff(unit.indptr).astype(np.float64)  # (U,) products per user
    pattern = unit_t.copy()
    pattern.data[:] = 1.0
    bound = np.minimum(pattern @ degree, n)  # (N,) entries of each row, at most
    ends = np.cumsum(bound)
    start = 0
    while start < n:
        # the longest run of rows from ``start`` whose bound fits (at least one row)
        base = ends[start - 1] if start else 0.0
        stop = max(start + 1, int(np.searchsorted(ends, base + max_entries, side="right")))
        block = (unit_t[start:stop] @ unit).tocsr()  # (c, N)
        block.sort_indices()
        if shrink > 0:
            rows = np.repeat(np.arange(start, stop), np.diff(block.indptr))  # (nnz,)
            both = norms[rows] * norms[block.indices]  # (nnz,) |a| |b|
            block.data *= (both / (both + shrink)).astype(np.float32)
        yield start, block
        start = stop


def top_per_row(block: sparse.csr_matrix, keep: int | None, first_row: int = 0, *,
                drop_self: bool = False) -> sparse.csr_matrix:
    """Each row's ``keep`` largest positive entries (None: all positive ones) of a block
    of a product × product matrix whose row 0 is product ``first_row``; ties go to the
    lower column. ``drop_self`` removes each product's entry for itself first."""
    block = block.tocsr()
    rows = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))  # (nnz,)
    cols, vals = block.indices, block.data
    wanted = vals > 0
    if drop_self:
        wanted &= cols != rows + first_row
    rows, cols, vals = rows[wanted], cols[wanted], vals[wanted]
    if keep is not None:
        order = np.lexsort((cols, -vals, rows))  # by row, then value descending
        rows, cols, vals = rows[order], cols[order], vals[order]
        starts = np.searchsorted(rows, rows, side="left")  # each entry's row start
        kept = np.arange(len(rows)) - starts < keep
        rows, cols, vals = rows[kept], cols[kept], vals[kept]
    return sparse.csr_matrix((vals.astype(np.float32), (rows, cols)), shape=block.shape)


def cosine_top(matrix: sparse.csr_matrix, keep: int | None, *, drop_self: bool,
               max_entries: int = BLOCK_ENTRIES, shrink: float = 0.0) -> sparse.csr_matrix:
    """Product × product cosine of the columns of a user × product matrix, each row's
    ``keep`` largest entries (None: all; ``top_per_row``), block by block
    (``cosine_blocks``, with its ``shrink``); ``drop_self`` removes the diagonal first.

    Returns:
        (N, N) CSR float32.
    """
    n = matrix.shape[1]
    blocks = [] if keep == 0 else [top_per_row(block, keep, start, drop_self=drop_self)
                                   for start, block in cosine_blocks(matrix, max_entries, shrink)]
    if not blocks:
        return sparse.csr_matrix((n, n), dtype=np.float32)
    return sparse.vstack(blocks, format="csr").astype(np.float32)


def cosine_neighbours(matrix: sparse.csr_matrix, neighbours: int,
                      max_entries: int = BLOCK_ENTRIES) -> sparse.csr_matrix:
    """Each product's top ``neighbours`` by cosine of its user column (itself excluded).

    Args:
        matrix: (U, N) non-negative user × product matrix.
        neighbours: entries kept per row.
        max_entries: entries of one block (``cosine_blocks``).

    Returns:
        (N, N) CSR float32.
    """
    keep = min(neighbours, max(matrix.shape[1] - 1, 0))
    return cosine_top(matrix, keep, drop_self=True, max_entries=max_entries)


def item_facts(data: TrainData, prior: float) -> dict[str, np.ndarray]:
    """Per-product purchase facts before the cut, each (N,) float32 in ``data.product_ids``
    order: repurchase_rate (share of buyers who bought on 2+ occasions, smoothed towards the
    overall share with ``prior`` pseudo-buyers), popularity_7d / popularity_30d (log purchases,
    scaled to [0, 1]), trend (log of the 7-day over the 30-day rate, / 3), newness
    (1 / (1 + days since first sale / 30)), popularity (raw 30-day purchases), and for the
    ranking stage's richer features: category (an integer code per distinct category),
    log_price (log1p of the catalogue price, 0 where unknown) and cycle_days (the median
    days between a buyer's successive purchase occasions of the product, the shop's median
    where nobody bought it twice)."""
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
        **catalogue_facts(data),
        "cycle_days": repurchase_cycles(occasions, data.product_ids),
    }


def catalogue_facts(data: TrainData) -> dict[str, np.ndarray]:
    """(N,) float32 ``category`` codes and ``log_price`` of the candidates."""
    rows = (data.catalog.drop_duplicates("product_id", keep="last").set_index("product_id")
            .reindex(data.product_ids))
    codes = pd.factorize(rows["category"].fillna("").astype(str), sort=True)[0]
    price = pd.to_numeric(rows["price"], errors="coerce").clip(lower=0).fillna(0.0)
    return {"category": codes.astype(np.float32),
            "log_price": np.log1p(price.to_numpy(np.float64)).astype(np.float32)}


def repurchase_cycles(occasions: pd.DataFrame, product_ids: list[str]) -> np.ndarray:
    """(N,) float32 median days between a buyer's successive occasions of each product."""
    ordered = occasions.sort_values(["user_id", "product_id", "ts"], kind="stable")
    same = ((ordered["user_id"] == ordered["user_id"].shift())
            & (ordered["product_id"] == ordered["product_id"].shift()))
    gaps = (ordered["ts"].diff().dt.total_seconds() / DAY_SECONDS)[same]
    per_product = gaps.groupby(ordered["product_id"][same]).median()
    overall = float(gaps.median()) if len(gaps) else 30.0
    return per_product.reindex(product_ids).fillna(overall).clip(lower=1.0).to_numpy(np.float32)


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
        sequence: the sequence encoder fitted on the same data (None: not fitted, or an
            item side from before it).
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
    sequence: SequenceState | None = None
    item_index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.item_index = {p: i for i, p in enumerate(self.product_ids)}

    def matrices(self) -> dict[str, np.ndarray | None]:
        """The vector spaces the ranking retrieves from (``training.index.SPACES``); None
        where a space is absent (no two-tower model)."""
        return {"two_tower": self.embeddings, "text": self.text_vectors, "als": self.als_items,
                "sequence": (self.sequence.items_matrix() if self.sequence is not None
                             else None)}

    def indexes(self, exact_max: int = EXACT_MAX) -> dict[str, VectorIndex]:
        """The retrieval index of each space: those given to ``use_indexes`` (a served
        version's, built and checked by the DAG's build_index step), else built here on
        first use through the same factory (evaluation)."""
        built = self.__dict__.get("_indexes")
        if built is None:
            built = build_indexes(self.matrices(), exact_max)
            self.__dict__["_indexes"] = built
        return built

    def use_indexes(self, indexes: dict[str, VectorIndex]) -> None:
        """Retrieve from ``indexes`` (one per present space, over this state's matrices)."""
        for name, matrix in self.matrices().items():
            if matrix is not None and (name not in indexes or indexes[name].size != len(matrix)):
                raise ValueError(f"no index of {len(matrix)} rows for the {name} space")
        self.__dict__["_indexes"] = dict(indexes)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the indexes (stored apart, by the build_index step) and caches."""
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

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
        matrix = data.interactions(event_types=TARGET_EVENT_TYPES, weight="binary")  # (U, N)
        als = ALS(factors=config.als_factors, regularization=config.als_regularization,
                  alpha=config.als_alpha, iterations=config.als_iterations, seed=config.seed)
        als.fit(data)
        embeddings = text_vectors = None
        if model is not None:
            embeddings, text_vectors = embed_catalog(model, model_config, data.catalog,
                                                     data.product_ids, cache_dir)
        items = als.item_factors.astype(np.float64)  # (N, F)
        sequence = None
        if config.sequence:
            device = (resolve_device(model_config.device) if model_config is not None
                      else None)
            sequence = fit_sequence(data.events, data.product_ids, text_vectors, config,
                                    device)
        return cls(cut=data.cut, product_ids=list(data.product_ids), embeddings=embeddings,
                   neighbours=cosine_neighbours(matrix, config.neighbours),
                   als_items=als.item_factors, als_gram=items.T @ items,
                   facts=item_facts(data, config.repurchase_prior), text_vectors=text_vectors,
                   country_popularity=country_popularity(data, users), sequence=sequence)


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
    from features.contract import product_text
    from training.embeddings import ItemFeatures, encode_items
    from training.examples import unique_products
    from training.text_cache import embed_texts

    rows = unique_products(catalog).set_index("product_id").loc[list(product_ids)].reset_index()
    text = embed_texts(product_text(rows), config, cache_dir, progress=False)
    return encode_items(model, ItemFeatures.from_catalog(rows, text)).astype(np.float32), text
