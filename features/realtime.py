"""Real-time user features: fold incoming events into the online store as they happen.

The serving layer calls ``ingest_events`` on each incoming event (or a small batch). Each
event is checked against the landing-zone contract plus the rules an online event must meet;
a bad event raises ``InvalidEvent`` (a ``ValueError`` naming the field; the server answers
422) and, for a batch, nothing at all is written. Good events are folded into each user's
current online rows, by the rule of ``features.user_state``:

- ``user_recent_products``: the history events (product events of ``HISTORY_EVENT_TYPES``)
  are appended in (ts, event_id) order (event type and time alongside, the last
  ``HISTORY_LEN`` kept) and ``n_events_total`` grows by as many; searches leave it alone.
- ``user_profile``: each event counts on its day in the stored days of activity
  (``fold_activity``; a purchase adds to the day's basket at the event's price), and a
  purchase sets ``last_purchase_epoch_s`` to its time. Readers count the pushed day in
  every window (``features.user_state.read_profiles``), so a profile read after a push
  includes it; the categories touched are left to the nightly build, which recomputes every
  value from the landing events and whose materialization replaces these rows.

Rows are pushed with ``PushMode.ONLINE`` through the views' push sources, so the next online
read sees them; the offline store only ever holds what ``features.build`` wrote. A pushed row
is stamped one microsecond after the row it extends (see ``_row_time``): newer than that row,
older than the next nightly snapshot, which therefore replaces it on SQLite and Redis alike.
"""

from __future__ import annotations

import bisect
import datetime as dt
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from features.contract import EVENT_TYPES, ContractError, conform
from features.user_state import (
    ACTIVE_DAYS,
    BASKET_BY_DAY,
    CATEGORY_DAYS,
    COUNTRY,
    DAILY_COLUMNS,
    HISTORY_LEN,
    KEPT_DAYS,
    LAST_PURCHASE_TS,
    NEVER,
    PURCHASED,
    RECENT_CATEGORIES,
    STORED_PROFILE_COLUMNS,
    epoch_seconds,
    first_purchases,
    history_events,
)
from features.validation_suites import MAX_PRICE, MAX_QUANTITY

if TYPE_CHECKING:
    from feast import FeatureStore

RECENT_VIEW = "user_recent_products"
PROFILE_VIEW = "user_profile"
PUSH_SOURCES = {RECENT_VIEW: "user_recent_products_push", PROFILE_VIEW: "user_profile_push"}
RECENT_FIELDS = ("recent_product_ids", "recent_event_types", "recent_timestamps",
                 PURCHASED, "n_events_total")
VIEW_FIELDS: dict[str, tuple[str, ...]] = {RECENT_VIEW: RECENT_FIELDS,
                                           PROFILE_VIEW: STORED_PROFILE_COLUMNS}
# Client and server clocks differ a little; an event further ahead than this is refused.
CLOCK_SKEW = dt.timedelta(seconds=5)
# Earlier than this is a unit mistake (e.g. epoch seconds read as nanoseconds).
EARLIEST_TS = pd.Timestamp("2000-01-01", tz="UTC")
_ONE_US = pd.Timedelta(microseconds=1)


class InvalidEvent(ValueError):
    """An incoming event that may not enter the feature store.

    Attributes:
        index: the event's position in the batch.
        event_id: its id, when it has a readable one.
        field: the offending field.
        reason: why it is refused.
    """

    def __init__(self, index: int, event_id: str | None, field: str, reason: str):
        self.index, self.event_id, self.field, self.reason = index, event_id, field, reason
        name = f"event {index}" + (f" ({event_id})" if event_id else "")
        super().__init__(f"{name}: {field}: {reason}")


@dataclass(frozen=True)
class IngestResult:
    """What one ``ingest_events`` call did.

    Attributes:
        events: events folded in.
        users: the users whose rows were pushed, sorted.
        pushed: rows pushed per feature view.
        read_seconds: the online read of the users' current rows.
        push_seconds: the pushes, all views together.
    """

    events: int
    users: list[str]
    pushed: dict[str, int] = field(default_factory=dict)
    read_seconds: float = 0.0
    push_seconds: float = 0.0


