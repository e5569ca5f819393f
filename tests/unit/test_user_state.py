"""The rule of a user's history and profile (``features.user_state``) against hand-computed
cases, and the offline build, run day by day and joined point in time, against it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.build import (
    USER_PROFILE_SCHEMA,
    USER_RECENT_SCHEMA,
    build_user_profile,
    build_user_recent_products,
)
from features.contract import Interval
from features.user_state import (
    COUNT_COLUMNS,
    COUNTRY,
    HISTORY_EVENT_TYPES,
    KEPT_DAYS,
    MEAN_BASKET,
    NEVER,
    PROFILE_COLUMNS,
    PROFILE_LOOKBACK_DAYS,
    STORED_PROFILE_COLUMNS,
    TARGET_EVENT_TYPES,
    epoch_seconds,
    first_purchases,
    history_events,
    keep_last,
    profile_arrays,
    profiles_as_of,
    read_profiles,
    recent_histories,
)

pytestmark = pytest.mark.fast

T0 = pd.Timestamp("2026-01-01", tz="UTC")
DAY = pd.Timedelta(days=1)
HOUR = pd.Timedelta(hours=1)


def _events(rows: list[tuple]) -> pd.DataFrame:
    """Contract-shaped events from (event_id, user_id, product_id, event_type, ts[, quantity,
    price]) tuples."""
    rows = [(*r, 1, None)[:7] for r in rows]
    return pd.DataFrame({
        "event_id": [r[0] for r in rows], "user_id": [r[1] for r in rows],
        "product_id": [r[2] for r in rows], "event_type": [r[3] for r in rows],
        "query": [None] * len(rows), "quantity": [r[5] for r in rows],
        "price": pd.Series([r[6] for r in rows], dtype="float64"),
        "ts": pd.to_datetime([r[4] for r in rows], utc=True),
    })


def test_the_constants() -> None:
    assert HISTORY_EVENT_TYPES == ("view", "add_to_cart", "purchase")
    assert TARGET_EVENT_TYPES == ("purchase", "add_to_cart")
    assert PROFILE_LOOKBACK_DAYS == 31
    assert list(PROFILE_COLUMNS) == [
        "view_count_7d", "add_to_cart_count_7d", "purchase_count_7d", "search_count_7d",
        "view_count_30d", "add_to_cart_count_30d", "purchase_count_30d", "search_count_30d",
        "days_since_last_purchase", "distinct_categories_30d", "mean_basket_value_30d",
        "country"]
    assert list(COUNT_COLUMNS) == list(PROFILE_COLUMNS[:8])
    # Feast stores what the profile is computed from; readers compute it at their time.
    assert list(STORED_PROFILE_COLUMNS) == [
        "active_days", "view_by_day", "add_to_cart_by_day", "purchase_by_day", "search_by_day",
        "basket_value_by_day", "recent_categories", "recent_category_days",
        "last_purchase_epoch_s", "country"]
    assert USER_PROFILE_SCHEMA.names == ["user_id", *STORED_PROFILE_COLUMNS, "event_timestamp"]
    assert KEPT_DAYS == 30


# --- history ------------------------------------------------------------------------------


def _history_shop() -> pd.DataFrame:
    at = T0 + 10 * HOUR
    return _events([  # deliberately out of order
        ("h5", "u1", "P3", "view", at + HOUR),
        ("h7", "u2", "P1", "purchase", at - HOUR + pd.Timedelta(milliseconds=900)),
        ("h2", "u1", None, "search", at + HOUR / 2),
        ("h1", "u1", "P1", "view", at),
        ("h6", "u1", None, "view", at + 2 * HOUR),  # no product: not history
        ("h4", "u1", "P4", "purchase", at + HOUR),  # same time as h5: h4 first
        ("h3", "u1", "P2", "add_to_cart", at + HOUR),
        ("h8", "u3", None, "search", at),
    ])


def test_history_events_are_product_events_in_user_ts_event_id_order() -> None:
    got = history_events(_history_shop())
    assert got["event_id"].tolist() == ["h1", "h3", "h4", "h5", "h7"]
    assert keep_last(got, 2)["event_id"].tolist() == ["h4", "h5", "h7"]


def test_first_purchases_keep_each_product_once_in_order_the_last_ones_past_the_limit() -> None:
    user = np.array([0, 0, 0, 0, 1, 1, 1])
    product = np.array(["a", "b", "a", "c", "x", "y", "z"], dtype=object)
    owner, kept = first_purchases(user, product)
    assert owner.tolist() == [0, 0, 0, 1, 1, 1] and kept.tolist() == ["a", "b", "c", "x", "y", "z"]
    owner, kept = first_purchases(user, product, limit=2)
    assert owner.tolist() == [0, 0, 1, 1] and kept.tolist() == ["b", "c", "y", "z"]


def test_epoch_seconds_floor_whatever_the_unit() -> None:
    times = pd.Series(pd.to_datetime(["1970-01-01 00:00:01.999", "2026-01-01 00:00:00.000"], utc=True))
    assert epoch_seconds(times).tolist() == [1, 1767225600]
    assert epoch_seconds(times.dt.as_unit("us")).tolist() == [1, 1767225600]
    assert epoch_seconds([T0]).tolist() == [1767225600]


def test_recent_histories_keep_the_last_entries_most_recent_last() -> None:
    eleven = int((T0 + 11 * HOUR).timestamp())
    got = recent_histories(_history_shop(), ["u2", "u1", "u3", "nobody", "u1"], limit=3)
    assert got.columns.tolist() == ["user_id", "recent_product_ids", "recent_event_types",
                                    "recent_timestamps", "purchased_product_ids",
                                    "n_events_total"]
    assert got["user_id"].tolist() == ["u2", "u1", "u3", "nobody", "u1"]
    assert got["recent_product_ids"].tolist() == [["P1"], ["P2", "P4", "P3"], [], [],
                                                  ["P2", "P4", "P3"]]
    assert got["recent_event_types"].tolist() == [
        ["purchase"], ["add_to_cart", "purchase", "view"], [], [],
        ["add_to_cart", "purchase", "view"]]
    assert got["recent_timestamps"].tolist() == [
        [int((T0 + 9 * HOUR).timestamp())], [eleven] * 3, [], [], [eleven] * 3]
    assert all(type(s) is int for row in got["recent_timestamps"] for s in row)
    assert got["n_events_total"].tolist() == [1, 4, 0, 0, 4]
    assert got["purchased_product_ids"].tolist() == [["P1"], ["P4"], [], [], ["P4"]]
    assert recent_histories(_history_shop().iloc[:0], ["u1"])["recent_product_ids"].tolist() \
        == [[]]


# --- profile ------------------------------------------------------------------------------


def _profile_shop() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """u1 buys twice on day 0 (basket 2 * 3.0 + 1 * 4.0, P2's catalogue price) and once on
    day 3 (P1's latest catalogue price, 6.0); u2 views twice on day 1 (once without a
    product) and buys P4, which the catalogue lacks (price 0). P3 has no category."""
    events = _events([
        ("e1", "u1", "P1", "purchase", T0 + 10 * HOUR, 2, 3.0),
        ("e2", "u1", "P2", "purchase", T0 + 11 * HOUR),
        ("e3", "u1", "P3", "view", T0 + 12 * HOUR),
        ("e4", "u1", None, "search", T0 + 13 * HOUR),
        ("e5", "u1", "P1", "purchase", T0 + 3 * DAY + 9 * HOUR),
        ("e6", "u1", "P2", "add_to_cart", T0 + 3 * DAY + 10 * HOUR),
        ("e7", "u2", None, "view", T0 + DAY + 7 * HOUR),
        ("e8", "u2", "P2", "view", T0 + DAY + 8 * HOUR),
        ("e9", "u2", "P4", "purchase", T0 + DAY + 9 * HOUR),
    ])
    catalog = pd.DataFrame({"product_id": ["P1", "P2", "P3", "P1"],
                            "category": ["candles", "mugs", None, "candles"],
                            "price": [5.0, 4.0, 2.0, 6.0]})
    users = pd.DataFrame({"user_id": ["u1", "u2", "u1", "u2"],
                          COUNTRY: ["FR", "GB", None, "DE"]})
    return events, catalog, users


def _profile(counts_7d: tuple[int, ...], counts_30d: tuple[int, ...], days: int,
             categories: int, basket: float, country: str | None) -> dict:
    """A profile row from (view, add_to_cart, purchase, search) counts and the rest."""
    return dict(zip(PROFILE_COLUMNS, (*counts_7d, *counts_30d, days, categories, basket,
                                      country), strict=True))


# (user, time) -> the profile visible then, computed by hand.
PROFILE_CASES = [
    ("u1", T0 + 15 * HOUR, None),  # the day's own events are not visible yet
    ("u1", T0 + DAY, _profile((1, 0, 2, 1), (1, 0, 2, 1), 0, 2, 10.0, "FR")),
    ("u1", T0 + 5 * DAY + 12 * HOUR,  # day 4's snapshot
     _profile((1, 1, 3, 1), (1, 1, 3, 1), 1, 2, 8.0, "FR")),
    ("u1", T0 + 9 * DAY, _profile((0, 1, 1, 0), (1, 1, 3, 1), 5, 2, 8.0, "FR")),
    ("u1", T0 + 33 * DAY + 12 * HOUR,  # day 32's: day 3 only
     _profile((0, 0, 0, 0), (0, 1, 1, 0), 29, 2, 6.0, "FR")),
    ("u1", T0 + 40 * DAY,  # the last snapshot, day 33's, whose windows had just emptied;
     # the days since the last purchase (day 3) keep counting to the day it is read
     _profile((0, 0, 0, 0), (0, 0, 0, 0), 36, 0, 0.0, "FR")),
    ("u2", T0 + 2 * DAY, _profile((2, 0, 1, 0), (2, 0, 1, 0), 0, 1, 0.0, "DE")),
    ("u3", T0 + 5 * DAY, None),  # never seen
]


def _as_dict(row: pd.Series) -> dict | None:
    if row.drop(COUNTRY).isna().all():
        assert row[COUNTRY] is None
        return None
    return {c: (v if c == COUNTRY else float(v)) for c, v in row.items()}


def test_profiles_as_of_hand_computed() -> None:
    events, catalog, users = _profile_shop()
    got = profiles_as_of(events, catalog, users, [c[0] for c in PROFILE_CASES],
                         [c[1] for c in PROFILE_CASES])
    assert got.columns.tolist() == list(PROFILE_COLUMNS) and len(got) == len(PROFILE_CASES)
    for (user, at, expected), (_, row) in zip(PROFILE_CASES, got.iterrows(), strict=True):
        assert _as_dict(row) == expected, (user, at)
    assert got[COUNT_COLUMNS[0]].dtype == "Int64"
    without_users = profiles_as_of(events, catalog, None, ["u1"], [T0 + DAY])
    assert without_users[COUNTRY].isna().all()  # unknown


def test_profiles_as_of_take_a_given_last_purchase() -> None:
    events, catalog, users = _profile_shop()
    got = profiles_as_of(events, catalog, users, ["u2", "u2"], [T0 + 2 * DAY] * 2,
                         last_purchase=[T0 - 10 * DAY + HOUR, pd.NaT])
    assert got["days_since_last_purchase"].tolist() == [11, NEVER]
    assert got["view_count_7d"].tolist() == [2, 2]  # the rest from the events


def test_readers_compute_the_profile_from_a_stored_row_at_their_time() -> None:
    d0 = (T0 - pd.Timestamp(0, tz="UTC")).days
    row = {"user_id": "a", "active_days": [d0, d0 + 3], "view_by_day": [2, 1],
           "add_to_cart_by_day": [0, 1], "purchase_by_day": [1, 0], "search_by_day": [0, 2],
           "basket_value_by_day": [10.0, 0.0], "recent_categories": ["x", "y"],
           "recent_category_days": [d0, d0 + 3],
           "last_purchase_epoch_s": int((T0 + 20 * HOUR).timestamp()), "country": "FR"}
    unknown = {"user_id": "b", **dict.fromkeys(STORED_PROFILE_COLUMNS)}
    stored = pd.DataFrame([row, row, row, row, unknown])
    read_at = [T0 + 4 * DAY, T0 + 8 * DAY, T0 + 31 * DAY,
               T0 + 3 * DAY + 21 * HOUR,  # day 3 itself: a pushed day counts too
               T0 + 4 * DAY]
    got = read_profiles(stored, read_at)
    assert got.columns.tolist() == ["user_id", *PROFILE_COLUMNS]
    assert got["user_id"].tolist() == ["a"] * 4 + ["b"]
    expected = [
        _profile((3, 1, 1, 2), (3, 1, 1, 2), 3, 2, 10.0, "FR"),  # D = day 3: both days
        _profile((1, 1, 0, 2), (3, 1, 1, 2), 7, 2, 10.0, "FR"),  # D = day 7: day 0 left 7 d
        _profile((0, 0, 0, 0), (1, 1, 0, 2), 30, 1, 0.0, "FR"),  # D = day 30: day 0 left
        _profile((3, 1, 1, 2), (3, 1, 1, 2), 2, 2, 10.0, "FR"),
        None,
    ]
    for i, want in enumerate(expected):
        assert _as_dict(got.drop(columns="user_id").iloc[i]) == want, i
    assert got[COUNT_COLUMNS[0]].dtype == "Int64"
    # lists as arrays (parquet) read the same; one time for every row
    arrays = stored.iloc[:1].map(lambda v: np.asarray(v) if isinstance(v, list) else v)
    pd.testing.assert_frame_equal(read_profiles(arrays, T0 + 8 * DAY),
                                  got.iloc[[1]].reset_index(drop=True))
    # a request's path without pandas: the same values, NaN where the row is unknown
    fast = profile_arrays({c: [r.get(c) for r in [row, row, row, row, unknown]]
                           for c in STORED_PROFILE_COLUMNS}, read_at)
    for column in PROFILE_COLUMNS:
        want = got[column].astype(object).where(got[column].notna(), None).tolist()
        have = [None if (isinstance(v, float) and np.isnan(v)) or v is None else v
                for v in fast[column].tolist()]
        assert have == want, column
    one = profile_arrays({c: [row[c]] for c in STORED_PROFILE_COLUMNS}, T0 + 8 * DAY)
    assert {c: v[0] for c, v in one.items()} == {c: fast[c][1] for c in PROFILE_COLUMNS}


def test_profiles_as_of_without_events_are_unknown() -> None:
    events, catalog, users = _profile_shop()
    out = profiles_as_of(events.iloc[:0], catalog, users, ["u1", "u2"], [T0, T0 + 5 * DAY])
    assert out.shape == (2, len(PROFILE_COLUMNS)) and out.isna().all().all()
    assert len(profiles_as_of(events, catalog, users, [], [])) == 0


# --- the offline build is the rule, day by day --------------------------------------------


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
def test_daily_snapshots_joined_point_in_time_are_profiles_as_of(seed: int) -> None:
    """The build reads a month of events a day and carries the last purchase in its rolled
    state; joined point in time and read at each query's time, its rows are the rule over
    all events."""
    days = 80
    events, catalog, users = _shop(seed, days)
    snapshots = _daily_snapshots(events, catalog, users, days + 5)
    # A user gets a row only on the days with an event of theirs.
    written = {(u, (t - T0).days - 1) for u, t in zip(snapshots["user_id"],
                                                      snapshots["event_timestamp"], strict=True)}
    assert written == {(u, (t - T0).days) for u, t in zip(events["user_id"], events["ts"],
                                                          strict=True)}
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
    expected = read_profiles(expected, expected["ts"])  # as a reader at each query's time

    got = profiles_as_of(events, catalog, users, queries["user_id"], queries["ts"])
    assert list(got.columns) == list(PROFILE_COLUMNS) and len(got) == len(queries)
    known = expected["event_timestamp"].notna()
    assert 0.3 * len(queries) < known.sum() < len(queries)  # both kinds of rows are tested
    for column in PROFILE_COLUMNS[:-1]:
        # every count to the bit; a mean basket up to the order of its additions
        check = (np.testing.assert_allclose if column == MEAN_BASKET
                 else np.testing.assert_array_equal)
        check(got[column].astype("float64").to_numpy(),
              expected[column].astype("float64").to_numpy(), err_msg=column)
    assert got[COUNTRY].tolist() == [c if isinstance(c, str) else None
                                      for c in expected[COUNTRY]]
    # Users gone quiet: their last row, read later, has every window back at zero.
    stale = known & (expected["purchase_count_30d"] == 0) & (expected["view_count_30d"] == 0)
    assert stale.any()
