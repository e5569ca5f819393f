"""Real-time pushes: incoming events reach the online store at once, bad ones never do.

A small synthetic shop is built and materialized day by day, once per profile for the module;
each test ingests events into a private copy of it as the serving layer would, and reads them
back through the online store (and through ``online_user_history``, which the serving API
calls). The ingest latency is measured by benchmarks/realtime_push.py.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from shops import FeastProfile, feast_copy, materialized_shop

from core.settings import Settings
from features.contract import Interval
from features.realtime import (
    InvalidEvent,
    fold_events,
    ingest_events,
    read_user_rows,
    validate_events,
)
from features.store import feature_store, online_user_history
from features.user_state import COUNT_COLUMNS, HISTORY_LEN, read_profiles

pytestmark = pytest.mark.integration

START = dt.date(2026, 1, 1)
DAYS = 3
LAST = START + dt.timedelta(days=DAYS - 1)
AFTER = pd.Timestamp(Interval.for_day(LAST).end)  # the first instant after the built days
NEW_USER = "U-brand-new"


@pytest.fixture(scope="module")
def built(feast: FeastProfile, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic shop, built and materialized day by day (its home)."""
    return materialized_shop(tmp_path_factory.mktemp(f"realtime-{feast.name}") / "state",
                             feast, start=START, days=DAYS, users=30, products=20, seed=11)


@pytest.fixture
def settings(built: Path, feast: FeastProfile, tmp_path: Path) -> Iterator[Settings]:
    """A private copy of the module's shop: every test here writes to the online store."""
    with feast_copy(built, feast, tmp_path) as settings:
        yield settings


def _event(event_id: str, user_id: str, event_type: str, product_id: str | None,
           ts: pd.Timestamp, **extra: Any) -> dict[str, Any]:
    return {"event_id": event_id, "user_id": user_id, "product_id": product_id,
            "event_type": event_type, "query": "candle" if event_type == "search" else None,
            "quantity": 1, "price": None if event_type == "search" else 9.5,
            "ts": ts.isoformat(), **extra}


def _read(stored: dict, at: pd.Timestamp) -> dict[str, Any]:
    """A stored user_profile row as the ranking reads it at ``at``."""
    return read_profiles(pd.DataFrame([stored]), at).iloc[0].to_dict()


def _known_user(settings: Settings) -> tuple[str, dict, dict]:
    """A user with both online rows, and those rows."""
    day = pd.read_parquet(settings.offline_root / "user_recent_products" / f"date={LAST}")
    user = sorted(day["user_id"])[0]
    rows = read_user_rows(feature_store(settings), [user])[user]
    assert rows["user_recent_products"][0] and rows["user_profile"][0]
    return user, rows["user_recent_products"][0], rows["user_profile"][0]


def test_a_purchase_is_online_at_once_as_the_most_recent_product(settings: Settings) -> None:
    store = feature_store(settings)
    user, recent, profile = _known_user(settings)
    before_ts = {v: ts for v, (_, ts) in read_user_rows(store, [user])[user].items()}
    product = "P000007"
    ts = AFTER + pd.Timedelta(minutes=10)
    result = ingest_events(store, [_event("rt-1", user, "purchase", product, ts)],
                           now=ts + pd.Timedelta(seconds=1))
    assert result.events == 1 and result.users == [user]
    assert result.pushed == {"user_recent_products": 1, "user_profile": 1}

    rows = read_user_rows(feature_store(settings), [user])[user]  # a fresh store sees it too
    got_recent, recent_ts = rows["user_recent_products"]
    got_profile, profile_ts = rows["user_profile"]
    assert got_recent["recent_product_ids"] == (recent["recent_product_ids"]
                                                + [product])[-HISTORY_LEN:]
    assert got_recent["recent_event_types"] == (recent["recent_event_types"]
                                                + ["purchase"])[-HISTORY_LEN:]
    assert got_recent["recent_timestamps"] == (recent["recent_timestamps"]
                                               + [int(ts.timestamp())])[-HISTORY_LEN:]
    assert got_recent["n_events_total"] == recent["n_events_total"] + 1
    before, after = _read(profile, ts), _read(got_profile, ts)  # read at the same time
    for column in COUNT_COLUMNS:
        bump = 1 if column.startswith("purchase_") else 0
        assert after[column] == before[column] + bump, column
    assert got_profile["last_purchase_epoch_s"] == int(ts.timestamp())
    assert after["days_since_last_purchase"] == 0
    for column in ("distinct_categories_30d", "country"):
        assert after[column] == before[column], column  # the nightly build's job
    # Not older than the rows they replace (SQLite keeps whole seconds; see the next test).
    assert recent_ts >= before_ts["user_recent_products"]
    assert profile_ts >= before_ts["user_profile"]
    # The serving API's reader shows it as the most recent product.
    history = online_user_history(feature_store(settings), [user])[user]
    assert history["recent_product_ids"][-1] == product
    assert history["recent_event_types"][-1] == "purchase"