def _event_id(record: Mapping[str, Any]) -> str | None:
    value = record.get("event_id")
    return value if isinstance(value, str) and value else None


def _contract_field(problem: str) -> str:
    """The column a ``ContractError`` problem names ("column 'x' ...", "missing ['x']")."""
    match = re.search(r"'([^']+)'", problem)
    return match.group(1) if match else "event"


def validate_event(record: Mapping[str, Any], *, index: int = 0,
                   now: dt.datetime | None = None) -> pa.Table:
    """Check one incoming event: the contract's schema, then the online rules.

    Args:
        record: field -> value, with the contract's event columns (``query``, ``price``
            optional).
        index: the event's position in its batch (for the error).
        now: the current time (UTC); defaults to the wall clock.

    Returns:
        A one-row arrow table with the contract's event schema.

    Raises:
        InvalidEvent: the first problem found, naming the field.
    """
    if not isinstance(record, Mapping):
        raise InvalidEvent(index, None, "event", f"expected an object, got {type(record).__name__}")
    event_id = _event_id(record)
    try:
        table = conform(pd.DataFrame([dict(record)]), "events")
    except ContractError as exc:
        raise InvalidEvent(index, event_id, _contract_field(exc.problems[0]),
                           "; ".join(exc.problems)) from exc
    row = table.to_pylist()[0]
    now_ts = pd.Timestamp(now or dt.datetime.now(dt.UTC))
    now_ts = now_ts.tz_localize("UTC") if now_ts.tzinfo is None else now_ts
    for key in ("event_id", "user_id"):
        if not row[key].strip():
            raise InvalidEvent(index, event_id, key, "must not be empty")
    if row["event_type"] not in EVENT_TYPES:
        raise InvalidEvent(index, event_id, "event_type",
                           f"{row['event_type']!r} is not one of {list(EVENT_TYPES)}")
    if row["event_type"] != "search" and not (row["product_id"] or "").strip():
        raise InvalidEvent(index, event_id, "product_id",
                           f"required for a {row['event_type']} event")
    if not 1 <= row["quantity"] <= MAX_QUANTITY:
        raise InvalidEvent(index, event_id, "quantity",
                           f"{row['quantity']} is outside [1, {MAX_QUANTITY}]")
    if row["price"] is not None and not 0 < row["price"] <= MAX_PRICE:
        raise InvalidEvent(index, event_id, "price",
                           f"{row['price']} is outside (0, {MAX_PRICE}]")
    ts = pd.Timestamp(row["ts"])
    if ts > now_ts + CLOCK_SKEW:
        raise InvalidEvent(index, event_id, "ts", f"{ts.isoformat()} is in the future "
                                                  f"(now {now_ts.isoformat()})")
    if ts < EARLIEST_TS:
        raise InvalidEvent(index, event_id, "ts", f"{ts.isoformat()} is before "
                                                  f"{EARLIEST_TS.date()}")
    return table


def validate_events(events: Sequence[Mapping[str, Any]] | pd.DataFrame, *,
                    now: dt.datetime | None = None) -> pd.DataFrame:
    """Check a batch of incoming events; one bad event refuses the whole batch.

    Args:
        events: dicts, or a frame with one event per row.
        now: the current time (UTC); defaults to the wall clock.

    Returns:
        The events with the contract's columns and types, sorted by (ts, event_id).

    Raises:
        InvalidEvent: the first bad event's first problem.
    """
    records = events.to_dict("records") if isinstance(events, pd.DataFrame) else list(events)
    tables = [validate_event(r, index=i, now=now) for i, r in enumerate(records)]
    if not tables:
        return conform(pd.DataFrame(columns=["event_id", "user_id", "product_id", "event_type",
                                             "quantity", "ts"]), "events").to_pandas()
    frame = pa.concat_tables(tables).to_pandas()
    return frame.sort_values(["ts", "event_id"], kind="stable").reset_index(drop=True)


