"""The retrieval index factory: the kind follows the catalogue size, recall is measured
against exact search (and can fail), indexes pickle and roundtrip through files."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import faiss
import numpy as np
import pytest

from training.index import (
    HNSW_EF_SEARCH,
    INDEX_META,
    IndexLoadError,
    VectorIndex,
    build_indexes,
    load_indexes,
    save_indexes,
)

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
def hnsw(vectors: np.ndarray) -> VectorIndex:
    return VectorIndex(vectors, exact_max=1000)


def test_small_catalogue_gets_exact_search(vectors: np.ndarray, queries: np.ndarray) -> None:
    index = VectorIndex(vectors[:100])
    assert index.kind == "exact" and isinstance(index.index, faiss.IndexFlatIP)
    scores, rows = index.search(queries[:5], 10)  # (5, 10)
    expected = queries[:5] @ vectors[:100].T  # (5, 100)
    np.testing.assert_array_equal(rows, np.argsort(-expected, axis=1, kind="stable")[:, :10])
    np.testing.assert_allclose(scores, np.take_along_axis(expected, rows, axis=1), atol=1e-5)
    assert index.measure_recall() == 1.0
    assert index.info() == {"kind": "exact", "size": 100, "dim": D, "recall_at_50": 1.0,
                            "exact_max": 50_000}


def test_threshold_is_inclusive_of_exact(vectors: np.ndarray) -> None:
    assert VectorIndex(vectors[:1000], exact_max=1000).kind == "exact"
    above = VectorIndex(vectors[:1001], exact_max=1000)
    assert above.kind == "hnsw" and isinstance(above.index, faiss.IndexHNSWFlat)


def test_large_catalogue_gets_hnsw_with_high_recall(hnsw: VectorIndex, vectors: np.ndarray,
                                                    queries: np.ndarray) -> None:
    assert hnsw.kind == "hnsw" and hnsw.index.metric_type == faiss.METRIC_INNER_PRODUCT
    assert hnsw.measure_recall() >= 0.95
    assert 0.95 <= hnsw.info()["recall_at_50"] < 1.0 + 1e-9
    hnsw.search(queries[:1], 10)
    assert hnsw.index.hnsw.efSearch == HNSW_EF_SEARCH
    # Catalogue vectors as queries (what the check samples) find themselves first.
    _, rows = hnsw.search(vectors[:100], 1)
    assert (rows[:, 0] == np.arange(100)).mean() >= 0.95


def test_top_is_the_exact_neighbours_below_the_threshold(vectors: np.ndarray,
                                                         queries: np.ndarray) -> None:
    index = VectorIndex(vectors)
    expected = np.argsort(-(queries[:3] @ vectors.T), axis=1)[:, :50]  # (3, 50)
    for found, want in zip(index.top(queries[:3], 50), expected, strict=True):
        assert set(found.tolist()) == set(want.tolist())
    assert [len(r) for r in index.top(queries[:2], 5000)] == [N, N]  # k capped by size


def test_recall_check_can_fail(vectors: np.ndarray) -> None:
    # A graph built over other vectors (a stale or mixed-up index) answers with the wrong
    # neighbours: the check against exact search over the version's vectors says so.
    other = VectorIndex(_unit(np.random.default_rng(2), N), exact_max=1000)
    stale = VectorIndex(vectors, exact_max=1000, index=other.index)
    assert stale.measure_recall() < 0.2  # chance level is 50 / 2000


def test_rows_tied_at_the_boundary_all_count_as_found() -> None:
    # ALS gives never-bought products zero factors: many rows score exactly 0 for every
    # query, and which of them fill the last places of a top 50 is arbitrary. The check
    # accepts any of them (a set comparison with exact search's pick measured 0.93 on the
    # 80-product test shop).
    x = _unit(np.random.default_rng(4), 80, 16)
    x[50:] = 0.0
    index = VectorIndex(x, exact_max=10)
    assert index.kind == "hnsw" and index.measure_recall() == 1.0


def test_searches_are_counted_and_the_check_is_not(hnsw: VectorIndex,
                                                   queries: np.ndarray) -> None:
    before = hnsw.searches
    hnsw.measure_recall()
    assert hnsw.searches == before
    hnsw.top(queries[:7], 10)
    assert hnsw.searches == before + 7


def test_pickle_keeps_the_neighbours(hnsw: VectorIndex, queries: np.ndarray) -> None:
    copy = pickle.loads(pickle.dumps(hnsw))
    np.testing.assert_array_equal(copy.search(queries, 20)[1], hnsw.search(queries, 20)[1])


def test_save_load_roundtrip_returns_the_same_neighbours(
    vectors: np.ndarray, queries: np.ndarray, tmp_path: Path
) -> None:
    matrices = {"two_tower": vectors, "text": vectors[:300], "als": None}
    indexes = build_indexes(matrices, exact_max=1000)
    assert set(indexes) == {"two_tower", "text"}
    assert (indexes["two_tower"].kind, indexes["text"].kind) == ("hnsw", "exact")
    for index in indexes.values():
        index.measure_recall()
    meta = save_indexes(indexes, tmp_path / "nested")  # parent folders are created
    assert json.loads((tmp_path / "nested" / INDEX_META).read_text()) == meta
    loaded = load_indexes(tmp_path / "nested", matrices)
    for name, index in indexes.items():
        assert loaded[name].info() == index.info()
        np.testing.assert_array_equal(loaded[name].search(queries, 20)[1],
                                      index.search(queries, 20)[1])


def test_load_refuses_a_missing_a_tampered_or_a_wrong_sized_index(
    vectors: np.ndarray, tmp_path: Path
) -> None:
    save_indexes(build_indexes({"text": vectors[:300]}), tmp_path)
    with pytest.raises(IndexLoadError, match="no index for the two_tower space"):
        load_indexes(tmp_path, {"two_tower": vectors, "text": vectors[:300]})
    with pytest.raises(IndexLoadError, match="holds 300 vectors for 299 products"):
        load_indexes(tmp_path, {"text": vectors[:299]})
    path = tmp_path / "text.faiss"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IndexLoadError, match="text.faiss is missing or its checksum differs"):
        load_indexes(tmp_path, {"text": vectors[:300]})
    with pytest.raises(IndexLoadError, match="no indexes.json"):
        load_indexes(tmp_path / "empty", {"text": vectors[:300]})
