"""Baselines on constructed cases: each ranks what its rule says it should."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import pytest

from training.config import TrainConfig
from training.data import TrainData, popularity_scores, temporal_split
from training.evaluation.baselines import ItemKNN, Popularity, Repeat, TextCosine, cosine_similarity
from training.ranking.als import ALS

pytestmark = pytest.mark.fast

T0 = pd.Timestamp("2026-01-01", tz="UTC")
CUT_DAY = 100


def train_data(rows: Sequence[tuple], products: Sequence[str],
               titles: Mapping[str, str] | None = None) -> TrainData:
    """TrainData with the cut at day 100 from (user, product, day[, quantity, type]) rows."""
    events = []
    for i, row in enumerate(rows):
        user, product, d = row[:3]
        events.append({"event_id": f"e{i:05d}", "user_id": user, "product_id": product,
                       "event_type": row[4] if len(row) > 4 else "purchase", "query": None,
                       "quantity": row[3] if len(row) > 3 else 1, "price": 1.0,
                       "ts": T0 + pd.Timedelta(days=d)})
    # one event at the end so that the default cut (last event - 30 days) is day 100
    events.append({"event_id": "zz", "user_id": "late", "product_id": products[0],
                   "event_type": "view", "query": None, "quantity": 1, "price": 1.0,
                   "ts": T0 + pd.Timedelta(days=CUT_DAY + 30)})
    catalog = pd.DataFrame([{
        "product_id": p, "title": (titles or {}).get(p, f"product {p}"), "description": None,
        "category": "c", "brand": None, "price": 1.0, "image_url": None, "updated_at": T0,
    } for p in products])
    split = temporal_split(pd.DataFrame(events), catalog)
    assert split.cut == T0 + pd.Timedelta(days=CUT_DAY)
    return split.train


def test_popularity_counts_only_the_window_before_the_cut() -> None:
    data = train_data([
        ("u1", "old", 10), ("u2", "old", 11), ("u3", "old", 12),  # long before the window
        ("u1", "hot", 80), ("u2", "hot", 90),
        ("u3", "warm", 95),
    ], ["hot", "old", "warm"])
    assert popularity_scores(data, 30).tolist() == [2.0, 0.0, 1.0]
    assert popularity_scores(data, None).tolist() == [2.0, 3.0, 1.0]
    rec = Popularity(days=30).fit(data)
    assert rec.recommend(["u1", "nobody"], 3) == [["hot", "warm", "old"]] * 2
    assert Popularity(days=None).fit(data).recommend(["u1"], 1) == [["old"]]


def test_popularity_by_quantity() -> None:
    data = train_data([("u1", "a", 90, 1), ("u2", "a", 91, 1), ("u3", "b", 92, 10)], ["a", "b"])
    assert Popularity().fit(data).recommend(["u1"], 1) == [["a"]]
    assert Popularity(weight="quantity").fit(data).recommend(["u1"], 1) == [["b"]]


def test_repeat_ranks_the_users_most_bought_first_then_popularity() -> None:
    data = train_data([
        ("u1", "x", 10), ("u1", "x", 20), ("u1", "x", 30),  # x three times
        ("u1", "y", 40, 50),  # y once, in bulk
        ("u2", "p", 90), ("u3", "p", 91), ("u4", "p", 92), ("u2", "q", 93),
    ], ["p", "q", "x", "y", "z"])
    rec = Repeat().fit(data)
    assert rec.recommend(["u1"], 4) == [["x", "y", "p", "q"]]
    assert Repeat(weight="quantity").fit(data).recommend(["u1"], 2) == [["y", "x"]]
    assert rec.recommend(["stranger"], 2) == [["p", "q"]]
    # in setting (b) own products are excluded: what is left is popularity
    assert rec.recommend(["u1"], 2, exclude={"u1": {"x", "y"}}) == [["p", "q"]]


def test_repeat_with_decay_prefers_recent_purchases() -> None:
    data = train_data([("u1", "x", 1), ("u1", "x", 2), ("u1", "y", 99)], ["x", "y"])
    assert Repeat().fit(data).recommend(["u1"], 2) == [["x", "y"]]
    assert Repeat(half_life_days=7).fit(data).recommend(["u1"], 2) == [["y", "x"]]


def test_cosine_similarity_of_a_large_catalogue_never_builds_n_by_n() -> None:
    import tracemalloc

    from scipy import sparse

    n = 30_000  # dense N x N float32 would be 3.6 GB
    matrix = sparse.random(3_000, n, density=2e-4, random_state=0, format="csr",
                           dtype=np.float32)
    matrix.data[:] = 1.0
    tracemalloc.start()
    try:
        sim = cosine_similarity(matrix, neighbours=20, self_similarity=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sim.shape == (n, n) and sim.getnnz(axis=1).max() <= 20
    assert peak < 400 * 2**20  # blocks are sparse and bounded; N x N would be 3.6 GB
    small = matrix[:, :500]  # and the blocks give what one dense product gives
    dense = (small.T @ small).toarray()
    norms = np.sqrt(np.diag(dense))
    outer = np.outer(norms, norms)
    expected = np.divide(dense, outer, out=np.zeros_like(dense), where=outer > 0)
    np.testing.assert_allclose(cosine_similarity(small, max_entries=2_000).toarray(), expected,
                               rtol=1e-5, atol=1e-6)


def test_cosine_similarity_by_hand() -> None:
    from scipy import sparse

    matrix = sparse.csr_matrix(np.array([[1, 1, 0], [1, 0, 0], [0, 1, 1]], dtype=np.float32))
    sim = cosine_similarity(matrix).toarray()
    assert sim[0, 1] == pytest.approx(1 / 2)  # columns (1,1,0) and (1,0,1)
    assert sim[0, 2] == pytest.approx(0.0)
    assert sim[1, 2] == pytest.approx(1 / np.sqrt(2))
    assert np.diag(sim) == pytest.approx([1, 1, 1])
    assert np.diag(cosine_similarity(matrix, self_similarity=False).toarray()).sum() == 0
    top1 = cosine_similarity(matrix, neighbours=1, self_similarity=False).toarray()
    assert (top1 > 0).sum(axis=1).tolist() == [1, 1, 1]


def co_bought() -> TrainData:
    """Two groups of products bought together; a popular product nobody co-buys."""
    rows = []
    for i in range(6):
        rows += [(f"g{i}", "a", 10 + i), (f"g{i}", "b", 10 + i)]
        rows += [(f"h{i}", "c", 10 + i), (f"h{i}", "d", 10 + i)]
    rows += [(f"p{i}", "pop", 95) for i in range(20)]
    rows += [("me", "a", 50)]
    return train_data(rows, ["a", "b", "c", "d", "pop"])


def test_item_knn_recommends_co_bought_products() -> None:
    data = co_bought()
    rec = ItemKNN().fit(data)
    got = rec.recommend(["me"], 2, exclude={"me": {"a"}})[0]
    assert got[0] == "b"  # bought with a by the same people
    assert rec.recommend(["stranger"], 1) == [["pop"]]


def test_item_knn_self_similarity_scores_repeat_purchases() -> None:
    data = co_bought()
    assert ItemKNN(self_similarity=True).fit(data).recommend(["me"], 1) == [["a"]]
    assert ItemKNN(self_similarity=False).fit(data).recommend(["me"], 1) == [["b"]]


def test_als_is_seeded_and_reproducible() -> None:
    data = co_bought()
    one = ALS(factors=4, iterations=5, seed=3).fit(data)
    two = ALS(factors=4, iterations=5, seed=3).fit(data)
    other = ALS(factors=4, iterations=5, seed=4).fit(data)
    np.testing.assert_array_equal(one.item_factors, two.item_factors)
    np.testing.assert_array_equal(one.scores(["me"]), two.scores(["me"]))
    assert not np.array_equal(one.item_factors, other.item_factors)


@pytest.mark.parametrize("weighting", ["bm25", "log1p", "none"])
def test_als_recommends_within_the_users_group(weighting: str) -> None:
    data = co_bought()
    rec = ALS(factors=4, iterations=15, weighting=weighting, regularization=0.01).fit(data)
    scores = rec.scores(["g0", "h0"])
    col = data.item_index
    assert scores[0, col["b"]] > scores[0, col["c"]] and scores[0, col["b"]] > scores[0, col["d"]]
    assert scores[1, col["d"]] > scores[1, col["a"]] and scores[1, col["d"]] > scores[1, col["b"]]
    assert rec.recommend(["stranger"], 1) == [["pop"]]


def test_als_rejects_an_unknown_weighting() -> None:
    with pytest.raises(ValueError, match="weighting"):
        ALS(weighting="tfidf").fit(co_bought())


def test_text_cosine_ranks_the_same_text_first(tmp_path) -> None:
    titles = {"a": "red candle", "twin": "red candle", "b": "garden gnome", "c": "tea cup"}
    data = train_data([("me", "a", 50), ("u2", "b", 95), ("u3", "c", 96)],
                      ["a", "b", "c", "twin"], titles)
    rec = TextCosine(TrainConfig(text_encoder="tiny"), tmp_path).fit(data)
    assert rec.recommend(["me"], 1, exclude={"me": {"a"}}) == [["twin"]]
    scores = rec.scores(["me"])[0]
    assert scores[data.item_index["twin"]] == pytest.approx(1.0, abs=1e-5)
    assert rec.recommend(["stranger"], 2) == [["b", "c"]]  # popularity, then product id


def test_item_knn_keeps_every_neighbour_of_a_small_catalogue_and_caps_a_large_one() -> None:
    from training.evaluation.baselines import ITEM_KNN_MAX_ENTRIES, auto_neighbours

    assert auto_neighbours(3_600) is None  # Online Retail's catalogue: all of them
    assert auto_neighbours(100_000) == ITEM_KNN_MAX_ENTRIES // 100_000 == 500
    assert auto_neighbours(10_000_000) == 200  # never fewer
    assert auto_neighbours(100_000) * 100_000 <= ITEM_KNN_MAX_ENTRIES


@pytest.mark.parametrize("max_entries", [1, 50, 10**9])
def test_sparse_cosine_blocks_keep_the_dense_top_k(max_entries: int) -> None:
    """Whatever the block size, each row keeps the k largest positive cosines of the dense
    reference (ties to the lower column), itself excluded."""
    from scipy import sparse

    rng = np.random.default_rng(4)
    matrix = sparse.csr_matrix((rng.random((40, 25)) < 0.15).astype(np.float32))
    dense = (matrix.T @ matrix).toarray()
    norms = np.sqrt(np.diag(dense))
    outer = np.outer(norms, norms)
    reference = np.divide(dense, outer, out=np.zeros_like(dense), where=outer > 0)
    np.fill_diagonal(reference, 0.0)
    k = 3
    got = cosine_similarity(matrix, neighbours=k, self_similarity=False,
                            max_entries=max_entries).toarray()
    for row in range(25):
        values = np.round(reference[row], 5)
        order = sorted((c for c in range(25) if values[c] > 0), key=lambda c: (-values[c], c))
        assert np.flatnonzero(got[row]).tolist() == sorted(order[:k]), row
        np.testing.assert_allclose(got[row, order[:k]], reference[row, order[:k]], rtol=1e-5)
