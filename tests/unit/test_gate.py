"""The promotion gate's rules, as a pure function."""

from __future__ import annotations

import pytest

from training.registry import PromotionPolicy, gate_decision

pytestmark = pytest.mark.fast

AUTO = PromotionPolicy()


def _metrics(score: float, *, champion: float | None = None, champion_version: int = 1,
             baseline: float | None = 0.30) -> dict[str, float]:
    out = {"recall_at_50": score}
    if champion is not None:
        out.update({"champion_recall_at_50": champion, "champion_version": champion_version})
    if baseline is not None:
        out["best_baseline_recall_at_50"] = baseline
    return out


@pytest.mark.parametrize(
    ("metrics", "champion", "promote", "says"),
    [
        (_metrics(0.40), None, True, "no champion yet"),
        (_metrics(0.25), None, False, "does not beat the best baseline 0.3000"),
        (_metrics(0.45, champion=0.40), ("1", "2026-01-01"), True, ">= champion v1"),
        (_metrics(0.401, champion=0.40), ("1", "2026-01-01"), False, "x (1 + margin 0.01)"),
        (_metrics(0.35, champion=0.40), ("1", "2026-01-01"), False, "< champion v1"),
        (_metrics(0.50, champion=0.40, champion_version=1), ("3", "2026-01-01"), False,
         "evaluated against v1, but the champion is now v3: rerun evaluate"),
        (_metrics(0.50, champion=0.40, champion_version=0), ("3", "2026-01-01"), False,
         "evaluated against no champion, but the champion is now v3"),
        (_metrics(0.50, champion=0.40), ("1", "2026-02-01"), False, "is newer"),
        (_metrics(0.10), ("2", "2026-01-01"), True, "already champion"),
        ({"recall_at_10": 0.2}, None, False, "not evaluated"),
    ],
)
def test_gate_rules(metrics: dict, champion: tuple | None, promote: bool, says: str) -> None:
    decided, reason = gate_decision(AUTO, metrics, "2026-01-15", champion, "2")
    assert decided is promote
    assert says in reason


def test_baseline_rule_can_be_switched_off() -> None:
    policy = PromotionPolicy(beat_baseline=False)
    assert gate_decision(policy, _metrics(0.25), "2026-01-15", None, "1")[0] is True


def test_manual_mode_never_promotes_but_says_the_gate_passed() -> None:
    policy = PromotionPolicy(mode="manual")
    promote, reason = gate_decision(policy, _metrics(0.45, champion=0.40), "2026-01-15",
                                    ("1", "2026-01-01"), "2")
    assert promote is False
    assert "gate passed" in reason and "shoprec model promote 2" in reason


def test_policy_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOPREC_PROMOTION_MODE", "manual")
    monkeypatch.setenv("SHOPREC_PROMOTION_MARGIN", "0.05")
    monkeypatch.setenv("SHOPREC_PROMOTION_BEAT_BASELINE", "0")
    assert PromotionPolicy.from_env() == PromotionPolicy(mode="manual", margin=0.05,
                                                         beat_baseline=False)
    monkeypatch.setenv("SHOPREC_PROMOTION_MODE", "sometimes")
    with pytest.raises(ValueError, match="auto or manual"):
        PromotionPolicy.from_env()


def _with_intervals(metrics: dict[str, float], **pairs: tuple[float, float, float]) -> dict:
    out = dict(metrics, gate_confidence=0.95)
    for against, (diff, low, high) in pairs.items():
        out.update({f"gate_vs_{against}_diff": diff, f"gate_vs_{against}_low": low,
                    f"gate_vs_{against}_high": high})
    return out


def test_an_advantage_within_noise_keeps_the_champion() -> None:
    # 0.45 vs 0.40 passes the margin, but the paired interval reaches zero
    metrics = _with_intervals(_metrics(0.45, champion=0.40),
                              champion=(0.05, -0.01, 0.11), baseline=(0.15, 0.10, 0.20))
    promote, reason = gate_decision(AUTO, metrics, "2026-01-15", ("1", "2026-01-01"), "2")
    assert promote is False
    assert "within noise" in reason and "95% CI [-0.0100, +0.1100]" in reason


def test_a_sure_advantage_is_promoted_and_the_reason_says_how_sure() -> None:
    metrics = _with_intervals(_metrics(0.45, champion=0.40),
                              champion=(0.05, 0.02, 0.08), baseline=(0.15, 0.10, 0.20))
    promote, reason = gate_decision(AUTO, metrics, "2026-01-15", ("1", "2026-01-01"), "2")
    assert promote is True
    assert "paired +0.0500, 95% CI [+0.0200, +0.0800]" in reason


def test_the_first_champion_must_beat_the_best_baseline_beyond_noise() -> None:
    noisy = _with_intervals(_metrics(0.35), baseline=(0.05, -0.02, 0.12))
    promote, reason = gate_decision(AUTO, noisy, "2026-01-15", None, "1")
    assert promote is False and "beats the best baseline 0.3000 only within noise" in reason
    sure = _with_intervals(_metrics(0.35), baseline=(0.05, 0.01, 0.09))
    assert gate_decision(AUTO, sure, "2026-01-15", None, "1")[0] is True
    # without the baseline rule, or at confidence 0 (point estimates), noise is no reason
    assert gate_decision(PromotionPolicy(beat_baseline=False), noisy, "2026-01-15", None,
                         "1")[0] is True
    assert gate_decision(PromotionPolicy(confidence=0), noisy, "2026-01-15", None, "1")[0]


def test_confidence_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOPREC_PROMOTION_CONFIDENCE", "0.9")
    assert PromotionPolicy.from_env().confidence == 0.9
    monkeypatch.setenv("SHOPREC_PROMOTION_CONFIDENCE", "95")
    with pytest.raises(ValueError, match="a level in"):
        PromotionPolicy.from_env()
