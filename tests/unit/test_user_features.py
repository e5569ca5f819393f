"""The user tower's profile features: columns, transform, country vocabulary, alignment.
(The profile itself, ``features.user_state.profiles_as_of``: tests/unit/test_user_state.py.)"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.build import USER_PROFILE_SCHEMA
from features.user_state import (
    COUNT_COLUMNS,
    COUNTRY,
    DAYS_SINCE_PURCHASE,
    NEVER,
    PROFILE_COLUMNS,
    STORED_PROFILE_COLUMNS,
)
from training.user_features import (
    N_NUMERIC,
    NO_PURCHASE_DAYS,
    NUMERIC_COLUMNS,
    align_to_users,
    country_values,
    country_vocabulary,
    has_profile,
    numeric_features,
    unknown_numeric,
)

pytestmark = pytest.mark.fast


def test_columns_are_the_feature_builds() -> None:
    assert list(STORED_PROFILE_COLUMNS) == [
        f.name for f in USER_PROFILE_SCHEMA if f.name not in ("user_id", "event_timestamp")]
    assert NUMERIC_COLUMNS[: len(COUNT_COLUMNS)] == COUNT_COLUMNS
    assert COUNTRY in PROFILE_COLUMNS and COUNTRY not in NUMERIC_COLUMNS
    assert DAYS_SINCE_PURCHASE in NUMERIC_COLUMNS
    assert N_NUMERIC == len(PROFILE_COLUMNS)  # every numeric column, plus the missing flag
    assert has_profile(pd.DataFrame(columns=["user_id", COUNTRY]))
    assert not has_profile(pd.DataFrame(columns=["user_id", "recent_product_ids"]))
    assert not has_profile(None)


def test_numeric_transform() -> None:
    full = {c: 3 for c in NUMERIC_COLUMNS} | {DAYS_SINCE_PURCHASE: 5,
                                             "mean_basket_value_30d": 20.5}
    frame = pd.DataFrame([
        full,
        {c: None for c in NUMERIC_COLUMNS},  # no profile at all
        full | {DAYS_SINCE_PURCHASE: NEVER},  # never purchased
        full | {"purchase_count_7d": None, DAYS_SINCE_PURCHASE: None},  # partly null
        full | {"view_count_30d": -4, DAYS_SINCE_PURCHASE: 10**6},  # out of range
    ]).astype({"purchase_count_7d": "Int64"})  # a nullable integer column, as Feast gives
    out = numeric_features(frame)
    assert out.shape == (5, N_NUMERIC) and out.dtype == np.float32
    j = {c: i for i, c in enumerate(NUMERIC_COLUMNS)}
    flag = N_NUMERIC - 1
    np.testing.assert_allclose(out[0, j["view_count_7d"]], np.log1p(3))
    np.testing.assert_allclose(out[0, j[DAYS_SINCE_PURCHASE]], np.log1p(5))
    np.testing.assert_allclose(out[0, j["mean_basket_value_30d"]], np.log1p(20.5))
    assert out[0, flag] == 0.0
    # missing: zeros, the days at "a long time ago", the flag up
    expected_missing = np.zeros(N_NUMERIC, np.float32)
    expected_missing[j[DAYS_SINCE_PURCHASE]] = np.log1p(NO_PURCHASE_DAYS)
    expected_missing[flag] = 1.0
    np.testing.assert_allclose(out[1], expected_missing)
    np.testing.assert_allclose(unknown_numeric(), expected_missing)
    np.testing.assert_allclose(out[2, j[DAYS_SINCE_PURCHASE]], np.log1p(NO_PURCHASE_DAYS))
    assert out[3, j["purchase_count_7d"]] == 0.0 and out[3, flag] == 0.0  # partly null: known
    np.testing.assert_allclose(out[3, j[DAYS_SINCE_PURCHASE]], np.log1p(NO_PURCHASE_DAYS))
    assert out[4, j["view_count_30d"]] == 0.0
    np.testing.assert_allclose(out[4, j[DAYS_SINCE_PURCHASE]], np.log1p(NO_PURCHASE_DAYS))
    # absent columns read as missing
    np.testing.assert_allclose(numeric_features(pd.DataFrame({"x": [1, 2]})),
                               np.stack([expected_missing] * 2))
    # column -> float array (NaN: null; a request's path) reads as the frame does
    arrays = {c: frame[c].to_numpy(dtype=np.float64, na_value=np.nan) for c in frame.columns}
    np.testing.assert_array_equal(numeric_features(arrays), out)
    assert country_values({"x": np.zeros(2)}) == [None, None]


def test_country_vocabulary_skips_unknowns() -> None:
    frame = pd.DataFrame({COUNTRY: ["UK", None, "France", "UK", "", np.nan, "Germany"]})
    assert country_vocabulary(frame) == ["France", "Germany", "UK"]
    assert country_vocabulary(pd.DataFrame({"user_id": ["u"]})) == []
    assert country_vocabulary(None) == []


def test_align_to_users_by_column_or_index() -> None:
    frame = pd.DataFrame({"user_id": ["a", "b", "a"], COUNTRY: ["UK", "FR", "DE"],
                          "purchase_count_7d": [1, 2, 3], "unrelated": [0, 0, 0]})
    out = align_to_users(frame, ["b", "zzz", "a"])
    assert list(out.columns) == [c for c in PROFILE_COLUMNS if c in frame.columns]
    assert out[COUNTRY].tolist()[0] == "FR" and out[COUNTRY].tolist()[2] == "DE"  # last wins
    assert out.iloc[1].isna().all()
    by_index = align_to_users(frame.drop_duplicates("user_id", keep="last")
                              .set_index("user_id"), ["a", "b"])
    assert by_index[COUNTRY].tolist() == ["DE", "FR"]
