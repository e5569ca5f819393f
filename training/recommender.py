"""The interface of a recommendation method fitted on ``TrainData``, and helpers its
implementations share.

The served ranking's ALS source (``training.ranking.als``) and every method the evaluation
protocol compares (``training.evaluation``) implement it: ``fit(data)`` then
``recommend(user_ids, k, exclude=...)``; ``ScoredRecommender`` derives ``recommend`` from a
(U, N) score matrix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, Self, runtime_checkable

import numpy as np
from scipy import sparse

from training.data import TrainData
from training.metrics import top_k


@runtime_checkable
class Recommender(Protocol):
    """A recommendation method the protocol can fit and ask.

    ``scores`` is optional: methods that have it (``ScoredRecommender``) can be blended.
    """

    name: str

    def fit(self, data: TrainData) -> Recommender:
        """Learn from what was known before the cut; returns self."""
        ...

    def recommend(
        self, user_ids: Sequence[str], k: int, *, exclude: Mapping[str, set[str]] | None = None
    ) -> list[list[str]]:
        """Per user, up to ``k`` product ids best first, none of ``exclude[user]``."""
        ...


class ScoredRecommender:
    """Base of methods that score every candidate: ``recommend`` is top-k of ``scores``.

    Subclasses set ``name`` and implement ``_fit`` and ``scores``. Ties are broken by the
    candidate's column (product id order), so rankings are deterministic.
    """

    name: str = "scored"
    data: TrainData | None = None

    def fit(self, data: TrainData) -> Self:
        """Fit on ``data``; returns self."""
        self.data = data
        self._fit(data)
        return self

    def _fit(self, data: TrainData) -> None:
        raise NotImplementedError

    def scores(self, user_ids: Sequence[str]) -> np.ndarray:
        """(U, N) float32 scores, columns ``data.product_ids``; higher is better."""
        raise NotImplementedError

    @property
    def fitted(self) -> TrainData:
        if self.data is None:
            raise RuntimeError(f"{self.name}: fit() first")
        return self.data

    def recommend(
        self,
        user_ids: Sequence[str],
        k: int,
        *,
        exclude: Mapping[str, set[str]] | None = None,
        batch_size: int | None = None,
    ) -> list[list[str]]:
        """Top ``k`` of ``scores`` per user, excluded products removed.

        Args:
            user_ids: users to recommend for.
            k: list length.
            exclude: user -> products never to recommend to them.
            batch_size: users scored at once (default: as many as keep one (b, N) float64
                block within ``SCORE_BLOCK_BYTES``, at most 2,048: 335 users at 100,000
                products).

        Returns:
            Per user, up to ``k`` product ids, best first.
        """
        data = self.fitted
        ids = np.asarray(data.product_ids, dtype=object)
        if batch_size is None:
            batch_size = score_batch(len(ids))
        out: list[list[str]] = []
        for start in range(0, len(user_ids), batch_size):
            batch = list(user_ids[start : start + batch_size])
            raw = np.asarray(self.scores(batch))  # (b, N)
            # float32 scores stay float32 (upcasting cannot change their order, and halves
            # the top-k's memory traffic); a copy, since excluded products are masked in place
            scores = raw.astype(np.float32 if raw.dtype == np.float32 else np.float64)
            mask_excluded(scores, batch, exclude, data.item_index)
            out.extend(ranked_ids(scores, ids, k))
        return out


SCORE_BLOCK_BYTES = 256 * 2**20


def score_batch(n_products: int, most: int = 2048) -> int:
    """Users to score at once so that one (b, N) float64 block stays within
    ``SCORE_BLOCK_BYTES`` (at least 16)."""
    return max(16, min(most, SCORE_BLOCK_BYTES // (8 * max(n_products, 1))))


def mask_excluded(
    scores: np.ndarray,
    user_ids: Sequence[str],
    exclude: Mapping[str, set[str]] | None,
    item_index: Mapping[str, int],
) -> None:
    """Set excluded products' scores to -inf, in place. ``scores`` is (U, N)."""
    if not exclude:
        return
    for row, user in enumerate(user_ids):
        cols = [item_index[p] for p in exclude.get(user, ()) if p in item_index]
        scores[row, cols] = -np.inf


def ranked_ids(scores: np.ndarray, ids: np.ndarray, k: int) -> list[list[str]]:
    """Top-k product ids per row of ``scores`` (U, N), dropping -inf (excluded) entries."""
    cols = top_k(scores, k)  # (U, k)
    finite = np.isfinite(np.take_along_axis(scores, cols, axis=1))  # (U, k)
    return [ids[c[f]].tolist() for c, f in zip(cols, finite, strict=True)]


def history_rows(data: TrainData, matrix: sparse.csr_matrix, user_ids: Sequence[str]
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


def with_fallback(scores: np.ndarray, has_history: np.ndarray, fill: np.ndarray) -> np.ndarray:
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


def unit_fill(popularity: np.ndarray) -> np.ndarray:
    """Popularity mapped into [0, 1) (the same order), to fill or break ties with."""
    top = float(popularity.max()) if len(popularity) else 0.0
    return (popularity / (top + 1.0)).astype(np.float32)  # (N,)
