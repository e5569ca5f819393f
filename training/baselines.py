"""Baselines the two-tower model must beat, measured in the same protocol run.

Every baseline is a ``ScoredRecommender`` (so it can also be a blend source) over the
catalogue as of the cut:

- ``Popularity``: most purchased products in the ``days`` before the cut.
- ``Repeat``: the user's own most-bought products (by count or quantity, optionally
  recency-weighted), then popularity.
- ``ItemKNN``: cosine similarity of products' user vectors; a user scores a product by
  its summed similarity to what they bought ("bought together by the same people").
- ``ALS``: implicit's alternating least squares on confidence-weighted (bm25 or log1p)
  purchases, seeded.
- ``TextCosine``: cosine between the mean text embedding of a user's products and each
  product's text embedding (the frozen encoder the item tower reads).

A user with no usable history gets the popularity ranking from every method.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from training.config import TrainConfig
from training.protocol import INTERACTION_EVENTS, ScoredRecommender, TrainData

POPULARITY_DAYS = 30


def popularity_scores(
    data: TrainData, days: int | None = POPULARITY_DAYS, weight: str = "count"
) -> np.ndarray:
    """Purchases per candidate in the ``days`` before the cut (None: all history).

    Returns:
        (N,) float64, columns ``data.product_ids``.
    """
    since = None if days is None else data.cut - pd.Timedelta(days=days)
    matrix = data.interactions(event_types=("purchase",), weight=weight, since=since)  # (U, N)
    return np.asarray(matrix.sum(axis=0), dtype=np.float64).ravel()  # (N,)


def _rows(data: TrainData, matrix: sparse.csr_matrix, user_ids: Sequence[str]
          ) -> tuple[sparse.csr_matrix, np.ndarray]:
    """The rows of ``matrix`` for ``user_ids`` (unknown users: empty rows) and which are known.

    Returns:
        (b, N) CSR and (b,) bool.
    """
    index = np.array([data.user_index.get(u, -1) for u in user_ids], dtype=np.int64)  # (b,)
    known = index >= 0  # (b,)
    rows = matrix[np.where(known, index, 0)]  # (b, N)
    rows = sparse.diags(known.astype(np.float32)) @ rows  # zero the unknown users' rows
    return sparse.csr_matrix(rows), known


def _with_fallback(scores: np.ndarray, has_history: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """``scores`` with the rows of users without history replaced by ``fill``.

    Args:
        scores: (b, N) method scores (rows with history).
        has_history: (b,) bool.
        fill: (N,) fallback scores in [0, 1).

    Returns:
        (b, N) float32.
    """
    out = np.asarray(scores, dtype=np.float32).copy()  # (b, N)
    out[~has_history] = fill
    return out


def _unit_fill(popularity: np.ndarray) -> np.ndarray:
    """Popularity mapped into [0, 1) (the same order), to fill or break ties with."""
    top = float(popularity.max()) if len(popularity) else 0.0
    return (popularity / (top + 1.0)).astype(np.float32)  # (N,)


class Popularity(ScoredRecommender):
    """Everyone gets the products most purchased in the ``days`` before the cut.

    Args:
        days: window before the cut (None: all history).
        weight: "count" (purchase events) or "quantity" (units).
        name: method name.
    """

    def __init__(self, days: int | None = POPULARITY_DAYS, weight: str = "count",
                 name: str = "popularity"):
        self.days = days
        self.weight = weight
        self.name = name

    def _fit(self, data: TrainData) -> None:
        self.popularity = popularity_scores(data, self.days, self.weight)  # (N,)

    def scores(self, user_ids: Sequence[str]) -> np.ndarray:
        pop = self.popularity.astype(np.float32)  # (N,)
        return np.broadcast_to(pop, (len(user_ids), len(pop))).copy()  # (U, N)

    def params(self) -> dict[str, object]:
        return {"days": self.days, "weight": self.weight}


class Repeat(ScoredRecommender):
    """The user's own most-bought products first, then the popular ones.

    Args:
        weight: "count" (purchase events) or "quantity" (units).
        half_life_days: weight each purchase by 0.5 ** (age / half life); None: no decay.
        popularity_days: window of the popularity fill.
        name: method name.
    """

    def __init__(self, weight: str = "count", half_life_days: float | None = None,
                 popularity_days: int | None = POPULARITY_DAYS, name: str = "repeat"):
        self.weight = weight
        self.half_life_days = half_life_days
        self.popularity_days = popularity_days
        self.name = name

    def _fit(self, data: TrainData) -> None:
        self.matrix = data.interactions(event_types=("purchase",), weight=self.weight,
                                        half_life_days=self.half_life_days)  # (U, N)
        self.fill = _unit_fill(popularity_scores(data, self.popularity_days))  # (N,)

    def scores(self, user_ids: Sequence[str]) -> np.ndarray:
        rows, _ = _rows(self.fitted, self.matrix, user_ids)  # (b, N)
        own = rows.toarray()  # (b, N)
        # Own products first (any positive weight), in weight order; the fill breaks ties
        # and ranks the rest. Own weights are rescaled into [1, 2) so decay cannot sink them.
        top = own.max(axis=1, keepdims=True)  # (b, 1)
        own = np.where(own > 0, 1.0 + own / (top + 1e-12) * 0.999, 0.0)  # (b, N)
        return (own + self.fill[None, :] * 1e-3).astype(np.float32)  # (b, N)

    def params(self) -> dict[str, object]:
        return {"weight": self.weight, "half_life_days": self.half_life_days}


class ItemKNN(ScoredRecommender):
    """Item-based nearest neighbours: cosine on the user × product matrix.

    Args:
        neighbours: keep each product's top ``neighbours`` similar products (None: all).
        weight: user × product cell value: "binary", "count" or "quantity".
        self_similarity: keep a product's similarity to itself (scores repeat purchases).
        event_types: events that count as interactions.
        name: method name.
    """

    def __init__(self, neighbours: int | None = None, weight: str = "binary",
                 self_similarity: bool = False,
                 event_types: Sequence[str] = INTERACTION_EVENTS, name: str = "item_knn"):
        self.neighbours = neighbours
        self.weight = weight
        self.self_similarity = self_similarity
        self.event_types = tuple(event_types)
        self.name = name

    def _fit(self, data: TrainData) -> None:
        self.matrix = data.interactions(event_types=self.event_types, weight=self.weight)
        self.similarity = cosine_similarity(self.matrix, self.neighbours,
                                            self_similarity=self.self_similarity)  # (N, N)
        self.fill = _unit_fill(popularity_scores(data))  # (N,)

    def scores(self, user_ids: Sequence[str]) -> np.ndarray:
        rows, _ = _rows(self.fitted, self.matrix, user_ids)  # (b, N)
        binary = rows.copy()
        binary.data[:] = 1.0
        scores = (binary @ self.similarity).toarray()  # (b, N)
        has = np.asarray(binary.sum(axis=1)).ravel() > 0  # (b,)
        # popularity, far below any similarity, breaks ties and fills empty rows
        return _with_fallback(scores + self.fill[None, :] * 1e-6, has, self.fill)

    def params(self) -> dict[str, object]:
        return {"neighbours": self.neighbours, "weight": self.weight,
                "self_similarity": self.self_similarity}


def cosine_similarity(
    matrix: sparse.csr_matrix, neighbours: int | None = None, *, self_similarity: bool = True
) -> sparse.csr_matrix:
    """Product × product cosine similarity of the columns of a user × product matrix.

    Args:
        matrix: (U, N) non-negative.
        neighbours: keep each row's top ``neighbours`` entries (None: all).
        self_similarity: keep the diagonal.

    Returns:
        (N, N) CSR float32.
    """
    items = sparse.csc_matrix(matrix, dtype=np.float32)  # (U, N)
    norms = np.sqrt(np.asarray(items.multiply(items).sum(axis=0)).ravel())  # (N,)
    inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)  # (N,)
    unit = items @ sparse.diags(inv.astype(np.float32))  # (U, N)
    sim = (unit.T @ unit).toarray()  # (N, N)
    if not self_similarity:
        np.fill_diagonal(sim, 0.0)
    if neighbours is not None and neighbours < sim.shape[1]:
        drop = np.argpartition(-sim, neighbours, axis=1)[:, neighbours:]  # (N, N - n)
        np.put_along_axis(sim, drop, 0.0, axis=1)
    return sparse.csr_matrix(sim)


class ALS(ScoredRecommender):
    """Implicit-feedback matrix factorisation (the ``implicit`` library, CPU, seeded).

    Args:
        factors: latent dimensions.
        regularization: L2 penalty.
        alpha: confidence scaling of the weighted matrix.
        iterations: ALS sweeps.
        weighting: "bm25" (``implicit.nearest_neighbours.bm25_weight``), "log1p" or "none".
        bm25_k1: BM25's K1.
        bm25_b: BM25's B.
        seed: ``random_state`` of the factor initialisation.
        event_types: events that count as interactions.
        name: method name.
    """

    def __init__(self, factors: int = 64, regularization: float = 0.05, alpha: float = 5.0,
                 iterations: int = 15, weighting: str = "log1p", bm25_k1: float = 100.0,
                 bm25_b: float = 0.8, seed: int = 42,
                 event_types: Sequence[str] = INTERACTION_EVENTS, name: str = "als"):
        self.factors = factors
        self.regularization = regularization
        self.alpha = alpha
        self.iterations = iterations
        self.weighting = weighting
        self.bm25_k1 = bm25_k1
        self.bm25_b = bm25_b
        self.seed = seed
        self.event_types = tuple(event_types)
        self.name = name

    def _confidence(self, matrix: sparse.csr_matrix) -> sparse.csr_matrix:
        if self.weighting == "bm25":
            from implicit.nearest_neighbours import bm25_weight

            return sparse.csr_matrix(bm25_weight(matrix, K1=self.bm25_k1, B=self.bm25_b))
        if self.weighting == "log1p":
            out = matrix.copy()
            out.data = np.log1p(out.data)
            return out
        if self.weighting == "none":
            return matrix
        raise ValueError(f"weighting {self.weighting!r} not in bm25/log1p/none")

    def _fit(self, data: TrainData) -> None:
        from implicit.cpu.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits

        self.matrix = data.interactions(event_types=self.event_types, weight="count")  # (U, N)
        confidence = self._confidence(self.matrix).astype(np.float32)
        confidence.data *= self.alpha
        # implicit parallelises itself; a multi-threaded BLAS underneath only contends
        with threadpool_limits(limits=1, user_api="blas"):
            model = AlternatingLeastSquares(
                factors=self.factors, regularization=self.regularization, alpha=1.0,
                iterations=self.iterations, random_state=self.seed,
                num_threads=min(2, os.cpu_count() or 1),
            )
            model.fit(sparse.csr_matrix(confidence), show_progress=False)
        self.user_factors = np.asarray(model.user_factors, dtype=np.float32)  # (U, F)
        self.item_factors = np.asarray(model.item_factors, dtype=np.float32)  # (N, F)
        self.fill = _unit_fill(popularity_scores(data))  # (N,)

    def scores(self, user_ids: Sequence[str]) -> np.ndarray:
        data = self.fitted
        index = np.array([data.user_index.get(u, -1) for u in user_ids], dtype=np.int64)  # (b,)
        has = (index >= 0) & (np.asarray(self.matrix.getnnz(axis=1))[np.maximum(index, 0)] > 0)
        users = self.user_factors[np.maximum(index, 0)]  # (b, F)
        scores = users @ self.item_factors.T  # (b, N)
        return _with_fallback(scores, has, self.fill)

    def params(self) -> dict[str, object]:
        return {"factors": self.factors, "regularization": self.regularization,
                "alpha": self.alpha, "iterations": self.iterations,
                "weighting": self.weighting, "seed": self.seed}


class TextCosine(ScoredRecommender):
    """Cosine between the mean text embedding of a user's products and every product.

    Args:
        config: ``text_encoder`` and friends select the frozen encoder ("minilm" for real
            runs, "tiny" in tests).
        cache_dir: text-embedding cache folder.
        event_types: events whose products make up the user's profile.
        weight: "count" (the mean over events, so products bought often weigh more),
            "binary" (over distinct products) or "quantity".
        progress: show the encoder's progress bar.
        name: method name.
    """

    def __init__(self, config: TrainConfig | None = None,
                 cache_dir: str | os.PathLike[str] | None = None,
                 event_types: Sequence[str] = INTERACTION_EVENTS, weight: str = "count",
                 progress: bool = False, name: str = "text_cosine"):
        self.config = config or TrainConfig()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.event_types = tuple(event_types)
        self.weight = weight
        self.progress = progress
        self.name = name

    def _fit(self, data: TrainData) -> None:
        from training.text import embed_texts, product_text

        text = embed_texts(product_text(data.catalog), self.config, self.cache_dir,
                           progress=self.progress)  # (N, H)
        norms = np.linalg.norm(text, axis=1, keepdims=True)  # (N, 1)
        self.text = (text / np.maximum(norms, 1e-12)).astype(np.float32)  # (N, H)
        self.matrix = data.interactions(event_types=self.event_types, weight=self.weight)
        self.fill = _unit_fill(popularity_scores(data))  # (N,)

    def scores(self, user_ids: Sequence[str]) -> np.ndarray:
        rows, _ = _rows(self.fitted, self.matrix, user_ids)  # (b, N)
        counts = np.asarray(rows.sum(axis=1)).ravel()  # (b,)
        profile = rows @ self.text / np.maximum(counts, 1.0)[:, None]  # (b, H) mean
        profile /= np.maximum(np.linalg.norm(profile, axis=1, keepdims=True), 1e-12)
        scores = profile @ self.text.T  # (b, N)
        return _with_fallback(scores, counts > 0, self.fill)

    def params(self) -> dict[str, object]:
        return {"text_encoder": self.config.text_encoder, "weight": self.weight}
