"""Train the two-tower model: ``train(config, catalog, examples) -> TrainResult``.

Product texts are embedded once by the frozen text encoder (cached), then the towers are
trained with AdamW on the in-batch sampled softmax. Everything is seeded, and on the CPU
deterministic algorithms are enforced, so the same inputs give bit-identical weights. On
CUDA the run uses mixed precision (bf16 where supported, else fp16 with loss scaling).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from training.config import TrainConfig, autocast_dtype, resolve_device
from training.loss import sampled_softmax_loss, sampling_log_q
from training.text import embed_texts, product_text
from training.towers import (
    ItemFeatures,
    TwoTowerBatch,
    TwoTowerModel,
    encode_items,
    history_matrix,
)

log = logging.getLogger(__name__)

EXAMPLE_COLUMNS = (
    "user_id", "product_id", "event_timestamp", "recent_product_ids", "recent_event_types",
)


class NotEnoughData(ValueError):
    """Too few usable training examples (or products) to train a model."""


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        model: the trained model, in eval mode, on the training device.
        config: the configuration it was trained with.
        item_embeddings: (N, D) float32, unit rows, for the whole catalogue.
        product_ids: catalogue product ids (sorted, one per product), aligned with
            ``item_embeddings``.
        text_embeddings: (N, H) float32 frozen text vectors the item tower read.
        history: per-epoch metrics (``loss``, ``seconds``, ``examples_per_s``).
        n_examples: usable training examples.
        seconds: wall time of the whole call (text embedding included).
        device: the device it trained on, e.g. "cpu" or "cuda:0".
    """

    model: TwoTowerModel
    config: TrainConfig
    item_embeddings: np.ndarray
    product_ids: list[str]
    text_embeddings: np.ndarray
    history: list[dict[str, float]] = field(default_factory=list)
    n_examples: int = 0
    seconds: float = 0.0
    device: str = "cpu"

    @property
    def losses(self) -> list[float]:
        """Mean training loss of each epoch."""
        return [m["loss"] for m in self.history]

    @property
    def item_index(self) -> dict[str, int]:
        """product id -> row of ``item_embeddings``."""
        return {p: i for i, p in enumerate(self.product_ids)}


def train(
    config: TrainConfig,
    catalog: pd.DataFrame,
    examples: pd.DataFrame,
    *,
    cache_dir: os.PathLike[str] | str | None = None,
    progress: bool = True,
    on_epoch: Callable[[int, dict[str, float]], Any] | None = None,
) -> TrainResult:
    """Train a two-tower model on purchase/add-to-cart examples.

    Args:
        config: hyper-parameters.
        catalog: the product catalogue (contract columns; one row per product_id, the last
            row wins otherwise). Every product gets an embedding.
        examples: user_id, product_id (the target), event_timestamp, recent_product_ids
            (the user's previous products, most recent LAST; may be empty or None),
            recent_event_types (aligned with recent_product_ids, or None). Targets and
            history products missing from the catalogue are dropped.
        cache_dir: text-embedding cache folder (None: no cache).
        progress: show progress bars.
        on_epoch: called after each epoch as ``on_epoch(epoch, metrics)``, epoch from 0,
            e.g. to log to MLflow.

    Returns:
        The trained model and the catalogue's item embeddings.

    Raises:
        NotEnoughData: fewer than ``config.min_examples`` usable examples, or fewer than 2
            products.
    """
    started = time.perf_counter()
    device = resolve_device(config.device)
    catalog = unique_products(catalog)
    product_ids = catalog["product_id"].astype(str).tolist()
    item_index = {p: i for i, p in enumerate(product_ids)}
    targets, history, events = prepare_examples(examples, item_index, config.history_len)
    if len(product_ids) < 2:
        raise NotEnoughData(f"the catalogue has {len(product_ids)} product(s); need >= 2")
    if len(targets) < max(config.min_examples, 2):
        raise NotEnoughData(
            f"{len(targets)} usable training examples (of {len(examples)} rows; targets "
            f"outside the catalogue dropped); need >= {max(config.min_examples, 2)}"
        )

    text_embeddings = embed_texts(product_text(catalog), config, cache_dir, progress=progress)
    with _deterministic(device):
        _seed_everything(config.seed)
        model = TwoTowerModel.from_catalog(config, catalog, text_embeddings.shape[1]).to(device)
        features = ItemFeatures.from_catalog(catalog, text_embeddings)
        epochs = _fit(model, config, device, features, targets, history, events, progress,
                      on_epoch)
        item_embeddings = encode_items(model, features)
    seconds = time.perf_counter() - started
    log.info(
        "trained two-tower on %d examples, %d products, %d epochs on %s in %.1fs; loss %s",
        len(targets), len(product_ids), config.epochs, device, seconds,
        f"{epochs[-1]['loss']:.4f}" if epochs else "n/a",
    )
    return TrainResult(
        model=model.eval(),
        config=config,
        item_embeddings=item_embeddings,
        product_ids=product_ids,
        text_embeddings=text_embeddings,
        history=epochs,
        n_examples=len(targets),
        seconds=seconds,
        device=str(device),
    )


def unique_products(catalog: pd.DataFrame) -> pd.DataFrame:
    """One row per product_id (the latest ``updated_at`` when present, else the last row)."""
    if "updated_at" in catalog.columns:
        catalog = catalog.sort_values("updated_at", kind="stable")
    catalog = catalog.drop_duplicates("product_id", keep="last")
    return catalog.sort_values("product_id", kind="stable").reset_index(drop=True)