def read_user_rows(store: FeatureStore, user_ids: list[str]
                   ) -> dict[str, dict[str, tuple[dict[str, Any] | None, pd.Timestamp | None]]]:
    """The users' current online rows of the real-time views, with their timestamps.

    Args:
        store: an open feature store.
        user_ids: users to read.

    Returns:
        user_id -> view -> (field -> value, or None when the store has no row; the row's
        event timestamp, or None).
    """
    refs = [f"{view}:{name}" for view, names in VIEW_FIELDS.items() for name in names]
    response = store.get_online_features(features=refs,
                                         entity_rows=[{"user_id": u} for u in user_ids],
                                         full_feature_names=True)
    data = response.to_dict()
    # Row timestamps at full precision (to_dict would give whole seconds).
    stamps: dict[str, list[pd.Timestamp | None]] = {}
    for name, vector in zip(response.proto.metadata.feature_names.val, response.proto.results,
                            strict=True):
        view = name.split("__", 1)[0]
        if view in VIEW_FIELDS and view not in stamps:
            stamps[view] = [
                pd.Timestamp(ts.seconds * 1_000_000_000 + ts.nanos, tz="UTC")
                if ts.seconds or ts.nanos else None
                for ts in vector.event_timestamps
            ]
    out: dict[str, dict[str, tuple[dict[str, Any] | None, pd.Timestamp | None]]] = {}
    for i, user in enumerate(data["user_id"]):
        out[user] = {}
        for view, names in VIEW_FIELDS.items():
            ts = stamps[view][i]
            values = {n: data[f"{view}__{n}"][i] for n in names} if ts is not None else None
            out[user][view] = (values, ts)
    return out


def _row_time(last_event: pd.Timestamp, current: pd.Timestamp | None) -> pd.Timestamp:
    """The pushed row's timestamp: one microsecond after the row it extends.

    Strictly newer than the current row, because online stores such as Redis skip a write
    that is not newer than what they hold; and older than the next nightly snapshot (stamped
    at the next interval end), so that snapshot replaces the pushed row on every online store.
    A user without a row gets the event's own time.
    """
    return last_event if current is None else current + _ONE_US


