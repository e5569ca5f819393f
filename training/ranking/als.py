"""Implicit-feedback matrix factorisation (ALS): a candidate source of the served ranking
(its item factors) and a baseline of the protocol.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from scipy import sparse

from features.user_state import TARGET_EVENT_TYPES
from training.data import TrainData, popularity_scores
from training.recommender import ScoredRecommender, unit_fill, with_fallback


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
                 event_types: Sequence[str] = TARGET_EVENT_TYPES, name: str = "als"):
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
        self.fill = unit_fill(popularity_scores(data))  # (N,)

    def scores(self, user_ids: Sequence[str]) -> np.ndarray:
        data = self.fitted
        index = np.array([data.user_index.get(u, -1) for u in user_ids], dtype=np.int64)  # (b,)
        has = (index >= 0) & (np.asarray(self.matrix.getnnz(axis=1))[np.maximum(index, 0)] > 0)
        users = self.user_factors[np.maximum(index, 0)]  # (b, F)
        scores = users @ self.item_factors.T  # (b, N)
        return with_fallback(scores, has, self.fill)

    def params(self) -> dict[str, object]:
        return {"factors": self.factors, "regularization": self.regularization,
                "alpha": self.alpha, "iterations": self.iterations,
                "weighting": self.weighting, "seed": self.seed}
