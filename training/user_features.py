"""The user tower's profile features: how it reads the ``user_profile`` columns.

The columns are Feast's ``user_profile`` view, defined once in ``features.user_state``
(``PROFILE_COLUMNS``; ``profiles_as_of`` computes them from raw events, point in time):
counters by event type over 7 and 30 days, days since the last purchase, distinct categories
and mean basket value over 30 days, and country. The tower reads

- numeric (``numeric_features``): log1p of every counter and value (clipped at 0; a missing
  value is 0), log1p of the days since the last purchase (never, or missing:
  ``NO_PURCHASE_DAYS``), and a "profile missing" flag, 1 where every numeric column of the
  row is missing (a user the store did not know at that time);
- country: an embedding over a vocabulary built from the training examples
  (``country_vocabulary``; index 0 = unknown or None).

A frame of profiles is aligned row by row with the users it describes; absent columns and
rows read as missing, i.e. "unknown".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from features.user_state import COUNTRY, DAYS_SINCE_PURCHASE, PROFILE_COLUMNS

# Every profile column but the country, in ``user_profile`` order.
NUMERIC_COLUMNS: tuple[str, ...] = tuple(c for c in PROFILE_COLUMNS if c != COUNTRY)
# Width of ``numeric_features``: the numeric columns plus the "profile missing" flag.
N_NUMERIC = len(NUMERIC_COLUMNS) + 1
# Days since the last purchase of a user who never purchased (``features.user_state.NEVER``)
# or is unknown.
NO_PURCHASE_DAYS = 1000.0


def has_profile(frame: pd.DataFrame | None) -> bool:
    """Whether ``frame`` carries any ``user_profile`` column."""
    return frame is not None and any(c in frame.columns for c in PROFILE_COLUMNS)


def numeric_features(frame: pd.DataFrame | Mapping[str, np.ndarray]) -> np.ndarray:
    """The tower's numeric inputs of each row of ``frame``.

    Args:
        frame: profile columns (any may be absent; nulls allowed), one row per user: a
            frame, or column -> (n,) float64 array (NaN: null; ``profile_arrays``' output, a
            request's path without pandas).

    Returns:
        (n, N_NUMERIC) float32: log1p of ``NUMERIC_COLUMNS`` as described in the module
        docstring, then the "profile missing" flag.
    """
    if not isinstance(frame, pd.DataFrame):
        raw = np.full((_rows(frame), len(NUMERIC_COLUMNS)), np.nan)  # (n, F)
        for j, column in enumerate(NUMERIC_COLUMNS):
            if column in frame:
                raw[:, j] = np.asarray(frame[column], dtype=np.float64)
        return _numeric(raw)
    raw = np.full((len(frame), len(NUMERIC_COLUMNS)), np.nan)  # (n, F)
    present = [j for j, column in enumerate(NUMERIC_COLUMNS) if column in frame.columns]
    try:  # one conversion for the usual case (numbers and nulls)
        raw[:, present] = frame[[NUMERIC_COLUMNS[j] for j in present]].to_numpy(
            dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError):  # something non-numeric: column by column, coerced
        for j in present:
            raw[:, j] = pd.to_numeric(frame[NUMERIC_COLUMNS[j]], errors="coerce").to_numpy(
                dtype=np.float64, na_value=np.nan)
    return _numeric(raw)


def _rows(columns: Mapping[str, Any]) -> int:
    return len(next(iter(columns.values()))) if columns else 0


def _numeric(raw: np.ndarray) -> np.ndarray:
    """(n, F) raw numeric columns (NaN: null) -> ``numeric_features``."""
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


def country_values(frame: pd.DataFrame | Mapping[str, np.ndarray]) -> list[Any]:
    """Each row's country (None where absent or null)."""
    if isinstance(frame, pd.DataFrame) and COUNTRY not in frame.columns:
        return [None] * len(frame)
    if not isinstance(frame, pd.DataFrame) and COUNTRY not in frame:
        return [None] * _rows(frame)
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
