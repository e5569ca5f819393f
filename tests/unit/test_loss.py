"""In-batch sampled softmax with logQ correction, hard negatives and their sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.batches import CategoryNegatives
from training.loss import (
    hard_negative_logits,
    in_batch_logits,
    mixed_sampling_log_q,
    sampled_softmax_loss,
    sampling_log_q,
)

pytestmark = pytest.mark.fast


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


def test_hard_negative_logits_mask_the_own_target_and_subtract_log_q() -> None:
    users = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    hard = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])  # (B, K, D)
    hard_ids = torch.tensor([[5, 7], [8, 9]])
    targets = torch.tensor([5, 6])
    log_q = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.25]]))
    logits = hard_negative_logits(users, hard, hard_ids, targets, log_q, temperature=0.5)
    assert logits.shape == (2, 2)
    assert logits[0, 0] == -math.inf  # product 5 is example 0's own target
    assert logits[0, 1].item() == pytest.approx(0.0 - math.log(0.25))
    assert logits[1, 0].item() == pytest.approx(2.0 - math.log(0.5))
    assert logits[1, 1].item() == pytest.approx(0.0 - math.log(0.25))


def test_mixed_sampling_log_q_adds_the_hard_samplers_expected_count() -> None:
    log_q = torch.log(torch.tensor([0.1, 0.2, 0.3]))  # the batch's targets, B = 3
    hard_log_q = torch.log(torch.tensor([[0.05], [0.4], [0.1]]))  # K = 1
    same = torch.tensor([[False, True, False], [True, False, False], [False, False, False]])
    rate = torch.tensor([0.5, 0.25, 0.0])
    columns, hard = mixed_sampling_log_q(log_q, hard_log_q, same, rate)
    expected = torch.log(3 * torch.tensor([0.1, 0.2, 0.3]).expand(3, 3)
                         + rate.unsqueeze(1) * same.float())
    torch.testing.assert_close(columns, expected)
    torch.testing.assert_close(hard, torch.log(torch.tensor([[0.15 + 0.5], [1.2 + 0.25],
                                                             [0.3 + 0.0]])))
    # Without a same-category overlap it is log q plus the constant log B: same softmax.
    torch.testing.assert_close(columns[2], log_q + math.log(3))


def test_loss_with_hard_negatives_matches_a_hand_computation() -> None:
    users = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    items = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    hard = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]])  # (B, 1, D)
    loss = sampled_softmax_loss(users, items, torch.tensor([0, 1]), None, temperature=1.0,
                                hard_emb=hard, hard_ids=torch.tensor([[3], [1]]))
    # row 0: logits (1, 0.6, 0), target 0; row 1: (0, 0.8, -inf: its own target), target 1
    expected = (-math.log(math.e / (math.e + math.exp(0.6) + 1))
                - math.log(math.exp(0.8) / (1 + math.exp(0.8)))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_category_negatives_stay_in_the_category_and_skip_the_target() -> None:
    categories = np.array([1, 2, 1, 1, 3, 2, 1])  # category 3 has one product
    negatives = CategoryNegatives(categories)
    rows = torch.tensor([0, 1, 4, 6])
    hard, rate = negatives.sample(rows, 50, torch.Generator().manual_seed(0))
    assert hard.shape == (4, 50)
    for b, row in enumerate(rows.tolist()):
        drawn = set(hard[b].tolist())
        if row == 4:  # alone in its category: itself, which the loss masks, at rate 0
            assert drawn == {4} and rate[b] == 0
            continue
        same = {j for j in range(len(categories)) if categories[j] == categories[row]}
        assert drawn == same - {row}  # 50 draws hit every other product of the category
        assert rate[b].item() == pytest.approx(50 / (len(same) - 1))


@pytest.mark.parametrize("correct", [True, False])
def test_mixed_log_q_makes_the_sampled_partition_unbiased(correct: bool) -> None:
    """Summing exp(logit) over in-batch and hard negatives estimates the full softmax's
    partition function without bias only with the mixture's expected counts."""
    rng = np.random.default_rng(0)
    n, batch, k, n_batches = 40, 32, 8, 300
    categories = np.repeat(np.arange(4), n // 4)  # (N,)
    scores = torch.from_numpy(rng.normal(size=n) * 1.5).float()  # one user against each item
    scores[categories == 0] += 2.0  # the category its hard negatives come from matters
    q = rng.dirichlet(np.ones(n))
    log_q_all = torch.from_numpy(np.log(q)).float()  # (N,)
    negatives = CategoryNegatives(categories)
    generator = torch.Generator().manual_seed(0)
    z_true = scores.exp().sum().item()
    estimates = []
    for _ in range(n_batches):
        rows = torch.from_numpy(rng.choice(n, size=batch, p=q))  # (B,) in-batch targets ~ q
        hard, rate = negatives.sample(rows, k, generator)  # (B, K)
        group = torch.from_numpy(categories)[rows]
        same = (group.unsqueeze(0) == group.unsqueeze(1)) & (rows.unsqueeze(0) != rows.unsqueeze(1))
        if correct:
            columns, hard_q = mixed_sampling_log_q(log_q_all[rows], log_q_all[hard], same, rate)
        else:  # the in-batch correction alone, applied to the hard negatives too
            columns = (log_q_all[rows] + math.log(batch)).expand(batch, batch)
            hard_q = log_q_all[hard] + math.log(batch)
        in_batch = scores[rows].unsqueeze(0) - columns  # (B, B), every row sees all columns
        hard_logits = scores[hard] - hard_q  # (B, K)
        estimates.append(torch.cat([in_batch, hard_logits], dim=1).exp().sum(1))
    ratio = torch.cat(estimates).mean().item() / z_true
    if correct:
        assert ratio == pytest.approx(1.0, abs=0.05)
    else:
        assert abs(ratio - 1.0) > 0.2
