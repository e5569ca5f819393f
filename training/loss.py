"""In-batch sampled softmax with logQ (popularity) correction.

Each example's target product is the positive; the other targets of the batch are its
negatives. Popular products appear as negatives more often than uniform sampling would
give, so the logits subtract log(q), q being a product's probability of being a target in
the training set (Yi et al., "Sampling-bias-corrected neural modeling", RecSys 2019).
When a product is the target of two examples in one batch, it is not a negative for the
other one ("accidental hit"): those logits are masked.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def sampling_log_q(target_rows: np.ndarray, n_items: int) -> np.ndarray:
    """log of each product's probability of being a training target.

    Args:
        target_rows: (E,) catalogue row of every training example's target.
        n_items: catalogue size N.

    Returns:
        (N,) float32; products never a target get log of half a count, a finite floor.
    """
    counts = np.bincount(target_rows, minlength=n_items).astype(np.float64)
    counts = np.maximum(counts, 0.5)
    return np.log(counts / max(len(target_rows), 1)).astype(np.float32)


def in_batch_logits(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    item_ids: torch.Tensor,
    log_q: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """Logits of every user against every target of the batch.

    Args:
        user_emb: (B, D) user embeddings.
        item_emb: (B, D) embeddings of each example's target product.
        item_ids: (B,) catalogue rows of the targets, to find accidental hits.
        log_q: (B,) log sampling probability of each target, or None for no correction.
        temperature: divides the similarities.

    Returns:
        (B, B) float32; row b's positive is column b; accidental hits are -inf.
    """
    logits = (user_emb @ item_emb.T).float() / temperature  # (B, B)
    if log_q is not None:
        logits = logits - log_q.float().unsqueeze(0)  # (B, B), per column (item)
    same = item_ids.unsqueeze(0) == item_ids.unsqueeze(1)  # (B, B)
    same.fill_diagonal_(False)
    return logits.masked_fill(same, float("-inf"))  # (B, B)


def sampled_softmax_loss(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    item_ids: torch.Tensor,
    log_q: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """Mean cross-entropy of each user's own target against the batch's other targets.

    Args: as ``in_batch_logits``.

    Returns:
        A scalar float32 tensor.
    """
    logits = in_batch_logits(user_emb, item_emb, item_ids, log_q, temperature)  # (B, B)
    labels = torch.arange(logits.shape[0], device=logits.device)  # (B,)
    return F.cross_entropy(logits, labels)
