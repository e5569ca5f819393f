"""The user tower's profile features: columns, transform, country vocabulary, alignment, and
the Feast-free profile computation against ``build_user_profile`` run day by day."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.build import (
    NEVER,
    PROFILE_LOOKBACK_DAYS,
    USER_PROFILE_SCHEMA,
    USER_RECENT_SCHEMA,
    build_user_profile,
    build_user_recent_products,
    user_count_columns,
    user_profile_columns,
)
from features.contract import Interval
from training.user_features import (
    COUNTRY,
    DAYS_SINCE_PURCHASE,
    N_NUMERIC,
    NO_PURCHASE_DAYS,
    NUMERIC_COLUMNS,
    PROFILE_COLUMNS,
    align_to_users,
    country_vocabulary,
    has_profile,
    numeric_features,
    profiles_as_of,
    unknown_numeric,
)

pytestmark = pytest.mark.fast

T0 = pd.Timestamp("2026-01-01", tz="UTC")
DAY = pd.Timedelta(days=1)


def test_columns_are_the_feature_builds() -> None:
    assert list(PROFILE_COLUMNS) == user_profile_columns() == [
        f.name for f in USER_PROFILE_SCHEMA if f.name not in ("user_id", "event_timestamp")]
    assert NUMERIC_COLUMNS[: len(user_count_columns())] == tuple(user_count_columns())
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


# --- the Feast-free profile against the daily snapshots -----------------------------------


def _shop(seed: int, days: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Random events in bursts (gaps longer than the lookback too), some at midnight, some
    searches, some purchases without a price, products outside the catalogue or without a
    category; users with and without a country."""
    rng = np.random.default_rng(seed)
    products = [f"p{i}" for i in range(20)]
    catalog = pd.DataFrame({
        "product_id": products[:18],
        "category": [None if i == 3 else f"c{i % 5}" for i in range(18)],
        "price": rng.uniform(1, 10, 18),
    })
    rows = []
    for u in range(15):
        for d in sorted(rng.choice(days, size=int(rng.integers(1, 12)), replace=False)):
            for _ in range(int(rng.integers(1, 6))):
                kind = str(rng.choice(["view", "add_to_cart", "purchase", "search"],
                                      p=[0.5, 0.2, 0.2, 0.1]))
                second = 0 if rng.random() < 0.2 else int(rng.integers(0, 86_400))
                rows.append({
                    "event_id": f"e{len(rows):05d}", "user_id": f"u{u}",
                    "product_id": None if kind == "search" else str(rng.choice(products)),
                    "event_type": kind, "query": None, "quantity": int(rng.integers(1, 4)),
                    "price": None if rng.random() < 0.3 else float(rng.uniform(1, 10)),
                    "ts": T0 + int(d) * DAY + pd.Timedelta(seconds=second),
                })
    users = pd.DataFrame({"user_id": [f"u{u}" for u in range(15)],
                          COUNTRY: [None if u % 4 == 0 else f"C{u % 3}" for u in range(15)]})
    return pd.DataFrame(rows), catalog, users


def _daily_snapshots(events: pd.DataFrame, catalog: pd.DataFrame, users: pd.DataFrame,
                     days: int) -> pd.DataFrame:
    """What ``build_features`` writes to ``user_profile`` day after day, in memory."""
    previous = USER_RECENT_SCHEMA.empty_table().to_pandas()
    snapshots = []
    for i in range(days):
        interval = Interval.for_day((T0 + i * DAY).date())
        start, end = pd.Timestamp(interval.start), pd.Timestamp(interval.end)
        window = events[(events["ts"] >= end - PROFILE_LOOKBACK_DAYS * DAY)
                        & (events["ts"] < end)]
        recent = build_user_recent_products(window[window["ts"] >= start], previous, interval)
        state = pd.concat([previous, recent.to_pandas()], ignore_index=True)
        state = state.drop_duplicates("user_id", keep="last")
        snapshots.append(build_user_profile(window, catalog, users, state, interval).to_pandas())
        previous = state
    return pd.concat(snapshots, ignore_index=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_profiles_as_of_equal_the_daily_snapshots_joined_point_in_time(seed: int) -> None:
    days = 80
    events, catalog, users = _shop(seed, days)
    snapshots = _daily_snapshots(events, catalog, users, days + 5)
    rng = np.random.default_rng(seed)
    queries = pd.DataFrame({
        "user_id": [f"u{u}" for u in rng.integers(0, 16, 400)],  # u15: never seen
        "ts": [T0 + pd.Timedelta(seconds=int(s))
               for s in rng.integers(-2 * 86_400, (days + 4) * 86_400, 400)],
    })
    queries.loc[:40, "ts"] = [T0 + int(d) * DAY for d in rng.integers(0, days, 41)]  # midnight
    queries["ts"] = queries["ts"].dt.as_unit("ns")
    snapshots["event_timestamp"] = snapshots["event_timestamp"].dt.as_unit("ns")
    expected = pd.merge_asof(
        queries.reset_index().sort_values("ts"), snapshots.sort_values("event_timestamp"),
        left_on="ts", right_on="event_timestamp", by="user_id", direction="backward",
    ).sort_values("index").reset_index(drop=True)

    got = profiles_as_of(events, catalog, users, queries["user_id"], queries["ts"])
    assert list(got.columns) == list(PROFILE_COLUMNS) and len(got) == len(queries)
    known = expected["event_timestamp"].notna()
    assert 0.3 * len(queries) < known.sum() < len(queries)  # both kinds of rows are tested
    for column in NUMERIC_COLUMNS:
        np.testing.assert_allclose(got[column].astype("float64").to_numpy(),
                                   expected[column].astype("float64").to_numpy(),
                                   rtol=1e-9, equal_nan=True, err_msg=column)
    assert got[COUNTRY].tolist() == [c if isinstance(c, str) else None
                                      for c in expected[COUNTRY]]
    # Users gone quiet keep the snapshot whose windows had just emptied.
    stale = known & (expected["purchase_count_30d"] == 0) & (expected["view_count_30d"] == 0)
    assert stale.any()


def test_profiles_as_of_without_events_are_unknown() -> None:
    events, catalog, users = _shop(0, 10)
    out = profiles_as_of(events.iloc[:0], catalog, users, ["u1", "u2"], [T0, T0 + 5 * DAY])
    assert out.shape == (2, len(PROFILE_COLUMNS)) and out.isna().all().all()
    first = events["ts"].min()
    before = profiles_as_of(events, catalog, users, [events["user_id"].iloc[0]], [first])
    assert before.isna().all().all()  # the day's own events are not visible yet
    assert len(profiles_as_of(events, catalog, users, [], [])) == 0
