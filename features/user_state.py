"""The rule of what the feature store knows about a user: their history and their profile.

One definition, called by everything that computes either: the offline build
(``features.build``: the ``user_recent_products`` and ``user_profile`` tables), the real-time
fold of pushed events (``features.realtime.fold_events``), the point-in-time profiles of
training examples and evaluation (``profiles_as_of``), and the served ranking's view of a
user's history (``recent_histories``). Training, evaluation and serving therefore read what
Feast holds, by construction rather than by a test comparing copies.

History (``user_recent_products``): the user's events of ``HISTORY_EVENT_TYPES`` that name a
product (``history_events``), ordered by (ts, event_id), the last ``HISTORY_LEN`` kept
(``keep_last``), each as (product id, event type, epoch seconds), most recent last; plus the
count of all such events so far.

Profile (``user_profile``, ``PROFILE_COLUMNS``), as of the end of a day D (a daily snapshot,
timestamped at the next midnight):

- ``<event_type>_count_<w>d`` (``COUNT_COLUMNS``): the user's events of that type (any of
  ``EVENT_TYPES``, with or without a product) on days D-w+1 .. D, for w in ``WINDOWS_DAYS``;
- ``days_since_last_purchase``: whole days from the last purchase history event to the
  start of the day the profile is read (``days_since_purchase``), ``NEVER`` when the user
  never bought;
- ``distinct_categories_30d``: catalogue categories of the history events of days
  D-29 .. D (``MONTH_DAYS``; products without a category do not count);
- ``mean_basket_value_30d``: the mean over the baskets of those days (a basket: one user's
  purchases on one UTC day, worth the sum of quantity x price, the event's price, else the
  catalogue's, else 0), 0 without a basket;
- ``country``: the user's last non-null country in the users table.

Feast does not store these values: each would change on days without any event (a window
moves, a day passes), and rewriting every user active in the month every day is what made the
daily build and materialization grow with the shop. It stores what they are computed from
(``STORED_PROFILE_COLUMNS``, built by ``stored_profiles``): the user's days with an event
among the last ``MONTH_DAYS`` and, per such day, the count of each event type and the basket
value; the categories touched in those days with the last day each was touched; the last
purchase's time; the country. Every reader turns a stored row into the profile as of the
time it reads (``read_profiles``: the online reads at the ranking's time, the point-in-time
reads at each row's), by the same windows. A user therefore gets a ``user_profile`` row only
on a day with an event of theirs, and the daily build and its materialization follow the
day's activity, not the number of users active in the month.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from features.contract import EVENT_TYPES
from features.key_windows import latest, window_mean, window_sum

# History
HISTORY_LEN = 200  # events kept per user
HISTORY_EVENT_TYPES = ("view", "add_to_cart", "purchase")  # with a product: history events
# The products a user ever bought (``purchased_product_ids``: what ``exclude_purchased``
# leaves out, however long ago), in order of first purchase; past this many, the earliest
# first purchases are dropped (a row stays bounded for a wholesale buyer).
PURCHASED_LEN = 5_000
PURCHASED = "purchased_product_ids"
# The key of an online row's stored user vectors (``features.store.OnlineUserReader``: the
# ``user_vectors`` view's values, None without).
VECTORS = "user_vectors"
# Events that say "this user wants this product": training targets, interaction matrices.
TARGET_EVENT_TYPES = ("purchase", "add_to_cart")

# Profile
WINDOWS_DAYS = (7, 30)  # the counters' windows
MONTH_DAYS = 30  # the window of the distinct categories and the basket value
# Days of events the daily build reads: the widest window and one more.
PROFILE_LOOKBACK_DAYS = max(WINDOWS_DAYS) + 1
NEVER = -1  # days_since_last_purchase / last_purchase_epoch_s of a user who never bought
COUNT_COLUMNS: tuple[str, ...] = tuple(f"{t}_count_{w}d" for w in WINDOWS_DAYS
                                       for t in EVENT_TYPES)
DAYS_SINCE_PURCHASE = "days_since_last_purchase"
DISTINCT_CATEGORIES = f"distinct_categories_{MONTH_DAYS}d"
MEAN_BASKET = f"mean_basket_value_{MONTH_DAYS}d"
COUNTRY = "country"
# The profile as its readers (the user tower, the ranking) see it, in table order.
PROFILE_COLUMNS: tuple[str, ...] = (*COUNT_COLUMNS, DAYS_SINCE_PURCHASE, DISTINCT_CATEGORIES,
                                    MEAN_BASKET, COUNTRY)

# The profile as Feast's user_profile view stores it (see the module docstring).
KEPT_DAYS = max(*WINDOWS_DAYS, MONTH_DAYS)  # days of activity a stored row keeps
ACTIVE_DAYS = "active_days"  # list: epoch days with an event, ascending
DAILY_COLUMNS: dict[str, str] = {t: f"{t}_by_day" for t in EVENT_TYPES}  # lists, per day
BASKET_BY_DAY = "basket_value_by_day"  # list: the day's basket value (0 without purchase)
RECENT_CATEGORIES = "recent_categories"  # list: categories touched in the kept days
CATEGORY_DAYS = "recent_category_days"  # list: the last epoch day each was touched
LAST_PURCHASE_TS = "last_purchase_epoch_s"  # epoch seconds, NEVER without a purchase
STORED_PROFILE_COLUMNS: tuple[str, ...] = (ACTIVE_DAYS, *DAILY_COLUMNS.values(), BASKET_BY_DAY,
                                           RECENT_CATEGORIES, CATEGORY_DAYS, LAST_PURCHASE_TS,
                                           COUNTRY)

_EPOCH = pd.Timestamp(0, tz="UTC")
_DAY_NS = 86_400 * 10**9


def count_column(event_type: str, days: int) -> str:
    """The counter column of an event type over a window, e.g. ``view_count_7d``."""
    return f"{event_type}_count_{days}d"


def epoch_seconds(times: Any) -> np.ndarray:
    """UTC times (a series or a sequence) -> (n,) int64 seconds since the epoch, floored,
    whatever the time unit: the history's timestamps."""
    return ((pd.Series(pd.to_datetime(times, utc=True)) - _EPOCH) // pd.Timedelta(seconds=1)
            ).to_numpy(dtype=np.int64)


