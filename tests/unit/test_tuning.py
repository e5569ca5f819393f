"""Tuned baselines: parameters chosen per setting on the validation window, never the test."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse
from unit.test_baselines import train_data

from training.config import TrainConfig
from training.evaluation.baselines import ItemKNN, Popularity, cosine_similarity
from training.evaluation.tuning import GRIDS, Tuned, tuned_baselines, tuning_tags

pytestmark = pytest.mark.fast


def test_shrinkage_damps_cosine_by_the_norms() -> None:
    # columns (1,1,0), (1,0,1), (0,0,1): dot(c0, c1) = 1, |c0| |c1| = 2
    matrix = sparse.csr_matrix(np.array([[1, 1, 0], [1, 0, 0], [0, 1, 1]], dtype=np.float32))
    plain = cosine_similarity(matrix).toarray()
    shrunk = cosine_similarity(matrix, shrink=2.0).toarray()
    assert plain[0, 1] == pytest.approx(0.5)
    assert shrunk[0, 1] == pytest.approx(1 / (2 + 2))
    assert shrunk[1, 2] == pytest.approx(1 / (np.sqrt(2) + 2))
    # one block per row gives the same shrunk values
    np.testing.assert_allclose(cosine_similarity(matrix, shrink=2.0, max_entries=1).toarray(),
                               shrunk, rtol=1e-6)


def repeat_and_new_buyers():
    """Co-bought pairs (a, b) and (c, d); in the validation window (days 70-100) two users buy
    again what they bought before and one buys the partner of what they bought; after the
    test cut (day 100) everybody buys the partner instead, which the tuning must not see."""
    rows = []
    for i in range(6):
        rows += [(f"g{i}", "a", 10 + i), (f"g{i}", "b", 10 + i)]
        rows += [(f"h{i}", "c", 10 + i), (f"h{i}", "d", 10 + i)]
    rows += [("me", "a", 50), ("me", "a", 80), ("me2", "b", 52), ("me2", "b", 82),
             ("you", "c", 55), ("you", "d", 85)]
    rows += [("me", "b", 110), ("me2", "a", 112), ("you", "c", 115)]  # the test window
    return train_data(rows, ["a", "b", "c", "d"])


def test_each_setting_gets_the_parameters_that_win_its_validation() -> None:
    data = repeat_and_new_buyers()
    tuned = Tuned(ItemKNN, {"self_similarity": (False, True)}, name="item_knn", k=1,
                  max_users=0).fit(data)
    # (a) repeats count: scoring a product by itself finds 2 of 3 (and sends "you" back to
    # c); (b) has only "you", whose c is excluded either way: a tie keeps the default
    assert tuned.chosen == {"all": {"self_similarity": True}, "new": {"self_similarity": False}}
    assert tuned.models["all"].self_similarity and not tuned.models["new"].self_similarity
    assert tuned.recommend(["me"], 1) == [["a"]]
    assert tuned.recommend(["me"], 1, exclude={"me": {"a"}}) == [["b"]]
    # each point fitted once and measured in both settings; the defaults come first
    trials = tuned.params()["trials"]
    assert [t["params"] for t in trials] == [{"self_similarity": False},
                                             {"self_similarity": True}]
    assert trials[0]["all"] == pytest.approx(1 / 3) and trials[1]["all"] == pytest.approx(2 / 3)
    assert trials[0]["new"] == trials[1]["new"] == 1.0
    assert tuned.params()["chosen"] == tuned.chosen
    # what the evaluation tags the MLflow run with (other methods' params left out)
    assert tuning_tags({"item_knn": tuned.params(), "served": {"stage": "mlp"}}) == {
        "tuned.item_knn.all": "self_similarity=True",
        "tuned.item_knn.new": "self_similarity=False"}
    # refitted on all the training data, not the validation part
    assert tuned.models["all"].data is data


def test_ties_keep_the_defaults_and_no_user_keeps_them_too() -> None:
    data = repeat_and_new_buyers()
    tuned = Tuned(Popularity, {"days": (30, 7, None)}, name="popularity", k=4,
                  max_users=0).fit(data)
    assert tuned.chosen["all"] == {"days": 30}  # recall@4 of 4 products: 1.0 everywhere
    assert len(tuned.params()["trials"]) == 3


def test_the_tuned_baselines_fit_and_answer(tmp_path) -> None:
    data = repeat_and_new_buyers()
    methods = tuned_baselines(TrainConfig(text_encoder="tiny"), tmp_path, max_users=0)
    assert [m.name for m in methods] == list(GRIDS)
    for method in methods:
        method.fit(data)
        assert set(method.chosen) == {"all", "new"}
        assert len(method.recommend(["me", "stranger"], 2)) == 2
        assert all(set(t["params"]) == set(GRIDS[method.name]) for t in method.trials)


def test_the_standard_methods_are_tuned_and_the_blends_opt_in() -> None:
    from training.evaluation.blends import standard_recommenders

    config = TrainConfig(text_encoder="tiny")
    methods = standard_recommenders(config, two_tower=False)
    assert [m.name for m in methods] == [*GRIDS, "served"]
    assert all(isinstance(m, Tuned) for m in methods[:-1])
    with_blends = standard_recommenders(config, two_tower=False, blends=True)
    assert [m.name for m in with_blends][-3:] == ["blend_weights", "blend", "served"]
    # the blends combine untuned sources of their own, not the tuned baselines
    assert not any(isinstance(s, Tuned) for s in with_blends[-2].sources)
    assert [m.name for m in standard_recommenders(config, two_tower=False, tuned=False)][:5] \
        == list(GRIDS)
