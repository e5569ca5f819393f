"""The baselines every model is compared with: popularity, repeat, item-kNN, text cosine
(ALS is also a source of the served ranking: ``training.ranking.als``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import sparse

from features.user_state import TARGET_EVENT_TYPES
from training.config import TrainConfig
from training.data import POPULARITY_DAYS, TrainData, popularity_scores
from training.ranking.items import BLOCK_ENTRIES, cosine_top
from training.recommender import ScoredRecommender, history_rows, unit_fill, with_fallback


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
        self.fill = unit_fill(popularity_scores(data, self.popularity_days))  # (N,)

    def scores(self, user_ids: Sequence[str]) -> np.ndarray:
        rows, _ = history_rows(self.fitted, self.matrix, user_ids)  # (b, N)
        own = rows.toarray()  # (b, N)
        # Own products first (any positive weight), in weight order; the fill breaks ties
        # and ranks the rest. Own weights are rescaled into [1, 2) so decay cannot sink them.
        top = own.max(axis=1, keepdims=True)  # (b, 1)
        own = np.where(own > 0, 1.0 + own / (top + 1e-12) * 0.999, 0.0)  # (b, N)
        return (own + self.fill[None, :] * 1e-3).astype(np.float32)  # (b, N)

    def params(self) -> dict[str, object]:
        return {"weight": self.weight, "half_life_days": self.half_life_days}


# Item-kNN's similarity matrix is kept within this many entries (~600 MB as float32 CSR):
# uncapped, a catalogue of 100,000 products bought by a million users keeps billions of
# co-occurrences. A catalogue of up to ~7,000 products keeps them all.
ITEM_KNN_MAX_ENTRIES = 50_000_000
ITEM_KNN_MIN_NEIGHBOURS = 200  # never fewer neighbours per product than this


def auto_neighbours(n_products: int) -> int | None:
    """Item-kNN's neighbours per product within ``ITEM_KNN_MAX_ENTRIES`` (None: all)."""
    if n_products * n_products <= ITEM_KNN_MAX_ENTRIES:
        return None
    return max(ITEM_KNN_MIN_NEIGHBOURS, ITEM_KNN_MAX_ENTRIES // max(n_products, 1))


class ItemKNN(ScoredRecommender):
    """Item-based nearest neighbours: cosine on the user × product matrix.

    Args:
        neighbours: keep each product's top ``neighbours`` similar products (None: all of
            them when the matrix fits ``ITEM_KNN_MAX_ENTRIES``, else ``auto_neighbours``).
        weight: user × product cell value: "binary", "count" or "quantity".
        self_similarity: keep a product's similarity to itself (scores repeat purchases).
        shrink: cosine shrinkage (``dot / (|a| |b| + shrink)``): damps the similarities of
            rarely bought products (0: plain cosine).
        event_types: events that count as interactions.
        name: method name.
    """

    def __init__(self, neighbours: int | None = None, weight: str = "binary",
                 self_similarity: bool = False, shrink: float = 0.0,
                 event_types: Sequence[str] = TARGET_EVENT_TYPES, name: str = "item_knn"):
        self.neighbours = neighbours
        self.weight = weight
        self.self_similarity = self_similarity
        self.shrink = shrink
        self.event_types = tuple(event_types)
        self.name = name

    def _fit(self, data: TrainData) -> None:
        self.matrix = data.interactions(event_types=self.event_types, weight=self.weight)
        self.kept = (self.neighbours if self.neighbours is not None
                     else auto_neighbours(self.matrix.shape[1]))
        self.similarity = cosine_similarity(self.matrix, self.kept,
                                            self_similarity=self.self_similarity,
                                            shrink=self.shrink)  # (N, N)
        self.fill = unit_fill(popularity_scores(data))  # (N,)

    def scores(self, user_ids: Sequence[str]) -> np.ndarray:
        rows, _ = history_rows(self.fitted, self.matrix, user_ids)  # (b, N)
        binary = rows.copy()
        binary.data[:] = 1.0
        scores = (binary @ self.similarity).toarray()  # (b, N)
        has = np.asarray(binary.sum(axis=1)).ravel() > 0  # (b,)
        # popularity, far below any similarity, breaks ties and fills empty rows
        return with_fallback(scores + self.fill[None, :] * 1e-6, has, self.fill)

    def params(self) -> dict[str, object]:
        return {"neighbours": getattr(self, "kept", self.neighbours), "weight": self.weight,
                "self_similarity": self.self_similarity, "shrink": self.shrink}


def cosine_similarity(
    matrix: sparse.csr_matrix, neighbours: int | None = None, *, self_similarity: bool = True,
    max_entries: int = BLOCK_ENTRIES, shrink: float = 0.0,
) -> sparse.csr_matrix:
    """Product × product cosine similarity of the columns of a user × product matrix,
    computed sparse a block of rows at a time (``training.ranking.items.cosine_blocks``):
    memory bounded by ``max_entries`` plus the entries kept, never a dense N × N.

    Args:
        matrix: (U, N) non-negative.
        neighbours: keep each row's top ``neighbours`` entries (None: all).
        self_similarity: keep the diagonal.
        max_entries: entries of one block, at most.
        shrink: cosine shrinkage (``training.ranking.items.cosine_blocks``).

    Returns:
        (N, N) CSR float32.
    """
    keep = neighbours if neighbours is not None and neighbours < matrix.shape[1] else None
    return cosine_top(matrix, keep, drop_self=not self_similarity, max_entries=max_entries,
                      shrink=shrink)


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
                 event_types: Sequence[str] = TARGET_EVENT_TYPES, weight: str = "count",
                 progress: bool = False, name: str = "text_cosine"):
        self.config = config or TrainConfig()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.event_types = tuple(event_types)
        self.weight = weight
        self.progress = progress
        self.name = name

    def _fit(self, data: TrainData) -> None:
        from features.contract import product_text
        from training.text_cache import embed_texts

        text = embed_texts(product_text(data.catalog), self.config, self.cache_dir,
                           progress=self.progress)  # (N, H)
        norms = np.linalg.norm(text, axis=1, keepdims=True)  # (N, 1)
        self.text = (text / np.maximum(norms, 1e-12)).astype(np.float32)  # (N, H)
        self.matrix = data.interactions(event_types=self.event_types, weight=self.weight)
        self.fill = unit_fill(popularity_scores(data))  # (N,)

    def scores(self, user_ids: Sequence[str]) -> np.ndarray:
        rows, _ = history_rows(self.fitted, self.matrix, user_ids)  # (b, N)
        counts = np.asarray(rows.sum(axis=1)).ravel()  # (b,)
        profile = rows @ self.text / np.maximum(counts, 1.0)[:, None]  # (b, H) mean
        profile /= np.maximum(np.linalg.norm(profile, axis=1, keepdims=True), 1e-12)
        scores = profile @ self.text.T  # (b, N)
        return with_fallback(scores, counts > 0, self.fill)

    def params(self) -> dict[str, object]:
        return {"text_encoder": self.config.text_encoder, "weight": self.weight}
