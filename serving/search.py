"""Product search: a lexical score (BM25 over the product's words and codes) and a semantic
one (the shared text encoder), combined; optionally personalised by the served ranking.

Exact tokens (a brand, a stock code, a product id) find their product through the lexical
part; paraphrases and related words through the semantic part. A product added to the
catalogue today is searchable as soon as a bundle containing it is served: nothing here
depends on sales.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

TOKEN = re.compile(r"[0-9a-z]+")
LEXICAL_WEIGHT = 0.6
SEMANTIC_WEIGHT = 0.4
PERSONAL_WEIGHT = 0.25
SEMANTIC_CANDIDATES = 200
LEXICAL_CANDIDATES = 500  # a common word matches thousands: only the best BM25 scores
MAX_QUERY_CHARS = 200


def tokens(text: str) -> list[str]:
    """Lower-case alphanumeric runs ("85123A White Heart" -> ["85123a", "white", "heart"])."""
    return TOKEN.findall(str(text).lower())


@dataclass
class SearchHit:
    row: int
    score: float
    matched: list[str]


class SearchIndex:
    """BM25 over product documents plus cosine of unit text vectors.

    Args:
        products: product_id, title, category, brand (rows in bundle order).
        text_vectors: (N, H) unit rows from the shared text encoder, or None (lexical only).
        retrieval: the text space's ``training.index.VectorIndex`` (over ``text_vectors``)
            for the semantic candidates (None: an exact one is built here).
        k1, b: BM25 parameters.
    """

    def __init__(self, products: pd.DataFrame, text_vectors: np.ndarray | None,
                 retrieval: Any = None, k1: float = 1.2, b: float = 0.75):
        docs = [tokens(" ".join(str(v) for v in row if v is not None and v == v))
                for row in products[["product_id", "title", "category", "brand"]]
                .itertuples(index=False)]
        self.vocabulary: dict[str, int] = {}
        rows, cols = [], []
        for r, doc in enumerate(docs):
            for t in doc:
                rows.append(r)
                cols.append(self.vocabulary.setdefault(t, len(self.vocabulary)))
        n, v = len(docs), len(self.vocabulary)
        tf = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n, v))
        tf.sum_duplicates()
        lengths = np.asarray(tf.sum(axis=1)).ravel()  # (N,)
        df = np.asarray((tf > 0).sum(axis=0)).ravel()  # (V,)
        idf = np.log1p((n - df + 0.5) / (df + 0.5)).astype(np.float32)  # (V,)
        norm = k1 * (1 - b + b * lengths / max(lengths.mean(), 1e-9))  # (N,)
        tf = tf.tocoo()
        weights = tf.data * (k1 + 1) / (tf.data + norm[tf.row]) * idf[tf.col]
        self.bm25 = sparse.csc_matrix((weights.astype(np.float32), (tf.row, tf.col)),
                                      shape=(n, v))  # (N, V)
        self.bm25.sort_indices()  # each column's rows ascending (``postings``, ``_members``)
        self.ids = {str(p).lower(): i for i, p in enumerate(products["product_id"])}
        self.text_vectors = text_vectors
        if text_vectors is not None and retrieval is None:
            from training.index import VectorIndex

            retrieval = VectorIndex(text_vectors, exact_max=len(text_vectors))
        self.retrieval = retrieval

    def postings(self, token: str) -> tuple[np.ndarray, np.ndarray]:
        """The rows whose document holds ``token`` (ascending) and their BM25 weights (read
        straight from the CSC arrays: scipy's slicing costs more than the sums here)."""
        col = self.vocabulary[token]
        start, stop = self.bm25.indptr[col], self.bm25.indptr[col + 1]
        return self.bm25.indices[start:stop], self.bm25.data[start:stop]

    def lexical(self, query_tokens: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """(N,) BM25 scores and the query tokens the catalogue knows."""
        known = [t for t in dict.fromkeys(query_tokens) if t in self.vocabulary]
        scores = np.zeros(self.bm25.shape[0], np.float32)  # (N,)
        for token in known:
            rows, weights = self.postings(token)
            scores[rows] += weights  # a row appears once per column
        return scores, known

    def search(self, query: str, k: int, *, query_vector: np.ndarray | None = None,
               personal: np.ndarray | None = None,
               excluded: np.ndarray | None = None) -> list[SearchHit]:
        """The top ``k`` products for a query.

        Args:
            query: the text typed.
            k: how many.
            query_vector: (H,) unit vector of the query from the shared text encoder.
            personal: (N,) the user's served-ranking scores (higher is better), or None.
            excluded: (N,) bool, products never to return.

        Returns:
            Hits best first: row, combined score, query tokens the product's text contains.
        """
        words = tokens(query)
        lex, known = self.lexical(words)  # (N,)
        n = len(lex)
        matching = np.flatnonzero(lex > 0)
        if len(matching) > LEXICAL_CANDIDATES:
            best = np.argpartition(-lex[matching], LEXICAL_CANDIDATES - 1)[:LEXICAL_CANDIDATES]
            matching = matching[best]
        parts = [matching]
        if query_vector is not None and self.retrieval is not None and n:
            parts.append(self.retrieval.top(query_vector[None, :], SEMANTIC_CANDIDATES)[0])
        exact = self.ids.get(query.strip().lower())
        if exact is not None:
            parts.append(np.asarray([exact]))
        rows = np.unique(np.concatenate(parts)).astype(np.int64)  # the candidates
        if excluded is not None:
            rows = rows[~excluded[rows]]
        score = np.zeros(len(rows), np.float64)  # (C,)
        if lex.max(initial=0.0) > 0:
            score += LEXICAL_WEIGHT * lex[rows] / lex.max()
        if query_vector is not None and self.text_vectors is not None and len(rows):
            semantic = self.text_vectors[rows] @ query_vector  # (C,) cosine
            score += SEMANTIC_WEIGHT * np.clip(semantic, 0.0, 1.0)
        if personal is not None and len(rows):
            p = personal[rows]
            finite = p[np.isfinite(p)]
            if len(finite) and finite.max() > finite.min():
                low, high = finite.min(), finite.max()
                scaled = np.where(np.isfinite(p), (p - low) / (high - low), 0.0)
                score += PERSONAL_WEIGHT * np.clip(scaled, 0.0, 1.0)
        if exact is not None:  # the product id itself: first
            score[rows == exact] += 10.0
        order = rows[np.lexsort((rows, -score))][:k]
        best = dict(zip(rows.tolist(), score.tolist(), strict=True))
        holds = {t: _members(order, self.postings(t)[0]) for t in known}  # token -> (k,) bool
        return [SearchHit(int(row), float(best[int(row)]), [t for t in known if holds[t][i]])
                for i, row in enumerate(order)]


def _members(items: np.ndarray, sorted_rows: np.ndarray) -> np.ndarray:
    """(len(items),) bool: which items are in ``sorted_rows`` (ascending). A binary search
    per item: ``np.isin`` would hash the whole posting list of a common word."""
    if not len(sorted_rows):
        return np.zeros(len(items), bool)
    at = np.minimum(np.searchsorted(sorted_rows, items), len(sorted_rows) - 1)
    return sorted_rows[at] == items
