"""The ranking stage's richer features of one user's candidates (``CONTEXT_NAMES``).

What a user's own history says about each candidate beyond the purchase facts: how often it
appears at all and in carts or purchases, how much of the history is in its category, its
price against what the user usually pays, whether its repurchase cycle has come round, its
co-occurrence with the last basket, and each candidate source's rank among the candidates.
Computed per request from the history (``UserView``) and the item side's facts; an item side
fitted before these facts existed gives zeros where it lacks them.
"""

from __future__ import annotations

import numpy as np

from training.ranking.histories import UserView
from training.ranking.items import ItemState


def _counts(values: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(C,) how many times each of ``cols`` occurs in ``values``."""
    if not len(values):
        return np.zeros(len(cols), np.float32)
    uniq, counts = np.unique(values, return_counts=True)
    at = np.searchsorted(uniq, cols).clip(max=len(uniq) - 1)
    return np.where(uniq[at] == cols, counts[at], 0).astype(np.float32)


def _ranks(scores: np.ndarray) -> np.ndarray:
    """(C,) 1 / log2(2 + rank) of each score among its row, best first (0: no signal)."""
    if not len(scores) or np.ptp(scores) == 0:
        return np.zeros(len(scores), np.float32)
    rank = np.empty(len(scores), np.int64)
    rank[np.argsort(-scores, kind="stable")] = np.arange(len(scores))
    return (1.0 / np.log2(2.0 + rank)).astype(np.float32)


def last_basket(view: UserView, cols: np.ndarray, state: ItemState) -> np.ndarray:
    """(C,) co-occurrence of each candidate with the products of the last purchase."""
    times = view.buy_times
    if not len(view.buy_cols) or np.isnan(times).all():
        return np.zeros(len(cols), np.float32)
    basket = np.unique(view.buy_cols[times == np.nanmax(times)])
    rows = state.neighbours[basket]  # (b, N) sparse
    if not rows.nnz:
        return np.zeros(len(cols), np.float32)
    uniq, inverse = np.unique(rows.indices, return_inverse=True)
    sums = np.bincount(inverse, weights=rows.data)
    at = np.searchsorted(uniq, cols).clip(max=len(uniq) - 1)
    return np.where(uniq[at] == cols, sums[at], 0.0).astype(np.float32)


def context_features(view: UserView, cols: np.ndarray, now: float, state: ItemState,
                     sources: np.ndarray, count: np.ndarray, age: np.ndarray
                     ) -> list[np.ndarray]:
    """The ``CONTEXT_NAMES`` features of one user's candidates, each (C,) float32.

    Args:
        view: the user's view.
        cols: the candidates' catalogue columns.
        now: epoch seconds of the moment of scoring.
        state: the item side.
        sources: (S, C) the candidate sources' scores (``SOURCE_NAMES`` order).
        count: (C,) the history's purchases of each candidate.
        age: (C,) days since the user last bought it (inf: never).
    """
    facts = state.facts
    c = len(cols)
    zeros = np.zeros(c, np.float32)
    known = view.known
    seen = np.log1p(_counts(known, cols))
    interacted = np.log1p(_counts(view.interactions, cols))
    category = facts.get("category")
    if category is not None and len(known):
        share = _counts(category[known], category[cols]) / np.float32(len(known))
    else:
        share = zeros
    log_price = facts.get("log_price")
    own = view.buy_cols if len(view.buy_cols) else known
    if log_price is not None and len(own):
        price = np.clip(log_price[cols] - np.median(log_price[own]), -3.0, 3.0)
    else:
        price = zeros
    cycle = facts.get("cycle_days")
    if cycle is not None:
        bought = count > 0
        with np.errstate(invalid="ignore", over="ignore"):
            ratio = np.log((np.where(bought, age, 0.0) + 1.0) / (cycle[cols] + 1.0))
        due = np.where(bought, np.exp(-np.abs(ratio)), 0.0)
    else:
        due = zeros
    return [seen, interacted, share, price, due, last_basket(view, cols, state),
            *(_ranks(s) for s in sources)]
