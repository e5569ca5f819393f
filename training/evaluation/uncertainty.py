"""How sure a figure is: per-user metric values, bootstrap confidence intervals, paired
differences between two methods measured on the same users.

A protocol figure is a mean over test users, so it carries sampling noise: two trainings of
the same model with different seeds differ by it, and so would the gate's verdict if it
compared point estimates. Every interval here is a percentile bootstrap over users with a
fixed seed, so a rerun gives the same figures, and a paired difference resamples the *same*
users for both methods (their per-user differences), which is far tighter than two separate
intervals: most of the noise is in which users happen to be in the test window, and both
methods see the same ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_SEED = 20_261_206
CHUNK = 64  # resamples drawn at once: (CHUNK, n_users) indices in memory


def per_user_accuracy(ranked: Sequence[Sequence[str]], truth: Sequence[set[str]],
                      ks: Iterable[int]) -> dict[str, np.ndarray]:
    """Recall@K and binary NDCG@K of each user with a non-empty truth.

    Their means are exactly ``training.metrics.recall_at_k`` and ``ndcg_at_k`` (a repeated
    hit counts once; the ideal list has min(K, |truth|) hits at the top).

    Args:
        ranked: per user, product ids best first.
        truth: per user, the relevant product ids (users with an empty truth are skipped).
        ks: cut-offs.

    Returns:
        ``{"recall_at_<k>": (U,), "ndcg_at_<k>": (U,)}``, U = users with a truth, in order.
    """
    ks = tuple(ks)
    if len(ranked) != len(truth):
        raise ValueError(f"{len(ranked)} rankings for {len(truth)} truth sets")
    pairs = [(r, set(t)) for r, t in zip(ranked, truth, strict=True) if t]
    kmax = max(ks)
    discount = 1.0 / np.log2(np.arange(2, kmax + 2))  # (kmax,)
    hits = np.zeros((len(pairs), kmax), dtype=np.float64)  # (U, kmax): first hits only
    sizes = np.zeros(len(pairs), dtype=np.int64)  # (U,)
    for u, (r, t) in enumerate(pairs):
        seen: set[str] = set()
        for rank, product in enumerate(r[:kmax]):
            if product in t and product not in seen:
                seen.add(product)
                hits[u, rank] = 1.0
        sizes[u] = len(t)
    out: dict[str, np.ndarray] = {}
    ideal_cum = np.cumsum(discount)  # (kmax,)
    for k in ks:
        found = hits[:, :k].sum(axis=1)  # (U,)
        out[f"recall_at_{k}"] = found / np.maximum(sizes, 1)
        ideal = ideal_cum[np.minimum(sizes, k) - 1] if len(sizes) else np.zeros(0)
        out[f"ndcg_at_{k}"] = (hits[:, :k] * discount[:k]).sum(axis=1) / ideal
    return out


def _resampled_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot,) means of ``values`` (U,) or of each column of ``values`` (U, M) ->
    (n_boot, M); the same user indices for every column."""
    rng = np.random.default_rng(seed)
    n = values.shape[0]
    out = []
    for start in range(0, n_boot, CHUNK):
        idx = rng.integers(0, n, size=(min(CHUNK, n_boot - start), n))  # (B, U)
        out.append(values[idx].mean(axis=1))
    return np.concatenate(out, axis=0)


def interval(values: np.ndarray | Sequence[float], confidence: float = 0.95,
             n_boot: int = 1000, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-user values.

    Returns:
        (low, high); (nan, nan) with no user, (v, v) with ``n_boot`` 0 or a single user.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    if n_boot <= 0 or x.size == 1:
        return float(x.mean()), float(x.mean())
    means = _resampled_means(x, n_boot, seed)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class PairedDifference:
    """Mean of (a - b) over the same users, with its bootstrap interval.

    Attributes:
        diff: mean(a) - mean(b).
        low: lower end of the two-sided ``confidence`` interval.
        high: upper end.
        n: users.
        confidence: the interval's level.
    """

    diff: float
    low: float
    high: float
    n: int
    confidence: float

    @property
    def holds(self) -> bool:
        """Whether a is better than b at this confidence: the whole interval is above 0."""
        return self.n > 0 and self.low > 0

    def describe(self) -> str:
        level = f"{self.confidence:.0%}"
        return (f"{self.diff:+.4f} ({level} CI [{self.low:+.4f}, {self.high:+.4f}] over "
                f"{self.n:,} users)")


def paired_difference(a: np.ndarray | Sequence[float], b: np.ndarray | Sequence[float],
                      confidence: float = 0.95, n_boot: int = 1000,
                      seed: int = BOOTSTRAP_SEED) -> PairedDifference:
    """The paired bootstrap of mean(a) - mean(b), a and b measured on the same users in the
    same order."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired values must have one shape: {x.shape} vs {y.shape}")
    d = x - y
    low, high = interval(d, confidence, n_boot, seed)
    return PairedDifference(diff=float(d.mean()) if d.size else math.nan, low=low, high=high,
                            n=int(d.size), confidence=confidence)
