"""The registry gate on a real MLflow registry: register, gate, manual promote, rollback."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from typer.testing import CliRunner

from core.settings import Settings
from shoprec.cli import app
from training.registry import (
    CHALLENGER,
    CHAMPION,
    TAG_GATE,
    TAG_INTERVAL,
    PromotionPolicy,
    alias_version,
    experiment_id,
    mlflow_client,
    promote_if_better,
    register_run,
)

pytestmark = pytest.mark.integration


class _Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return model_input


def _trained(settings: Settings, interval: str, metrics: dict[str, float]) -> str:
    """A finished run with a logged model and evaluation metrics, as the pipeline leaves it."""
    client = mlflow_client(settings)
    with mlflow.start_run(experiment_id=experiment_id(settings, client),
                          tags={TAG_INTERVAL: interval}) as run:
        mlflow.pyfunc.log_model(name="model", python_model=_Constant())
        mlflow.log_metrics(metrics)
    return run.info.run_id


@pytest.fixture
def settings(shop_home: Path) -> Settings:
    return Settings.from_env()


def _gate(settings: Settings, version: str) -> dict:
    mv = mlflow_client(settings).get_model_version(settings.model_name, version)
    return json.loads(mv.tags[TAG_GATE])


def test_a_worse_model_is_registered_but_not_promoted(settings: Settings) -> None:
    client = mlflow_client(settings)
    first = register_run(settings, _trained(settings, "2026-01-10", {
        "recall_at_50": 0.40, "best_baseline_recall_at_50": 0.30}))
    assert promote_if_better(settings, first["version"])["promoted"] is True

    worse = register_run(settings, _trained(settings, "2026-01-11", {
        "recall_at_50": 0.33, "champion_recall_at_50": 0.41, "champion_version": 1.0,
        "best_baseline_recall_at_50": 0.30}))
    result = promote_if_better(settings, worse["version"])

    assert result["promoted"] is False
    assert str(alias_version(client, settings.model_name, CHAMPION).version) == first["version"]
    assert str(alias_version(client, settings.model_name, CHALLENGER).version) == worse["version"]
    gate = _gate(settings, worse["version"])
    assert gate["promoted"] is False
    assert "0.3300 < champion v1 0.4100" in gate["reason"]
    assert gate["policy"]["margin"] == PromotionPolicy().margin


def test_manual_mode_stops_at_challenger_then_cli_promotes_and_rolls_back(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    client = mlflow_client(settings)
    first = register_run(settings, _trained(settings, "2026-01-10", {
        "recall_at_50": 0.40, "best_baseline_recall_at_50": 0.30}))
    promote_if_better(settings, first["version"])
    monkeypatch.setenv("SHOPREC_PROMOTION_MODE", "manual")
    better = register_run(settings, _trained(settings, "2026-01-11", {
        "recall_at_50": 0.50, "champion_recall_at_50": 0.40, "champion_version": 1.0,
        "best_baseline_recall_at_50": 0.30}))
    assert promote_if_better(settings, better["version"])["promoted"] is False
    assert "promotion is manual" in _gate(settings, better["version"])["reason"]
    assert str(alias_version(client, settings.model_name, CHAMPION).version) == first["version"]

    runner = CliRunner()
    out = runner.invoke(app, ["model", "promote", better["version"], "--reason", "reviewed"])
    assert out.exit_code == 0, out.output
    champion = alias_version(client, settings.model_name, CHAMPION)
    assert str(champion.version) == better["version"]
    promotion = json.loads(champion.tags["shoprec.promotion"])
    assert promotion["reason"] == "reviewed" and promotion["previous"] == first["version"]

    out = runner.invoke(app, ["model", "rollback", "--reason", "bad clicks"])
    assert out.exit_code == 0, out.output
    assert str(alias_version(client, settings.model_name, CHAMPION).version) == first["version"]


def test_rollback_without_history_says_what_to_do(settings: Settings) -> None:
    only = register_run(settings, _trained(settings, "2026-01-10", {
        "recall_at_50": 0.40, "best_baseline_recall_at_50": 0.30}))
    promote_if_better(settings, only["version"])
    out = CliRunner().invoke(app, ["model", "rollback", "--reason", "test"])
    assert out.exit_code == 2
    assert "--to" in out.output