def fold_activity(profile: Mapping[str, Any], events: pd.DataFrame) -> dict[str, list]:
    """A stored profile's days of activity with the events added: each event counts on its
    UTC day (a new day entry where there was none), a purchase adds quantity x its price
    (0 without one) to the day's basket; days more than ``KEPT_DAYS`` before the newest one
    are dropped. A row whose lists disagree in length starts afresh.

    Returns:
        ``ACTIVE_DAYS``, ``DAILY_COLUMNS`` and ``BASKET_BY_DAY`` -> their new lists.
    """
    days = [int(d) for d in profile.get(ACTIVE_DAYS) or []]
    daily = {t: [int(v) for v in profile.get(c) or []] for t, c in DAILY_COLUMNS.items()}
    basket = [float(v) for v in profile.get(BASKET_BY_DAY) or []]
    if any(len(v) != len(days) for v in (*daily.values(), basket)):
        days, basket = [], []
        daily = {t: [] for t in DAILY_COLUMNS}
    event_days = (epoch_seconds(events["ts"]) // 86_400).tolist()
    for day, kind, quantity, price in zip(event_days, events["event_type"], events["quantity"],
                                          events["price"], strict=True):
        at = bisect.bisect_left(days, day)
        if at == len(days) or days[at] != day:
            days.insert(at, day)
            basket.insert(at, 0.0)
            for values in daily.values():
                values.insert(at, 0)
        daily[kind][at] += 1
        if kind == "purchase" and not pd.isna(price):
            basket[at] += float(quantity or 0) * float(price)
    start = bisect.bisect_left(days, days[-1] - KEPT_DAYS + 1) if days else 0
    return {ACTIVE_DAYS: days[start:], BASKET_BY_DAY: basket[start:],
            **{DAILY_COLUMNS[t]: v[start:] for t, v in daily.items()}}


def fold_events(user_id: str, events: pd.DataFrame,
                current: Mapping[str, tuple[dict[str, Any] | None, pd.Timestamp | None]],
                history_len: int = HISTORY_LEN) -> dict[str, dict[str, Any]]:
    """One user's new online rows after their events (pure: no store access).

    Args:
        user_id: the user.
        events: the user's validated events (any order).
        current: the user's current rows (``read_user_rows(...)[user_id]``).
        history_len: entries kept in the recent history.

    Returns:
        view -> the full row to push (``user_id``, every field, ``event_timestamp``);
        ``user_recent_products`` only when a history event was among the events.
    """
    recent, recent_ts = current[RECENT_VIEW]
    profile, profile_ts = current[PROFILE_VIEW]
    recent = recent or {}
    profile = profile or {}
    ids = list(recent.get("recent_product_ids") or [])
    types = list(recent.get("recent_event_types") or [])
    stamps = list(recent.get("recent_timestamps") or [])
    if len(stamps) != len(ids):  # a row from before the timestamps existed
        stamp = int(epoch_seconds([recent_ts])[0]) if recent_ts is not None else 0
        stamps = [stamp] * len(ids)
    last_purchase = profile.get(LAST_PURCHASE_TS)
    last_purchase = NEVER if last_purchase is None else int(last_purchase)
    purchases = events.loc[events["event_type"] == "purchase", "ts"]
    if len(purchases):
        last_purchase = max(last_purchase, int(epoch_seconds([purchases.max()])[0]))

    last = pd.Timestamp(events["ts"].max())
    rows: dict[str, dict[str, Any]] = {PROFILE_VIEW: {
        "user_id": user_id, **fold_activity(profile, events),
        RECENT_CATEGORIES: list(profile.get(RECENT_CATEGORIES) or []),
        CATEGORY_DAYS: list(profile.get(CATEGORY_DAYS) or []),
        LAST_PURCHASE_TS: last_purchase,
        COUNTRY: profile.get(COUNTRY),
        "event_timestamp": _row_time(last, profile_ts),
    }}
    entries = history_events(events)  # (H, contract columns), oldest first
    if len(entries):
        bought = recent.get(PURCHASED)
        if bought is None:  # a row from before the list existed: its history's purchases
            bought = [p for p, t in zip(ids, types, strict=False) if t == "purchase"]
        new = entries.loc[entries["event_type"] == "purchase", "product_id"].tolist()
        _, bought = first_purchases(np.zeros(len(bought) + len(new), np.int64),
                                    np.asarray(list(bought) + new, dtype=object))
        rows[RECENT_VIEW] = {
            "user_id": user_id,
            "recent_product_ids": (ids + entries["product_id"].tolist())[-history_len:],
            "recent_event_types": (types + entries["event_type"].tolist())[-history_len:],
            "recent_timestamps": (stamps + epoch_seconds(entries["ts"]).tolist())[-history_len:],
            PURCHASED: [str(p) for p in bought],
            "n_events_total": int(recent.get("n_events_total") or 0) + len(entries),
            "event_timestamp": _row_time(last, recent_ts),
        }
    return rows


def ingest_events(store: FeatureStore, events: Sequence[Mapping[str, Any]] | pd.DataFrame, *,
                  now: dt.datetime | None = None,
                  history_len: int = HISTORY_LEN) -> IngestResult:
    """Validate incoming events and fold them into the users' online features.

    Args:
        store: an open feature store (``features.store.feature_store``) with the repo applied.
        events: one or more events as dicts (or a frame), contract columns.
        now: the current time (UTC) for the no-future rule; defaults to the wall clock.
        history_len: entries kept in the recent history.

    Returns:
        What was pushed, and how long the online read and the pushes took.

    Raises:
        InvalidEvent: a bad event; nothing is written then.
    """
    from feast.data_source import PushMode

    frame = validate_events(events, now=now)  # (N, contract columns), oldest first
    if frame.empty:
        return IngestResult(events=0, users=[])
    users = sorted(frame["user_id"].unique())
    started = time.perf_counter()
    current = read_user_rows(store, users)
    read_seconds = time.perf_counter() - started

    rows: dict[str, list[dict[str, Any]]] = {RECENT_VIEW: [], PROFILE_VIEW: []}
    for user, group in frame.groupby("user_id", sort=True):
        for view, row in fold_events(user, group, current[user], history_len).items():
            rows[view].append(row)
    started = time.perf_counter()
    for view, view_rows in rows.items():
        if view_rows:
            store.push(PUSH_SOURCES[view], pd.DataFrame(view_rows), to=PushMode.ONLINE)
    return IngestResult(events=len(frame), users=users,
                        pushed={view: len(r) for view, r in rows.items()},
                        read_seconds=read_seconds,
                        push_seconds=time.perf_counter() - started)
