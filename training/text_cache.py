"""The on-disk caches of catalogue text: frozen text vectors and token ids.

Embedding or tokenizing a catalogue of real size takes minutes, and most of it is the same
from one training run to the next, so both are cached under a cache folder:

- ``embed_texts`` keeps one vector per distinct text, keyed by sha256(encoder identity,
  max tokens, text), so re-embedding an unchanged catalogue computes nothing. The store is
  a set of append-only shards (``.npz``, written atomically), which keeps concurrent
  writers safe: the worst case is a text computed twice.
- ``token_ids`` keeps one file of int32 ids per (tokenizer, catalogue version), which the
  fine-tuned text encoder reads instead of tokenizing again.

Kept apart from the encoders themselves (``training.text``), which know nothing of files.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from training.config import TrainConfig, resolve_device
from training.text import TextEncoder, encode_tokens, encoder_dim, encoder_identity, one_ahead

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# Texts per Rust ``encode_batch`` call when tokenizing a catalogue (bounds memory).
TOKENIZE_CHUNK = 65536
# Merge the cache's shards into one once there are more than this many.
MAX_CACHE_SHARDS = 32


def token_ids(
    texts: Sequence[str],
    tokenizer: Tokenizer,
    cache_dir: os.PathLike[str] | str | None = None,
    *,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize a whole catalogue's texts once, reusing the ids cached for the same texts.

    The cache holds one file per (tokenizer, texts) pair: ``<cache_dir>/tokens/<key>.npz``
    with key sha256(tokenizer JSON (vocabulary, truncation and padding included), every
    text), so an unchanged catalogue version loads its ids instead of tokenizing. Chunks are
    tokenized one ahead in a worker thread (the Rust call releases the GIL) while the
    previous chunk's ids are copied into numpy.

    Args:
        texts: e.g. ``product_text(catalog)``.
        tokenizer: from ``training.text.load_tokenizer`` (padding to a fixed length enabled).
        cache_dir: cache folder; None disables caching.
        progress: show a tqdm bar.

    Returns:
        ids (N, T) int32 and attention mask (N, T) int32.
    """
    texts = list(texts)
    target = None
    if cache_dir is not None:
        digest = hashlib.sha256(tokenizer.to_str().encode())
        for text in texts:
            raw = text.encode()
            digest.update(len(raw).to_bytes(8, "little") + raw)
        target = Path(cache_dir) / "tokens" / f"{digest.hexdigest()[:32]}.npz"
        with contextlib.suppress(FileNotFoundError, OSError, ValueError, KeyError):
            with np.load(target, allow_pickle=False) as data:
                return data["ids"], data["mask"]
    chunks = [texts[i : i + TOKENIZE_CHUNK] for i in range(0, len(texts), TOKENIZE_CHUNK)]
    parts = []
    with tqdm(total=len(texts), desc="tokenize", unit="text", disable=not progress) as bar:
        for encodings in one_ahead(tokenizer.encode_batch, chunks):
            parts.append((np.array([e.ids for e in encodings], dtype=np.int32),
                          np.array([e.attention_mask for e in encodings], dtype=np.int32)))
            bar.update(len(encodings))
    if parts:
        ids, mask = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    else:
        ids, mask = encode_tokens(tokenizer, [])
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        _atomic_savez(target, ids=ids, mask=mask)
    return ids, mask


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
    return _embed(texts, config, cache_dir, progress=progress, encoder=encoder)[0]


def fill_text_cache(texts: Sequence[str], config: TrainConfig, cache_dir: Path | str, *,
                    progress: bool = True) -> int:
    """Encode into the cache the ``texts`` not there yet; returns how many of ``texts``
    (counting repeats) were missing."""
    return _embed(texts, config, cache_dir, progress=progress)[1]


def _embed(texts: Sequence[str], config: TrainConfig, cache_dir: Path | str | None, *,
           progress: bool, encoder: TextEncoder | None = None) -> tuple[np.ndarray, int]:
    """``embed_texts``, and how many of the texts were not cached."""
    texts = list(texts)
    device = encoder.device if encoder is not None else resolve_device(config.device)
    identity = encoder.identity if encoder is not None else encoder_identity(config, device)
    keys = [text_key(identity, config.max_text_tokens, t) for t in texts]
    store = _ShardStore(Path(cache_dir), identity) if cache_dir is not None else None
    known = store.load(set(keys)) if store is not None else {}
    uncached = sum(key not in known for key in keys)

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
        return np.zeros((0, dim), dtype=np.float32), 0
    return np.stack([known[k] for k in keys]).astype(np.float32, copy=False), uncached


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
        _atomic_savez(target, keys=np.array(keys, dtype="S64"),
                      vectors=np.asarray(vectors, dtype=np.float32))


def _atomic_savez(target: Path, **arrays: np.ndarray) -> None:
    """``np.savez`` to a temporary file, then rename: readers see the whole file or none."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
