"""Train the two-tower model: ``train(config, catalog, examples) -> TrainResult``.

Frozen text (``text_trainable_layers=0``, the default): product texts are embedded once by
the frozen encoder (cached), then the towers train with AdamW on the in-batch sampled
softmax (``training.loss``).

Fine-tuned text (``text_trainable_layers=N``): the catalogue is tokenized once per version
(Rust backend, ids cached on disk: ``training.text_cache``), the frozen embedding layer and
lower layers run once per catalogue (their hidden states are kept when they fit
``training.catalog_text.FROZEN_STATES_MAX_BYTES``, else recomputed per step without
gradients), and per step only the top N layers run, with
gradients, for the batch's targets and hard negatives. History products read the text
vectors of the encoder as it was at the start of the epoch (refreshed every epoch), which
keeps a step's encoder work to B (1 + K) texts instead of every product of every history.
Token ids are cut to each batch's longest text (padding changes no output). After
training, every product's text vector and item embedding are recomputed with the
fine-tuned encoder. CPU cost, measured with MiniLM on one core (batch 256, 32 tokens,
2k examples of real shop titles): frozen ~9,500 examples/s, one fine-tuned layer ~490,
two ~250, plus a one-off pass of the frozen layers over the catalogue; fine-tune on a GPU.

User features: when the examples carry Feast's ``user_profile`` columns (as
``features.store.historical_user_history`` and
``training.event_examples.examples_from_events`` give them), each example's profile, as it
stood at its time, is fed to the user tower; without them every profile is "unknown"
(``training.user_features``).

Options: K same-category hard negatives per example (``hard_negatives``), early stopping
on a validation set's Recall@K (``validation``), warm start from a checkpoint
(``warm_start``), and DistributedDataParallel when a process group is initialised (see
``training.distributed``): each rank trains on a disjoint shard of every epoch's batches.

This module is the run and its loop; the examples' preparation is ``training.examples``',
the batches' (hard negatives included) ``training.batches``', the fine-tuned catalogue
text's ``training.catalog_text``'.

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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from features.contract import product_text
from training.batches import CategoryNegatives, epoch_batches, make_batch
from training.catalog_text import CatalogText
from training.checkpoint import warm_start as init_from_checkpoint
from training.config import TINY, TrainConfig, autocast_dtype, resolve_device, step_batch_size
from training.embeddings import ItemFeatures, encode_items
from training.examples import prepare_examples, unique_products
from training.loss import mixed_sampling_log_q, sampled_softmax_loss, sampling_log_q
from training.text import TrainableTextEncoder
from training.text_cache import embed_texts, token_ids
from training.towers import TwoTowerModel
from training.user_features import country_vocabulary

log = logging.getLogger(__name__)


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

    def sample(self, max_users: int, seed: int) -> ValidationSet:
        """At most ``max_users`` of the users with a truth (a uniform sample, the same for
        the same users and seed; 0: all)."""
        users = sample_users(self.truth, max_users, seed)
        if len(users) == len(self.truth):
            return self
        keep = set(users)
        features = self.user_features
        if features is not None:
            ids = features["user_id"] if "user_id" in features.columns else features.index
            features = features[np.isin(np.asarray(ids, dtype=object), users)]
        return ValidationSet(
            histories={u: h for u, h in self.histories.items() if u in keep},
            truth={u: self.truth[u] for u in users},
            event_types=(None if self.event_types is None else
                         {u: t for u, t in self.event_types.items() if u in keep}),
            exclude_history=self.exclude_history, user_features=features)


def sample_users(users: Iterable[str], max_users: int, seed: int) -> list[str]:
    """At most ``max_users`` of ``users``, sorted: a uniform sample seeded by ``seed`` that
    depends only on the set of users (0: all of them)."""
    ordered = sorted(set(users))
    if not max_users or len(ordered) <= max_users:
        return ordered
    rng = np.random.default_rng(seed)
    return sorted(ordered[i] for i in rng.choice(len(ordered), max_users, replace=False))


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
            the ``user_profile`` columns (``features.user_state.PROFILE_COLUMNS``, as of
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
    examples = within_budget(examples, config.max_examples)
    if validation is not None:
        validation = validation.sample(config.validation_max_users, config.seed)
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


def within_budget(examples: pd.DataFrame, max_examples: int,
                  column: str = "event_timestamp") -> pd.DataFrame:
    """The most recent ``max_examples`` rows by ``column`` (ties: the later row), in their
    original order; all of them when ``max_examples`` is 0 or not exceeded."""
    if not max_examples or len(examples) <= max_examples:
        return examples
    stamps = pd.to_datetime(examples[column], utc=True).to_numpy()
    keep = np.sort(np.argsort(stamps, kind="stable")[-max_examples:])
    log.info("training budget: the %d most recent of %d examples", max_examples, len(examples))
    return examples.iloc[keep]


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
    fit_started = time.perf_counter()
    for epoch in bar:
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(targets), generator=shuffle)
        batches = epoch_batches(order, step, rank, world)
        table = text.vectors(encoder) if text is not None and encoder is not None else None
        total = torch.zeros((), device=device)
        seen = torch.zeros((), device=device)
        spent = False
        for b, idx in enumerate(tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}",
                                     unit="batch", disable=not progress, leave=False)):
            if b and b % BUDGET_CHECK_BATCHES == 0 and _over_budget(config, fit_started,
                                                                    world):
                spent = True  # the budget ran out mid-epoch: this epoch ends here
                break
            hard, rate = (negatives.sample(targets_t[idx], config.hard_negatives, sampler)
                          if negatives is not None else (None, None))
            batch, rows, hard_rows = make_batch(idx, targets_t, history_t, events_t, items,
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
            "examples": float(seen),
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
        if not spent and not stop and epoch + 1 < config.epochs:
            spent = _over_budget(config, fit_started, world)
        if spent:
            log.info("training budget: %.1f min spent, stopping in epoch %d of %d after %d "
                     "of %d examples", (time.perf_counter() - fit_started) / 60, epoch + 1,
                     config.epochs, int(seen), len(targets))
            break
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


# The minutes budget is checked every this many batches (with several processes, each check
# is one all-reduce, so every rank stops at the same batch).
BUDGET_CHECK_BATCHES = 8


def _over_budget(config: TrainConfig, started: float, world: int) -> bool:
    """Whether the minutes budget (``config.max_minutes``; 0: none) is spent, as every rank
    agrees."""
    if not config.max_minutes:
        return False
    over = torch.tensor(float(time.perf_counter() - started > config.max_minutes * 60))
    if world > 1:
        dist.all_reduce(over, op=dist.ReduceOp.MAX)
    return bool(over.item())


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
    from training.metrics import evaluate_model

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
