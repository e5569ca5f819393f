"""Sums, means and lookups over sorted (user, day) keys: the point-in-time profile's windows
(``features.user_state.profiles_as_of``), each query answered with binary searches instead of
a pass over the user's events."""

from __future__ import annotations

import numpy as np
import pandas as pd


def window_sum(keys: np.ndarray, cumulative: np.ndarray, at: np.ndarray,
                days: int) -> np.ndarray:
    """Per query, the sum of the weights of entries with key in (at - days, at].

    Args:
        keys: (E,) sorted (user, day) keys.
        cumulative: (E + 1,) cumulative weights, starting at 0.
        at: (Q,) query keys.
        days: window length.
    """
    return (cumulative[np.searchsorted(keys, at, side="right")]
            - cumulative[np.searchsorted(keys, at - days, side="right")])


def window_mean(keys: np.ndarray, values: np.ndarray, at: np.ndarray,
                 days: int) -> np.ndarray:
    """Per query, the mean of the values of entries with key in (at - days, at], 0 without.

    Averaged by pandas' grouped mean over the entries in key order, as a per-user mean of
    one day's baskets is, so that a snapshot's value does not depend on the days around it
    (a running sum's differences would, in the last bits).

    Args:
        keys: (E,) sorted (user, day) keys.
        values: (E,) float64.
        at: (Q,) query keys.
        days: window length.

    Returns:
        (Q,) float64.
    """
    distinct, inverse = np.unique(at, return_inverse=True)  # (A,), (Q,)
    lo = np.searchsorted(keys, distinct - days, side="right")  # (A,)
    n = np.searchsorted(keys, distinct, side="right") - lo  # (A,) entries per window
    group = np.repeat(np.arange(len(distinct)), n)  # (sum n,)
    position = np.arange(len(group)) - np.repeat(np.cumsum(n) - n, n) + np.repeat(lo, n)
    means = pd.Series(values[position]).groupby(group).mean()
    return means.reindex(range(len(distinct)), fill_value=0.0).to_numpy(np.float64)[inverse]


def latest(keys: np.ndarray, at: np.ndarray, user: np.ndarray,
            span: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the position of the user's last entry with key <= the query key.

    Args:
        keys: (E,) sorted (user, day) keys.
        at: (Q,) query keys.
        user: (Q,) the queries' user codes.
        span: the key's day range per user.

    Returns:
        (Q,) positions in ``keys`` (0 where there is none) and (Q,) whether there is one.
    """
    last = np.searchsorted(keys, at, side="right") - 1  # (Q,)
    found = last >= 0
    found[found] = keys[last[found]] // span == user[found]
    return np.where(found, last, 0), found
