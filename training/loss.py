"""In-batch sampled softmax with logQ (popularity) correction.

Each example's target product is the positive; the other targets of the batch are its
negatives. Popular products appear as negatives more often than uniform sampling would
give, so the logits subtract log(q), q being a product's probability of being a target in
the training set (Yi et al., "Sampling-bias-corrected neural modeling", RecSys 2019).
When a product is the target of two examples in one batch, it is not a negative for the
other one ("accidental hit"): those logits are masked.

Hard negatives (optional): each example also scores K products drawn uniformly from its
target's category. The negatives of example b then come from a mixture of two samplers,
and the correction is the log of each product's expected count under that mixture
(Yang et al., "Mixed negative sampling", WWW 2020): B·q(j) from the batch, plus
K / (n_c - 1) when j is another product of b's category c (``mixed_sampling_log_q``).
Without hard negatives the correction stays log q(j): the constant log B cancels.
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
        log_q: (B,) log sampling probability of each target (per column), or (B, B) per
            row and column (``mixed_sampling_log_q``), or None for no correction.
        temperature: divides the similarities.

    Returns:
        (B, B) float32; row b's positive is column b; accidental hits are -inf.
    """
    logits = (user_emb @ item_emb.T).float() / temperature  # (B, B)
    if log_q is not None:
        log_q = log_q.float()
        logits = logits - (log_q.unsqueeze(0) if log_q.dim() == 1 else log_q)  # (B, B)
    same = item_ids.unsqueeze(0) == item_ids.unsqueeze(1)  # (B, B)
    same.fill_diagonal_(False)
    return logits.masked_fill(same, float("-inf"))  # (B, B)


def hard_negative_logits(
    user_emb: torch.Tensor,
    hard_emb: torch.Tensor,
    hard_ids: torch.Tensor,
    target_ids: torch.Tensor,
    log_q: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """Logits of every user against its own K hard negatives.

    Args:
        user_emb: (B, D) user embeddings.
        hard_emb: (B, K, D) embeddings of each example's hard negatives.
        hard_ids: (B, K) their catalogue rows.
        target_ids: (B,) catalogue rows of the targets: a negative equal to its example's
            target is an accidental hit (masked).
        log_q: (B, K) log expected count of each negative, or None for no correction.
        temperature: divides the similarities.

    Returns:
        (B, K) float32.
    """
    logits = torch.einsum("bd,bkd->bk", user_emb, hard_emb).float() / temperature  # (B, K)
    if log_q is not None:
        logits = logits - log_q.float()  # (B, K)
    return logits.masked_fill(hard_ids == target_ids.unsqueeze(1), float("-inf"))  # (B, K)


def mixed_sampling_log_q(
    log_q: torch.Tensor,
    hard_log_q: torch.Tensor,
    same_group: torch.Tensor,
    hard_rate: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logQ corrections when in-batch and same-category negatives are mixed.

    Example b's negatives come from the batch (product j expected B·q(j) times) and from
    K uniform draws among the other products of its target's category (each expected
    ``hard_rate[b]`` = K / (n_c - 1) times). Each logit subtracts the log of the sum.

    Args:
        log_q: (B,) log q of the batch's targets (the in-batch columns).
        hard_log_q: (B, K) log q of each example's hard negatives.
        same_group: (B, B) True where column j's target is another product of row b's
            target's category (so that sampler could have drawn it too).
        hard_rate: (B,) expected draws of one such product by row b's hard sampler.

    Returns:
        (B, B) corrections for ``in_batch_logits`` and (B, K) for ``hard_negative_logits``.
    """
    batch = log_q.shape[0]
    in_batch = batch * log_q.float().exp()  # (B,) expected in-batch count per column
    rate = hard_rate.float().unsqueeze(1)  # (B, 1)
    columns = torch.log(in_batch.unsqueeze(0) + rate * same_group.float())  # (B, B)
    hard = torch.log(batch * hard_log_q.float().exp() + rate)  # (B, K)
    return columns, hard


def sampled_softmax_loss(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    item_ids: torch.Tensor,
    log_q: torch.Tensor | None,
    temperature: float,
    *,
    hard_emb: torch.Tensor | None = None,
    hard_ids: torch.Tensor | None = None,
    hard_log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of each user's own target against the batch's other targets
    (and, when given, its hard negatives).

    Args: as ``in_batch_logits``; ``hard_emb`` (B, K, D), ``hard_ids`` (B, K) and
        ``hard_log_q`` (B, K) as ``hard_negative_logits``.

    Returns:
        A scalar float32 tensor.
    """
    logits = in_batch_logits(user_emb, item_emb, item_ids, log_q, temperature)  # (B, B)
    if hard_emb is not None:
        if hard_ids is None:
            raise ValueError("hard_emb needs hard_ids")
        hard = hard_negative_logits(user_emb, hard_emb, hard_ids, item_ids, hard_log_q,
                                    temperature)  # (B, K)
        logits = torch.cat([logits, hard], dim=1)  # (B, B + K)
    labels = torch.arange(logits.shape[0], device=logits.device)  # (B,)
    return F.cross_entropy(logits, labels)
