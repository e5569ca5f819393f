"""A sequence encoder of the user's behaviour: a small causal transformer over the ordered
history of product events, trained to predict the user's next purchase.

Each history entry is the sum of four embeddings: the product (initialised from the
products' frozen text vectors, projected to ``dim`` by PCA, so a product never bought starts
where its text puts it), the event type (view, add to cart, purchase), the time since the
previous entry (log2 buckets of hours) and the slot in the window. A causal transformer
(``layers`` pre-norm layers) reads the last ``length`` entries; the output at the last
slot is the user's vector, and a product's score is ``vector · item + bias`` -- one inner
product over ``items_matrix()`` (the item table with the bias as an extra column), so the
retrieval indexes serve it like the other spaces.

Training (``fit_sequence``): every history before the cut (as Feast truncates it) is cut
into windows of ``length`` entries from the end (at most ``MAX_WINDOWS``); each slot's target
is the user's next purchase after it (SASRec-style, all slots of a window at once). The loss is a softmax over
the batch's targets plus ``negatives`` products sampled uniformly (the whole catalogue when
it is smaller), for ``sequence_epochs`` passes or ``sequence_steps`` steps, whichever ends
first. It is fitted with the rest of the item side at each cut
(``training.ranking.items.ItemState``), on the GPU in bf16 when there is one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from features.user_state import HISTORY_EVENT_TYPES, HISTORY_LEN, recent_histories

log = logging.getLogger(__name__)

GAP_BUCKETS = 16  # 0 padding, 1 first entry (or unknown time), 2.. log2(1 + hours) + 2
_TYPE_ID = {t: i + 1 for i, t in enumerate(HISTORY_EVENT_TYPES)}  # 0: padding
BATCH = 128  # windows per training step
MAX_WINDOWS = 3  # training windows per history, the latest
LOSS_SLOTS = 2048  # slots (with a target) per step that the loss reads, a random subset
ENCODE_BATCH = 1024  # users per inference call


def gap_buckets(stamps: np.ndarray) -> np.ndarray:
    """(T,) int64 bucket of the time since the previous entry (``GAP_BUCKETS``)."""
    hours = np.diff(np.asarray(stamps, np.float64), prepend=np.nan) / 3600.0
    with np.errstate(invalid="ignore"):
        bucket = np.floor(np.log2(1.0 + np.clip(hours, 0.0, None))) + 2.0
    return np.where(np.isfinite(bucket), bucket, 1.0).clip(1, GAP_BUCKETS - 1).astype(np.int64)


def entries(products: Sequence[str], types: Sequence[str], stamps: np.ndarray,
            index: Mapping[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A history's catalogue entries: columns + 1, type ids and gap buckets, oldest first."""
    keep = [i for i, p in enumerate(products) if p in index and types[i] in _TYPE_ID]
    items = np.asarray([index[products[i]] + 1 for i in keep], np.int64)
    kinds = np.asarray([_TYPE_ID[types[i]] for i in keep], np.int64)
    times = np.asarray(stamps, np.float64)[keep] if len(stamps) else np.full(len(keep), np.nan)
    return items, kinds, gap_buckets(times)


