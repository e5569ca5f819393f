"""Retrieval metrics on hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from training import metrics as evaluate_module
from training.metrics import coverage_at_k, evaluate_model, hit_rate_at_k, ndcg_at_k, recall_at_k

pytestmark = pytest.mark.fast


def _dcg(ranks: list[int]) -> float:
    return sum(1 / math.log2(r + 1) for r in ranks)  # ranks from 1


@pytest.mark.parametrize(
    ("ranked", "truth", "k", "recall", "hit", "ndcg"),
    [
        # one hit at rank 1 out of two relevant
        (["a", "b", "c"], {"a", "z"}, 2, 0.5, 1.0, 1.0 / _dcg([1, 2])),
        # hit at rank 2
        (["a", "b", "c"], {"b"}, 2, 1.0, 1.0, _dcg([2])),
        # hit beyond K does not count
        (["a", "b", "c"], {"c"}, 2, 0.0, 0.0, 0.0),
        # all relevant found, ideal is min(K, |truth|) = 2
        (["a", "b", "c"], {"a", "c"}, 3, 1.0, 1.0, _dcg([1, 3]) / _dcg([1, 2])),
        # more relevant than K: recall is capped by K, NDCG is not
        (["a", "b"], {"a", "b", "c", "d"}, 2, 0.5, 1.0, 1.0),
    ],
)
def test_metrics_single_user(ranked, truth, k, recall, hit, ndcg) -> None:
    assert recall_at_k([ranked], [truth], [k])[f"recall_at_{k}"] == pytest.approx(recall)
    assert hit_rate_at_k([ranked], [truth], [k])[f"hit_rate_at_{k}"] == pytest.approx(hit)
    assert ndcg_at_k([ranked], [truth], [k])[f"ndcg_at_{k}"] == pytest.approx(ndcg)


def test_metrics_average_over_users_with_truth() -> None:
    ranked = [["a", "b"], ["c", "d"], ["e", "f"]]
    truth = [{"a"}, {"x", "d"}, set()]  # the third user has no truth: skipped
    assert recall_at_k(ranked, truth, [2]) == {"recall_at_2": pytest.approx((1 + 0.5) / 2)}
    assert hit_rate_at_k(ranked, truth, [1]) == {"hit_rate_at_1": pytest.approx(0.5)}


def test_repeated_hits_count_once() -> None:
    assert ndcg_at_k([["a", "a"]], [{"a"}], [2])["ndcg_at_2"] == pytest.approx(1.0)


def test_coverage() -> None:
    ranked = [["a", "b", "c"], ["a", "d", "e"]]
    assert coverage_at_k(ranked, 10, [1, 3]) == {"coverage_at_1": 0.1, "coverage_at_3": 0.5}


def test_length_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError):
        recall_at_k([["a"]], [{"a"}, {"b"}], [1])


def test_evaluate_model_ranks_by_dot_product(monkeypatch: pytest.MonkeyPatch) -> None:
    items = np.array([[1, 0], [0.9, 0.1], [0, 1], [-1, 0]], dtype=np.float32)
    product_ids = ["p0", "p1", "p2", "p3"]
    users = {"u1": np.array([1.0, 0.0]), "u2": np.array([0.0, 1.0])}

    def fake_encode_users(model, histories, event_types, item_index, item_embeddings, *,
                          user_features=None):
        # evaluate_model visits users sorted by id; map back through the history marker
        return np.stack([users[h[0]] for h in histories]).astype(np.float32)

    monkeypatch.setattr(evaluate_module, "encode_users", fake_encode_users)
    histories = {"u1": ["u1", "p0"], "u2": ["u2"]}
    truth = {"u1": {"p1"}, "u2": {"p3"}}
    out = evaluate_model(None, None, items, product_ids, histories, None, truth, ks=(1, 2))
    # u1 ranks p0, p1, p2, p3 -> p1 at 2; u2 ranks p2, p1, p0, p3 -> p3 at 4
    assert out["recall_at_1"] == 0.0
    assert out["recall_at_2"] == pytest.approx(0.5)
    assert out["ndcg_at_2"] == pytest.approx(0.5 * _dcg([2]))

    # Excluding the history drops p0 for u1, lifting p1 to the top.
    out = evaluate_model(None, None, items, product_ids, histories, None, truth, ks=(1,),
                         exclude_history=True)
    assert out["recall_at_1"] == pytest.approx(0.5)

    # Restricting candidates to a catalogue: without p0, p1, p2, u2's p3 is first.
    catalog = pd.DataFrame({"product_id": ["p3"]})
    out = evaluate_model(None, catalog, items, product_ids, histories, None, truth, ks=(1,))
    assert out["recall_at_1"] == pytest.approx(0.5)
    assert out["coverage_at_1"] == pytest.approx(1.0)
