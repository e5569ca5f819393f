"""The real-time fold of pushed events into a user's online rows (``fold_events``), against
hand-computed rows; the pushes themselves: tests/integration/test_realtime_push.py."""

from __future__ import annotations

import pandas as pd
import pytest

from features.realtime import PROFILE_VIEW, RECENT_VIEW, fold_activity, fold_events
from features.user_state import COUNT_COLUMNS, NEVER

pytestmark = pytest.mark.fast

NOW = pd.Timestamp("2026-02-01 12:00", tz="UTC")
SNAPSHOT = pd.Timestamp("2026-02-01", tz="UTC")
ONE_US = pd.Timedelta(microseconds=1)
DAY = (NOW - pd.Timestamp(0, tz="UTC")).days  # NOW's epoch day


def _events(rows: list[tuple[str, str | None, str, pd.Timestamp]]) -> pd.DataFrame:
    """Validated-event columns from (event_id, product_id, event_type, ts) of user "u"."""
    return pd.DataFrame({
        "event_id": [r[0] for r in rows], "user_id": "u",
        "product_id": [r[1] for r in rows], "event_type": [r[2] for r in rows],
        "quantity": 1, "price": 2.0, "ts": pd.to_datetime([r[3] for r in rows], utc=True),
    })


def _epoch(ts: pd.Timestamp) -> int:
    return int(ts.timestamp())


def test_events_extend_the_rows_they_fold_into() -> None:
    recent = {"recent_product_ids": ["A", "B"], "recent_event_types": ["view", "view"],
              "recent_timestamps": [100, 200], "n_events_total": 7}
    profile = {"active_days": [DAY - 4, DAY], "view_by_day": [1, 1],
               "add_to_cart_by_day": [0, 1], "purchase_by_day": [1, 0],
               "search_by_day": [0, 1], "basket_value_by_day": [5.0, 0.0],
               "recent_categories": ["c"], "recent_category_days": [DAY - 4],
               "last_purchase_epoch_s": _epoch(NOW - pd.Timedelta(days=4)), "country": "FR"}
    t1, t2 = NOW + pd.Timedelta(seconds=1.5), NOW + pd.Timedelta(seconds=2)
    events = _events([  # out of order; x2 and x3 at the same time: x2 first
        ("x3", "P9", "purchase", t2),
        ("x4", None, "search", t2),
        ("x1", "P8", "view", t1),
        ("x2", "P7", "add_to_cart", t2),
    ])
    rows = fold_events("u", events, {RECENT_VIEW: (recent, SNAPSHOT),
                                     PROFILE_VIEW: (profile, SNAPSHOT)}, history_len=4)
    assert rows[RECENT_VIEW] == {
        "user_id": "u",
        "recent_product_ids": ["B", "P8", "P7", "P9"],  # A falls out
        "recent_event_types": ["view", "view", "add_to_cart", "purchase"],
        "recent_timestamps": [200, _epoch(NOW) + 1, _epoch(t2), _epoch(t2)],
        "purchased_product_ids": ["P9"],  # a row without the list: its history's purchases
        "n_events_total": 10,
        "event_timestamp": SNAPSHOT + ONE_US,
    }
    kept = fold_events("u", events, {RECENT_VIEW: ({**recent, "purchased_product_ids":
                                                    ["P9", "OLD"]}, SNAPSHOT),
                                     PROFILE_VIEW: (profile, SNAPSHOT)}, history_len=4)
    assert kept[RECENT_VIEW]["purchased_product_ids"] == ["P9", "OLD"]  # every purchase, once
    assert rows[PROFILE_VIEW] == {
        "user_id": "u",
        "active_days": [DAY - 4, DAY],  # today's entry grows
        "view_by_day": [1, 2], "add_to_cart_by_day": [0, 2], "purchase_by_day": [1, 1],
        "search_by_day": [0, 2], "basket_value_by_day": [5.0, 2.0],  # 1 x 2.0 bought
        "recent_categories": ["c"], "recent_category_days": [DAY - 4],  # the build's job
        "last_purchase_epoch_s": _epoch(t2),  # read back as 0 days since
        "country": "FR",
        "event_timestamp": SNAPSHOT + ONE_US,
    }
    assert all(type(s) is int for s in rows[RECENT_VIEW]["recent_timestamps"])


def test_a_new_user_who_only_searches_gets_a_profile_row_alone() -> None:
    rows = fold_events("u", _events([("s1", None, "search", NOW)]),
                       {RECENT_VIEW: (None, None), PROFILE_VIEW: (None, None)})
    assert list(rows) == [PROFILE_VIEW]
    assert rows[PROFILE_VIEW] == {
        "user_id": "u", "active_days": [DAY], "view_by_day": [0], "add_to_cart_by_day": [0],
        "purchase_by_day": [0], "search_by_day": [1], "basket_value_by_day": [0.0],
        "recent_categories": [], "recent_category_days": [], "last_purchase_epoch_s": NEVER,
        "country": None,
        "event_timestamp": NOW,
    }


def test_a_row_without_timestamps_gets_its_own_time_for_the_old_entries() -> None:
    recent = {"recent_product_ids": ["A", "B"], "recent_event_types": ["view", "purchase"],
              "recent_timestamps": None, "n_events_total": 2}
    rows = fold_events("u", _events([("v1", "C", "view", NOW)]),
                       {RECENT_VIEW: (recent, SNAPSHOT), PROFILE_VIEW: (None, None)})
    assert rows[RECENT_VIEW]["recent_timestamps"] == [_epoch(SNAPSHOT)] * 2 + [_epoch(NOW)]
    assert rows[RECENT_VIEW]["n_events_total"] == 3
    assert rows[PROFILE_VIEW]["last_purchase_epoch_s"] == NEVER  # a view buys nothing


def test_an_older_pushed_purchase_does_not_move_the_last_one_back() -> None:
    later = _epoch(NOW + pd.Timedelta(hours=1))
    profile = {**dict.fromkeys(COUNT_COLUMNS, 0), "last_purchase_epoch_s": later}
    rows = fold_events("u", _events([("b1", "C", "purchase", NOW)]),
                       {RECENT_VIEW: (None, None), PROFILE_VIEW: (profile, SNAPSHOT)})
    assert rows[PROFILE_VIEW]["last_purchase_epoch_s"] == later


def test_days_older_than_the_kept_month_are_dropped_and_bad_rows_start_afresh() -> None:
    profile = {"active_days": [DAY - 40, DAY - 29, DAY - 10], "view_by_day": [1, 2, 3],
               "add_to_cart_by_day": [0, 0, 0], "purchase_by_day": [0, 0, 0],
               "search_by_day": [0, 0, 0], "basket_value_by_day": [0.0, 0.0, 0.0]}
    late = NOW - pd.Timedelta(days=10)  # a late event of an earlier day joins that day
    got = fold_activity(profile, _events([("v1", "A", "view", NOW), ("v2", "B", "view", late)]))
    assert got["active_days"] == [DAY - 29, DAY - 10, DAY]
    assert got["view_by_day"] == [2, 4, 1]
    broken = {**profile, "view_by_day": [1]}  # lists that disagree: not trusted
    assert fold_activity(broken, _events([("v1", "A", "view", NOW)]))["view_by_day"] == [1]
