"""The retrieval indexes of a model version: one factory, one check, one set of parameters.

The served ranking retrieves from several vector spaces of the catalogue (``SPACES``): the
two-tower item embeddings (``/recommend`` candidates, ``/similar``), the frozen text
encoder's product vectors (``/recommend`` candidates, ``/search`` semantic candidates) and
the ALS item factors and the sequence encoder's item table (``/recommend`` candidates).
Each gets its index from ``VectorIndex``:

- exact inner-product search (``faiss.IndexFlatIP``) for catalogues up to ``exact_max``
  products (``SHOPREC_INDEX_EXACT_MAX``, default ``core.settings.Settings.index_exact_max``);
  On a machine where faiss sees a GPU (the ``gpu`` extra), exact search runs on a copy of
  the index on the GPU;
- above, an HNSW graph (``faiss.IndexHNSWFlat``) with ``HNSW_M``, ``HNSW_EF_CONSTRUCTION``
  and ``HNSW_EF_SEARCH``, because reading the whole matrix per request would cost more than
  a request's budget (100,000 products x 384 floats is 150 MB).

``measure_recall`` checks an index against exact search (recall@``RECALL_K`` for a seeded
sample of catalogue rows as queries); the daily DAG's ``build_index`` step builds every
space's index, measures it, refuses a version below ``SHOPREC_INDEX_MIN_RECALL`` and stores
the indexes with the version (``save_indexes``); the server loads them (``load_indexes``)
and ``/version`` shows each one's ``info()``. Evaluation builds its indexes through the same
factory with the same threshold, so what is measured retrieves as what is served.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from core.checksums import sha256_file, sha256_files
from core.settings import Settings

log = logging.getLogger(__name__)

SPACES = ("two_tower", "text", "als", "sequence")
EXACT_MAX = Settings.index_exact_max  # rows; above this, HNSW
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 256
RECALL_K = 50
RECALL_QUERIES = 200
INDEX_META = "indexes.json"


class VectorIndex:
    """Inner-product search over the rows of one matrix.

    Args:
        matrix: (N, D) rows to retrieve (the product order of the bundle).
        exact_max: up to this many rows, exact search; above, HNSW.
        index: an already built faiss index over ``matrix`` (``load_indexes``).
        recall: its measured recall@``RECALL_K`` (None: not measured yet).
    """

    def __init__(self, matrix: np.ndarray, exact_max: int = EXACT_MAX, *, index: Any = None,
                 recall: float | None = None):
        import faiss

        self.matrix = np.ascontiguousarray(matrix, dtype=np.float32)  # (N, D)
        self.exact_max = int(exact_max)
        self.recall = recall
        self.searches = 0  # queries answered (shown by /version)
        if index is None:
            n, d = self.matrix.shape
            if n > self.exact_max:
                index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
                index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            else:
                index = faiss.IndexFlatIP(d)
            index.add(self.matrix)
            if n > self.exact_max:
                log.info("index: HNSW over %d x %d", n, d)
        if index.ntotal != len(self.matrix):
            raise ValueError(f"index holds {index.ntotal} vectors for {len(self.matrix)} rows")
        self.index = index  # on the CPU: what is saved and pickled
        self._searcher = _on_gpu(index) if self.kind == "exact" else index

    @property
    def kind(self) -> str:
        return "exact" if self.size <= self.exact_max else "hnsw"

    @property
    def size(self) -> int:
        return len(self.matrix)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(b, k) scores and (b, k) rows, best first; rows are -1 where fewer were found."""
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.matrix.shape[1])
        k = min(k, self.size)
        if k <= 0 or len(q) == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(HNSW_EF_SEARCH, k)
        self.searches += len(q)
        scores, rows = self._searcher.search(q, k)
        return scores, rows.astype(np.int64)

    def top(self, queries: np.ndarray, k: int) -> list[np.ndarray]:
        """Per query (row of ``queries`` (b, D)), up to ``k`` row numbers."""
        _, rows = self.search(queries, k)
        return [r[r >= 0] for r in rows]

    def measure_recall(self, k: int = RECALL_K, queries: int = RECALL_QUERIES,
                       seed: int = 0) -> float:
        """Recall@k against exact search, for a seeded sample of the matrix's own rows as
        queries (1.0 for an exact index); kept as ``recall``. A returned row is right when
        its exact score reaches the k-th best score (ties at the boundary are all right)."""
        if self.kind == "exact" or self.size == 0:
            self.recall = 1.0
            return self.recall
        rng = np.random.default_rng(seed)
        sample = self.matrix[rng.choice(self.size, min(queries, self.size), replace=False)]
        k = min(k, self.size)
        exact = sample @ self.matrix.T  # (Q, N)
        kth = -np.partition(-exact, k - 1, axis=1)[:, k - 1 : k]  # (Q, 1) k-th best score
        searches = self.searches
        _, found = self.search(sample, k)  # (Q, k)
        self.searches = searches  # the check is not traffic
        # A found row counts when it scores at least the k-th best: rows tied at the
        # boundary (e.g. zero ALS factors of never-bought products) are equally right.
        scores = np.take_along_axis(exact, np.maximum(found, 0), axis=1)  # (Q, k)
        hits = int(((found >= 0) & (scores >= kth - 1e-5 * np.abs(kth).clip(min=1.0))).sum())
        self.recall = hits / float(found.size)
        return self.recall

    def info(self) -> dict[str, Any]:
        """What ``/version`` and the DAG report about this index."""
        return {"kind": self.kind, "size": self.size, "dim": int(self.matrix.shape[1]),
                f"recall_at_{RECALL_K}": self.recall, "exact_max": self.exact_max}

    def __getstate__(self) -> dict[str, Any]:
        import faiss

        state = {k: v for k, v in self.__dict__.items() if k != "_searcher"}
        state["index"] = faiss.serialize_index(self.index)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        import faiss

        state["index"] = faiss.deserialize_index(state["index"])
        self.__dict__.update(state)
        self._searcher = _on_gpu(self.index) if self.kind == "exact" else self.index


