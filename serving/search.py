"""Product search: a lexical score (BM25 over the product's words and codes) and a semantic
one (the shared text encoder), combined; optionally personalised by the served ranking.

Exact tokens (a brand, a stock code, a product id) find their product through the lexical
part; paraphrases and related words through the semantic part. A product added to the
catalogue today is searchable as soon as a bundle containing it is served: nothing here
depends on sales.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
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

log = logging.getLogger(__name__)


def tokens(text: str) -> list[str]:
    """Lower-case alphanumeric runs ("85123A White Heart" -> ["85123a", "white", "heart"])."""
    return TOKEN.findall(str(text).lower())


@dataclass
class SearchHit:
    row: int
    score: float
    matched: list[str]


class SortedKeys:
    """A read-only ``str -> int`` map over one sorted array of keys.

    A dict of the catalogue's 100,000 product ids and words is 100,000 Python objects to
    build while a bundle loads, with the GIL held (a serving thread of the same worker waits);
    this is two arrays, loaded from disk as they are, and a lookup is a binary search.
    """

    def __init__(self, keys: np.ndarray, values: np.ndarray):
        self.keys = keys  # (K,) str, ascending
        self.values = values  # (K,) int

    @classmethod
    def of(cls, keys: Sequence[str], values: Sequence[int] | None = None) -> SortedKeys:
        """From keys in any order; values default to the keys' positions, and a repeated
        key keeps its last value (as a dict would)."""
        pairs = dict(zip(keys, range(len(keys)) if values is None else values, strict=True))
        array = np.asarray(list(pairs), dtype=str)
        order = np.argsort(array, kind="stable")
        return cls(array[order], np.asarray(list(pairs.values()), np.int64)[order])

    def get(self, key: str, default: int | None = None) -> int | None:
        at = int(np.searchsorted(self.keys, key))
        if at < len(self.keys) and self.keys[at] == key:
            return int(self.values[at])
        return default

    def __getitem__(self, key: str) -> int:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def __len__(self) -> int:
        return len(self.keys)


LEXICAL_FILE = "lexical.npz"
LEXICAL_META = "lexical.json"  # {"file", "sha256", "rows"}: what build_index stored


class SearchIndex:
    """BM25 over product documents plus cosine of unit text vectors.

    Built from the products (``SearchIndex(products, ...)``: every document tokenized, ~1-2 s
    of pure Python at 100,000 products) or loaded from what ``save`` wrote (arrays only: the
    DAG's build_index step stores it with the version's indexes, so a server's load does not
    tokenize the catalogue beside the traffic).

    Args:
        products: product_id, title, category, brand (rows in bundle order).
        text_vectors: (N, H) unit rows from the shared text encoder, or None (lexical only).
        retrieval: the text space's ``training.index.VectorIndex`` (over ``text_vectors``)
            for the semantic candidates (None: an exact one is built here).
        k1, b: BM25 parameters.
    """

    def __init__(self, products: pd.DataFrame | None, text_vectors: np.ndarray | None,
                 retrieval: Any = None, k1: float = 1.2, b: float = 0.75, *,
                 lexical: tuple[SortedKeys, sparse.csc_matrix, SortedKeys] | None = None):
        if lexical is None:
            if products is None:
                raise ValueError("SearchIndex needs the products or a saved lexical part")
            lexical = _lexical(products, k1, b)
        self.vocabulary, self.bm25, self.ids = lexical  # token -> column, (N, V), id -> row
        self.text_vectors = text_vectors
        if text_vectors is not None and retrieval is None:
            from training.index import VectorIndex

            retrieval = VectorIndex(text_vectors, exact_max=len(text_vectors))
        self.retrieval = retrieval

    def save(self, folder: Any) -> Any:
        """Write the lexical part (vocabulary, BM25 matrix, product ids) to
        ``folder/LEXICAL_FILE``; returns its path."""
        path = Path(folder) / LEXICAL_FILE
        with path.open("wb") as fh:  # np.savez would append ".npz" to a str path
            np.savez(fh, tokens=self.vocabulary.keys, columns=self.vocabulary.values,
                     indptr=self.bm25.indptr, indices=self.bm25.indices, data=self.bm25.data,
                     shape=np.asarray(self.bm25.shape), ids=self.ids.keys,
                     id_rows=self.ids.values)
        return path

    @classmethod
    def load(cls, path: Any, text_vectors: np.ndarray | None,
             retrieval: Any = None) -> SearchIndex:
        """The index ``save`` wrote (no pickle: arrays of numbers and fixed-width strings)."""
        with np.load(path, allow_pickle=False) as saved:
            bm25 = sparse.csc_matrix((saved["data"], saved["indices"], saved["indptr"]),
                                     shape=tuple(int(v) for v in saved["shape"]))
            lexical = (SortedKeys(saved["tokens"], saved["columns"]), bm25,
                       SortedKeys(saved["ids"], saved["id_rows"]))
        return cls(None, text_vectors, retrieval, lexical=lexical)

    @property
    def rows(self) -> int:
        return self.bm25.shape[0]

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


def _lexical(products: pd.DataFrame, k1: float, b: float
             ) -> tuple[SortedKeys, sparse.csc_matrix, SortedKeys]:
    """The lexical part of a ``SearchIndex``: vocabulary, (N, V) BM25 weights with each
    column's rows ascending, and the lower-cased product ids."""
    docs = [tokens(" ".join(str(v) for v in row if v is not None and v == v))
            for row in products[["product_id", "title", "category", "brand"]]
            .itertuples(index=False)]
    vocabulary: dict[str, int] = {}
    rows, cols = [], []
    for r, doc in enumerate(docs):
        for t in doc:
            rows.append(r)
            cols.append(vocabulary.setdefault(t, len(vocabulary)))
    n, v = len(docs), len(vocabulary)
    tf = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n, v))
    tf.sum_duplicates()
    lengths = np.asarray(tf.sum(axis=1)).ravel()  # (N,)
    df = np.asarray((tf > 0).sum(axis=0)).ravel()  # (V,)
    idf = np.log1p((n - df + 0.5) / (df + 0.5)).astype(np.float32)  # (V,)
    norm = k1 * (1 - b + b * lengths / max(lengths.mean(), 1e-9))  # (N,)
    tf = tf.tocoo()
    weights = tf.data * (k1 + 1) / (tf.data + norm[tf.row]) * idf[tf.col]
    bm25 = sparse.csc_matrix((weights.astype(np.float32), (tf.row, tf.col)), shape=(n, v))
    bm25.sort_indices()  # each column's rows ascending (``postings``, ``_members``)
    ids = [str(p).lower() for p in products["product_id"]]
    return SortedKeys.of(list(vocabulary)), bm25, SortedKeys.of(ids)


