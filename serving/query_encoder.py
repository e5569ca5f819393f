"""The text encoder for /search queries: one short text per request, on the serving CPU.

A MiniLM forward pass for one query is ~1,000 small torch operations. Run eagerly, each of
them takes the GIL back from the event loop, and the matrix products of a 5-15-token query
run far below the CPU's speed in fp32. The encoder is therefore traced once per process
into a frozen TorchScript graph (the whole pass, mean pooling included, runs without the
GIL) and, where the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), in bfloat16.
On this project's 2-core AMD EPYC: 8.2-10.4 ms per query fp32 eager, 3.2-4.7 ms traced
bf16, cosine to the fp32 vectors >= 0.9999 (``benchmarks/serving.py`` quotes the effect).

The graph is checked against the eager fp32 encoder on texts of several lengths and batch
sizes when it is built; if tracing fails or any vector strays (cosine < ``MIN_COSINE``),
the eager encoder is used and the reason logged. ``SHOPREC_QUERY_GRAPH``: ``auto``
(default: traced, in the dtype the catalogue texts are encoded in: bf16 where native),
``fp32`` (traced fp32), ``eager`` (plain torch).
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from types import SimpleNamespace
from typing import Any

import numpy as np

from serving.cache import LRU

log = logging.getLogger(__name__)

MODES = ("auto", "fp32", "eager")
MIN_COSINE = 0.999
# Texts the traced graph is checked on: one to ~30 tokens, alone and padded in a batch.
_CHECK_TEXTS = (
    "mug",
    "red ceramic mug",
    "vintage christmas paper chain kit with heart t-light holder and jumbo lunch bag",
    " ".join(["white hanging heart t-light holder"] * 6),
)


def graph_mode() -> str:
    mode = os.environ.get("SHOPREC_QUERY_GRAPH", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"SHOPREC_QUERY_GRAPH={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def _pooled_module(model: Any) -> Any:
    """``model`` with mean pooling and L2 normalisation: (ids, mask) -> (B, H) fp32."""
    import torch

    from training.text import mean_pool

    class Pooled(torch.nn.Module):
        def __init__(self, transformer: Any) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            hidden = self.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
            return mean_pool(hidden, mask)  # (B, H) fp32 unit rows

    return Pooled(model).eval()


def build_forward(encoder: Any, mode: str) -> tuple[Any, str]:
    """The fastest checked forward pass for ``encoder`` (a ``training.text.TextEncoder``)
    under ``mode``, and a word for what it is ("traced-bf16", "traced-fp32", "eager")."""
    import copy

    import torch

    eager = _pooled_module(encoder.model)
    if mode == "eager":
        return eager, "eager"
    # "auto": the dtype the catalogue's texts are encoded in (``training.config.text_dtype``)
    dtype = (encoder.autocast or torch.float32) if mode == "auto" else torch.float32
    kind = f"traced-{'bf16' if dtype == torch.bfloat16 else 'fp32'}"
    try:
        model = copy.deepcopy(encoder.model).to(dtype).eval()
        example = encoder.tokenize_trimmed([_CHECK_TEXTS[2]])
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about the model's shape checks
            traced = torch.jit.trace(_pooled_module(model), example, strict=False)
            graph = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
            worst = 1.0
            for batch in ([[t] for t in _CHECK_TEXTS] + [list(_CHECK_TEXTS)]):
                ids, mask = encoder.tokenize_trimmed(batch)
                cosine = (graph(ids, mask) * eager(ids, mask)).sum(-1)  # (B,)
                worst = min(worst, float(cosine.min()))
    except Exception as exc:  # noqa: BLE001 - any tracing failure: the eager path still works
        log.warning("query encoder not traced (%s: %s); encoding eagerly",
                    type(exc).__name__, str(exc)[:300])
        return eager, "eager"
    if not worst >= MIN_COSINE:
        log.warning("traced %s query encoder strays from fp32 (cosine %.5f < %.3f); "
                    "encoding eagerly", kind, worst, MIN_COSINE)
        return eager, "eager"
    log.info("query encoder: %s (worst cosine to eager fp32 %.5f)", kind, worst)
    return graph, kind


class QueryEncoder:
    """The shared (frozen) text encoder for search queries, loaded once per process.

    Shoppers repeat queries ("gift", "christmas"): the vectors of the last ``cache_size``
    distinct queries (whitespace-normalised) are kept (``SHOPREC_QUERY_CACHE``, default
    10,000 = about 15 MB of 384-float vectors; 0 disables it). ``encode_many`` encodes the
    queries it has not seen in one forward pass (``serving.runtime``'s ``QueryBatcher``
    gathers concurrent requests' queries for it): sixteen 13-token queries cost ~5x one.

    Args:
        config: the bundle's training config (its text encoder and token limit).
        cache_size: kept query vectors (None: ``SHOPREC_QUERY_CACHE``).
        mode: ``auto`` / ``fp32`` / ``eager`` (None: ``SHOPREC_QUERY_GRAPH``).
    """

    def __init__(self, config: Any, cache_size: int | None = None, mode: str | None = None):
        from training.text import TextEncoder

        self.encoder = TextEncoder(config.replace(device="cpu"), progress=False)
        self.forward, self.kind = build_forward(self.encoder, mode or graph_mode())
        if cache_size is None:
            cache_size = int(os.environ.get("SHOPREC_QUERY_CACHE", "10000"))
        self._cache = LRU(cache_size) if cache_size > 0 else None

    @staticmethod
    def normalise(text: str) -> str:
        return " ".join(text.split())

    def cached(self, text: str) -> np.ndarray | None:
        """The kept vector of ``text`` (None: not kept)."""
        return None if self._cache is None else self._cache.get(self.normalise(text))

    def encode(self, text: str) -> np.ndarray:
        """(H,) unit vector of ``text`` (read-only)."""
        return self.encode_many([text])[0]

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        """Unit vectors of ``texts`` (read-only; shared between requests through the cache),
        the ones not kept computed in one forward pass."""
        import torch

        keys = [self.normalise(t) for t in texts]
        out: dict[str, np.ndarray] = {}
        for key in dict.fromkeys(keys):
            hit = self._cache.get(key) if self._cache is not None else None
            if hit is not None:
                out[key] = hit
        missing = [key for key in dict.fromkeys(keys) if key not in out]
        if missing:
            ids, mask = self.encoder.tokenize_trimmed(missing)  # (B, T): padded to the longest
            with torch.inference_mode():
                vectors = self.forward(ids, mask).numpy()  # (B, H) unit rows
            for key, vector in zip(missing, vectors, strict=True):
                vector = np.array(vector, dtype=np.float32)
                vector.setflags(write=False)
                out[key] = vector
                if self._cache is not None:
                    self._cache.put(key, vector)
        return [out[key] for key in keys]

    def clear_cache(self) -> None:
        if self._cache is not None:
            self._cache.clear()

    def forget(self, texts: list[str]) -> None:
        """Drop these queries' kept vectors."""
        if self._cache is not None:
            for text in texts:
                self._cache.pop(self.normalise(text))

    def cache_info(self) -> Any:
        """(hits, misses, currsize) of the query cache; None when it is off."""
        if self._cache is None:
            return None
        return SimpleNamespace(hits=self._cache.hits, misses=self._cache.misses,
                               currsize=len(self._cache))


_QUERY_ENCODERS: dict[str, QueryEncoder] = {}
_QUERY_ENCODERS_LOCK = threading.Lock()


def shared_query_encoder(config: Any) -> QueryEncoder:
    """The process's query encoder for ``config``'s text encoder, loaded once and shared by
    every bundle that uses the same one (with its query cache: the same pretrained weights
    give the same query vectors, whichever model version asks). Loading it took 4 s of a
    100,000-product bundle's 10 s, with the longest pause of the serving thread (0.35 s)."""
    from training.text import encoder_identity

    key = f"{encoder_identity(config.replace(device='cpu'))}|{config.max_text_tokens}"
    with _QUERY_ENCODERS_LOCK:
        if key not in _QUERY_ENCODERS:
            _QUERY_ENCODERS[key] = QueryEncoder(config)
        return _QUERY_ENCODERS[key]