class SequenceModel(nn.Module):
    """The encoder: (B, L) item ids (column + 1; 0 pads, left), type ids, gap buckets ->
    (B, L, dim) outputs, causal (slot t reads slots <= t)."""

    def __init__(self, n_items: int, dim: int, length: int, layers: int, heads: int):
        super().__init__()
        self.length, self.heads = length, heads
        self.items = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.bias = nn.Embedding(n_items + 1, 1, padding_idx=0)
        self.types = nn.Embedding(len(_TYPE_ID) + 1, dim, padding_idx=0)
        self.gaps = nn.Embedding(GAP_BUCKETS, dim, padding_idx=0)
        self.slots = nn.Embedding(length, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        nn.init.zeros_(self.bias.weight)

    def forward(self, items: torch.Tensor, types: torch.Tensor, gaps: torch.Tensor
                ) -> torch.Tensor:
        b, n = items.shape
        x = (self.items(items) + self.types(types) + self.gaps(gaps)
             + self.slots.weight[self.length - n:][None])  # (B, L, dim)
        # causal, and never a padding key; each slot may always read itself (so a padding
        # slot's row is never all masked, which would give NaN)
        causal = torch.triu(torch.ones(n, n, dtype=torch.bool, device=items.device), 1)
        mask = causal[None] | (items == 0)[:, None, :]  # (B, L, L) True: not read
        mask = mask & ~torch.eye(n, dtype=torch.bool, device=items.device)[None]
        mask = mask.repeat_interleave(self.heads, dim=0)  # (B * heads, L, L)
        return self.norm(self.encoder(x, mask=mask))  # (B, L, dim)

    def table(self) -> torch.Tensor:
        """(N, dim + 1) the products' vectors with their bias as the last column."""
        return torch.cat([self.items.weight[1:], self.bias.weight[1:]], dim=1)


def _windows(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], length: int,
             targets: bool) -> tuple[np.ndarray, ...]:
    """Left-padded (W, length) items, types, gaps (and next-purchase targets, column; -1:
    none): with ``targets``, every window of ``length`` entries from each history's end that
    has a target; without, each history's last window."""
    out: list[list[np.ndarray]] = [[], [], [], []]
    for items, kinds, gaps in rows:
        if targets:
            nxt = np.full(len(items), -1, np.int64)
            following = -1
            for t in range(len(items) - 1, -1, -1):  # the next purchase after slot t
                nxt[t] = following
                if kinds[t] == _TYPE_ID["purchase"]:
                    following = items[t] - 1
            ends = range(len(items), 0, -length)[:MAX_WINDOWS]
        else:
            nxt, ends = None, [len(items)] if len(items) else []
        for end in ends:
            start = max(0, end - length)
            if nxt is not None and not (nxt[start:end] >= 0).any():
                continue
            pad = length - (end - start)
            for slot, values in enumerate((items, kinds, gaps) if nxt is None
                                          else (items, kinds, gaps, nxt)):
                fill = -1 if slot == 3 else 0
                out[slot].append(np.concatenate([np.full(pad, fill, np.int64),
                                                 values[start:end]]))
    width = 4 if targets else 3
    return tuple(np.stack(out[s]) if out[s] else np.zeros((0, length), np.int64)
                 for s in range(width))


@dataclass
class SequenceState:
    """A fitted sequence encoder, as the item side keeps (and pickles) it.

    Attributes:
        n_items, dim, length, layers, heads: the architecture.
        weights: the module's state dict as numpy arrays.
        report: what training did (windows, epochs, losses, seconds).
    """

    n_items: int
    dim: int
    length: int
    layers: int
    heads: int
    weights: dict[str, np.ndarray]
    report: dict[str, Any] = field(default_factory=dict)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def metrics(self) -> dict[str, float]:
        """Its training for MLflow: windows, users, seconds and the last epoch's loss."""
        report = self.report
        return {"sequence_windows": report.get("windows", 0),
                "sequence_users": report.get("users", 0),
                "sequence_seconds": report.get("seconds", 0.0),
                **({"sequence_loss": report["losses"][-1]} if report.get("losses") else {})}

    def module(self) -> SequenceModel:
        """The encoder in eval mode on the CPU (built once per process)."""
        built = self.__dict__.get("_module")
        if built is None:
            built = SequenceModel(self.n_items, self.dim, self.length, self.layers, self.heads)
            built.load_state_dict({k: torch.from_numpy(np.asarray(v))
                                   for k, v in self.weights.items()})
            built = self.__dict__["_module"] = built.eval().requires_grad_(False)
        return built

    def items_matrix(self) -> np.ndarray:
        """(N, dim + 1) float32: what a user's vector is multiplied with (the retrieval
        space ``sequence``)."""
        table = self.__dict__.get("_table")
        if table is None:
            table = self.__dict__["_table"] = np.ascontiguousarray(
                self.module().table().numpy(), dtype=np.float32)
        return table

    def encode(self, products: Sequence[Sequence[str]], types: Sequence[Sequence[str]],
               stamps: Sequence[np.ndarray], index: Mapping[str, int]
               ) -> list[np.ndarray | None]:
        """Per history, the user's (dim + 1,) vector (the last entry 1, for the bias), None
        where the history has no catalogue product."""
        rows = [entries(p, t, s, index) for p, t, s in zip(products, types, stamps,
                                                             strict=True)]
        have = [r for r, row in enumerate(rows) if len(row[0])]
        out: list[np.ndarray | None] = [None] * len(rows)
        if not have:
            return out
        items, kinds, gaps = _windows([rows[r] for r in have], self.length, targets=False)
        module = self.module()
        vectors = []
        with torch.inference_mode():
            for start in range(0, len(items), ENCODE_BATCH):
                part = slice(start, start + ENCODE_BATCH)
                hidden = module(torch.from_numpy(items[part]), torch.from_numpy(kinds[part]),
                                torch.from_numpy(gaps[part]))[:, -1]  # (b, dim)
                vectors.append(hidden.float().numpy())
        encoded = np.concatenate(vectors)
        ones = np.ones((len(encoded), 1), np.float32)
        for r, vector in zip(have, np.hstack([encoded, ones]).astype(np.float32), strict=True):
            out[r] = vector
        return out


