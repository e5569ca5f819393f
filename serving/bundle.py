"""The serving bundle: everything one model version needs to answer requests.

Written by the training step into the MLflow model's artifacts::

    manifest.json          name/interval/metrics and the sha256 of every file below
    model/                 two-tower weights, config, vocabularies (training.checkpoint)
    scorer/                the served ranking's pair scorers and item side (training.ranking)
    item_embeddings.npy    (N, D) float32, unit rows, in ``products.parquet`` order
    products.parquet       product_id, title, category, brand, price, popularity

and completed by the DAG's build_index step (run artifacts ``index/``, ``training.index``)::

    two_tower.faiss, text.faiss, als.faiss   one retrieval index per vector space
    indexes.json                             each one's kind, size, recall@50, sha256

A ``Bundle`` is immutable once loaded; the server swaps whole bundles, never edits one.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.checksums import sha256_file, sha256_files
from serving.cache import LRU

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PRODUCTS = "products.parquet"
EMBEDDINGS = "item_embeddings.npy"
MODEL_DIR = "model"
SCORER_DIR = "scorer"
PERSONAL_TOP = 500  # /search with a user: the user's top products that get a boost
# Users whose views (vectors, co-occurrence sums, retrieved candidates) a bundle keeps
# (``SHOPREC_SERVING_USER_CACHE``; 0: none): ~20 KB each at 100,000 products.
USER_CACHE = 10_000
# Where this process's requests found their users' views, across bundles (/metrics):
# "kept" (the worker's cache), "stored" (vectors written with the row:
# ``serving.user_vectors``), "computed" (on the request).
VIEW_SOURCES: collections.Counter = collections.Counter()


class BundleError(RuntimeError):
    """A bundle that is incomplete or whose files do not match their checksums."""


def _checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def write_bundle(folder: Path, *, model: Any, config: Any, scorer: Any,
                 products: pd.DataFrame, item_embeddings: np.ndarray,
                 meta: dict[str, Any]) -> Path:
    """Write a bundle folder and its manifest.

    Args:
        folder: target folder (created).
        model: the trained ``TwoTowerModel``; config: its ``TrainConfig``.
        scorer: the served ranking (``training.ranking.scorer.Scorer``), its item side fitted on
            the same catalogue as ``products`` (same order).
        products: one row per embedding, in embedding order, with product_id, title,
            category, brand, price and popularity.
        item_embeddings: (N, D) float32.
        meta: JSON-able facts recorded in the manifest (interval, metrics, ...).

    Returns:
        The folder.
    """
    from training.checkpoint import save_model

    if len(products) != len(item_embeddings):
        raise ValueError(f"{len(products)} products for {len(item_embeddings)} embeddings")
    if list(products["product_id"]) != list(scorer.state.product_ids):
        raise ValueError("the scorer's item side and the product table disagree")
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, config, folder / MODEL_DIR)
    scorer.save(folder / SCORER_DIR)
    np.save(folder / EMBEDDINGS, np.ascontiguousarray(item_embeddings, dtype=np.float32))
    products.reset_index(drop=True).to_parquet(folder / PRODUCTS, index=False)
    manifest = {**meta, "products": len(products), "dim": int(item_embeddings.shape[1]),
                "files": _checksums(folder)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    return folder


def verify(folder: Path) -> dict[str, Any]:
    """Check every file against the manifest.

    Raises:
        BundleError: missing manifest, missing file or checksum mismatch (named).
    """
    path = folder / MANIFEST
    if not path.exists():
        raise BundleError(f"no {MANIFEST} in {folder}: not a shoprec bundle")
    manifest = json.loads(path.read_text())
    files = manifest.get("files", {})
    for name in files:
        if not (folder / name).is_file():
            raise BundleError(f"bundle {folder}: {name} is missing")
    # hashed in a child process: a worker verifying a swap's bundle keeps its GIL
    actual = sha256_files([folder / name for name in files])
    for (name, expected), got in zip(files.items(), actual, strict=True):
        if got != expected:
            raise BundleError(f"bundle {folder}: checksum mismatch for {name} "
                              f"(manifest {expected[:12]}, file {got[:12]}); refusing to load")
    return manifest


@dataclass(frozen=True)
class Recommendation:
    product_id: str
    title: str
    score: float
    reason: str


@dataclass(frozen=True)
class Bundle:
    """One model version, loaded: immutable; requests read it, reloads replace it."""

    name: str
    version: str
    run_id: str
    manifest: dict[str, Any]
    model: Any
    scorer: Any  # training.ranking.scorer.Scorer
    products: pd.DataFrame  # indexed by row, aligned with item_embeddings
    item_embeddings: np.ndarray  # (N, D)
    indexes: dict[str, Any]  # space -> training.index.VectorIndex (the scorer's)
    search_index: Any  # serving.search.SearchIndex
    query_encoder: Any  # QueryEncoder, or None (no text encoder: lexical search only)
    item_row: dict[str, int] = field(repr=False)
    categories: frozenset[str] = field(default=frozenset(), repr=False)

    @property
    def size(self) -> int:
        return len(self.products)

    def _column(self, name: str) -> np.ndarray:
        """A product column as a numpy array of str, made once (pandas' per-element
        access costs microseconds a call on a request's path)."""
        columns = self.__dict__.setdefault("_columns", {})
        if name not in columns:
            columns[name] = self.products[name].astype(str).to_numpy(dtype=object)
        return columns[name]

    def title(self, row: int) -> str:
        return self._column("title")[row]

    def _result(self, row: int, score: float, reason: str) -> Recommendation:
        return Recommendation(self._column("product_id")[row], self.title(row), float(score),
                              reason)

    def _allowed(self, category: str | None) -> np.ndarray | None:
        """(N,) bool: the rows of ``category`` (None: no restriction)."""
        if category is None:
            return None
        masks = self.__dict__.setdefault("_category_masks", {})
        if category not in masks:
            masks[category] = (self.products["category"] == category).to_numpy()
        return masks[category]

    def _excluded(self, exclude: set[str], category: str | None) -> np.ndarray:
        """(N,) bool: rows never to return."""
        out = np.zeros(self.size, dtype=bool)
        out[[self.item_row[p] for p in exclude if p in self.item_row]] = True
        allowed = self._allowed(category)
        if allowed is not None:
            out |= ~allowed
        return out

    def _views(self, history: Any, now: float) -> list[Any]:
        """The scorer's view of a one-user ``history`` (``Scorer.views``), kept per row digest
        (``Histories.digests``: the same online row gives the same view, whatever the
        request) for the last ``SHOPREC_SERVING_USER_CACHE`` users; a changed row has another
        digest, so an event that changes the row is seen at once."""
        digest = history.digests[0] if history.digests else None
        cache = self._kept_views()
        views = cache.get(digest) if digest is not None and cache.size > 0 else None
        if views is not None:
            self.view_sources["kept"] += 1
            return views
        # vectors written with the row (``serving.user_vectors``) by this bundle, if any
        stored = history.vectors_for(self.identity)
        self.view_sources["stored" if stored else "computed"] += 1
        views = self.scorer.views(history, now, stored)
        if digest is not None and cache.size > 0:
            cache.put(digest, views)
        return views

    @property
    def identity(self) -> str:
        """What stored user vectors are bound to (``serving.user_vectors.bundle_identity``)."""
        return f"{self.name}/{self.version}/{self.run_id}"

    @property
    def view_sources(self) -> collections.Counter:
        """``VIEW_SOURCES``: where this process's requests found their users' views."""
        return VIEW_SOURCES

    def _kept_views(self) -> LRU:
        cache = self.__dict__.get("_view_cache")
        if cache is None:
            size = int(os.environ.get("SHOPREC_SERVING_USER_CACHE", USER_CACHE))
            cache = self.__dict__.setdefault("_view_cache", LRU(size))
        return cache

    def view_time(self, history: Any) -> float:
        """The moment a one-user history's view is computed at: the cut, or the row's
        latest event when later (not the request's time: a row's view is fixed)."""
        stamps = history.timestamps[0]
        known_times = stamps[np.isfinite(stamps)]
        return max(self.scorer.state.cut.timestamp(), float(known_times.max(initial=0.0)))

    def recommend(self, history: Any, k: int, *, exclude_purchased: bool = False,
                  exclude: set[str] = frozenset(), category: str | None = None,
                  country: str | None = None) -> tuple[list[Recommendation], bool]:
        """Top-k products for one user with the served ranking.

        Args:
            history: the user's ``training.ranking.histories.Histories`` (one entry).
            k: how many.
            exclude_purchased: leave out everything the user ever bought (``Histories.bought``).
            exclude: more products to leave out.
            category: only products of this category.
            country: the visitor's country, used when the history is empty (else the
                profile's): popularity in that country.

        Returns:
            (recommendations best first, cold_start: no known product in the history).
        """
        from training.metrics import top_k

        products = history.products[0]
        known = [self.item_row[p] for p in products if p in self.item_row]
        if not known:
            country = country or _profile_country(history)
            local = self.scorer.state.country_popularity.get(country) if country else None
            if local is not None and local.sum() > 0:
                excluded = self._excluded(set(exclude), category)
                scores = np.where(excluded, -np.inf, local + 1e-3 * self.scorer.state.facts[
                    "popularity_30d"])  # (N,)
                rows = [int(r) for r in top_k(scores[None, :], k)[0] if np.isfinite(scores[r])]
                return [self._result(r, scores[r], f"popular in {country} this month")
                        for r in rows], True
        now = self.view_time(history)
        [(rows, scores)] = self.scorer.rank(history, now, k,
                                            exclude_purchased=exclude_purchased,
                                            exclude=[set(exclude)],
                                            allowed=self._allowed(category),
                                            views=self._views(history, now))
        rows = [int(r) for r in rows]
        reasons = self._reasons(rows, known, history.event_types[0], products)
        return [self._result(r, s, reason)
                for r, s, reason in zip(rows, scores, reasons, strict=True)], not known

    def similar(self, product_id: str, k: int) -> list[Recommendation]:
        """The ``k`` products whose item embeddings are nearest (the two-tower index).

        Raises:
            KeyError: the product is not in this bundle's catalogue.
        """
        row = self.item_row[product_id]
        query = self.item_embeddings[row : row + 1].astype(np.float32)  # (1, D)
        scores, rows = self.indexes["two_tower"].search(query, k + 1)  # (1, k + 1)
        title = self.title(row)
        return [self._result(int(r), float(sc), f"similar to {title}")
                for sc, r in zip(scores[0], rows[0], strict=True) if r >= 0 and r != row][:k]

    def complementary(self, product_id: str, k: int) -> tuple[list[Recommendation], bool]:
        """Products bought together with ``product_id`` (co-occurrence of buyers), best
        first; topped up with popular products of other categories when there are fewer
        than ``k`` (the second value says so).

        Raises:
            KeyError: the product is not in this bundle's catalogue.
        """
        row = self.item_row[product_id]
        neighbours = self.scorer.state.neighbours[row]
        order = np.lexsort((neighbours.indices, -neighbours.data))[:k]
        title = self.title(row)
        out = [self._result(int(neighbours.indices[i]), float(neighbours.data[i]),
                            f"often bought with {title}") for i in order]
        if len(out) >= k:
            return out, False
        taken = {row, *(self.item_row[r.product_id] for r in out)}
        same = (self.products["category"] == self.products["category"].iat[row]).to_numpy()
        popularity = self.scorer.state.facts["popularity"]  # (N,)
        for r in np.lexsort((np.arange(self.size), -popularity)):
            if len(out) == k:
                break
            if int(r) not in taken and not same[r]:
                out.append(self._result(int(r), 0.0, "popular with shoppers this month"))
        return out, True

    def search(self, query: str, k: int, *, history: Any = None, category: str | None = None,
               query_vector: np.ndarray | None = None) -> list[Recommendation]:
        """Products for a search query: lexical + semantic match, personalised by the
        served ranking when the user's ``history`` is given (``query_vector``: the query's
        vector when already encoded, e.g. in a batch of concurrent queries)."""
        vector = query_vector
        if vector is None and self.query_encoder is not None:
            vector = self.query_encoder.encode(query)
        personal = None
        if history is not None and any(p in self.item_row for p in history.products[0]):
            now = self.view_time(history)
            [(rows, scores)] = self.scorer.rank(history, now, PERSONAL_TOP,
                                                views=self._views(history, now))
            personal = np.full(self.size, -np.inf)  # (N,) the user's top products only
            personal[rows] = scores
        hits = self.search_index.search(query, k, query_vector=vector, personal=personal,
                                        excluded=self._excluded(set(), category))
        return [self._result(h.row, h.score,
                             f"matches '{' '.join(h.matched)}'" if h.matched
                             else f"related to '{query.strip()[:40]}'") for h in hits]

    def _reasons(self, rows: list[int], known: list[int], types: list[str],
                 products: list[str]) -> list[str]:
        """A short reason per result: bought before, bought together with / similar to a
        product of the history, or popular / trending."""
        from training.ranking.rows import dense_block

        state = self.scorer.state
        bought = {self.item_row[p] for p, t in zip(products, types, strict=True)
                  if t == "purchase" and p in self.item_row}
        recent = list(dict.fromkeys(reversed(known)))[:20]  # most recent first, distinct
        trend = state.facts["trend"]
        if recent and rows:
            together = dense_block(state.neighbours, recent, rows)  # (R, k)
            similar = self.item_embeddings[recent] @ self.item_embeddings[rows].T  # (R, k)
        out = []
        for i, row in enumerate(rows):
            if row in bought:
                out.append("you bought it before")
                continue
            if recent:
                if together[:, i].max(initial=0.0) > 0:
                    anchor = recent[int(np.argmax(together[:, i]))]
                    out.append(f"often bought with {self.title(anchor)}")
                    continue
                anchor = recent[int(np.argmax(similar[:, i]))]
                out.append(f"similar to {self.title(anchor)}")
                continue
            out.append("trending this week" if trend[row] > 0.1
                       else "popular with shoppers this month")
        return out


def _profile_country(history: Any) -> str | None:
    value = history.profile_value("country")
    return str(value) if isinstance(value, str) and value else None


def _item_rows(products: pd.DataFrame, state: Any) -> dict[str, int]:
    """Product id -> row: the item state's own map when the product table lists the same ids
    in the same order (a bundle as ``write_bundle`` writes it), so a load builds no second
    100,000-entry dict beside the traffic; built otherwise."""
    ids = products["product_id"].tolist()
    if ids == list(state.product_ids):
        return state.item_index
    return {p: i for i, p in enumerate(ids)}


def load_bundle(model_dir: Path, index_dir: Path, *, name: str, version: str,
                run_id: str) -> Bundle:
    """Verify and load a bundle from its two artifact folders (the model, and the indexes
    the DAG's build_index step stored).

    Raises:
        BundleError: checksum mismatch, missing index, or an index that does not match the
            version's vectors.
    """
    from serving.query_encoder import shared_query_encoder
    from serving.search import load_search_index
    from training.checkpoint import load_model
    from training.index import IndexLoadError, load_indexes
    from training.ranking.scorer import Scorer

    manifest = verify(model_dir)
    model, config = load_model(model_dir / MODEL_DIR)
    model.eval()
    scorer = Scorer.load(model_dir / SCORER_DIR, model, config)
    try:
        indexes = load_indexes(index_dir, scorer.state.matrices())
    except IndexLoadError as exc:
        raise BundleError(f"version {version}: {exc}") from exc
    scorer.state.use_indexes(indexes)
    products = pd.read_parquet(model_dir / PRODUCTS)
    embeddings = np.load(model_dir / EMBEDDINGS)
    if len(products) != len(scorer.state.product_ids):
        raise BundleError(f"version {version}: {len(products)} products for an item side of "
                          f"{len(scorer.state.product_ids)}")
    text_vectors = scorer.state.text_vectors
    return Bundle(
        name=name, version=version, run_id=run_id, manifest=manifest, model=model,
        scorer=scorer, products=products,
        search_index=load_search_index(index_dir, products, text_vectors,
                                       indexes.get("text")),
        query_encoder=shared_query_encoder(config) if text_vectors is not None else None,
        categories=frozenset(products["category"].astype(str)),
        item_embeddings=embeddings, indexes=indexes,
        item_row=_item_rows(products, scorer.state),
    )
