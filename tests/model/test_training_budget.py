"""The daily training's budget (examples, minutes) and the switch for fine-tuning the text
encoder, as the pipeline's settings choose them."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pandas as pd
import pytest

# The toy task of the behaviour test next door (pytest puts this folder on sys.path).
from test_two_tower_learns import CONFIG, _catalog, _examples

from core.settings import Settings
from shoprec.pipeline import FINE_TUNED_LAYERS_ON_CUDA, text_trainable_layers, train_config
from training.config import TrainConfig
from training.train import train, within_budget

pytestmark = pytest.mark.fast


def test_the_budget_keeps_the_most_recent_examples_in_their_order() -> None:
    examples = pd.DataFrame({
        "event_timestamp": pd.to_datetime(["2026-01-03", "2026-01-01", "2026-01-05",
                                           "2026-01-02", "2026-01-04"], utc=True),
        "product_id": list("abcde")})
    assert within_budget(examples, 3)["product_id"].tolist() == ["a", "c", "e"]
    assert within_budget(examples, 0) is examples and within_budget(examples, 5) is examples


def test_train_uses_only_the_budgeted_examples() -> None:
    examples = _examples(160)
    result = train(CONFIG.replace(epochs=1, max_examples=120), _catalog(), examples,
                   progress=False, cache_dir=None)
    assert result.n_examples <= 120 < len(examples)


def test_a_minutes_budget_stops_within_the_epoch_that_spends_it() -> None:
    from training.train import BUDGET_CHECK_BATCHES

    batch = 8  # 160 examples: 20 batches an epoch, so the budget is checked mid-epoch
    result = train(CONFIG.replace(epochs=4, batch_size=batch, max_minutes=1e-6), _catalog(),
                   _examples(160), progress=False, cache_dir=None)
    assert len(result.history) == 1  # no epoch starts after the budget ...
    # ... and the one that spent it stops at the first check, not at its end
    assert result.history[0]["examples"] == BUDGET_CHECK_BATCHES * batch < 160
    unlimited = train(CONFIG.replace(epochs=2, batch_size=batch), _catalog(), _examples(160),
                      progress=False, cache_dir=None)
    assert [h["examples"] for h in unlimited.history] == [160, 160]


def test_fine_tuning_follows_the_setting_and_cuda() -> None:
    assert text_trainable_layers("auto", cuda=True) == FINE_TUNED_LAYERS_ON_CUDA > 0
    assert text_trainable_layers("auto", cuda=False) == 0
    assert text_trainable_layers("1", cuda=False) == 1
    with pytest.raises(ValueError, match="SHOPREC_TEXT_TRAINABLE_LAYERS"):
        text_trainable_layers("some")
    with pytest.raises(ValueError, match=">= 0"):
        text_trainable_layers("-1")
    with pytest.raises(ValueError, match="max_minutes"):
        TrainConfig(max_minutes=-1)


def test_the_pipeline_config_takes_the_settings(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path) -> None:
    monkeypatch.setenv("SHOPREC_HOME", str(tmp_path))
    monkeypatch.setenv("SHOPREC_TEXT_TRAINABLE_LAYERS", "1")
    monkeypatch.setenv("SHOPREC_TRAIN_MAX_EXAMPLES", "1000")
    monkeypatch.setenv("SHOPREC_TRAIN_MAX_MINUTES", "20")
    config = train_config(Settings.from_env())
    assert (config.text_trainable_layers, config.max_examples, config.max_minutes) == (1, 1000, 20)


def test_early_stopping_reads_a_seeded_sample_of_the_validation_users() -> None:
    from training.train import ValidationSet, sample_users

    users = [f"u{i:03d}" for i in range(50)]
    picked = sample_users(users, 10, seed=3)
    assert len(picked) == 10 and picked == sorted(picked) and set(picked) <= set(users)
    assert sample_users(list(reversed(users)), 10, seed=3) == picked  # the set decides
    assert sample_users(users, 0, seed=3) == users == sample_users(users, 50, seed=3)
    full = ValidationSet(histories={u: ["p1"] for u in users},
                         truth={u: {"p2"} for u in users},
                         event_types={u: ["view"] for u in users},
                         user_features=pd.DataFrame({"user_id": users, "country": "FR"}))
    small = full.sample(10, seed=3)
    assert sorted(small.truth) == picked == sorted(small.histories)
    assert sorted(small.event_types) == picked
    assert small.user_features["user_id"].tolist() == picked
    assert full.sample(0, seed=3) is full
    with pytest.raises(ValueError, match="validation_max_users"):
        TrainConfig(validation_max_users=-1)


def test_the_run_reads_the_newest_days_within_train_max_events(tmp_path) -> None:
    import dataclasses
    import datetime as dt

    from features.contract import newest_days, partition_rows
    from features.synth import generate_shop
    from shoprec.pipeline import HoldoutConfig, load_interval

    start = dt.date(2026, 1, 1)
    landing = tmp_path / "landing"
    generate_shop(str(landing), days=12, users=80, products=30, seed=3, start=start)
    base = Settings(home=tmp_path, landing_root=str(landing))
    last = start + dt.timedelta(days=11)
    rows = [partition_rows(str(landing), "events", last - dt.timedelta(days=i))
            for i in range(6)]  # the newest six days' events
    budget = sum(rows[:5])  # room for five whole days, one row short of a sixth
    assert partition_rows(str(landing), "events", last + dt.timedelta(days=1)) == 0
    assert newest_days(str(landing), "events", last, 1) == [last]  # at least the newest day
    windowed = load_interval(dataclasses.replace(base, train_max_events=sum(rows) - 1), last,
                             HoldoutConfig())
    assert len(windowed.events) == budget
    everything = load_interval(dataclasses.replace(base, train_max_events=0), last,
                               HoldoutConfig())
    assert windowed.events["ts"].min().date() == last - dt.timedelta(days=4)
    assert everything.events["ts"].min().date() == start
    assert windowed.windows()["start"].startswith(str(last - dt.timedelta(days=4)))
    assert (windowed.test_days, windowed.validation_days) == (1, 1)  # a 5-day shop's windows
    assert everything.test_days == everything.validation_days == 3
