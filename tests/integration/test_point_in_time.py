"""Point-in-time correctness: a training row at time t sees only the values valid at t.

A hand-made shop where features change mid-history, built day by day and read back through
Feast's historical retrieval (``two_tower_training_v1``):

- u1 views P1 on day 1 and buys two P1 on day 2, then stops: their 7-day purchase count is 0,
  then 2 from the end of day 2, and 0 again from the end of day 9 (day 2 has left the window);
  the 30-day count stays 2.
- P1 costs 10.0 until its price changes to 12.5 on day 3 at 08:00; the change is seen from
  the end of day 3 (the snapshot of the day it landed), never before.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from shops import FeastProfile, shop_environment

from core.settings import Settings
from features.build import build_interval
from features.contract import Interval, write_partition
from features.store import TRAINING_SERVICE, apply_repo, historical_features
from features.user_state import read_profiles

pytestmark = pytest.mark.integration

DAY1 = dt.date(2026, 3, 1)
DAYS = 11
MICRO = pd.Timedelta(microseconds=1)


def _day(n: int) -> dt.date:
    return DAY1 + dt.timedelta(days=n - 1)


def _at(n: int, clock: str) -> pd.Timestamp:
    return pd.Timestamp(f"{_day(n).isoformat()} {clock}", tz="UTC")


def _end(n: int) -> pd.Timestamp:
    """The snapshot time of day n (the next midnight)."""
    return pd.Timestamp(Interval.for_day(_day(n)).end)


def _events(rows: list[tuple[str, str, str, str, pd.Timestamp]]) -> pd.DataFrame:
    return pd.DataFrame({
        "event_id": [r[0] for r in rows], "user_id": [r[1] for r in rows],
        "product_id": [r[2] for r in rows], "event_type": [r[3] for r in rows],
        "quantity": [1] * len(rows), "price": [10.0] * len(rows),
        "ts": pd.to_datetime([r[4] for r in rows], utc=True),
    })


@pytest.fixture(scope="module")
def built(feast: FeastProfile, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shop of the module docstring, built for days 1..DAYS in order (its home)."""
    home = tmp_path_factory.mktemp(f"point-in-time-{feast.name}") / "state"
    with shop_environment(home, **feast.env) as settings:
        _land_and_build(settings)
    return home


@pytest.fixture
def settings(built: Path, feast: FeastProfile) -> Iterator[Settings]:
    """The module's shop (every test here only reads it)."""
    with shop_environment(built, **feast.env) as settings:
        yield settings


def _land_and_build(settings: Settings) -> None:
    root = settings.landing_root
    product = {"product_id": "P1", "title": "Pillar Candle", "category": "candles",
               "brand": "Lumo", "description": "Beeswax"}
    write_partition(root, "products", _day(1), pd.DataFrame([
        {**product, "price": 10.0, "updated_at": _at(1, "06:00")},
        {**product, "product_id": "P2", "title": "Mug", "category": "mugs", "price": 4.0,
         "updated_at": _at(1, "06:00")}]))
    write_partition(root, "products", _day(3), pd.DataFrame([
        {**product, "price": 12.5, "updated_at": _at(3, "08:00")}]))
    write_partition(root, "users", _day(1), pd.DataFrame({"user_id": ["u1", "u2"],
                                                          "country": ["FR", "GB"]}))
    write_partition(root, "events", _day(1), _events([
        ("e1", "u1", "P1", "view", _at(1, "09:00")),
        ("e2", "u2", "P2", "view", _at(1, "10:00"))]))
    write_partition(root, "events", _day(2), _events([
        ("e3", "u1", "P1", "purchase", _at(2, "10:00")),
        ("e4", "u1", "P1", "purchase", _at(2, "10:05"))]))
    write_partition(root, "events", _day(6), _events([  # another user, to keep rows apart
        ("e5", "u2", "P2", "purchase", _at(6, "12:00"))]))
    apply_repo(settings)
    for n in range(1, DAYS + 1):
        build_interval(settings, _day(n))


