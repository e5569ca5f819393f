"""Point-in-time training examples for the two-tower model, built straight from events.

Each purchase or add-to-cart of a catalogue product is a target, with the user's products of
strictly earlier events as its history (and, with a catalogue, the user's profile as of that
moment). The daily pipeline builds the same examples from Feast
(``features.store.historical_user_history``); the evaluation protocol from the events.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from features.user_state import TARGET_EVENT_TYPES


def examples_from_events(
    events: pd.DataFrame,
    products: set[str] | None = None,
    *,
    history_len: int = 50,
    target_event_types: Sequence[str] = TARGET_EVENT_TYPES,
    min_history: int = 1,
    catalog: pd.DataFrame | None = None,
    users: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Training examples straight from events: each target with the user's prior products
    and, given a catalogue, the user's profile.

    Args:
        events: contract events (any order).
        products: products that may be targets or history (None: all).
        history_len: keep the most recent ``history_len`` history entries.
        target_event_types: event types that make a target.
        min_history: drop targets with fewer history entries (the pipeline's rule: 1).
        catalog: product rows (``category``, ``price``); given, each example also carries
            the ``user_profile`` columns as of the end of the day before it, the rule of
            Feast's daily snapshots (``features.user_state.profiles_as_of``, over all of
            ``events``); None: no profile columns.
        users: user rows (``user_id``, ``country``) for the profile's country; None:
            country unknown.

    Returns:
        user_id, product_id, event_timestamp, recent_product_ids (most recent LAST: products
        of the user's events strictly before the target's time), recent_event_types, and
        with ``catalog`` the ``user_profile`` columns (``PROFILE_COLUMNS``; null where the
        user had no profile yet).
    """
    ev = events[events["product_id"].notna()]
    if products is not None:
        ev = ev[ev["product_id"].isin(products)]
    ev = ev.sort_values(["user_id", "ts", "event_id"], kind="stable").reset_index(drop=True)
    user = ev["user_id"].to_numpy(dtype=object)  # (E,)
    product = ev["product_id"].tolist()
    kind = ev["event_type"].tolist()
    ts = ev["ts"].dt.tz_convert("UTC").dt.tz_localize(None).to_numpy()  # (E,) datetime64
    is_target = ev["event_type"].isin(list(target_event_types)).to_numpy()  # (E,)
    bounds = np.flatnonzero(user[1:] != user[:-1]) + 1  # user boundaries
    starts = np.concatenate([[0], bounds]).astype(np.int64)
    ends = np.concatenate([bounds, [len(user)]]).astype(np.int64)
    rows: list[int] = []
    hist: list[list[str]] = []
    types: list[list[str]] = []
    for a, b in zip(starts, ends, strict=True) if len(user) else ():
        # per event, the user's first event at the same time: history ends before it
        first = a + np.searchsorted(ts[a:b], ts[a:b], side="left")  # (n,)
        for i in np.flatnonzero(is_target[a:b]) + a:
            stop = int(first[i - a])
            if stop - a < min_history:
                continue
            lo = max(int(a), stop - history_len)
            rows.append(int(i))
            hist.append(product[lo:stop])
            types.append(kind[lo:stop])
    picked = ev.iloc[rows]
    examples = pd.DataFrame({
        "user_id": picked["user_id"].to_numpy(dtype=object),
        "product_id": picked["product_id"].to_numpy(dtype=object),
        "event_timestamp": picked["ts"].to_numpy(),
        "recent_product_ids": pd.Series(hist, dtype=object).to_numpy(),
        "recent_event_types": pd.Series(types, dtype=object).to_numpy(),
    })
    if catalog is None:
        return examples
    from features.user_state import profiles_as_of

    profiles = profiles_as_of(events, catalog, users, examples["user_id"],
                              examples["event_timestamp"])  # (E, len(PROFILE_COLUMNS))
    return pd.concat([examples, profiles], axis=1)
