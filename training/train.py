"""Train the two-tower model: ``train(config, catalog, examples) -> TrainResult``.

Frozen text (``text_trainable_layers=0``, the default): product texts are embedded once by
the frozen encoder (cached), then the towers train with AdamW on the in-batch sampled
softmax (``training.loss``).

Fine-tuned text (``text_trainable_layers=N``): the catalogue is tokenized once per version
(Rust backend, ids cached on disk), the frozen embedding layer and lower layers run once
per catalogue (their hidden states are kept when they fit ``FROZEN_STATES_MAX_BYTES``,
else recomputed per step without gradients), and per step only the top N layers run, with
gradients, for the batch's targets and hard negatives. History products read the text
vectors of the encoder as it was at the start of the epoch (refreshed every epoch), which
keeps a step's encoder work to B (1 + K) texts instead of every product of every history.
Token ids are cut to each batch's longest text (padding changes no output). After
training, every product's text vector and item embedding are recomputed with the
fine-tuned encoder. CPU cost, measured with MiniLM on one core (batch 256, 32 tokens,
2k examples of real shop titles): frozen ~9,500 examples/s, one fine-tuned layer ~490,
two ~250, plus a one-off pass of the frozen layers over the catalogue; fine-tune on a GPU.

User features: when the examples carry Feast's ``user_profile`` columns (as
``features.store.historical_user_history`` and ``training.blend.examples_from_events`` give
them), each example's profile, as it stood at its time, is fed to the user tower; without
them every profile is "unknown" (``training.user_features``).

Options: K same-category hard negatives per example (``hard_negatives``), early stopping
on a validation set's Recall@K (``validation``), warm start from a checkpoint
(``warm_start``), and DistributedDataParallel when a process group is initialised (see
``training.distributed``): each rank trains on a disjoint shard of every epoch's batches.

Everything is seeded, and on the CPU deterministic algorithms are enforced, so the same
inputs give bit-identical weights. On CUDA the run uses mixed precision (bf16 where
supported, else fp16 with loss scaling), ``batch_size_cuda`` and pinned, non-blocking
host-to-device copies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from training.checkpoint import warm_start as init_from_checkpoint
from training.config import TINY, TrainConfig, autocast_dtype, resolve_device, step_batch_size
from training.loss import mixed_sampling_log_q, sampled_softmax_loss, sampling_log_q
from training.text import (
    TrainableTextEncoder,
    embed_texts,
    length_batches,
    product_text,
    token_ids,
    token_lengths,
)
from training.towers import (
    ItemFeatures,
    TwoTowerBatch,
    TwoTowerModel,
    encode_items,
    history_matrix,
)
from training.user_features import PROFILE_COLUMNS, country_vocabulary, has_profile

log = logging.getLogger(__name__)

EXAMPLE_COLUMNS = (
    "user_id", "product_id", "event_timestamp", "recent_product_ids", "recent_event_types",
)
# Keep the frozen layers' hidden states of the whole catalogue (N x T x H) up to this size;
# above it the frozen layers run again, without gradients, for each batch's texts.
FROZEN_STATES_MAX_BYTES = 2 * 2**30


class NotEnoughData(ValueError):
    """Too few usable training examples (or products) to train a model."""


@dataclass(frozen=True)
class ValidationSet:
    """Held-out users to pick the best epoch by (early stopping).

    Attributes:
        histories: user -> products before the holdout, most recent LAST (missing = cold).
        truth: user -> products bought in the holdout (users with none are skipped).
        event_types: user -> event type per history entry, or None.
        exclude_history: do not count products already in the user's history.
        user_features: the users' ``user_profile`` columns at the holdout cut, keyed by a
            ``user_id`` column (else by the index); missing users and columns are unknown;
            None: every profile unknown.
    """

    histories: Mapping[str, Sequence[str] | None]
    truth: Mapping[str, set[str]]
    event_types: Mapping[str, Sequence[str] | None] | None = None
    exclude_history: bool = False
    user_features: pd.DataFrame | None = None


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        model: the trained model (the best epoch's weights with a validation set), in eval
            mode, on the training device.
        config: the configuration it was trained with.
        item_embeddings: (N, D) float32, unit rows, for the whole catalogue.
        product_ids: catalogue product ids (sorted, one per product), aligned with
            ``item_embeddings``.
        text_embeddings: (N, H) float32 text vectors the item tower read (the fine-tuned
            encoder's when ``text_trainable_layers`` > 0).
        history: per-epoch metrics (``loss``, ``seconds``, ``examples_per_s``, and with a
            validation set ``val_recall_at_<K>``).
        n_examples: usable training examples.
        seconds: wall time of the whole call (text embedding included).
        device: the device it trained on, e.g. "cpu" or "cuda:0".
        best_epoch: with a validation set, the epoch (from 0) whose weights were kept.
        warm_start: with a warm start, what was loaded, mapped and skipped.
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
    best_epoch: int | None = None
    warm_start: dict[str, list[str]] | None = None

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
    validation: ValidationSet | None = None,
    warm_start: os.PathLike[str] | str | None = None,
) -> TrainResult:
    """Train a two-tower model on purchase/add-to-cart examples.

    Args:
        config: hyper-parameters.
        catalog: the product catalogue (contract columns; one row per product_id, the last
            row wins otherwise). Every product gets an embedding.
        examples: user_id, product_id (the target), event_timestamp, recent_product_ids
            (the user's previous products, most recent LAST; may be empty or None),
            recent_event_types (aligned with recent_product_ids, or None), and optionally
            the ``user_profile`` columns (``training.user_features.PROFILE_COLUMNS``, as of
            the example's time; absent or null = unknown), whose countries make the
            model's country vocabulary. Targets and history products missing from the
            catalogue are dropped.
        cache_dir: cache folder for text vectors and token ids (None: no cache).
        progress: show progress bars.
        on_epoch: called after each epoch as ``on_epoch(epoch, metrics)``, epoch from 0,
            e.g. to log to MLflow (validation recall included).
        validation: held-out users; after each epoch Recall@``config.early_stopping_k``
            is measured, the best epoch's weights kept, and training stops after
            ``config.patience`` epochs without improvement.
        warm_start: a checkpoint folder (``training.checkpoint``, e.g. the champion's) to
            initialise matching parameters from (``checkpoint.warm_start``).

    Returns:
        The trained model and the catalogue's item embeddings.

    Raises:
        NotEnoughData: fewer than ``config.min_examples`` usable examples, or fewer than 2
            products.
    """
    started = time.perf_counter()
    rank, world = _rank_and_world()
    device = _training_device(config)
    progress = progress and rank == 0
    catalog = unique_products(catalog)
    product_ids = catalog["product_id"].astype(str).tolist()
    item_index = {p: i for i, p in enumerate(product_ids)}
    targets, history, events, profiles = prepare_examples(examples, item_index,
                                                          config.history_len)
    if len(product_ids) < 2:
        raise NotEnoughData(f"the catalogue has {len(product_ids)} product(s); need >= 2")
    if len(targets) < max(config.min_examples, 2 * world):
        raise NotEnoughData(
            f"{len(targets)} usable training examples (of {len(examples)} rows; targets "
            f"outside the catalogue dropped); need >= {max(config.min_examples, 2 * world)}"
        )

    encoder: TrainableTextEncoder | None = None
    tokens: tuple[np.ndarray, np.ndarray] | None = None
    if config.text_trainable_layers > 0:
        if device.type == "cpu" and config.text_encoder != TINY:
            log.warning("fine-tuning %d layer(s) of the text encoder on the CPU: ~20x (one "
                        "layer) to ~40x (two) slower per example than frozen text; use a GPU "
                        "for real catalogues", config.text_trainable_layers)
        encoder = TrainableTextEncoder.from_config(config, progress=progress)
        tokens = token_ids(product_text(catalog), encoder.tokenizer, cache_dir,
                           progress=progress)
        text_embeddings = np.zeros((len(catalog), encoder.dim), np.float32)  # filled below
    else:
        text_embeddings = embed_texts(product_text(catalog), config, cache_dir,
                                      progress=progress)
    with _deterministic(device):
        _seed_everything(config.seed)
        model = TwoTowerModel.from_catalog(config, catalog, text_embeddings.shape[1],
                                           countries=country_vocabulary(profiles))
        if encoder is not None:
            model.attach_text_encoder(encoder)
        report = init_from_checkpoint(model, warm_start) if warm_start is not None else None
        model.to(device)
        amp = autocast_dtype(device, config.precision)
        text = None
        if encoder is not None and tokens is not None:
            text = CatalogText(encoder, tokens, device, amp, config.text_batch_size)
            text_embeddings = text.vectors(encoder).cpu().numpy()
        features = ItemFeatures.from_catalog(catalog, text_embeddings, tokens=tokens)
        inputs = model.user_inputs(profiles, len(targets)) if model.user_features else None
        epochs, best_epoch = _fit(model, config, device, features, targets, history, events,
                                  profiles=inputs, text=text, validation=validation,
                                  progress=progress, on_epoch=on_epoch)
        if text is not None and encoder is not None:
            text_embeddings = text.vectors(encoder).cpu().numpy()  # the fine-tuned encoder's
        item_embeddings = encode_items(model, features, text=torch.from_numpy(text_embeddings))
    seconds = time.perf_counter() - started
    log.info(
        "trained two-tower on %d examples, %d products, %d epochs on %s%s in %.1fs; loss %s",
        len(targets), len(product_ids), len(epochs), device,
        f" x{world} processes" if world > 1 else "", seconds,
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
        best_epoch=best_epoch,
        warm_start=report,
    )


def unique_products(catalog: pd.DataFrame) -> pd.DataFrame:
    """One row per product_id (the latest ``updated_at`` when present, else the last row)."""
    if "updated_at" in catalog.columns:
        catalog = catalog.sort_values("updated_at", kind="stable")
    catalog = catalog.drop_duplicates("product_id", keep="last")
    return catalog.sort_values("product_id", kind="stable").reset_index(drop=True)


def prepare_examples(
    examples: pd.DataFrame, item_index: dict[str, int], history_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, pd.DataFrame | None]:
    """Turn example rows into index arrays, dropping targets outside the catalogue.

    Rows are put in a canonical order (timestamp, user, product) first, so the result does
    not depend on the order a feature store returned them in.

    Returns:
        targets (E,) int64 catalogue rows; history (E, L) int64 rows, -1 = padding, most
        recent first; events (E, L) int64 event type ids; the kept rows' ``user_profile``
        columns (E rows, in that order), or None when the examples carry none.
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
    profiles = None
    if has_profile(examples):
        columns = [c for c in PROFILE_COLUMNS if c in examples.columns]
        profiles = examples[columns].reset_index(drop=True)
    return targets, history, events, profiles


class CatalogText:
    """The catalogue's text inputs while the text encoder is fine-tuned.

    Holds the token ids (N, T), the frozen layers' hidden states (N, T', H) when they fit
    ``FROZEN_STATES_MAX_BYTES`` (T' the longest text's tokens), and the current text
    vectors (N, H), recomputed lazily after the encoder changed (``mark_stale``). Batches
    are cut to their longest text (``token_lengths``).

    Args:
        encoder: the model's trainable text encoder (on ``device``).
        tokens: ids and attention mask, (N, T) int32 each.
        device: where everything lives.
        amp: autocast dtype (CUDA), or None.
        batch_size: texts per encoder forward pass.
    """

    def __init__(
        self,
        encoder: TrainableTextEncoder,
        tokens: tuple[np.ndarray, np.ndarray],
        device: torch.device,
        amp: torch.dtype | None,
        batch_size: int,
    ):
        self.lengths = token_lengths(torch.from_numpy(tokens[1]))  # (N,) on the CPU
        length = int(self.lengths.max()) if len(self.lengths) else 1
        self.ids = torch.from_numpy(tokens[0][:, :length]).to(device)  # (N, T') int32
        self.mask = torch.from_numpy(tokens[1][:, :length]).to(device)  # (N, T') int32
        self.device = device
        self.amp = amp
        self.batch_size = batch_size
        n = len(self.ids)
        dtype = amp or torch.float32
        size = n * length * encoder.dim * torch.finfo(dtype).bits // 8
        self.states: torch.Tensor | None = None
        if size <= FROZEN_STATES_MAX_BYTES:
            # Zeros past each text's end: padding, never attended to nor pooled.
            states = torch.zeros(n, length, encoder.dim, dtype=dtype, device=device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                for part, cut in length_batches(self.lengths, batch_size):
                    on = part.to(device)
                    states[on, :cut] = encoder.frozen_states(self.ids[on, :cut],
                                                             self.mask[on, :cut]).to(dtype)
            self.states = states  # (N, T', H)
        else:
            log.info("frozen text states of %d products would take %.1f GiB: recomputing "
                     "them per batch instead", n, size / 2**30)
        self._vectors: torch.Tensor | None = None

    def mark_stale(self) -> None:
        """The encoder changed: recompute the vectors when next asked."""
        self._vectors = None

    def vectors(self, encoder: TrainableTextEncoder) -> torch.Tensor:
        """Every product's text vector under the encoder as it is now: (N, H) float32."""
        if self._vectors is None:
            self._vectors = encoder.encode(self.ids, self.mask, states=self.states,
                                           batch_size=self.batch_size, autocast=self.amp)
        return self._vectors

    def inputs(self, rows: torch.Tensor, *, pin: bool = False) -> dict[str, torch.Tensor]:
        """The encoder inputs of catalogue ``rows`` (F,) on the CPU: mask and states (or
        ids), cut to the longest of these texts."""
        cut = int(self.lengths[rows].max())
        on = rows.pin_memory().to(self.device, non_blocking=True) if pin else rows.to(self.device)
        out = {"fresh_mask": self.mask[on, :cut]}  # (F, T'')
        if self.states is not None:
            out["fresh_states"] = self.states[on, :cut]  # (F, T'', H)
        else:
            out["fresh_ids"] = self.ids[on, :cut]  # (F, T'')
        return out


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
        self.category = torch.from_numpy(category_ids)  # (N,)

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


def _fit(
    model: TwoTowerModel,
    config: TrainConfig,
    device: torch.device,
    features: ItemFeatures,
    targets: np.ndarray,
    history: np.ndarray,
    events: np.ndarray,
    *,
    profiles: tuple[np.ndarray, np.ndarray] | None,
    text: CatalogText | None,
    validation: ValidationSet | None,
    progress: bool,
    on_epoch: Callable[[int, dict[str, float]], Any] | None,
) -> tuple[list[dict[str, float]], int | None]:
    """The optimisation loop.

    Args:
        profiles: every example's profile inputs, (E, P) numeric and (E,) country ids
            (``TwoTowerModel.user_inputs``), or None for a model without user features;
            the others as ``train``'s.

    Returns:
        Per-epoch metrics, and the best epoch with a validation set (its weights are then
        loaded back into ``model``).
    """
    rank, world = _rank_and_world()
    items = features.tensors(model, device)
    n_items = len(features.product_ids)
    log_q = (
        torch.from_numpy(sampling_log_q(targets, n_items)).to(device)
        if config.logq_correction else None
    )  # (N,)
    negatives = (CategoryNegatives(model.category_ids(features.category))
                 if config.hard_negatives > 0 else None)
    categories = items["category"]  # (N,) on device
    amp = autocast_dtype(device, config.precision)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    encoder = model.text_encoder
    encoder_params = {id(p) for p in encoder.parameters()} if encoder is not None else set()
    groups: list[dict[str, Any]] = [{"params": [p for p in model.parameters()
                          if p.requires_grad and id(p) not in encoder_params]}]
    if encoder is not None:
        groups.append({"params": [p for p in encoder.parameters() if p.requires_grad],
                       "lr": config.text_lr})
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    pin = device.type == "cuda"
    targets_t = torch.from_numpy(targets)  # (E,)
    history_t = torch.from_numpy(history)  # (E, L)
    events_t = torch.from_numpy(events)  # (E, L)
    profiles_t = ((torch.from_numpy(profiles[0]), torch.from_numpy(profiles[1]))
                  if profiles is not None else None)  # (E, P), (E,)
    shuffle = torch.Generator().manual_seed(config.seed)  # the same order on every rank
    sampler = torch.Generator().manual_seed(config.seed + 7919 * (rank + 1))
    step = step_batch_size(config, device)
    k_recall = config.early_stopping_k
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    since_best = 0
    metrics: list[dict[str, float]] = []
    bar = tqdm(range(config.epochs), desc="train", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(targets), generator=shuffle)
        batches = epoch_batches(order, step, rank, world)
        table = text.vectors(encoder) if text is not None and encoder is not None else None
        total = torch.zeros((), device=device)
        seen = torch.zeros((), device=device)
        for idx in tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch",
                        disable=not progress, leave=False):
            hard, rate = (negatives.sample(targets_t[idx], config.hard_negatives, sampler)
                          if negatives is not None else (None, None))
            batch, rows, hard_rows = _make_batch(idx, targets_t, history_t, events_t, items,
                                                 device, profiles=profiles_t, hard=hard,
                                                 text=text, table=table, pin=pin)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                users, candidates = net(batch)  # (B, D), (B, D) or (B, 1 + K, D)
            users = users.float()
            if hard_rows is None:
                loss = sampled_softmax_loss(
                    users, candidates.float(), rows,
                    log_q[rows] if log_q is not None else None, config.temperature,
                )
            else:
                col_q = hard_q = None
                if log_q is not None and rate is not None:
                    group = categories[rows]  # (B,)
                    same = (group.unsqueeze(0) == group.unsqueeze(1)) & (
                        rows.unsqueeze(0) != rows.unsqueeze(1))  # (B, B)
                    col_q, hard_q = mixed_sampling_log_q(
                        log_q[rows], log_q[hard_rows], same, rate.to(device))
                loss = sampled_softmax_loss(
                    users, candidates[:, 0].float(), rows, col_q, config.temperature,
                    hard_emb=candidates[:, 1:].float(), hard_ids=hard_rows, hard_log_q=hard_q,
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += loss.detach() * len(idx)
            seen += len(idx)
        if text is not None:
            text.mark_stale()
        if world > 1:
            dist.all_reduce(total)
            dist.all_reduce(seen)
        seconds = time.perf_counter() - t0
        epoch_metrics = {
            "loss": float(total) / max(float(seen), 1.0),
            "seconds": seconds,
            "examples_per_s": float(seen) / max(seconds, 1e-9),
        }
        stop = False
        if validation is not None:
            recall = _validation_recall(model, features, text, validation, k_recall, rank, world)
            epoch_metrics[f"val_recall_at_{k_recall}"] = recall
            if best is None or recall > best[0]:
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                best, since_best = (recall, epoch, state), 0
            else:
                since_best += 1
                stop = since_best >= config.patience
        metrics.append(epoch_metrics)
        bar.set_postfix({k: round(v, 4) for k, v in epoch_metrics.items()
                         if k == "loss" or k.startswith("val_")})
        if on_epoch is not None:
            on_epoch(epoch, dict(epoch_metrics))
        if stop:
            log.info("early stop after epoch %d: no better val recall@%d than %.4f (epoch "
                     "%d) for %d epochs", epoch, k_recall, best[0] if best else float("nan"),
                     best[1] if best else -1, config.patience)
            break
    bar.close()
    model.eval()
    if best is not None:
        model.load_state_dict(best[2])
        if text is not None:
            text.mark_stale()
    return metrics, best[1] if best is not None else None


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


def _validation_recall(
    model: TwoTowerModel,
    features: ItemFeatures,
    text: CatalogText | None,
    validation: ValidationSet,
    k: int,
    rank: int,
    world: int,
) -> float:
    """Recall@k of the model as it is now on the validation users (computed on rank 0)."""
    from training.evaluate import evaluate_model

    recall = [0.0]
    if rank == 0:
        vectors = (text.vectors(model.text_encoder)
                   if text is not None and model.text_encoder is not None else None)
        item_emb = encode_items(model, features, text=vectors)
        scores = evaluate_model(
            model, None, item_emb, features.product_ids, validation.histories,
            validation.event_types, validation.truth, ks=(k,),
            exclude_history=validation.exclude_history,
            user_features=validation.user_features,
        )
        recall = [float(scores[f"recall_at_{k}"])]
    if world > 1:  # one decision for every rank, or they would step out of lockstep
        dist.broadcast_object_list(recall, src=0)
    return recall[0]


def _make_batch(
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


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _training_device(config: TrainConfig) -> torch.device:
    """The config's device; under torchrun on CUDA, this process's own GPU (LOCAL_RANK)."""
    device = resolve_device(config.device)
    if device.type == "cuda" and device.index is None and _rank_and_world()[1] > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


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
