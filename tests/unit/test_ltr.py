"""The learning-to-rank stage: lambdarank trees, and the stage chosen on held-out users."""

from __future__ import annotations

import numpy as np
import pytest

from training.ranking.ltr import STAGES, TreeRanker, choose_stage, stage_scores, standardised

pytestmark = pytest.mark.fast


def band_shop(users: int = 200, candidates: int = 30, seed: int = 0):
    """Each user bought the candidates whose feature 0 lies in a band (0.4, 0.6): a rule no
    monotone score finds, and trees do; feature 1 is noise. The last 5 columns are padding."""
    rng = np.random.default_rng(seed)
    features = rng.random((users, candidates, 2)).astype(np.float32)
    padding = np.zeros((users, candidates), dtype=bool)
    padding[:, -5:] = True
    truth = (np.abs(features[..., 0] - 0.5) < 0.1) & ~padding
    sizes = np.maximum(truth.sum(axis=1), 1)
    truth[truth.sum(axis=1) == 0, 0] = True  # every user bought something
    padding[:, 0] = False
    return features, padding, truth, sizes


def recall_at(scores: np.ndarray, truth: np.ndarray, padding: np.ndarray, k: int) -> float:
    scores = np.where(padding, -np.inf, scores)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((np.take_along_axis(truth, top, axis=1).sum(axis=1) / truth.sum(axis=1)).mean())


def test_trees_learn_a_band_and_survive_a_round_trip() -> None:
    features, padding, truth, _ = band_shop()
    trees = TreeRanker.train(features, padding, truth, rounds=50)
    scores = trees(features)
    assert scores.shape == truth.shape
    oracle = recall_at(-np.abs(features[..., 0] - 0.5), truth, padding, 5)
    assert recall_at(scores, truth, padding, 5) > 0.97 * oracle
    assert recall_at(features[..., 0], truth, padding, 5) < 0.6 * oracle  # the raw feature
    again = TreeRanker.from_string(trees.to_string())
    np.testing.assert_array_equal(again(features), scores)
    assert trees(features[:0]).shape == (0, truth.shape[1])


def test_standardised_ignores_padding() -> None:
    scores = np.array([[1.0, 3.0, 100.0], [2.0, 2.0, 2.0]])
    padding = np.array([[False, False, True], [False, False, False]])
    z = standardised(scores, padding)
    np.testing.assert_allclose(z[0], [-1.0, 1.0, 0.0])
    np.testing.assert_allclose(z[1], 0.0)  # no spread: all zero, never nan


def test_the_stage_that_wins_on_held_out_users_is_chosen() -> None:
    features, padding, truth, sizes = band_shop()

    def useless(f, p, t):  # a pair scorer that learnt nothing
        return lambda x: np.zeros(x.shape[:-1])

    def perfect(f, p, t):  # one that knows the rule
        return lambda x: -np.abs(x[..., 0] - 0.5)

    stage, table = choose_stage(features, padding, truth, sizes, useless)
    # a constant pair scorer adds nothing to the blend: trees and blend tie, trees win
    assert stage == "trees" and set(table) == set(STAGES)
    assert table["trees"]["ndcg_at_10"] > table["mlp"]["ndcg_at_10"] + 0.3
    assert table["mlp"]["n_users"] == 50  # a quarter of 200, held out
    stage, table = choose_stage(features, padding, truth, sizes, perfect)
    assert stage == "mlp"  # nothing beats it; a tie would keep it too


def test_too_few_users_keep_the_pair_scorer() -> None:
    features, padding, truth, sizes = band_shop(users=40)
    stage, table = choose_stage(features, padding, truth, sizes,
                                lambda f, p, t: pytest.fail("nothing should be trained"))
    assert stage == "mlp" and set(table) == {"mlp"}


def test_stage_scores_refuse_an_unknown_stage() -> None:
    features, padding, _, _ = band_shop(users=4)
    trees = lambda x: x[..., 0]  # noqa: E731
    mlp = lambda x: x[..., 1]  # noqa: E731
    got = stage_scores("trees", features, padding, mlp, trees)
    np.testing.assert_array_equal(got[~padding], features[..., 0][~padding])
    assert (got[padding] < -1e5).all()
    np.testing.assert_array_equal(stage_scores("blend", features, padding, mlp, None),
                                  features[..., 1])  # no trees: the pair scorer
    with pytest.raises(ValueError, match="stage 'forest'"):
        stage_scores("forest", features, padding, mlp, trees)


def test_the_trees_rerank_only_the_pair_scorers_top() -> None:
    from training.ranking import ltr

    features = np.random.default_rng(1).random((3, 400, 2)).astype(np.float32)
    padding = np.zeros((3, 400), dtype=bool)
    padding[:, :10] = True
    mlp = lambda x: x[..., 1]  # noqa: E731
    seen = []

    def trees(x):
        seen.append(len(x))
        return -x[..., 0]

    got = stage_scores("trees", features, padding, mlp, trees)
    assert seen == [3 * ltr.TREE_TOP]  # one call, the top of each row only
    top = ltr.cascade_top(features[..., 1].astype(np.float64), padding)
    assert top.sum(axis=1).tolist() == [ltr.TREE_TOP] * 3 and not (top & padding).any()
    for row in range(3):
        order = np.argsort(-got[row], kind="stable")
        inside = order[: ltr.TREE_TOP]
        assert set(inside) == set(np.flatnonzero(top[row]))  # the top stays on top...
        np.testing.assert_array_equal(got[row, inside], -features[row, inside, 0])  # ...re-ranked
        rest = order[ltr.TREE_TOP:]  # and the rest keeps the pair scorer's order
        rest = rest[~padding[row, rest]]
        assert (np.diff(features[row, rest, 1]) <= 0).all()
