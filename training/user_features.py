"""The user tower's profile features: which ``user_profile`` columns it reads, and how.

The columns are Feast's ``user_profile`` view as ``features.build`` writes it
(``user_profile_columns``): counters by event type over 7 and 30 days, days since the last
purchase, distinct categories and mean basket value over 30 days, and country. The tower reads

- numeric (``numeric_features``): log1p of every counter and value (clipped at 0; a missing
  value is 0), log1p of the days since the last purchase (never, or missing:
  ``NO_PURCHASE_DAYS``), and a "profile missing" flag, 1 where every numeric column of the
  row is missing (a user the store did not know at that time);
- country: an embedding over a vocabulary built from the training examples
  (``country_vocabulary``; index 0 = unknown or None).

A frame of profiles is aligned row by row with the users it describes; absent columns and
rows read as missing, i.e. "unknown". ``profiles_as_of`` computes the same features from raw
events, without Feast, by the rule of the daily snapshots.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from features.build import (
    HISTORY_EVENT_TYPES,
    NEVER,
    PROFILE_LOOKBACK_DAYS,
    WINDOWS_DAYS,
    user_count_columns,
    user_profile_columns,
)
from features.contract import EVENT_TYPES

PROFILE_COLUMNS: tuple[str, ...] = tuple(user_profile_columns())
COUNTRY = "country"
DAYS_SINCE_PURCHASE = "days_since_last_purchase"
DISTINCT_CATEGORIES = "distinct_categories_30d"
MEAN_BASKET = "mean_basket_value_30d"
# Every profile column but the country, in ``user_profile`` order.
NUMERIC_COLUMNS: tuple[str, ...] = tuple(c for c in PROFILE_COLUMNS if c != COUNTRY)
# Width of ``numeric_features``: the numeric columns plus the "profile missing" flag.
N_NUMERIC = len(NUMERIC_COLUMNS) + 1
# Days since the last purchase of a user who never purchased (NEVER) or is unknown.
NO_PURCHASE_DAYS = 1000.0
# The windows of the distinct-categories and basket features (features.build: 30 days).
MONTH_DAYS = 30

_DAY_NS = 86_400 * 10**9


def has_profile(frame: pd.DataFrame | None) -> bool:
    """Whether ``frame`` carries any ``user_profile`` column."""
    return frame is not None and any(c in frame.columns for c in PROFILE_COLUMNS)


def numeric_features(frame: pd.DataFrame) -> np.ndarray:
    """The tower's numeric inputs of each row of ``frame``.

    Args:
        frame: profile columns (any may be absent; nulls allowed), one row per user.

    Returns:
        (n, N_NUMERIC) float32: log1p of ``NUMERIC_COLUMNS`` as described in the module
        docstring, then the "profile missing" flag.
    """
    raw = np.full((len(frame), len(NUMERIC_COLUMNS)), np.nan)  # (n, F)
    present = [j for j, column in enumerate(NUMERIC_COLUMNS) if column in frame.columns]
    try:  # one conversion for the usual case (numbers and nulls): a request's hot path
        raw[:, present] = frame[[NUMERIC_COLUMNS[j] for j in present]].to_numpy(
            dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError):  # something non-numeric: column by column, coerced
        for j in present:
            raw[:, j] = pd.to_numeric(frame[NUMERIC_COLUMNS[j]], errors="coerce").to_numpy(
                dtype=np.float64, na_value=np.nan)
    missing = np.isnan(raw).all(axis=1)  # (n,)
    values = np.nan_to_num(raw, nan=0.0).clip(min=0.0)  # (n, F)
    j = NUMERIC_COLUMNS.index(DAYS_SINCE_PURCHASE)
    days = raw[:, j]
    # NEVER (-1) and missing both mean "no purchase we know of": a long time ago.
    values[:, j] = np.where(np.isnan(days) | (days < 0), NO_PURCHASE_DAYS,
                            np.minimum(days, NO_PURCHASE_DAYS))
    return np.concatenate([np.log1p(values), missing[:, None]], axis=1).astype(np.float32)


def unknown_numeric() -> np.ndarray:
    """(N_NUMERIC,) float32: the numeric inputs of a user without a profile."""
    return numeric_features(pd.DataFrame(index=range(1)))[0]


def country_values(frame: pd.DataFrame) -> list[Any]:
    """Each row's country (None where absent or null)."""
    if COUNTRY not in frame.columns:
        return [None] * len(frame)
    return [None if pd.isna(v) else str(v) for v in frame[COUNTRY]]


def country_vocabulary(frame: pd.DataFrame | None) -> list[str]:
    """Sorted distinct non-empty countries of ``frame`` (empty without a country column)."""
    if frame is None:
        return []
    return sorted({c for c in country_values(frame) if c})


