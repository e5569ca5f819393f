"""serving.search.SearchIndex: BM25 read from its posting lists agrees with the matrix; the
index saved at publish time loads as arrays and answers the same."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from serving.search import SearchIndex, SortedKeys, _members, tokens

pytestmark = pytest.mark.fast


def _products(n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    words = ["red", "heart", "mug", "candle", "tin", "lantern", "gift", "blue", "set", "bag"]
    return pd.DataFrame({
        "product_id": [f"P{i:03d}" for i in range(n)],
        "title": [" ".join(rng.choice(words, size=rng.integers(1, 6))) for _ in range(n)],
        "category": [["home", "kitchen", None][i % 3] for i in range(n)],
        "brand": [None if i % 4 else "acme" for i in range(n)],
    })


def test_lexical_scores_and_matched_words_are_the_matrix_ones() -> None:
    products = _products()
    index = SearchIndex(products, None)
    dense = index.bm25.toarray()  # (N, V)
    for query in ["red heart", "mug mug tin", "acme lantern gift", "P007", "nothing known"]:
        known = [t for t in dict.fromkeys(tokens(query)) if t in index.vocabulary]
        scores, got_known = index.lexical(tokens(query))
        assert got_known == known
        want = dense[:, [index.vocabulary[t] for t in known]].sum(axis=1)
        np.testing.assert_allclose(scores, want, rtol=1e-6)
        for hit in index.search(query, 8):
            assert hit.matched == [t for t in known if dense[hit.row, index.vocabulary[t]] > 0]
    first = index.search("p007", 3)[0]
    assert first.row == 7 and first.matched == ["p007"]  # the product id itself comes first


def test_members_is_isin_on_sorted_rows() -> None:
    rng = np.random.default_rng(0)
    rows = np.unique(rng.integers(0, 500, 120))
    items = rng.integers(0, 520, 40)
    np.testing.assert_array_equal(_members(items, rows), np.isin(items, rows))
    assert not _members(items, rows[:0]).any()


def test_a_saved_index_loads_as_arrays_and_answers_the_same(tmp_path) -> None:
    products = _products()
    vectors = np.random.default_rng(1).normal(size=(len(products), 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    built = SearchIndex(products, vectors)
    path = built.save(tmp_path)
    with np.load(path, allow_pickle=False) as saved:  # nothing in it needs pickle
        assert {saved[k].dtype.kind for k in saved.files} <= {"U", "i", "f"}
    loaded = SearchIndex.load(path, vectors)
    assert loaded.rows == built.rows == len(products)
    query_vector = vectors[5]
    for query in ["red heart", "acme lantern gift", "P007", "p007", "nothing known", ""]:
        want = built.search(query, 8, query_vector=query_vector)
        got = loaded.search(query, 8, query_vector=query_vector)
        assert [(h.row, h.matched) for h in got] == [(h.row, h.matched) for h in want]
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want])


def test_sorted_keys_is_a_read_only_dict() -> None:
    keys = ["mug", "85123a", "heart", "mug", "zebra"]
    mapping = SortedKeys.of(keys)
    want = {k: i for i, k in enumerate(keys)}  # a repeated key keeps its last position
    assert len(mapping) == len(want)
    for key, value in want.items():
        assert key in mapping and mapping[key] == value and mapping.get(key) == value
    for missing in ["", "aaa", "mu", "mugs", "zzz"]:
        assert missing not in mapping and mapping.get(missing) is None
        with pytest.raises(KeyError):
            mapping[missing]
    assert 3 not in mapping
    assert SortedKeys.of([]).get("x") is None


def test_the_bundle_loads_the_stored_lexical_index_and_builds_it_when_it_cannot(
        tmp_path, monkeypatch, caplog) -> None:
    import serving.search as search

    products = _products()
    search.save_lexical(products, tmp_path)
    built = []
    real = search._lexical
    monkeypatch.setattr(search, "_lexical", lambda *a: built.append(1) or real(*a))
    loaded = search.load_search_index(tmp_path, products, None)
    assert not built and loaded.search("red heart", 5)  # read from the file
    assert len(search.load_search_index(tmp_path, products.iloc[:-1], None).ids) == \
        len(products) - 1 and built == [1]  # not these products: built
    (tmp_path / search.LEXICAL_FILE).write_bytes(b"damaged")
    with caplog.at_level("WARNING", logger="serving.search"):
        again = search.load_search_index(tmp_path, products, None)
    assert built == [1, 1] and "checksum" in caplog.text
    assert [h.row for h in again.search("red heart", 5)] == \
        [h.row for h in loaded.search("red heart", 5)]
    assert search.load_search_index(tmp_path / "absent", products, None).rows == len(products)