def test_pushed_rows_are_stamped_after_the_rows_they_extend() -> None:
    """Strictly newer than the current row (Redis drops a write that is not), older than the
    next nightly snapshot (so that it replaces the pushed row), the event's time for a user
    without a row."""
    snapshot = AFTER  # the latest nightly snapshot of the user
    events = validate_events([_event("s-1", "u", "purchase", "P1",
                                     AFTER + pd.Timedelta(hours=5))],
                             now=AFTER + pd.Timedelta(hours=6))
    known = fold_events("u", events, {"user_recent_products": ({}, snapshot),
                                      "user_profile": ({}, snapshot)})
    for view in ("user_recent_products", "user_profile"):
        stamp = known[view]["event_timestamp"]
        assert snapshot < stamp < snapshot + pd.Timedelta(days=1), view
    again = fold_events("u", events, {v: ({}, known[v]["event_timestamp"]) for v in known})
    assert all(again[v]["event_timestamp"] > known[v]["event_timestamp"] for v in known)
    new = fold_events("u", events, {"user_recent_products": (None, None),
                                    "user_profile": (None, None)})
    assert new["user_profile"]["event_timestamp"] == AFTER + pd.Timedelta(hours=5)


def test_events_of_a_batch_are_folded_in_time_order(settings: Settings) -> None:
    store = feature_store(settings)
    user, recent, profile = _known_user(settings)
    base = AFTER + pd.Timedelta(hours=1)
    reps = HISTORY_LEN // 3 + 5  # enough product events to push old ones out
    kinds = ["view", "add_to_cart", "purchase", "search"] * reps
    events = [_event(f"b-{i:03d}", user, kind, None if kind == "search" else f"P{i:06d}",
                     base + pd.Timedelta(seconds=i))
              for i, kind in enumerate(kinds)]
    events.reverse()  # arrival order must not matter
    ingest_events(store, pd.DataFrame(events), now=base + pd.Timedelta(minutes=5))
    got = read_user_rows(store, [user])[user]
    got_recent, got_profile = got["user_recent_products"][0], got["user_profile"][0]
    new_ids = [f"P{i:06d}" for i, k in enumerate(kinds) if k != "search"]
    new_types = [k for k in kinds if k != "search"]
    new_stamps = [int((base + pd.Timedelta(seconds=i)).timestamp())
                  for i, k in enumerate(kinds) if k != "search"]
    assert got_recent["recent_product_ids"] == (recent["recent_product_ids"]
                                                + new_ids)[-HISTORY_LEN:]
    assert got_recent["recent_event_types"] == (recent["recent_event_types"]
                                                + new_types)[-HISTORY_LEN:]
    assert got_recent["recent_timestamps"] == (recent["recent_timestamps"]
                                               + new_stamps)[-HISTORY_LEN:]
    assert len(got_recent["recent_product_ids"]) == HISTORY_LEN
    assert got_recent["n_events_total"] == recent["n_events_total"] + 3 * reps
    before, after = _read(profile, base), _read(got_profile, base)
    for kind in ("view", "add_to_cart", "purchase", "search"):
        for window in (7, 30):
            column = f"{kind}_count_{window}d"
            assert after[column] == before[column] + reps, column


