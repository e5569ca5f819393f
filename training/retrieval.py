"""Top-k inner-product retrieval over the rows of a matrix, for candidate generation.

The served ranking scores a few hundred candidates per user, not the whole catalogue; the
candidates of its dense sources (two-tower, text, ALS) are the rows with the highest inner
product with the user's vector. ``Retrieval`` answers that exactly (numpy) for catalogues up
to ``exact_max`` rows and through a FAISS HNSW graph above, where reading the whole matrix per
request would cost more than the request's budget (100,000 products x 384 floats is 150 MB).

A ``Retrieval`` pickles (the HNSW graph through ``faiss.serialize_index``), so it travels
inside the scorer's item state and is identical in evaluation and serving.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

EXACT_MAX = 50_000  # rows; above this, HNSW
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 256


class Retrieval:
    """The ``k`` rows of ``matrix`` with the highest inner product with a query.

    Args:
        matrix: (N, D) rows to retrieve.
        exact_max: up to this many rows, exact search with numpy; above, FAISS HNSW.
    """

    def __init__(self, matrix: np.ndarray, exact_max: int = EXACT_MAX):
        self.matrix = np.ascontiguousarray(matrix, dtype=np.float32)  # (N, D)
        self.index: Any = None
        if len(self.matrix) > exact_max:
            import faiss

            index = faiss.IndexHNSWFlat(self.matrix.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            index.add(self.matrix)
            self.index = index
            log.info("retrieval: HNSW over %d x %d", *self.matrix.shape)

    @property
    def kind(self) -> str:
        return "exact" if self.index is None else "hnsw"

    def top(self, queries: np.ndarray, k: int) -> list[np.ndarray]:
        """Per query (row of ``queries`` (b, D)), up to ``k`` row numbers, unordered."""
        n = len(self.matrix)
        k = min(k, n)
        if k <= 0 or len(queries) == 0:
            return [np.zeros(0, np.int64) for _ in range(len(queries))]
        q = np.ascontiguousarray(queries, dtype=np.float32)  # (b, D)
        if self.index is None:
            scores = q @ self.matrix.T  # (b, N)
            part = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (b, k)
            return list(part.astype(np.int64))
        self.index.hnsw.efSearch = max(HNSW_EF_SEARCH, k)
        _, rows = self.index.search(q, k)  # (b, k), -1 where fewer found
        return [r[r >= 0].astype(np.int64) for r in rows]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.index is not None:
            import faiss

            state["index"] = faiss.serialize_index(self.index)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if state.get("index") is not None:
            import faiss

            state["index"] = faiss.deserialize_index(state["index"])
        self.__dict__.update(state)