def save_lexical(products: pd.DataFrame, folder: Path) -> dict[str, Any]:
    """Build the lexical part of the products' ``SearchIndex`` and store it in ``folder``
    with its checksum (the DAG's build_index step, beside the vector indexes)."""
    from core.checksums import sha256_file

    path = SearchIndex(products, None).save(folder)
    meta = {"file": path.name, "sha256": sha256_file(path), "rows": len(products)}
    (Path(folder) / LEXICAL_META).write_text(json.dumps(meta, indent=2))
    return meta


def load_search_index(folder: Path, products: pd.DataFrame, text_vectors: np.ndarray | None,
                 retrieval: Any = None) -> SearchIndex:
    """The bundle's ``SearchIndex``: loaded from what ``save_lexical`` stored in ``folder``
    when it is there, intact and of these products; built from ``products`` otherwise (a
    version indexed before the lexical part was stored, or a damaged file: logged)."""
    from core.checksums import sha256_files

    meta_path = Path(folder) / LEXICAL_META
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        path = Path(folder) / meta["file"]
        if (path.exists() and meta.get("rows") == len(products)
                and sha256_files([path]) == [meta["sha256"]]):
            return SearchIndex.load(path, text_vectors, retrieval)
        log.warning("%s does not match the bundle's %d products or its checksum: building "
                    "the lexical index instead", path, len(products))
    else:
        log.info("no stored lexical index in %s: building it (%d products)", folder,
                 len(products))
    return SearchIndex(products, text_vectors, retrieval)
