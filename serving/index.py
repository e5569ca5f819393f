"""FAISS indexes over the catalogue's item embeddings.

``build_index`` picks the index type from the catalogue size (exact inner product for small
catalogues, HNSW above ``ann_threshold``), puts it on a GPU when faiss sees one, and
``measure_recall`` checks an ANN index against exact search before it may serve.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_ANN_THRESHOLD = 50_000
HNSW_M = 32
HNSW_EF_SEARCH = 128


@dataclass(frozen=True)
class IndexInfo:
    kind: str  # "flat_ip" or "hnsw_ip"
    size: int
    dim: int
    device: str  # "cpu" or "gpu"
    recall_at_k: float
    k: int


def _gpu_count() -> int:
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0


def build_index(embeddings: np.ndarray, *, ann_threshold: int = DEFAULT_ANN_THRESHOLD,
                use_gpu: bool | None = None):
    """Build an inner-product index over L2-normalised item embeddings.

    Args:
        embeddings: (N, D) float32, one row per product, in the bundle's product order.
        ann_threshold: catalogues smaller than this get exact search.
        use_gpu: None = when faiss sees a GPU.

    Returns:
        (faiss index on the CPU, its kind). A GPU copy is made by ``to_device`` at load.
    """
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)  # (N, D)
    n, d = x.shape
    if n < ann_threshold:
        index, kind = faiss.IndexFlatIP(d), "flat_ip"
    else:
        index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = HNSW_EF_SEARCH
        kind = "hnsw_ip"
    if kind == "flat_ip" and (use_gpu if use_gpu is not None else _gpu_count() > 0):
        # Exact search is embarrassingly parallel: a GPU copy answers much faster.
        res = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(res, 0, index)
        gpu_index.add(x)
        return faiss.index_gpu_to_cpu(gpu_index), kind
    index.add(x)
    return index, kind


def to_device(index):
    """A GPU copy of the index when faiss sees a GPU and the index type supports it."""
    if _gpu_count() == 0:
        return index
    import faiss

    try:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    except RuntimeError:  # e.g. HNSW has no GPU implementation
        return index


def measure_recall(index, embeddings: np.ndarray, queries: np.ndarray, k: int = 50) -> float:
    """Recall@k of ``index`` against exact inner-product search for the same queries."""
    import faiss

    k = min(k, embeddings.shape[0])
    exact = faiss.IndexFlatIP(embeddings.shape[1])
    exact.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    q = np.ascontiguousarray(queries, dtype=np.float32)  # (Q, D)
    _, truth = exact.search(q, k)
    _, found = index.search(q, k)
    hits = sum(len(set(t) & set(f)) for t, f in zip(truth, found, strict=True))
    return hits / float(truth.size)


def save_index(index, path: Path) -> None:
    import faiss

    path.parent.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(path))


def load_index(path: Path):
    import faiss

    index = faiss.read_index(str(path))
    if isinstance(index, faiss.IndexHNSWFlat):
        index.hnsw.efSearch = HNSW_EF_SEARCH
    return index
