"""What each training step reads: this rank's batches, their hard negatives, their tensors.

- ``epoch_batches`` cuts an epoch's shuffled examples into this rank's batches (disjoint
  shards of equal count under DistributedDataParallel).
- ``CategoryNegatives`` draws K hard negatives per target from its category, with the
  sampling rate the logQ correction needs.
- ``make_batch`` gathers a batch's tensors so that every distinct product (targets, hard
  negatives, histories) goes through the item tower once.

The fit loop that runs them per step is ``training.train``'s.
"""

from __future__ import annotations

import numpy as np
import torch

from training.catalog_text import CatalogText
from training.towers import TwoTowerBatch


class CategoryNegatives:
    """Hard negatives: products drawn uniformly, with replacement, among the OTHER products
    of the target's category (products without a category form one group).

    Chosen over "the top-scored wrong products of the previous epoch" because it needs no
    extra scoring pass over the catalogue, is exact under sharding, and its sampling
    probability is known in closed form, which the logQ correction needs.

    Args:
        category_ids: (N,) category vocabulary id of every catalogue row.
    """

    def __init__(self, category_ids: np.ndarray):
        category_ids = np.asarray(category_ids, dtype=np.int64)
        order = np.argsort(category_ids, kind="stable")  # (N,) rows grouped by category
        grouped = category_ids[order]
        first = np.searchsorted(grouped, grouped, side="left")  # (N,) group start, by slot
        last = np.searchsorted(grouped, grouped, side="right")
        slot = np.empty_like(order)
        slot[order] = np.arange(len(order))  # row -> its position in ``order``
        self.order = torch.from_numpy(order)
        self.start = torch.from_numpy(first[slot])  # (N,) per row
        self.size = torch.from_numpy((last - first)[slot])  # (N,) its category's size
        self.offset = torch.from_numpy(slot - first[slot])  # (N,) its place in the group

    def sample(
        self, rows: torch.Tensor, k: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K negatives per target row.

        Args:
            rows: (B,) catalogue rows of the targets.
            k: negatives per target.
            generator: the (seeded) random source.

        Returns:
            (B, K) catalogue rows (a target alone in its category gets itself, which the
            loss masks as an accidental hit), and (B,) float32 expected draws of any one
            other product of the category, K / (n_c - 1) (0 when alone).
        """
        size, offset = self.size[rows], self.offset[rows]  # (B,)
        others = (size - 1).clamp(min=1).unsqueeze(1)  # (B, 1)
        draw = (torch.rand(len(rows), k, generator=generator) * others).long()  # (B, K)
        draw = torch.minimum(draw, others - 1)
        draw = draw + (draw >= offset.unsqueeze(1)).long()  # skip the target itself
        draw = torch.where(size.unsqueeze(1) > 1, draw, offset.unsqueeze(1))  # (B, K)
        hard = self.order[self.start[rows].unsqueeze(1) + draw]  # (B, K)
        rate = torch.where(size > 1, k / (size - 1).clamp(min=1).float(), 0.0)  # (B,)
        return hard, rate


def epoch_batches(order: torch.Tensor, step: int, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    """This rank's batches of one epoch.

    The shuffled examples are cut into global batches of ``step * world``; rank r takes
    the r-th of ``world`` near-equal parts of each. So the ranks' shards are disjoint,
    cover every example, and have the same number of batches (DDP steps in lockstep).
    A last global batch too small to give every rank two examples joins the previous one.

    Args:
        order: (E,) shuffled example indices, the same on every rank.
        step: examples per batch and rank.
        rank, world: this process and the number of processes.

    Returns:
        Index tensors, each of at least 2 examples when E >= 2 * world.
    """
    batches = list(order.split(step * world))
    if len(batches) > 1 and len(batches[-1]) < 2 * world:  # a batch of one has no negatives
        batches[-2] = torch.cat(batches[-2:])
        batches.pop()
    if world == 1:
        return batches
    return [batch.tensor_split(world)[rank] for batch in batches]


def make_batch(
    idx: torch.Tensor,
    targets: torch.Tensor,
    history: torch.Tensor,
    events: torch.Tensor,
    items: dict[str, torch.Tensor],
    device: torch.device,
    *,
    profiles: tuple[torch.Tensor, torch.Tensor] | None = None,
    hard: torch.Tensor | None = None,
    text: CatalogText | None = None,
    table: torch.Tensor | None = None,
    pin: bool = False,
) -> tuple[TwoTowerBatch, torch.Tensor, torch.Tensor | None]:
    """A batch whose distinct products (targets, hard negatives, histories) go through the
    item tower once.

    Args:
        idx: (B,) example indices.
        targets, history, events: every example's target (E,), history and event types
            (E, L), on the CPU.
        items: the catalogue's item-tower inputs on ``device``.
        device: the training device.
        profiles: every example's profile inputs, (E, P) numeric and (E,) country ids, on
            the CPU; None: no user features.
        hard: (B, K) catalogue rows of hard negatives, or None.
        text: with a fine-tuned encoder, the catalogue's text inputs; its ``table`` (N, H)
            gives the history products' text vectors.
        table: (N, H) current text vectors, with ``text``.
        pin: copy through page-locked memory, asynchronously (CUDA).

    Returns:
        The batch, the (B,) catalogue rows of its targets and the (B, K) rows of its hard
        negatives (or None), on ``device``.
    """
    rows = targets[idx]  # (B,)
    hist = history[idx]  # (B, L)
    mask = hist >= 0  # (B, L); histories are left-aligned (most recent first)
    longest = int(mask.sum(dim=1).max()) if len(idx) else 0
    hist, mask = hist[:, :longest], mask[:, :longest]  # (B, L')
    ev = events[idx][:, :longest]  # (B, L')
    n, k = len(rows), (hard.shape[1] if hard is not None else 0)
    parts = [rows] + ([hard.reshape(-1)] if hard is not None else []) + [hist[mask]]
    distinct, inverse = torch.unique(torch.cat(parts), return_inverse=True)  # (M,)
    local_history = torch.full_like(hist, -1)  # (B, L')
    local_history[mask] = inverse[n + n * k :]

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory().to(device, non_blocking=True) if pin else t.to(device)

    on = move(distinct)
    batch: TwoTowerBatch = {
        "item_text": (table if table is not None else items["text"])[on],  # (M, H)
        "item_category": items["category"][on],  # (M,)
        "item_brand": items["brand"][on],  # (M,)
        "item_price": items["price"][on],  # (M,)
        "target": move(inverse[:n]),  # (B,)
        "history": move(local_history),  # (B, L')
        "history_mask": move(mask),  # (B, L')
        "history_event": move(ev),  # (B, L')
    }
    if profiles is not None:
        batch["user_numeric"] = move(profiles[0][idx])  # (B, P)
        batch["user_country"] = move(profiles[1][idx])  # (B,)
    hard_rows = None
    if hard is not None:
        batch["hard"] = move(inverse[n : n + n * k].view(n, k))  # (B, K)
        hard_rows = move(hard)  # (B, K)
    if text is not None:
        fresh = torch.unique(inverse[: n + n * k])  # (F,) targets and hard negatives
        batch["fresh"] = move(fresh)
        batch.update(text.inputs(distinct[fresh], pin=pin))  # type: ignore[typeddict-item]
    return batch, move(rows), hard_rows