def _features(settings: Settings, times: dict[str, pd.Timestamp],
              user: str = "u1") -> dict[str, pd.Series]:
    """name -> the training row of (user, P1) at that time."""
    entity = pd.DataFrame({"user_id": [user] * len(times), "product_id": ["P1"] * len(times),
                           "event_timestamp": list(times.values()), "name": list(times)})
    out = historical_features(settings, entity, TRAINING_SERVICE)
    assert list(out["name"]) == list(times)  # the entity frame's order
    out = read_profiles(out, out["event_timestamp"])  # as a reader at each row's time
    return {row["name"]: row for _, row in out.iterrows()}


def test_seven_day_purchase_count_goes_0_2_0(settings: Settings) -> None:
    times = {
        "before any snapshot": _at(1, "12:00"),
        "day 2, after the purchases": _at(2, "12:00"),
        "last instant of day 2": _end(2) - MICRO,
        "at day 2's snapshot": _end(2),
        "just after it": _end(2) + MICRO,
        "day 8's snapshot": _end(8),
        "last instant before day 9's": _end(9) - MICRO,
        "at day 9's snapshot": _end(9),
        "after day 9's": _end(9) + pd.Timedelta(hours=5),
    }
    got = _features(settings, times)
    purchases_7d = {k: got[k]["purchase_count_7d"] for k in times}
    assert pd.isna(purchases_7d.pop("before any snapshot"))  # nothing known yet
    assert purchases_7d == {
        "day 2, after the purchases": 0,  # the day's own events are not visible yet
        "last instant of day 2": 0,
        "at day 2's snapshot": 2,
        "just after it": 2,
        "day 8's snapshot": 2,  # window days 2..8
        "last instant before day 9's": 2,
        "at day 9's snapshot": 0,  # window days 3..9
        "after day 9's": 0,
    }
    assert got["after day 9's"]["purchase_count_30d"] == 2
    assert got["last instant of day 2"]["view_count_7d"] == 1
    # days since the last purchase (stored as its time) counted to the day it is read
    assert got["at day 2's snapshot"]["days_since_last_purchase"] == 0
    assert got["last instant of day 2"]["days_since_last_purchase"] == -1
    assert got["day 8's snapshot"]["days_since_last_purchase"] == 6
    # The recent history changes only at snapshots too.
    assert list(got["last instant of day 2"]["recent_event_types"]) == ["view"]
    assert list(got["at day 2's snapshot"]["recent_event_types"]) == [
        "view", "purchase", "purchase"]
    assert list(got["at day 2's snapshot"]["recent_timestamps"]) == [
        int(_at(1, "09:00").timestamp()), int(_at(2, "10:00").timestamp()),
        int(_at(2, "10:05").timestamp())]


def test_a_price_change_is_seen_only_from_its_snapshot_on(settings: Settings) -> None:
    times = {
        "day 1": _at(1, "12:00"),
        "day 2's snapshot": _end(2),
        "day 3, after the change": _at(3, "09:00"),
        "last instant of day 3": _end(3) - MICRO,
        "at day 3's snapshot": _end(3),
        "day 10": _at(10, "12:00"),
    }
    got = _features(settings, times)
    assert pd.isna(got["day 1"]["price"])
    assert {k: got[k]["price"] for k in list(times)[1:]} == {
        "day 2's snapshot": 10.0,
        "day 3, after the change": 10.0,
        "last instant of day 3": 10.0,
        "at day 3's snapshot": 12.5,
        "day 10": 12.5,
    }
    # The item text of P1 is there from day 1's snapshot on, and P1's purchase counts follow
    # the same windows as u1's.
    assert got["day 2's snapshot"]["text"] == "Pillar Candle | candles | Lumo | Beeswax"
    assert got["day 2's snapshot"]["product_purchase_count_7d"] == 2
    assert got["day 10"]["product_purchase_count_7d"] == 0  # snapshot of day 9
    assert got["day 10"]["product_purchase_count_30d"] == 2
    # first seen day 1 06:00, stored as that time (the row does not change daily for it)
    assert got["day 10"]["first_seen_epoch_s"] == int(_at(1, "06:00").timestamp())


def test_each_user_sees_only_their_own_rows(settings: Settings) -> None:
    got = _features(settings, {"day 7": _at(7, "12:00"), "day 3": _at(3, "12:00")}, user="u2")
    assert got["day 3"]["purchase_count_7d"] == 0 and got["day 7"]["purchase_count_7d"] == 1
    assert got["day 7"]["country"] == "GB"
    assert list(got["day 7"]["recent_product_ids"]) == ["P2", "P2"]
