"""Ranking metrics: Recall, binary NDCG, HitRate and coverage at K, top-k selection.

Used by training (the two-tower model's validation recall, the pair scorers' in-sample
validation) and by the evaluation protocol (``training.evaluation``), so both measure alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from training.embeddings import encode_users
from training.towers import TwoTowerModel
from training.user_features import align_to_users


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's ``k`` highest scores, best first (ties by column).

    Args:
        scores: (U, N).
        k: how many (capped at N).

    Returns:
        (U, min(k, N)) int64.
    """
    k = min(k, scores.shape[1])
    if k <= 0:
        return np.zeros((scores.shape[0], 0), dtype=np.int64)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (U, k) unordered
    part_scores = np.take_along_axis(scores, part, axis=1)  # (U, k)
    order = np.lexsort((part, -part_scores), axis=1)  # score desc, then column
    return np.take_along_axis(part, order, axis=1)  # (U, k)


def tuning_metrics(
    scores: np.ndarray, truth: np.ndarray, truth_sizes: np.ndarray, ks: Sequence[int] = (10, 50)
) -> dict[str, float]:
    """Mean Recall@K and binary NDCG@K of score matrices, vectorised for weight search.

    Args:
        scores: (U, N) blended scores (-inf = excluded).
        truth: (U, N) bool, relevant candidates.
        truth_sizes: (U,) |truth| including products outside the candidates.
        ks: cut-offs.

    Returns:
        ``recall_at_<k>`` and ``ndcg_at_<k>`` means over users.
    """
    top = top_k(scores, max(ks))  # (U, K)
    hits = np.take_along_axis(truth, top, axis=1)  # (U, K)
    hits &= np.isfinite(np.take_along_axis(scores, top, axis=1))
    discount = 1.0 / np.log2(np.arange(2, hits.shape[1] + 2))  # (K,)
    out = {}
    for k in ks:
        out[f"recall_at_{k}"] = float((hits[:, :k].sum(axis=1) / truth_sizes).mean())
        dcg = (hits[:, :k] * discount[:k]).sum(axis=1)  # (U,)
        ideal = np.cumsum(discount[:k])[np.minimum(truth_sizes, k) - 1]  # (U,)
        out[f"ndcg_at_{k}"] = float((dcg / ideal).mean())
    return out


DEFAULT_KS = (10, 50)


def _pairs(
    ranked: Sequence[Sequence[str]], truth: Sequence[set[str]]
) -> list[tuple[Sequence[str], set[str]]]:
    if len(ranked) != len(truth):
        raise ValueError(f"{len(ranked)} rankings for {len(truth)} truth sets")
    return [(r, set(t)) for r, t in zip(ranked, truth, strict=True) if t]


def recall_at_k(
    ranked: Sequence[Sequence[str]], truth: Sequence[set[str]], ks: Iterable[int] = DEFAULT_KS
) -> dict[str, float]:
    """Mean Recall@K over users with a non-empty truth.

    Args:
        ranked: per user, product ids best first.
        truth: per user, the relevant product ids.
        ks: cut-offs.

    Returns:
        ``{"recall_at_<k>": value}``; 0.0 when no user has a truth.
    """
    pairs = _pairs(ranked, truth)
    return {
        f"recall_at_{k}": _mean(len(set(r[:k]) & t) / len(t) for r, t in pairs) for k in ks
    }


def hit_rate_at_k(
    ranked: Sequence[Sequence[str]], truth: Sequence[set[str]], ks: Iterable[int] = DEFAULT_KS
) -> dict[str, float]:
    """Share of users (with a non-empty truth) with at least one hit in their top K."""
    pairs = _pairs(ranked, truth)
    return {f"hit_rate_at_{k}": _mean(float(bool(set(r[:k]) & t)) for r, t in pairs) for k in ks}


def ndcg_at_k(
    ranked: Sequence[Sequence[str]], truth: Sequence[set[str]], ks: Iterable[int] = DEFAULT_KS
) -> dict[str, float]:
    """Mean binary NDCG@K; the ideal ranking has min(K, |truth|) hits at the top."""
    pairs = _pairs(ranked, truth)
    out = {}
    for k in ks:
        scores = []
        for r, t in pairs:
            seen: set[str] = set()
            dcg = 0.0
            for rank, product in enumerate(r[:k]):
                if product in t and product not in seen:  # a repeated hit counts once
                    seen.add(product)
                    dcg += 1.0 / math.log2(rank + 2)
            ideal = sum(1.0 / math.log2(rank + 2) for rank in range(min(k, len(t))))
            scores.append(dcg / ideal)
        out[f"ndcg_at_{k}"] = _mean(scores)
    return out


def coverage_at_k(
    ranked: Sequence[Sequence[str]], n_products: int, ks: Iterable[int] = DEFAULT_KS
) -> dict[str, float]:
    """Share of the ``n_products`` catalogue that appears in some user's top K."""
    return {
        f"coverage_at_{k}": len({p for r in ranked for p in r[:k]}) / max(n_products, 1)
        for k in ks
    }