def prepare_examples(
    examples: pd.DataFrame, item_index: dict[str, int], history_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Turn example rows into index arrays, dropping targets outside the catalogue.

    Rows are put in a canonical order (timestamp, user, product) first, so the result does
    not depend on the order a feature store returned them in.

    Returns:
        targets (E,) int64 catalogue rows; history (E, L) int64 rows, -1 = padding, most
        recent first; events (E, L) int64 event type ids.
    """
    missing = {"product_id"} - set(examples.columns)
    if missing:
        raise ValueError(f"examples lack columns {sorted(missing)}")
    order = [c for c in ("event_timestamp", "user_id", "product_id") if c in examples.columns]
    examples = examples.sort_values(order, kind="stable") if order else examples
    rows = examples["product_id"].astype(str).map(item_index)
    keep = rows.notna().to_numpy()
    examples = examples[keep]
    targets = rows[keep].to_numpy(dtype=np.int64)
    n = len(examples)
    histories = (
        examples["recent_product_ids"].tolist()
        if "recent_product_ids" in examples.columns else [None] * n
    )
    types = (
        examples["recent_event_types"].tolist()
        if "recent_event_types" in examples.columns else None
    )
    history, events = history_matrix(histories, types, item_index, history_len)
    return targets, history, events


def _fit(
    model: TwoTowerModel,
    config: TrainConfig,
    device: torch.device,
    features: ItemFeatures,
    targets: np.ndarray,
    history: np.ndarray,
    events: np.ndarray,
    progress: bool,
    on_epoch: Callable[[int, dict[str, float]], Any] | None,
) -> list[dict[str, float]]:
    """The optimisation loop; returns per-epoch metrics."""
    items = features.tensors(model, device)
    log_q = (
        torch.from_numpy(sampling_log_q(targets, len(features.product_ids))).to(device)
        if config.logq_correction else None
    )
    amp = autocast_dtype(device, config.precision)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    targets_t = torch.from_numpy(targets)  # (E,)
    history_t = torch.from_numpy(history)  # (E, L)
    events_t = torch.from_numpy(events)  # (E, L)
    shuffle = torch.Generator().manual_seed(config.seed)
    metrics: list[dict[str, float]] = []
    for epoch in range(config.epochs):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(targets), generator=shuffle)
        batches = list(order.split(config.batch_size))
        if len(batches) > 1 and len(batches[-1]) < 2:  # a batch of one has no negatives
            batches[-2] = torch.cat(batches[-2:])
            batches.pop()
        total = torch.zeros((), device=device)
        for idx in tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch",
                        disable=not progress, leave=False):
            batch, rows = _make_batch(idx, targets_t, history_t, events_t, items, device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                users, targets_emb = model(batch)  # (B, D), (B, D)
            loss = sampled_softmax_loss(
                users.float(), targets_emb.float(), rows,
                log_q[rows] if log_q is not None else None, config.temperature,
            )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += loss.detach() * len(idx)
        seconds = time.perf_counter() - t0
        metrics.append({
            "loss": float(total) / len(targets),
            "seconds": seconds,
            "examples_per_s": len(targets) / max(seconds, 1e-9),
        })
        if on_epoch is not None:
            on_epoch(epoch, dict(metrics[-1]))
    model.eval()
    return metrics


def _make_batch(
    idx: torch.Tensor,
    targets: torch.Tensor,
    history: torch.Tensor,
    events: torch.Tensor,
    items: dict[str, torch.Tensor],
    device: torch.device,
) -> tuple[TwoTowerBatch, torch.Tensor]:
    """A batch whose distinct products (targets and histories) go through the item tower once.

    Returns:
        The batch, and the (B,) catalogue rows of its targets (on ``device``).
    """
    rows = targets[idx]  # (B,)
    hist = history[idx]  # (B, L)
    mask = hist >= 0  # (B, L); histories are left-aligned (most recent first)
    longest = int(mask.sum(dim=1).max()) if len(idx) else 0
    hist, mask = hist[:, :longest], mask[:, :longest]  # (B, L')
    ev = events[idx][:, :longest]  # (B, L')
    distinct, inverse = torch.unique(torch.cat([rows, hist[mask]]), return_inverse=True)  # (M,)
    local_history = torch.full_like(hist, -1)  # (B, L')
    local_history[mask] = inverse[len(rows):]
    on = distinct.to(device)
    batch: TwoTowerBatch = {
        "item_text": items["text"][on],  # (M, H)
        "item_category": items["category"][on],  # (M,)
        "item_brand": items["brand"][on],  # (M,)
        "item_price": items["price"][on],  # (M,)
        "target": inverse[: len(rows)].to(device),  # (B,)
        "history": local_history.to(device),  # (B, L')
        "history_mask": mask.to(device),  # (B, L')
        "history_event": ev.to(device),  # (B, L')
    }
    return batch, rows.to(device)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic kernels while training, restored afterwards.

    Enforced on the CPU (free there). On CUDA only when CUBLAS_WORKSPACE_CONFIG is set,
    which cuBLAS needs for reproducible matmuls; otherwise GPU runs trade bit-exactness
    for speed.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    enable = device.type == "cpu" or bool(os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    if enable:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn_only)
