"""FAISS indexes: the type follows the catalogue size, recall is measured, files roundtrip."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from serving.index import HNSW_EF_SEARCH, build_index, load_index, measure_recall, save_index

pytestmark = pytest.mark.fast

N, D = 2000, 32


def _unit(rng: np.random.Generator, n: int, d: int = D) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)  # (n, d)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return _unit(np.random.default_rng(0), N)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return _unit(np.random.default_rng(1), 200)


@pytest.fixture(scope="module")
def hnsw(vectors: np.ndarray):
    return build_index(vectors, ann_threshold=1000, use_gpu=False)


def test_small_catalogue_gets_exact_search(vectors: np.ndarray, queries: np.ndarray) -> None:
    index, kind = build_index(vectors[:100], use_gpu=False)
    assert kind == "flat_ip" and isinstance(index, faiss.IndexFlatIP)
    assert index.ntotal == 100 and index.d == D
    scores, rows = index.search(queries[:5], 10)  # (5, 10)
    expected = queries[:5] @ vectors[:100].T  # (5, 100)
    np.testing.assert_array_equal(rows, np.argsort(-expected, axis=1, kind="stable")[:, :10])
    np.testing.assert_allclose(scores, np.take_along_axis(expected, rows, axis=1), atol=1e-5)
    assert measure_recall(index, vectors[:100], queries, k=10) == 1.0


def test_threshold_is_exclusive(vectors: np.ndarray) -> None:
    assert build_index(vectors[:999], ann_threshold=1000, use_gpu=False)[1] == "flat_ip"
    assert build_index(vectors[:1000], ann_threshold=1000, use_gpu=False)[1] == "hnsw_ip"


def test_large_catalogue_gets_hnsw_with_high_recall(hnsw, vectors: np.ndarray,
                                                    queries: np.ndarray) -> None:
    index, kind = hnsw
    assert kind == "hnsw_ip" and isinstance(index, faiss.IndexHNSWFlat)
    assert index.ntotal == N and index.metric_type == faiss.METRIC_INNER_PRODUCT
    assert index.hnsw.efSearch == HNSW_EF_SEARCH
    assert measure_recall(index, vectors, queries, k=50) >= 0.95
    # Catalogue vectors as queries (what the pipeline samples) find themselves first.
    _, rows = index.search(vectors[:100], 1)
    assert (rows[:, 0] == np.arange(100)).mean() >= 0.95


def test_recall_check_can_fail(vectors: np.ndarray, queries: np.ndarray) -> None:
    wrong, _ = build_index(_unit(np.random.default_rng(2), N), use_gpu=False)
    recall = measure_recall(wrong, vectors, queries, k=50)
    assert recall < 0.2  # chance level is 50 / 2000
    # A barely searched HNSW graph is measurably worse than exact.
    weak, _ = build_index(vectors, ann_threshold=1000, use_gpu=False)
    weak.hnsw.efSearch = 1
    assert measure_recall(weak, vectors, queries, k=50) < 0.95


def test_recall_k_is_capped_by_catalogue_size(vectors: np.ndarray, queries: np.ndarray) -> None:
    index, _ = build_index(vectors[:20], use_gpu=False)
    assert measure_recall(index, vectors[:20], queries, k=50) == 1.0


@pytest.mark.parametrize("kind", ["flat_ip", "hnsw_ip"])
def test_save_load_roundtrip_returns_the_same_neighbours(
    kind: str, hnsw, vectors: np.ndarray, queries: np.ndarray, tmp_path: Path
) -> None:
    index = hnsw[0] if kind == "hnsw_ip" else build_index(vectors, use_gpu=False)[0]
    before_scores, before_rows = index.search(queries, 20)
    path = tmp_path / "nested" / "index.faiss"  # parent folders are created
    save_index(index, path)
    loaded = load_index(path)
    assert type(loaded) is type(index) and loaded.ntotal == N
    scores, rows = loaded.search(queries, 20)
    np.testing.assert_array_equal(rows, before_rows)
    np.testing.assert_allclose(scores, before_scores, rtol=0, atol=0)


def test_load_restores_the_search_breadth(vectors: np.ndarray, tmp_path: Path) -> None:
    index, _ = build_index(vectors[:1200], ann_threshold=1000, use_gpu=False)
    index.hnsw.efSearch = 4
    save_index(index, tmp_path / "index.faiss")
    assert load_index(tmp_path / "index.faiss").hnsw.efSearch == HNSW_EF_SEARCH