def _on_gpu(index: Any) -> Any:
    """A GPU copy of an exact index when faiss sees a GPU (the ``gpu`` extra, faiss-gpu),
    else the index itself. HNSW has no GPU implementation in faiss."""
    import faiss

    if getattr(faiss, "get_num_gpus", lambda: 0)() == 0:
        return index
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)


def build_indexes(matrices: Mapping[str, np.ndarray | None],
                  exact_max: int = EXACT_MAX) -> dict[str, VectorIndex]:
    """One ``VectorIndex`` per space whose matrix is present (None: the space is absent,
    e.g. no two-tower model)."""
    return {name: VectorIndex(m, exact_max) for name, m in matrices.items() if m is not None}


def save_indexes(indexes: Mapping[str, VectorIndex], folder: Path) -> dict[str, Any]:
    """Write each index (``<space>.faiss``) and ``indexes.json`` (each one's ``info()`` and
    checksum) into ``folder``; returns the metadata written."""
    import faiss

    folder.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {}
    for name, index in indexes.items():
        path = folder / f"{name}.faiss"
        faiss.write_index(index.index, str(path))
        meta[name] = {**index.info(), "file": path.name, "sha256": sha256_file(path)}
    (folder / INDEX_META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return meta


class IndexLoadError(ValueError):
    """A stored index is missing, corrupt, or does not match the version's vectors."""


def load_indexes(folder: Path, matrices: Mapping[str, np.ndarray | None]
                 ) -> dict[str, VectorIndex]:
    """The indexes ``save_indexes`` wrote, checked against their checksums and against the
    version's ``matrices`` (every present space must have its index, of the same size).

    Raises:
        IndexLoadError: a missing or corrupt file, or a size mismatch (named).
    """
    import faiss

    meta_path = folder / INDEX_META
    if not meta_path.exists():
        raise IndexLoadError(f"no {INDEX_META} in {folder}")
    meta = json.loads(meta_path.read_text())
    wanted = {name: matrix for name, matrix in matrices.items() if matrix is not None}
    for name in wanted:
        info = meta.get(name)
        if info is None:
            raise IndexLoadError(f"{folder}: no index for the {name} space")
        if not (folder / info["file"]).is_file():
            raise IndexLoadError(f"{folder}: {info['file']} is missing or its checksum differs")
    # hashed in a child process: a serving worker loading a swap's indexes keeps its GIL
    digests = sha256_files([folder / meta[name]["file"] for name in wanted])
    out = {}
    for (name, matrix), digest in zip(wanted.items(), digests, strict=True):
        info = meta[name]
        path = folder / info["file"]
        if digest != info["sha256"]:
            raise IndexLoadError(f"{folder}: {info['file']} is missing or its checksum differs")
        index = faiss.read_index(str(path))
        if index.ntotal != len(matrix):
            raise IndexLoadError(f"{folder}: the {name} index holds {index.ntotal} vectors for "
                              f"{len(matrix)} products")
        out[name] = VectorIndex(matrix, info["exact_max"], index=index,
                                recall=info.get(f"recall_at_{RECALL_K}"))
    return out
