"""Re-evaluating a version against another champion recomputes; a rerun against the same
champion does not. On a private copy of the session's trained shop (versions trained on
days 6, 7 and 8)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_reevaluation_against_a_newer_champion_recomputes(shop_copy) -> None:
    from shoprec.pipeline import evaluate_interval
    from training.registry import (
        TAG_INTERVAL,
        PromotionPolicy,
        mlflow_client,
        promote_if_better,
        set_champion,
    )

    settings, built = shop_copy
    policy = PromotionPolicy(mode="manual", beat_baseline=False)  # the champion rule alone
    client = mlflow_client(settings)
    first, middle, last = built.versions
    mv = client.get_model_version(settings.model_name, last)
    day = client.get_run(mv.run_id).data.tags[TAG_INTERVAL]

    def history() -> list[float]:
        return [m.value for m in client.get_metric_history(mv.run_id, "champion_version")]

    set_champion(settings, first, reason="re-evaluation test")
    evaluate_interval(settings, mv.run_id, day)  # against v1 (now, or already when built)
    before = history()
    assert before[-1] == float(first)
    again = evaluate_interval(settings, mv.run_id, day)["metrics"]
    assert again["champion_version"] == float(first)
    assert history() == before  # the same champion: the stored figures, nothing logged

    # A newer champion than the one it was measured against (trained before it, on day 7).
    set_champion(settings, middle, reason="another champion")
    assert "rerun evaluate to compare" in promote_if_better(settings, last, policy)["reason"]
    result = evaluate_interval(settings, mv.run_id, day)["metrics"]
    assert result["champion_version"] == float(middle)
    assert history() == [*before, float(middle)]  # measured again, against v2
    assert 0 <= result["champion_recall_at_50"] <= 1
    assert result["recall_at_50"] == again["recall_at_50"]  # the challenger measures alike
    # the bootstrap figures the gate reads, paired against the new champion
    assert result["recall_at_50_ci_low"] <= result["recall_at_50"] <= result["recall_at_50_ci_high"]
    assert result["gate_vs_champion_low"] <= result["gate_vs_champion_diff"] \
        <= result["gate_vs_champion_high"]
    assert result["gate_vs_champion_diff"] == pytest.approx(
        result["recall_at_50"] - result["champion_recall_at_50"])
    assert result["holdout_users"] == result["holdout_users_total"]  # tiny shop: no sampling
    reason = promote_if_better(settings, last, policy)["reason"]
    assert "rerun evaluate" not in reason and f"champion v{middle}" in reason
