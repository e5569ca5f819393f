"""The promotion gate on real evaluations: a retraining with another seed is noise and keeps
the champion; a clearly better method is promoted. The figures come from the protocol the DAG
runs (``evaluate_split`` with bootstrap) and the metrics it logs (``interval_metrics``)."""

from __future__ import annotations

import datetime as dt

import pytest

from features.contract import list_days, read_upto
from features.synth import generate_shop
from shoprec.pipeline import interval_metrics
from training.data import temporal_split
from training.evaluation.baselines import ItemKNN, Popularity, Repeat
from training.evaluation.protocol import evaluate_split
from training.ranking.als import ALS
from training.registry import PromotionPolicy, gate_decision

pytestmark = pytest.mark.integration

CHAMPION = ("1", "2026-02-01")  # (version, interval) of the current champion


def _named(method, name: str):
    method.name = name
    return method


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory):
    root = str(tmp_path_factory.mktemp("noise") / "landing")
    generate_shop(root, days=60, users=3000, products=300, seed=5, start=dt.date(2026, 1, 1))
    events = read_upto(root, "events", list_days(root, "events")[-1])
    products = read_upto(root, "products", list_days(root, "products")[-1])
    return temporal_split(events, products, None, 14)


def _gate(split, challenger, champion, policy: PromotionPolicy) -> tuple[bool, str, dict]:
    result = evaluate_split(split, [_named(champion, "champion"), _named(challenger, "model"),
                                    Popularity(), Repeat()], (10, 50), bootstrap=1000)
    metrics = interval_metrics(result, float(CHAMPION[0]), policy.metric)
    promote, reason = gate_decision(policy, metrics, "2026-03-01", CHAMPION, "2")
    return promote, reason, metrics


def test_the_same_model_with_another_seed_keeps_the_champion(split) -> None:
    # Of the two seeds, the challenger is the one whose point estimate is higher: compared
    # on point estimates alone (margin 0) it would replace the champion.
    scores = {}
    for seed in (1, 2):
        result = evaluate_split(split, [ALS(seed=seed)], (50,))
        scores[seed] = result.value("als", "all", "recall_at_50")
    assert scores[1] != scores[2]  # the seed matters
    high, low = sorted(scores, key=scores.get, reverse=True)
    policy = PromotionPolicy(margin=0.0)
    promote, reason, metrics = _gate(split, ALS(seed=high), ALS(seed=low), policy)
    assert metrics["recall_at_50"] > metrics["champion_recall_at_50"]
    assert metrics["gate_vs_champion_low"] <= 0 < metrics["gate_vs_champion_high"]
    assert promote is False and "within noise" in reason, reason
    # point estimates alone would have promoted it: the interval is what keeps it
    assert gate_decision(PromotionPolicy(margin=0.0, confidence=0), metrics, "2026-03-01",
                         CHAMPION, "2")[0] is True


def test_a_clearly_better_model_is_promoted(split) -> None:
    promote, reason, metrics = _gate(split, ItemKNN(), ALS(seed=1), PromotionPolicy())
    assert metrics["gate_vs_champion_low"] > 0 and metrics["gate_vs_baseline_low"] > 0
    assert promote is True and "95% CI" in reason, reason
    assert metrics["holdout_users"] == metrics["holdout_users_total"] > 1000
