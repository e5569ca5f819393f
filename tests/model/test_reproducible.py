"""Reproducibility on the CPU: the same seed gives identical metrics and weights, for frozen
and for fine-tuned text; another seed gives other weights."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

# The toy task of the behaviour test next door (pytest puts this folder on sys.path).
from test_two_tower_learns import CONFIG, _catalog, _examples, _new_users

from training.config import TrainConfig
from training.train import TrainResult, ValidationSet, train

pytestmark = pytest.mark.fast

CASES = {
    "frozen": CONFIG.replace(epochs=3),
    # One fine-tuned layer of the tiny encoder (with dropout), hard negatives on top.
    "fine_tuned": CONFIG.replace(epochs=3, text_trainable_layers=1, hard_negatives=2),
}


def _run(config: TrainConfig) -> TrainResult:
    histories, truth = _new_users(seed=3)
    return train(config, _catalog(), _examples(160), progress=False,
                 validation=ValidationSet(histories=histories, truth=truth),
                 cache_dir=None)


def _curves(result: TrainResult) -> list[dict[str, float]]:
    """Per-epoch metrics without the timings."""
    return [{k: v for k, v in m.items() if k not in ("seconds", "examples_per_s")}
            for m in result.history]


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_seed_gives_identical_metrics_and_weights(case: str) -> None:
    a, b = _run(CASES[case]), _run(CASES[case])
    assert _curves(a) == _curves(b) and len(a.history) == 3
    assert a.best_epoch == b.best_epoch
    state_a, state_b = a.model.state_dict(), b.model.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name
    np.testing.assert_array_equal(a.item_embeddings, b.item_embeddings)
    np.testing.assert_array_equal(a.text_embeddings, b.text_embeddings)
    if case == "fine_tuned":
        assert any(k.startswith("text_encoder.") for k in state_a)


@pytest.mark.parametrize("case", sorted(CASES))
def test_another_seed_gives_other_weights(case: str) -> None:
    a, c = _run(CASES[case]), _run(CASES[case].replace(seed=1))
    state_a, state_c = a.model.state_dict(), c.model.state_dict()
    differ = [n for n in state_a if not torch.equal(state_a[n], state_c[n])]
    assert "user_tower.query" in differ and "item_tower.text_skip.weight" in differ
    if case == "fine_tuned":
        assert any(n.startswith("text_encoder.transformer.encoder.layer.1.") for n in differ)
    assert not np.allclose(a.item_embeddings, c.item_embeddings)
    assert [m["loss"] for m in a.history] != [m["loss"] for m in c.history]
