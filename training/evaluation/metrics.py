"""Per-setting metrics of the protocol: accuracy at K and fairness of exposure (Gini).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from training.data import SEGMENTS, Split
from training.metrics import DEFAULT_KS, coverage_at_k, hit_rate_at_k, ndcg_at_k, recall_at_k


def gini(counts: Sequence[float] | np.ndarray) -> float:
    """Gini coefficient of non-negative counts: 0 when even, (n-1)/n when one takes all.

    Args:
        counts: (n,) e.g. how often each candidate product was recommended (zeros included).

    Returns:
        G = sum_i (2i - n - 1) x_(i) / (n sum x), x sorted ascending, i from 1; 0.0 when
        every count is zero.
    """
    x = np.sort(np.asarray(counts, dtype=np.float64))  # (n,)
    n, total = len(x), x.sum()
    if n == 0 or total <= 0:
        return 0.0
    i = np.arange(1, n + 1)  # (n,)
    return float(((2 * i - n - 1) * x).sum() / (n * total))


def exposure_gini_at_k(
    ranked: Sequence[Sequence[str]], product_ids: Sequence[str], ks: Iterable[int] = DEFAULT_KS
) -> dict[str, float]:
    """Gini of how often each candidate appears in users' top K (``gini_at_<k>``)."""
    index = {p: i for i, p in enumerate(product_ids)}
    out = {}
    for k in ks:
        counts = np.zeros(len(product_ids), dtype=np.float64)  # (N,)
        for r in ranked:
            for p in r[:k]:
                if p in index:
                    counts[index[p]] += 1
        out[f"gini_at_{k}"] = gini(counts)
    return out


def accuracy_metrics(
    ranked: Sequence[Sequence[str]], truth: Sequence[set[str]], ks: Iterable[int]
) -> dict[str, float]:
    """Recall, NDCG and HitRate at each K, and ``n_users``."""
    ks = tuple(ks)
    return {**recall_at_k(ranked, truth, ks), **ndcg_at_k(ranked, truth, ks),
            **hit_rate_at_k(ranked, truth, ks), "n_users": float(sum(1 for t in truth if t))}


def setting_metrics(
    split: Split, setting: str, ranked: Mapping[str, list[str]], ks: Iterable[int] = DEFAULT_KS
) -> dict[str, dict[str, float]]:
    """Every metric of one method in one setting, overall and per segment.

    Args:
        split: the split.
        setting: "all" or "new".
        ranked: user -> ranking (every test user of the setting).
        ks: cut-offs.

    Returns:
        segment ("all", then ``SEGMENTS``) -> metric -> value.
    """
    ks = tuple(ks)
    users = split.users(setting)
    lists = [ranked[u] for u in users]
    truth = [split.truth[setting][u] for u in users]
    product_ids = split.train.product_ids
    out = {"all": {**accuracy_metrics(lists, truth, ks),
                   **coverage_at_k(lists, len(product_ids), ks),
                   **exposure_gini_at_k(lists, product_ids, ks)}}
    for segment in SEGMENTS:
        seg = split.segment_truth(setting, segment)
        seg_users = sorted(seg)
        out[segment] = accuracy_metrics([ranked[u] for u in seg_users],
                                        [seg[u] for u in seg_users], ks)
    return out
