"""The pair scorer: the small network that turns a (user, candidate) feature vector into
the served ranking's score, and its listwise training.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class PairScorer(nn.Module):
    """Score of one (user, product) from its features: linear + a one-hidden-layer MLP."""

    def __init__(self, n_features: int, hidden: int = 32):
        super().__init__()
        self.linear = nn.Linear(n_features, 1)
        self.mlp = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., F) -> (...)."""
        return (self.linear(x) + self.mlp(x)).squeeze(-1)

    def as_numpy(self) -> NumpyPairScorer:
        """The same function in numpy, for serving (see ``NumpyPairScorer``)."""
        return NumpyPairScorer(self)


class NumpyPairScorer:
    """A trained ``PairScorer`` evaluated with two float32 matrix products in numpy.

    A request scores a few hundred candidates: torch's per-call dispatch of five modules
    costs more than the arithmetic there. The result equals the module's up to float32
    rounding (``tests/unit/test_scorer.py`` compares them).
    """

    def __init__(self, module: PairScorer):
        with torch.no_grad():
            first = module.mlp[0]
            # one product gives the linear part and the hidden layer together: (F, 1 + H)
            self.weight = torch.cat([module.linear.weight, first.weight]).T.contiguous().numpy()
            self.bias = torch.cat([module.linear.bias, first.bias]).numpy()  # (1 + H,)
            self.out = module.mlp[2].weight[0].numpy().copy()  # (H,)
            self.out_bias = float(module.mlp[2].bias[0])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(..., F) float32 -> (...) float32."""
        both = x @ self.weight + self.bias  # (..., 1 + H)
        return both[..., 0] + np.maximum(both[..., 1:], 0.0) @ self.out + self.out_bias


def train_scorer(
    features: np.ndarray,
    excluded: np.ndarray,
    truth: np.ndarray,
    *,
    hidden: int = 32,
    epochs: int = 10,
    lr: float = 1e-2,
    batch_users: int = 64,
    seed: int = 0,
) -> PairScorer:
    """Fit a ``PairScorer`` with a listwise softmax: each user's truth against all candidates.

    Args:
        features: (U, N, F) float32.
        excluded: (U, N) bool, products that may not be recommended (left out of the softmax).
        truth: (U, N) bool, what the user bought in the window.
        hidden: MLP width.
        epochs: passes over the users.
        lr: Adam learning rate.
        batch_users: users per step.
        seed: initialisation and shuffling seed.

    Returns:
        The scorer (eval mode).
    """
    torch.manual_seed(seed)
    model = PairScorer(features.shape[-1], hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order_rng = torch.Generator().manual_seed(seed)
    x_all = torch.from_numpy(features)  # (U, N, F)
    off = torch.from_numpy(excluded)  # (U, N)
    target = torch.from_numpy(truth).float()  # (U, N)
    keep = target.sum(dim=1) > 0  # users with a hit among the candidates
    rows = torch.nonzero(keep).squeeze(1)
    model.train()
    for _ in range(epochs):
        for idx in rows[torch.randperm(len(rows), generator=order_rng)].split(batch_users):
            logits = model(x_all[idx]).masked_fill(off[idx], -1e9)  # (b, N)
            t = target[idx]  # (b, N)
            loss = -(torch.log_softmax(logits, dim=1) * t).sum(dim=1) / t.sum(dim=1)  # (b,)
            optimizer.zero_grad(set_to_none=True)
            loss.mean().backward()
            optimizer.step()
    return model.eval()