def ranking_metrics(
    ranked: Sequence[Sequence[str]],
    truth: Sequence[set[str]],
    ks: Iterable[int] = DEFAULT_KS,
    n_products: int | None = None,
) -> dict[str, float]:
    """Recall, hit rate, NDCG (and coverage when ``n_products`` is given) at each K,
    plus ``n_users``, the users with a non-empty truth."""
    ks = tuple(ks)
    out = {
        **recall_at_k(ranked, truth, ks),
        **hit_rate_at_k(ranked, truth, ks),
        **ndcg_at_k(ranked, truth, ks),
    }
    if n_products is not None:
        out.update(coverage_at_k(ranked, n_products, ks))
    out["n_users"] = float(sum(1 for t in truth if t))
    return out


def rank_with_model(
    model: TwoTowerModel,
    catalog: pd.DataFrame | None,
    item_embeddings: np.ndarray,
    product_ids: Sequence[str],
    histories: Mapping[str, Sequence[str] | None],
    event_types: Mapping[str, Sequence[str] | None] | None,
    users: Sequence[str],
    top: int,
    *,
    exclude_history: bool = False,
    batch_size: int = 1024,
    user_features: pd.DataFrame | None = None,
) -> tuple[list[list[str]], int]:
    """Rank candidate products for each user by user · item.

    Args:
        model: the trained model (its user tower pools over ``item_embeddings``).
        catalog: the catalogue to recommend from (products of ``product_ids`` outside it are
            not candidates); None: every product of ``product_ids``.
        item_embeddings: (N, D) from ``encode_items``.
        product_ids: ids aligned with ``item_embeddings``.
        histories: user -> products before the holdout, most recent LAST (missing = cold).
        event_types: user -> event type per history entry, or None.
        users: the users to rank for, in output order.
        top: length of each ranking.
        exclude_history: do not recommend products already in the user's history.
        batch_size: users scored at once.
        user_features: the users' ``user_profile`` columns, keyed by a ``user_id`` column
            (else by the index); missing users and columns are unknown; None: all unknown.

    Returns:
        (per user, the top product ids best first; the number of candidate products)
    """
    item_index = {p: i for i, p in enumerate(product_ids)}
    candidates = np.ones(len(product_ids), dtype=bool)
    if catalog is not None:
        candidates = np.isin(np.asarray(product_ids, dtype=object),
                             catalog["product_id"].astype(str).unique())
    user_histories = [histories.get(u) for u in users]
    user_types = [event_types.get(u) for u in users] if event_types is not None else None
    profiles = align_to_users(user_features, users) if user_features is not None else None
    user_emb = encode_users(model, user_histories, user_types, item_index, item_embeddings,
                            user_features=profiles)
    items = np.asarray(item_embeddings, dtype=np.float32)  # (N, D)
    ids = np.asarray(product_ids, dtype=object)
    top = min(top, int(candidates.sum()))
    ranked: list[list[str]] = []
    for start in range(0, len(users), batch_size):
        scores = user_emb[start : start + batch_size] @ items.T  # (b, N)
        scores[:, ~candidates] = -np.inf
        if exclude_history:
            for row, history in enumerate(user_histories[start : start + batch_size]):
                seen = [item_index[p] for p in (history or []) if p in item_index]
                scores[row, seen] = -np.inf
        ranked.extend(ids[top_k(scores, top)].tolist() if top > 0 else [[]] * len(scores))
    return ranked, int(candidates.sum())


def evaluate_model(
    model: TwoTowerModel,
    catalog: pd.DataFrame | None,
    item_embeddings: np.ndarray,
    product_ids: Sequence[str],
    histories: Mapping[str, Sequence[str] | None],
    event_types: Mapping[str, Sequence[str] | None] | None,
    truth: Mapping[str, set[str]],
    ks: Iterable[int] = DEFAULT_KS,
    *,
    exclude_history: bool = False,
    batch_size: int = 1024,
    user_features: pd.DataFrame | None = None,
) -> dict[str, float]:
    """Score every candidate product for each holdout user by user · item; rank; measure.

    Args: as ``rank_with_model`` (``user_features`` included); ``truth``: user -> products
    bought in the holdout (users with an empty set are skipped); ``ks``: cut-offs.

    Returns:
        ``ranking_metrics`` over the users, coverage relative to the candidates.
    """
    ks = tuple(ks)
    users = sorted(u for u, t in truth.items() if t)
    ranked, n_candidates = rank_with_model(
        model, catalog, item_embeddings, product_ids, histories, event_types, users, max(ks),
        exclude_history=exclude_history, batch_size=batch_size, user_features=user_features)
    return ranking_metrics(ranked, [truth[u] for u in users], ks, n_candidates)


def recall_curve(ranked: Sequence[Sequence[str]], truth: Sequence[set[str]],
                 max_k: int = 100) -> np.ndarray:
    """Recall@K for K = 1..max_k (one pass), averaged over users with a non-empty truth.

    Returns:
        (max_k,) float64; entry K-1 is Recall@K.
    """
    pairs = _pairs(ranked, truth)
    if not pairs:
        return np.zeros(max_k)
    hits = np.zeros((len(pairs), max_k))  # (U, K)
    for u, (r, t) in enumerate(pairs):
        for pos, product in enumerate(r[:max_k]):
            if product in t:
                hits[u, pos] = 1.0 / len(t)
    return hits.cumsum(axis=1).mean(axis=0)


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(np.mean(values)) if values else 0.0