def _initial_items(text_vectors: np.ndarray | None, n: int, dim: int,
                   rng: np.random.Generator) -> np.ndarray:
    """(N, dim) starting product vectors: the text vectors' first ``dim`` principal
    components (scaled to a small norm), random where there is no text."""
    if text_vectors is None or text_vectors.shape[1] < dim or n < dim:
        return rng.normal(0.0, 0.05, (n, dim)).astype(np.float32)
    centred = text_vectors.astype(np.float64) - text_vectors.mean(axis=0)
    sample = centred[rng.permutation(n)[:20_000]]
    _, _, vt = np.linalg.svd(sample, full_matrices=False)
    projected = centred @ vt[:dim].T  # (N, dim)
    scale = 0.5 / max(float(np.sqrt((projected ** 2).sum(axis=1).mean())), 1e-9)
    return (projected * scale).astype(np.float32)


def fit_sequence(events: pd.DataFrame, product_ids: Sequence[str],
                 text_vectors: np.ndarray | None, config: Any,
                 device: torch.device | None = None) -> SequenceState | None:
    """Train the encoder on ``events`` (everything before a cut) over ``product_ids``.

    Args:
        events: contract events.
        product_ids: the catalogue (its columns).
        text_vectors: (N, H) the products' frozen text vectors (None: random start).
        config: a ``ScorerConfig`` (``sequence_*`` fields and ``seed``).
        device: where to train (default: CUDA when present, bf16 there).

    Returns:
        The fitted state, or None without any window that has a next purchase.
    """
    started = time.perf_counter()
    index = {p: i for i, p in enumerate(product_ids)}
    rng = np.random.default_rng(config.seed)
    buyers = events.loc[events["event_type"] == "purchase", "user_id"].dropna().unique()
    if len(buyers) > config.sequence_users:
        buyers = np.sort(rng.choice(buyers, config.sequence_users, replace=False))
    frame = recent_histories(events, list(buyers), HISTORY_LEN)
    rows = [entries(p, t, np.asarray(s, np.float64), index) for p, t, s in zip(
        frame["recent_product_ids"], frame["recent_event_types"], frame["recent_timestamps"],
        strict=True)]
    items, kinds, gaps, targets = _windows(rows, config.sequence_len, targets=True)
    if not len(items):
        return None
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(config.seed)
    n, dim = len(product_ids), config.sequence_dim
    model = SequenceModel(n, dim, config.sequence_len, config.sequence_layers,
                          config.sequence_heads)
    with torch.no_grad():
        model.items.weight[1:] = torch.from_numpy(_initial_items(text_vectors, n, dim, rng))
    model = model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.sequence_lr)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    data = [torch.from_numpy(a) for a in (items, kinds, gaps, targets)]
    negatives = min(config.sequence_negatives, n)
    losses, budget = [], config.sequence_steps
    for _epoch in range(config.sequence_epochs):
        if budget <= 0:
            break
        order = torch.from_numpy(rng.permutation(len(items)))
        total, steps = 0.0, 0
        for start in range(0, min(len(order), budget * BATCH), BATCH):
            pick = order[start:start + BATCH]
            batch = [d[pick].to(device) for d in data]
            with torch.autocast(device.type, dtype=autocast or torch.float32,
                                enabled=autocast is not None):
                hidden = model(*batch[:3])  # (B, L, dim)
            slots = torch.nonzero(batch[3].reshape(-1) >= 0).squeeze(1)  # (P,)
            if len(slots) > LOSS_SLOTS:
                slots = slots[torch.from_numpy(rng.permutation(len(slots))[:LOSS_SLOTS])
                              .to(device)]
            hidden = hidden.reshape(-1, dim)[slots].float()  # (P, dim)
            target = batch[3].reshape(-1)[slots]  # (P,)
            if negatives < n:
                drawn = torch.from_numpy(rng.integers(0, n, negatives)).to(device)
                pool = torch.unique(torch.cat([target, drawn]))  # sorted
            else:
                pool = torch.arange(n, device=device)
            table = model.table()[pool]  # (K, dim + 1)
            logits = hidden @ table[:, :-1].T + table[:, -1]  # (P, K)
            loss = nn.functional.cross_entropy(logits, torch.searchsorted(pool, target))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, steps = total + loss.item(), steps + 1
        losses.append(round(total / max(steps, 1), 4))
        budget -= steps
    model = model.cpu().eval()
    weights = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    report = {"windows": int(len(items)), "users": int(len(rows)), "epochs": len(losses),
              "losses": losses, "seconds": round(time.perf_counter() - started, 1)}
    log.info("sequence encoder: %s", report)
    return SequenceState(n, dim, config.sequence_len, config.sequence_layers,
                         config.sequence_heads, weights, report)