def days_since_purchase(last_purchase: Any, read_at: Any) -> np.ndarray:
    """Whole days from each last purchase to the start of the UTC day it is read on.

    Args:
        last_purchase: (n,) epoch seconds of the last purchase (``NEVER`` or null: none).
        read_at: (n,) the read times (UTC timestamps), or one time for every row.

    Returns:
        (n,) int64: ``(start of read day - purchase) // 1 day``, at least 0 (a purchase
        pushed on the read day itself), ``NEVER`` without a purchase.
    """
    stamps = _numbers(last_purchase)
    times = _read_times(read_at)
    day_start = (times // _DAY_NS) * 86_400  # (n,) or (1,) epoch seconds
    never = np.isnan(stamps) | (stamps == NEVER)
    safe = np.where(never, 0, stamps).astype(np.int64)
    days = np.maximum((day_start - safe) // 86_400, 0)
    return np.where(never, NEVER, days).astype(np.int64)


def is_stored(frame: pd.DataFrame | None) -> bool:
    """Whether ``frame`` holds stored ``user_profile`` rows (``STORED_PROFILE_COLUMNS``)."""
    return frame is not None and ACTIVE_DAYS in frame.columns


def read_profiles(stored: pd.DataFrame, read_at: Any) -> pd.DataFrame:
    """Stored ``user_profile`` rows as their readers see them at ``read_at``.

    The windows end with D, the day before the day of ``read_at``, as a daily snapshot's do:
    a stored row was written at the end of a day before, so every day it holds is at most D,
    except the days a real-time push added (``features.realtime``), which count as well.

    Args:
        stored: rows with ``STORED_PROFILE_COLUMNS`` (lists as lists or arrays; a row whose
            ``active_days`` is null is a user the store does not know). Other columns are
            kept, in front.
        read_at: (n,) UTC read times, or one time for every row.

    Returns:
        The other columns, then ``PROFILE_COLUMNS`` (integers as nullable Int64; every
        column null where the row is unknown), in row order.
    """
    values = profile_arrays({c: stored[c].to_numpy(dtype=object)
                             for c in STORED_PROFILE_COLUMNS}, read_at)
    unknown = np.isnan(values[DAYS_SINCE_PURCHASE])  # (n,) every number is NaN there
    # One frame built from ready arrays (a request reads one row: astype, loc and concat
    # cost milliseconds there).
    columns: dict[str, Any] = {c: stored[c].array for c in stored.columns
                               if c not in STORED_PROFILE_COLUMNS}  # in front, dtypes kept
    for c, v in values.items():
        columns[c] = v if c in (MEAN_BASKET, COUNTRY) else pd.arrays.IntegerArray(
            np.nan_to_num(v).astype(np.int64), unknown.copy())
    return pd.DataFrame(columns, index=pd.RangeIndex(len(stored)))


def profile_arrays(stored: Mapping[str, Sequence[Any]], read_at: Any) -> dict[str, np.ndarray]:
    """``read_profiles`` without pandas (a request's row: no frame to build): the
    ``PROFILE_COLUMNS`` of stored rows at ``read_at``, numbers as (n,) float64 (NaN where the
    row is unknown), the country as objects (None where unknown).

    Args:
        stored: ``STORED_PROFILE_COLUMNS`` -> one value per row (lists, or object arrays).
        read_at: (n,) UTC read times, or one time for every row.
    """
    n = len(stored[ACTIVE_DAYS])
    times = _read_times(read_at)
    last_day = np.broadcast_to(times // _DAY_NS - 1, (n,))  # (n,) D per row
    known = np.array([isinstance(v, list | np.ndarray) for v in stored[ACTIVE_DAYS]],
                     dtype=bool)  # (n,)

    def flat(column: str, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
        """(values, row of each value) of a list column over the known rows."""
        values = [np.asarray(v if k else [], dtype=dtype)
                  for v, k in zip(stored[column], known, strict=True)]
        lengths = np.fromiter((len(v) for v in values), dtype=np.int64, count=n)
        return (np.concatenate(values) if n else np.zeros(0, dtype)), \
            np.repeat(np.arange(n), lengths)

    day, row = flat(ACTIVE_DAYS, np.int64)  # (K,), (K,)
    out: dict[str, np.ndarray] = {}
    inside = {w: day > last_day[row] - w for w in {*WINDOWS_DAYS, MONTH_DAYS}}  # (K,) each
    by_type = {t: flat(DAILY_COLUMNS[t], np.int64)[0] for t in EVENT_TYPES}
    for w in WINDOWS_DAYS:
        for t in EVENT_TYPES:
            out[count_column(t, w)] = np.bincount(row[inside[w]], by_type[t][inside[w]],
                                                  minlength=n)
    out[DAYS_SINCE_PURCHASE] = days_since_purchase(stored[LAST_PURCHASE_TS], read_at)
    cat_day, cat_row = flat(CATEGORY_DAYS, np.int64)
    recent = cat_day > last_day[cat_row] - MONTH_DAYS
    out[DISTINCT_CATEGORIES] = np.bincount(cat_row[recent], minlength=n)
    basket = flat(BASKET_BY_DAY, np.float64)[0]
    baskets = inside[MONTH_DAYS] & (by_type["purchase"] > 0)
    total = np.bincount(row[baskets], basket[baskets], minlength=n)
    count = np.bincount(row[baskets], minlength=n)
    out[MEAN_BASKET] = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    values = {c: np.where(known, out[c], np.nan).astype(np.float64)
              for c in PROFILE_COLUMNS if c != COUNTRY}
    values[COUNTRY] = np.array([c if k and isinstance(c, str) else None
                                for c, k in zip(stored[COUNTRY], known, strict=True)],
                               dtype=object)
    return values


def history_events(events: pd.DataFrame) -> pd.DataFrame:
    """The events that enter users' histories, in history order.

    Args:
        events: contract events (any order).

    Returns:
        The rows of ``events`` of ``HISTORY_EVENT_TYPES`` with a product, sorted by
        (user_id, ts, event_id): each user's oldest first.
    """
    mine = events[events["event_type"].isin(HISTORY_EVENT_TYPES) & events["product_id"].notna()]
    return mine.sort_values(["user_id", "ts", "event_id"], kind="stable")


def keep_last(entries: pd.DataFrame, limit: int = HISTORY_LEN) -> pd.DataFrame:
    """Each user's last ``limit`` rows of a frame holding every user's entries oldest first."""
    return entries[entries.groupby("user_id", sort=False).cumcount(ascending=False) < limit]


def first_purchases(user: np.ndarray, product: np.ndarray,
                    limit: int = PURCHASED_LEN) -> tuple[np.ndarray, np.ndarray]:
    """Each user's distinct products in order of first appearance, the last ``limit`` kept.

    Args:
        user: (E,) sortable user keys, grouped (each user's entries together, in order).
        product: (E,) product ids (objects), each user's in purchase order.

    Returns:
        (user, product) of the kept entries, in the same grouping and order.
    """
    if not len(user):
        return user, product
    frame = pd.DataFrame({"user": user, "product": product})
    first = frame[~frame.duplicated(["user", "product"], keep="first")]
    kept = first[first.groupby("user", sort=False).cumcount(ascending=False) < limit]
    return kept["user"].to_numpy(), kept["product"].to_numpy(dtype=object)


def recent_histories(events: pd.DataFrame, users: Sequence[str],
                     limit: int = HISTORY_LEN) -> pd.DataFrame:
    """The ``user_recent_products`` rows Feast holds for ``users`` once it has seen ``events``.

    Args:
        events: contract events (any order), e.g. everything before a cut.
        users: (U,) the users, in output order; repeats allowed.
        limit: entries kept per user (``HISTORY_LEN``).

    Returns:
        (U, 6) frame in ``users`` order: ``user_id``; ``recent_product_ids``,
        ``recent_event_types`` (lists of str) and ``recent_timestamps`` (list of int epoch
        seconds), the last ``limit`` history events, most recent last;
        ``purchased_product_ids`` (``PURCHASED``: every product the user bought, in order
        of first purchase, ``first_purchases``); ``n_events_total`` (int64): all the user's
        history events. A user without one gets empty lists and 0.
    """
    wanted = list(users)
    mine = history_events(events[events["user_id"].isin(set(wanted))])
    total = mine.groupby("user_id").size()
    kept = keep_last(mine, limit)
    user = kept["user_id"].to_numpy(dtype=object)  # (K,) sorted
    bounds = np.flatnonzero(user[1:] != user[:-1]) + 1  # (G - 1,) where each user starts
    firsts = user[np.concatenate([[0], bounds])] if len(user) else user  # (G,)
    columns = {
        "recent_product_ids": kept["product_id"].to_numpy(dtype=object),
        "recent_event_types": kept["event_type"].to_numpy(dtype=object),
        "recent_timestamps": epoch_seconds(kept["ts"]),
    }
    lists = {name: dict(zip(firsts, (part.tolist() for part in np.split(values, bounds)),
                            strict=True)) if len(user) else {}
             for name, values in columns.items()}
    bought = mine[mine["event_type"] == "purchase"]
    owner, product = first_purchases(bought["user_id"].to_numpy(dtype=object),
                                     bought["product_id"].to_numpy(dtype=object))
    lists[PURCHASED] = {}
    if len(owner):
        starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
        lists[PURCHASED] = dict(zip(owner[starts], (part.tolist() for part in
                                                    np.split(product, starts[1:])), strict=True))
    return pd.DataFrame({
        "user_id": pd.Series(wanted, dtype=object),
        **{name: pd.Series([by_user.get(u, []) for u in wanted], dtype=object)
           for name, by_user in lists.items()},
        "n_events_total": total.reindex(wanted, fill_value=0).to_numpy(dtype=np.int64),
    })


def latest_countries(users: pd.DataFrame | None) -> pd.Series:
    """user_id -> the user's last non-null country (empty without a users table)."""
    if users is None or COUNTRY not in users.columns:
        return pd.Series(dtype=object)
    known = users.dropna(subset=[COUNTRY]).drop_duplicates("user_id", keep="last")
    return known.set_index("user_id")[COUNTRY]


def _numbers(values: Any) -> np.ndarray:
    """(n,) float64 of numbers, NaN where null or not a number."""
    array = np.asarray(values, dtype=object).ravel()
    try:
        return array.astype(np.float64)  # numbers and None (-> NaN): the usual case
    except (TypeError, ValueError):
        return pd.to_numeric(pd.Series(array), errors="coerce").to_numpy(
            dtype=np.float64, na_value=np.nan)


def _read_times(read_at: Any) -> np.ndarray:
    """Read times (one, or one per row) -> (n,) or (1,) int64 epoch nanoseconds."""
    if isinstance(read_at, pd.Timestamp):  # one time for every row: a request's case
        return np.array([read_at.as_unit("ns").value if read_at.tzinfo is not None
                         else read_at.tz_localize("UTC").as_unit("ns").value], np.int64)
    return np.atleast_1d(_epoch_ns(np.atleast_1d(np.asarray(read_at, dtype=object))))


def _epoch_ns(values: Any) -> np.ndarray:
    """Timestamps (naive = UTC) -> int64 nanoseconds since the epoch."""
    return pd.DatetimeIndex(pd.to_datetime(values, utc=True)).as_unit("ns").asi8


def profiles_as_of(
    events: pd.DataFrame,
    catalog: pd.DataFrame,
    users: pd.DataFrame | None,
    user_ids: Sequence[str],
    times: Sequence[Any] | pd.Series,
    *,
    last_purchase: Sequence[Any] | pd.Series | None = None,
) -> pd.DataFrame:
    """The ``user_profile`` each user had at each time: the latest daily snapshot before it.

    At time t a user has the profile of day D = floor(t) - 1 day (the windows up to D, the
    days since the last purchase counted to floor(t)); without any event up to D, none: what
    ``read_profiles`` of the user's latest stored row reads at t. Training and evaluation
    call this for their examples, over all events. Vectorised: sorted (user, day) keys,
    cumulative sums and searches, instead of one computation per day.

    Args:
        events: contract events (any order); those on or after a query's day are ignored.
        catalog: product rows (``category``, ``price``; the last row of a product wins), for
            the distinct categories and the price of purchases without one.
        users: user rows (``user_id``, ``country``; the last non-null country wins), or None
            (country unknown).
        user_ids: (Q,) the users.
        times: (Q,) UTC times, aligned with ``user_ids``.
        last_purchase: (Q,) each query's last purchase (NaT: none), instead of the last one
            in ``events``.

    Returns:
        (Q, len(PROFILE_COLUMNS)) frame in query order: ``PROFILE_COLUMNS``, integers as
        nullable Int64; every column null where the user had no event before D + 1.
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
    last, known = latest(active, keys(q_user, query_day), q_user, span)  # (Q,), (Q,)
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
            out[count_column(event_type, w)] = window_sum(mine, cumulative, at, w)

    has_product = events["product_id"].notna().to_numpy()
    touched = has_product & np.isin(kind, HISTORY_EVENT_TYPES)  # (E,) history events
    if last_purchase is None:
        is_buy = touched & (kind == "purchase")  # (E,)
        order = np.lexsort((ev_ns[is_buy], ev_user[is_buy]))  # by user, then time
        last_buy, bought = latest(keys(ev_user[is_buy], ev_day[is_buy])[order], at, q_user,
                                   span)  # (Q,), (Q,)
        buy_ns = (ev_ns[is_buy][order][last_buy] if len(order)
                  else np.zeros(len(user_ids), dtype=np.int64))
    else:
        stamps = pd.DatetimeIndex(pd.to_datetime(pd.Series(list(last_purchase), dtype=object),
                                                 utc=True))  # (Q,)
        bought, buy_ns = ~stamps.isna(), stamps.as_unit("ns").asi8  # (Q,), (Q,)
    buy_s = np.where(bought, buy_ns // 10**9, NEVER)  # (Q,) epoch seconds
    read_ns = (query_day + origin + 1) * _DAY_NS  # (Q,) the start of each query's day
    out[DAYS_SINCE_PURCHASE] = days_since_purchase(buy_s, read_ns)

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
    out[MEAN_BASKET] = window_mean(baskets.index.to_numpy(dtype=np.int64),
                                    baskets.to_numpy(dtype=np.float64), at, MONTH_DAYS)

    frame = pd.DataFrame({c: out[c] for c in PROFILE_COLUMNS if c != COUNTRY})
    frame = frame.astype({c: "Int64" for c in frame.columns if c != MEAN_BASKET})
    frame.loc[~known] = np.nan  # no snapshot yet: every column null
    country = pd.Series(user_ids).map(latest_countries(users))
    frame[COUNTRY] = country.where(pd.Series(known) & country.notna(), None).astype(object)
    return frame


def snapshot_users(events: pd.DataFrame, day_end: Any) -> pd.Index:
    """The users who get a ``user_profile`` row on the day ending at ``day_end``: those with
    an event that day.

    Args:
        events: contract events (``user_id``, ``ts``), e.g. the day's or a month's.
        day_end: the day's end (the row's timestamp).

    Returns:
        The users, sorted, named ``user_id``.
    """
    snapshot_day = _epoch_ns([day_end])[0] // _DAY_NS - 1
    today = _epoch_ns(events["ts"]) // _DAY_NS == snapshot_day  # (E,)
    users = events["user_id"].to_numpy(dtype=object)[today]
    return pd.Index(pd.unique(users), name="user_id").sort_values()


def stored_profiles(events: pd.DataFrame, catalog: pd.DataFrame, users: pd.DataFrame | None,
                    user_ids: Sequence[str], day_end: Any,
                    last_purchase: Sequence[Any] | pd.Series) -> pd.DataFrame:
    """The stored ``user_profile`` rows of ``user_ids`` at the end of a day (see the module
    docstring): what ``read_profiles`` turns into ``profiles_as_of``'s profiles.

    Args:
        events: contract events up to ``day_end`` (at least the ``KEPT_DAYS`` before it;
            older ones are ignored).
        catalog: product rows (``category``, ``price``; the last row of a product wins).
        users: user rows (``country``), or None.
        user_ids: (U,) the users, in output order.
        day_end: the day's end.
        last_purchase: (U,) each user's last purchase up to ``day_end`` (NaT: none).

    Returns:
        (U, len(STORED_PROFILE_COLUMNS)) frame in ``user_ids`` order; list columns hold
        Python lists, days ascending.
    """
    user_ids = pd.Index(list(user_ids), dtype=object)
    end_day = int(_epoch_ns([day_end])[0] // _DAY_NS)  # the day after the row's day
    ev_day = _epoch_ns(events["ts"]) // _DAY_NS  # (E,)
    mine = events[(ev_day >= end_day - KEPT_DAYS) & (ev_day < end_day)
                  & events["user_id"].isin(user_ids).to_numpy()]
    day = _epoch_ns(mine["ts"]) // _DAY_NS  # (M,)
    user = user_ids.get_indexer(mine["user_id"].to_numpy(dtype=object))  # (M,)
    key = user.astype(np.int64) * KEPT_DAYS + (day - (end_day - KEPT_DAYS))  # user-major
    keys, inverse = np.unique(key, return_inverse=True)  # (K,) one per (user, day)
    kind = mine["event_type"].to_numpy(dtype=object)
    columns: dict[str, np.ndarray] = {ACTIVE_DAYS: keys % KEPT_DAYS + end_day - KEPT_DAYS}
    for event_type, column in DAILY_COLUMNS.items():
        columns[column] = np.bincount(inverse[kind == event_type],
                                      minlength=len(keys)).astype(np.int64)
    products = catalog.drop_duplicates("product_id", keep="last").set_index("product_id")
    buy = kind == "purchase"
    buys = mine[buy]
    price = (buys["price"].astype(float).fillna(buys["product_id"].map(products["price"]))
             .fillna(0.0).to_numpy(dtype=np.float64))
    value = pd.Series(buys["quantity"].to_numpy(dtype=np.float64) * price).groupby(
        inverse[buy]).sum()  # one basket per user and day, summed as profiles_as_of does
    columns[BASKET_BY_DAY] = value.reindex(range(len(keys)), fill_value=0.0).to_numpy(
        np.float64)
    per_user = _split_by_user(keys // KEPT_DAYS, columns, len(user_ids))

    touched = (mine["product_id"].notna().to_numpy() & np.isin(kind, HISTORY_EVENT_TYPES))
    category = mine["product_id"].map(products["category"]).to_numpy(dtype=object)
    has = touched & pd.notna(category)
    last_touch = pd.DataFrame({"user": user[has], "category": category[has],
                               "day": day[has]}).groupby(["user", "category"])["day"].max()
    cat_user = last_touch.index.get_level_values("user").to_numpy(dtype=np.int64)
    per_user |= _split_by_user(cat_user, {
        RECENT_CATEGORIES: last_touch.index.get_level_values("category").to_numpy(dtype=object),
        CATEGORY_DAYS: last_touch.to_numpy(dtype=np.int64)}, len(user_ids))

    stamps = pd.DatetimeIndex(pd.to_datetime(pd.Series(list(last_purchase), dtype=object),
                                             utc=True))
    buy_s = np.where(stamps.isna(), NEVER, stamps.as_unit("ns").asi8 // 10**9)
    country = user_ids.to_series().map(latest_countries(users))
    return pd.DataFrame({
        **{c: per_user[c] for c in STORED_PROFILE_COLUMNS[:-2]},
        LAST_PURCHASE_TS: buy_s.astype(np.int64),
        COUNTRY: [c if isinstance(c, str) else None for c in country],
    })


def _split_by_user(owner: np.ndarray, columns: dict[str, np.ndarray],
                   n: int) -> dict[str, list[list]]:
    """Per user 0..n-1, the entries of each column whose ``owner`` is that user (``owner``
    sorted), as Python lists (empty for a user without entries)."""
    bounds = np.searchsorted(owner, np.arange(n + 1))  # (n + 1,)
    return {name: [values[bounds[i]:bounds[i + 1]].tolist() for i in range(n)]
            for name, values in columns.items()}


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
