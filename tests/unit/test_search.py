"""serving.search.SearchIndex: BM25 read from its posting lists agrees with the matrix."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from serving.search import SearchIndex, _members, tokens

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