def align_to_users(frame: pd.DataFrame, user_ids: Sequence[str]) -> pd.DataFrame:
    """Profile rows in ``user_ids`` order.

    Args:
        frame: one row per user, keyed by a ``user_id`` column, else by the index (the last
            row of a repeated user wins).
        user_ids: the users wanted.

    Returns:
        The profile columns of ``frame``, one row per user id; users it lacks are all null.
    """
    keyed = frame.set_index("user_id") if "user_id" in frame.columns else frame
    keyed = keyed[~keyed.index.duplicated(keep="last")]
    columns = [c for c in PROFILE_COLUMNS if c in keyed.columns]
    return keyed[columns].reindex(pd.Index(list(user_ids), dtype=object)).reset_index(drop=True)


def _epoch_ns(values: Any) -> np.ndarray:
    """Timestamps (naive = UTC) -> int64 nanoseconds since the epoch."""
    return pd.DatetimeIndex(pd.to_datetime(values, utc=True)).as_unit("ns").asi8


def _window_sum(keys: np.ndarray, cumulative: np.ndarray, at: np.ndarray,
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


def profiles_as_of(
    events: pd.DataFrame,
    catalog: pd.DataFrame,
    users: pd.DataFrame | None,
    user_ids: Sequence[str],
    times: Sequence[Any] | pd.Series,
) -> pd.DataFrame:
    """The ``user_profile`` features each user had at each time, without Feast.

    The rule of the daily snapshots (``features.build.build_user_profile``, joined point in
    time): at time t a user has the profile built at the end of day D = floor(t) - 1 day, or,
    when they had no event in the ``PROFILE_LOOKBACK_DAYS`` up to D, their last snapshot
    before that (the one whose windows had just emptied); without any event up to D, none.
    Vectorised (sorted (user, day) keys and cumulative sums) instead of one build per day;
    tests/unit/test_user_features.py checks it against ``build_user_profile`` day by day.

    Args:
        events: contract events (any order); those at or after a query's day are ignored.
        catalog: product rows (``category``, ``price``; the last row of a product wins), for
            the distinct categories and the price of purchases without one.
        users: user rows (``user_id``, ``country``; the last non-null country wins), or None
            (country unknown).
        user_ids: (Q,) the users.
        times: (Q,) UTC times, aligned with ``user_ids``.

    Returns:
        (Q, len(PROFILE_COLUMNS)) frame in query order: ``PROFILE_COLUMNS``, integers as
        nullable Int64; every column null where the user had no snapshot yet.
    """
    user_ids = np.asarray(list(user_ids), dtype=object)
    query_day = _epoch_ns(times) // _DAY_NS - 1  # (Q,) the day whose snapshot is visible
    ev_ns = _epoch_ns(events["ts"])  # (E,)
    ev_day = ev_ns // _DAY_NS  # (E,)
    codes = pd.Index(pd.unique(np.concatenate([events["user_id"].to_numpy(dtype=object),
                                               user_ids])))
    ev_user = codes.get_indexer(events["user_id"].to_numpy(dtype=object))  # (E,)
    q_user = codes.get_indexer(user_ids)  # (Q,)
    # Days shifted so that a window never reaches below 0; keys user-major: user * span + day.
    every_day = np.concatenate([ev_day, query_day])
    origin = (int(every_day.min()) if len(every_day) else 0) - PROFILE_LOOKBACK_DAYS - 1
    ev_day = ev_day - origin
    query_day = query_day - origin
    span = int(max(ev_day.max(initial=0), query_day.max(initial=0))) + PROFILE_LOOKBACK_DAYS + 2

    def keys(user: np.ndarray, day: np.ndarray) -> np.ndarray:
        return user.astype(np.int64) * span + day

    # The latest snapshot at or before the query day: the day itself while the user had an
    # event in its lookback, else the last day of the lookback after their last event.
    active = np.sort(keys(ev_user, ev_day))  # (E,)
    last, known = _latest(active, keys(q_user, query_day), q_user, span)  # (Q,), (Q,)
    last_day = np.zeros(len(user_ids), dtype=np.int64)  # (Q,)
    last_day[known] = active[last[known]] % span
    snapshot_day = np.minimum(query_day, last_day + PROFILE_LOOKBACK_DAYS - 1)  # (Q,)
    at = keys(q_user, snapshot_day)  # (Q,)

    out: dict[str, np.ndarray] = {}
    kind = events["event_type"].to_numpy(dtype=object)
    for event_type in EVENT_TYPES:
        mine = np.sort(keys(ev_user[kind == event_type], ev_day[kind == event_type]))
        cumulative = np.arange(len(mine) + 1)
        for w in WINDOWS_DAYS:
            out[f"{event_type}_count_{w}d"] = _window_sum(mine, cumulative, at, w)

    has_product = events["product_id"].notna().to_numpy()
    touched = has_product & np.isin(kind, HISTORY_EVENT_TYPES)  # (E,)
    is_buy = touched & (kind == "purchase")  # (E,)
    order = np.lexsort((ev_ns[is_buy], ev_user[is_buy]))  # by user, then time
    buy_keys = keys(ev_user[is_buy], ev_day[is_buy])[order]
    buy_ns = ev_ns[is_buy][order]
    last_buy, bought = _latest(buy_keys, at, q_user, span)  # (Q,), (Q,)
    end_ns = (snapshot_day + origin + 1) * _DAY_NS  # (Q,) the snapshot's timestamp
    days = np.full(len(user_ids), NEVER, dtype=np.int64)  # (Q,)
    days[bought] = (end_ns[bought] - buy_ns[last_buy[bought]]) // _DAY_NS
    out[DAYS_SINCE_PURCHASE] = days

    products = catalog.drop_duplicates("product_id", keep="last").set_index("product_id")
    category = events["product_id"].map(products["category"]).to_numpy(dtype=object)
    out[DISTINCT_CATEGORIES] = _distinct_in_window(
        ev_user[touched], pd.factorize(category[touched])[0], ev_day[touched], span, at)

    buys = events[kind == "purchase"]
    price = (buys["price"].astype(float).fillna(buys["product_id"].map(products["price"]))
             .fillna(0.0).to_numpy(dtype=np.float64))
    baskets = pd.DataFrame({
        "key": keys(ev_user[kind == "purchase"], ev_day[kind == "purchase"]),
        "value": buys["quantity"].to_numpy(dtype=np.float64) * price,
    }).groupby("key", sort=True)["value"].sum()  # one basket per user and day
    basket_keys = baskets.index.to_numpy(dtype=np.int64)
    n_baskets = _window_sum(basket_keys, np.arange(len(baskets) + 1), at, MONTH_DAYS)
    value = _window_sum(basket_keys, np.concatenate([[0.0], np.cumsum(baskets.to_numpy())]),
                        at, MONTH_DAYS)
    out[MEAN_BASKET] = np.where(n_baskets > 0, value / np.maximum(n_baskets, 1), 0.0)

    frame = pd.DataFrame({c: out[c] for c in user_count_columns()})
    for column in (DAYS_SINCE_PURCHASE, DISTINCT_CATEGORIES, MEAN_BASKET):
        frame[column] = out[column]
    frame = frame.astype({c: "Int64" for c in frame.columns if c != MEAN_BASKET})
    frame.loc[~known] = np.nan  # no snapshot yet: every column null
    countries = pd.Series(dtype=object)
    if users is not None and COUNTRY in users.columns:
        known_users = users.dropna(subset=[COUNTRY]).drop_duplicates("user_id", keep="last")
        countries = known_users.set_index("user_id")[COUNTRY]
    country = pd.Series(user_ids).map(countries)
    frame[COUNTRY] = country.where(pd.Series(known) & country.notna(), None).astype(object)
    return frame[list(PROFILE_COLUMNS)]


def _latest(keys: np.ndarray, at: np.ndarray, user: np.ndarray,
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


def _distinct_in_window(user: np.ndarray, category: np.ndarray, day: np.ndarray, span: int,
                        at: np.ndarray) -> np.ndarray:
    """Per query key, the distinct categories the user touched in the ``MONTH_DAYS`` up to it.

    Each (user, category) counts from a touch until the next touch or ``MONTH_DAYS`` later,
    whichever comes first: disjoint intervals, so a running sum of +1 at each start and -1
    at each end counts each category once.

    Args:
        user, category, day: (T,) codes and shifted days of touches; category -1 = none.
        span: the key's day range per user.
        at: (Q,) query keys.

    Returns:
        (Q,) int64.
    """
    keep = category >= 0
    touches = pd.DataFrame({"user": user[keep], "category": category[keep], "day": day[keep]})
    touches = touches.drop_duplicates().sort_values(["user", "category", "day"])
    u, c, d = (touches[k].to_numpy(dtype=np.int64) for k in ("user", "category", "day"))
    same_next = np.append((u[1:] == u[:-1]) & (c[1:] == c[:-1]), False)  # (T',)
    next_day = np.append(d[1:], 0)
    end = np.where(same_next, np.minimum(d + MONTH_DAYS, next_day), d + MONTH_DAYS)
    starts, ends = u * span + d, u * span + end
    delta_keys = np.concatenate([starts, ends])
    order = np.argsort(delta_keys, kind="stable")
    deltas = np.concatenate([np.ones(len(starts)), -np.ones(len(ends))]).astype(np.int64)[order]
    running = np.concatenate([[0], np.cumsum(deltas)])
    return running[np.searchsorted(delta_keys[order], at, side="right")]