def test_a_brand_new_user_gets_rows_and_a_search_only_counts(settings: Settings) -> None:
    store = feature_store(settings)
    assert read_user_rows(store, [NEW_USER])[NEW_USER] == {
        "user_recent_products": (None, None), "user_profile": (None, None)}
    assert online_user_history(store, [NEW_USER])[NEW_USER]["recent_product_ids"] == []
    ts = AFTER + pd.Timedelta(minutes=1)
    ingest_events(store, [_event("n-1", NEW_USER, "view", "P000003", ts)],
                  now=ts + pd.Timedelta(seconds=1))
    rows = read_user_rows(store, [NEW_USER])[NEW_USER]
    recent, recent_ts = rows["user_recent_products"]
    assert recent == {"recent_product_ids": ["P000003"], "recent_event_types": ["view"],
                      "recent_timestamps": [int(ts.timestamp())], "purchased_product_ids": [],
                      "n_events_total": 1}
    stored = rows["user_profile"][0]
    profile = _read(stored, ts)
    assert profile["view_count_7d"] == profile["view_count_30d"] == 1
    assert sum(profile[c] for c in COUNT_COLUMNS) == 2
    assert stored["last_purchase_epoch_s"] == -1  # never purchased
    assert profile["days_since_last_purchase"] == -1
    assert profile["country"] is None and profile["mean_basket_value_30d"] == 0.0

    later = ts + pd.Timedelta(minutes=1)
    result = ingest_events(store, [_event("n-2", NEW_USER, "search", None, later)],
                           now=later + pd.Timedelta(seconds=1))
    assert result.pushed == {"user_recent_products": 0, "user_profile": 1}
    rows = read_user_rows(store, [NEW_USER])[NEW_USER]
    assert rows["user_recent_products"] == (recent, recent_ts)  # untouched
    profile = _read(rows["user_profile"][0], later)
    assert profile["search_count_7d"] == 1
    assert profile["view_count_7d"] == 1


def _bad_events(user: str, ts: pd.Timestamp) -> list[tuple[str, Any]]:
    """(the field that must be named, a bad event) pairs."""
    good = _event("bad-x", user, "view", "P000001", ts)
    without_user = {k: v for k, v in good.items() if k != "user_id"}
    return [
        ("event_type", {**good, "event_type": "wishlist"}),
        ("quantity", {**good, "quantity": 0}),
        ("quantity", {**good, "quantity": "two"}),
        ("quantity", {**good, "quantity": 1.5}),
        ("ts", {**good, "ts": (ts + pd.Timedelta(hours=1)).isoformat()}),  # the future
        ("ts", {**good, "ts": "yesterday-ish"}),
        ("ts", {**good, "ts": None}),
        ("user_id", without_user),
        ("user_id", {**good, "user_id": "  "}),
        ("product_id", {**good, "product_id": None}),  # a view names its product
        ("price", {**good, "price": -3.0}),
        ("coupon", {**good, "coupon": "FREE"}),  # not in the contract
        ("event", ["not", "an", "object"]),
    ]


def test_a_bad_event_is_refused_with_its_reason_and_nothing_is_written(
    settings: Settings,
) -> None:
    store = feature_store(settings)
    user, _, _ = _known_user(settings)
    now = AFTER + pd.Timedelta(minutes=30)
    before = read_user_rows(store, [user, NEW_USER])
    for field, bad in _bad_events(user, now):
        # A good event of another user first: the whole batch is refused, not just the bad one.
        batch = [_event("ok-1", NEW_USER, "purchase", "P000002", now - pd.Timedelta(minutes=1)),
                 bad]
        with pytest.raises(InvalidEvent) as refused:
            ingest_events(store, batch, now=now)
        assert isinstance(refused.value, ValueError)  # the server maps it to 422
        assert refused.value.field == field, (bad, str(refused.value))
        assert refused.value.index == 1
        assert field in str(refused.value) and refused.value.reason
        assert read_user_rows(store, [user, NEW_USER]) == before, field
    # The same good event alone goes through: the refusals were about the bad ones.
    ingest_events(store, [_event("ok-1", NEW_USER, "purchase", "P000002", now)], now=now)
    assert read_user_rows(store, [NEW_USER])[NEW_USER]["user_profile"][0][
        "purchase_by_day"] == [1]


def test_consecutive_single_event_pushes_all_land(settings: Settings) -> None:
    """One event per call, as the serving API ingests them: every push lands (the latency of
    the same loop is measured by benchmarks/realtime_push.py)."""
    store = feature_store(settings)
    user, recent, _ = _known_user(settings)
    n = 12
    for i in range(n):
        ts = AFTER + pd.Timedelta(seconds=10 + i)
        ingest_events(store, [_event(f"seq-{i}", user, "view", f"P{i % 20:06d}", ts)],
                      now=ts + pd.Timedelta(seconds=1))
    got = read_user_rows(store, [user])[user]["user_recent_products"][0]
    assert got["n_events_total"] == recent["n_events_total"] + n
    assert got["recent_product_ids"][-n:] == [f"P{i % 20:06d}" for i in range(n)]
