"""In-batch sampled softmax with logQ correction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.loss import in_batch_logits, sampled_softmax_loss, sampling_log_q


def test_sampling_log_q_is_the_target_frequency() -> None:
    log_q = sampling_log_q(np.array([0, 0, 1]), n_items=3)
    np.testing.assert_allclose(log_q, np.log([2 / 3, 1 / 3, 0.5 / 3]), rtol=1e-6)


def test_logq_correction_subtracts_log_q_per_item_column() -> None:
    torch.manual_seed(0)
    users, items = torch.randn(3, 4), torch.randn(3, 4)
    ids = torch.tensor([0, 1, 2])
    log_q = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    plain = in_batch_logits(users, items, ids, None, temperature=0.5)
    corrected = in_batch_logits(users, items, ids, log_q, temperature=0.5)
    torch.testing.assert_close(plain, users @ items.T / 0.5)
    torch.testing.assert_close(corrected - plain, -log_q.expand(3, 3))
    # The popular item (q=0.5) loses the most, the rare one (q=0.2) the least.
    delta = (corrected - plain)[0]
    assert delta[0] < delta[1] < delta[2]


def test_accidental_hits_are_masked_but_not_the_diagonal() -> None:
    users, items = torch.eye(3), torch.eye(3)
    logits = in_batch_logits(users, items, torch.tensor([7, 8, 7]), None, temperature=1.0)
    assert logits[0, 2] == -math.inf and logits[2, 0] == -math.inf
    assert torch.isfinite(torch.diagonal(logits)).all()
    assert torch.isfinite(logits[1]).all()


def test_loss_matches_a_hand_computation() -> None:
    users = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    items = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    loss = sampled_softmax_loss(users, items, torch.tensor([0, 1]), None, temperature=1.0)
    # row 0: logits (1, 0.6), target 0; row 1: logits (0, 0.8), target 1
    expected = (-math.log(math.e / (math.e + math.exp(0.6)))
                - math.log(math.exp(0.8) / (1 + math.exp(0.8)))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_loss_ignores_accidental_hits() -> None:
    """Two examples with the same target: neither is the other's negative."""
    users = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    items = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    loss = sampled_softmax_loss(users, items, torch.tensor([5, 5]), None, temperature=1.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("log_q", [None, torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))])
def test_loss_decreases_on_a_toy_batch(log_q: torch.Tensor | None) -> None:
    torch.manual_seed(0)
    users = torch.nn.Parameter(torch.randn(4, 8))
    items = torch.nn.Parameter(torch.randn(4, 8))
    ids = torch.arange(4)
    optimizer = torch.optim.SGD([users, items], lr=0.1)
    losses = []
    for _ in range(30):
        u = torch.nn.functional.normalize(users, dim=-1)
        i = torch.nn.functional.normalize(items, dim=-1)
        loss = sampled_softmax_loss(u, i, ids, log_q, temperature=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
