"""Feast over the offline partitions: point-in-time joins, row order, online reads, reruns,
and online == offline at the interval end for every online view.

A small synthetic shop is built and materialized day by day, as the DAG does, once per
profile for the module; the tests read it, and the two that materialize again do so on a
private copy. Expected histories and profiles are computed from the raw landing data by the
rule (``features.user_state``: ``recent_histories``, ``profiles_as_of``), not from the feature
tables under test.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from shops import FeastProfile, feast_copy, materialized_shop, shop_environment

from core.settings import Settings
from features.contract import Interval, read_range, read_upto
from features.store import (
    MATERIALIZED_VIEWS,
    OnlineUserReader,
    feature_store,
    historical_user_history,
    materialize_day,
    online_user_history,
)
from features.user_state import (
    DAYS_SINCE_PURCHASE,
    PROFILE_COLUMNS,
    STORED_PROFILE_COLUMNS,
    VECTORS,
    history_events,
    profiles_as_of,
    read_profiles,
    recent_histories,
)
from training.ranking.histories import Histories

pytestmark = pytest.mark.integration

START = dt.date(2026, 1, 1)
DAYS = 5
DAY_LIST = [START + dt.timedelta(days=i) for i in range(DAYS)]
LAST = DAY_LIST[-1]
UNKNOWN = "U-never-seen"


@pytest.fixture(scope="module")
def built(feast: FeastProfile, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic shop, built and materialized day by day in date order (its home)."""
    return materialized_shop(tmp_path_factory.mktemp(f"feature-store-{feast.name}") / "state",
                             feast, start=START, days=DAYS, users=40, products=30, seed=5)


@pytest.fixture
def settings(built: Path, feast: FeastProfile) -> Iterator[Settings]:
    """The module's shop, to read."""
    with shop_environment(built, **feast.env) as settings:
        yield settings


@pytest.fixture
def own_settings(built: Path, feast: FeastProfile, tmp_path: Path) -> Iterator[Settings]:
    """A private copy of the module's shop, to write."""
    with feast_copy(built, feast, tmp_path) as settings:
        yield settings


def _events(settings: Settings) -> pd.DataFrame:
    return read_range(settings.landing_root, "events", DAY_LIST)


def _expected(events: pd.DataFrame, user_id: str, before: pd.Timestamp) -> dict:
    """The user's history by the rule (``features.user_state``) over the raw events strictly
    before ``before`` (oldest first)."""
    row = recent_histories(events[events["ts"] < before], [user_id]).iloc[0]
    return {"recent_product_ids": row["recent_product_ids"],
            "recent_event_types": row["recent_event_types"],
            "purchased_product_ids": row["purchased_product_ids"],
            "n_events_total": int(row["n_events_total"])}


def _got(row: pd.Series) -> dict:
    return {"recent_product_ids": list(row["recent_product_ids"]),
            "recent_event_types": list(row["recent_event_types"]),
            "purchased_product_ids": list(row["purchased_product_ids"]),
            "n_events_total": int(row["n_events_total"])}


def _history(row: dict) -> dict:
    """The history part of an ``online_user_history`` row."""
    return {k: row[k] for k in ("recent_product_ids", "recent_event_types",
                                "purchased_product_ids")}


def _profile(value: object) -> object:
    """A profile value in one spelling: None when missing, float when numeric, lists (of
    stored rows) as lists of those."""
    if isinstance(value, list | np.ndarray):
        return [_profile(v) for v in value]
    if value is None or value is pd.NA or (isinstance(value, float) and pd.isna(value)):
        return None
    return value if isinstance(value, str) else float(value)


def _same(a: object, b: object) -> bool:
    """Two profile values agree (numbers to 1e-9 relative: sums in another order)."""
    a, b = _profile(a), _profile(b)
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-9)
    return a == b


def _expected_profiles(settings: Settings, user_ids: list[str], times: list) -> pd.DataFrame:
    """Profiles from the raw landing events, users and products (no feature table)."""
    events = _events(settings)
    catalog = read_upto(settings.landing_root, "products", LAST)
    users = read_upto(settings.landing_root, "users", LAST)
    return profiles_as_of(events, catalog, users, user_ids, times)


def _purchases(events: pd.DataFrame) -> pd.DataFrame:
    """Purchases after the first day (earlier days exist to give them a history)."""
    day_start = pd.Timestamp(Interval.for_day(DAY_LIST[1]).start)
    buys = events[(events["event_type"] == "purchase") & (events["ts"] >= day_start)]
    return buys.sort_values(["ts", "event_id"]).reset_index(drop=True)


def _entity(frame: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"user_id": frame["user_id"].to_numpy(),
                         "event_timestamp": frame["ts"].to_numpy(),
                         "event_id": frame["event_id"].to_numpy()})


def _utc(value: dt.datetime) -> pd.Timestamp:
    stamp = pd.Timestamp(value)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def _online_everyone(settings: Settings, users: list[str]) -> dict:
    return online_user_history(feature_store(settings), users)


def test_point_in_time_history_is_the_end_of_the_previous_day(settings: Settings) -> None:
    events = _events(settings)
    buys = _purchases(events)
    assert len(buys) >= 10, "the synthetic shop should have purchases to check"
    out = historical_user_history(settings, _entity(buys))
    assert len(out) == len(buys)
    with_history = 0
    for i, buy in buys.iterrows():
        got = _got(out.iloc[i])
        day_start = pd.Timestamp(Interval.for_day(buy["ts"].date()).start)
        assert got == _expected(events, buy["user_id"], day_start), buy["event_id"]
        # The same day's events, the purchase itself included, are never visible.
        assert got["n_events_total"] < _expected(events, buy["user_id"],
                                                 buy["ts"] + pd.Timedelta(microseconds=1)
                                                 )["n_events_total"]
        with_history += got["n_events_total"] > 0
    assert with_history >= len(buys) // 2  # most buyers were active on an earlier day


def test_snapshot_becomes_visible_at_its_own_timestamp(settings: Settings) -> None:
    events = _events(settings)
    first = history_events(events).sort_values("ts").drop_duplicates("user_id").iloc[0]
    end = pd.Timestamp(Interval.for_day(first["ts"].date()).end)
    stamps = [pd.Timestamp(START, tz="UTC") - pd.Timedelta(days=30),  # before any data
              first["ts"],  # the user's very first event
              end - pd.Timedelta(microseconds=1),  # the day's last instant
              end]  # the first snapshot's timestamp
    entity = pd.DataFrame({"user_id": [first["user_id"]] * 4, "event_timestamp": stamps})
    out = historical_user_history(settings, entity)
    empty = {"recent_product_ids": [], "recent_event_types": [], "purchased_product_ids": [],
             "n_events_total": 0}
    assert [_got(row) for _, row in out.iloc[:3].iterrows()] == [empty] * 3
    assert _got(out.iloc[3]) == _expected(events, first["user_id"], end)
    assert _got(out.iloc[3])["n_events_total"] > 0


def test_rows_keep_the_entity_frame_order(settings: Settings) -> None:
    events = _events(settings)
    entity = _entity(_purchases(events))
    late = pd.Timestamp(LAST, tz="UTC") + pd.Timedelta(hours=30)
    extra = pd.DataFrame({"user_id": [UNKNOWN, entity["user_id"].iloc[0]],
                          "event_timestamp": [late, late], "event_id": ["x1", "x2"]})
    entity = pd.concat([entity, extra, entity.iloc[:3]], ignore_index=True)  # some duplicates
    in_order = historical_user_history(settings, entity)

    shuffled = entity.sample(frac=1.0, random_state=7)
    positions = list(shuffled.index)  # each shuffled row's position in ``entity``
    assert positions != sorted(positions)
    shuffled.index = range(100, 100 + len(shuffled))  # an index Feast must not rely on
    out = historical_user_history(settings, shuffled)
    assert len(out) == len(shuffled)
    assert list(out["user_id"]) == list(shuffled["user_id"])
    assert list(out["event_id"]) == list(shuffled["event_id"])
    assert list(out["event_timestamp"]) == list(shuffled["event_timestamp"])
    assert "_row" not in out.columns
    # Each row carries its own history, wherever it was in the frame.
    assert [_got(r) for _, r in out.iterrows()] == [_got(in_order.iloc[p]) for p in positions]
    unknown = out[out["event_id"] == "x1"].iloc[0]
    assert _got(unknown)["n_events_total"] == 0 and _got(unknown)["recent_product_ids"] == []
    known = out[out["event_id"] == "x2"].iloc[0]  # after the last day: everything so far
    assert _got(known) == _expected(events, known["user_id"], late)


def test_online_store_holds_each_users_latest_snapshot(settings: Settings) -> None:
    events = _events(settings)
    users = sorted(history_events(events)["user_id"].unique())
    online = _online_everyone(settings, [*users, UNKNOWN])
    assert _history(online[UNKNOWN]) == {"recent_product_ids": [], "recent_event_types": [],
                                         "purchased_product_ids": None}
    after_all = pd.Timestamp(Interval.for_day(LAST).end)
    for user in users:
        expected = _expected(events, user, after_all)
        del expected["n_events_total"]
        assert _history(online[user]) == expected, user

    # A user active on the last day: exactly that day's offline snapshot.
    path = settings.offline_root / "user_recent_products" / f"date={LAST}" / "part-0.parquet"
    last_day = pq.read_table(path).to_pylist()
    assert last_day, "somebody should be active on the last day"
    row = last_day[0]
    assert _history(online[row["user_id"]]) == {
        "recent_product_ids": row["recent_product_ids"],
        "recent_event_types": row["recent_event_types"],
        "purchased_product_ids": row["purchased_product_ids"]}
    assert online_user_history(feature_store(settings), []) == {}


def test_the_servers_reader_returns_exactly_what_feast_returns(settings: Settings) -> None:
    """``OnlineUserReader`` (the server's fast path) against ``get_online_features``."""
    events = _events(settings)
    users = [*sorted(events["user_id"].unique()), UNKNOWN]
    store = feature_store(settings)
    reader = OnlineUserReader(store)
    expected = online_user_history(store, users)
    got = reader.read(users)
    assert list(got) == users
    for user in users:
        assert got[user].pop(VECTORS) is None  # none stored here (test_user_vectors.py)
        assert got[user].keys() == expected[user].keys()
        for column, value in expected[user].items():
            if isinstance(value, float) and np.isnan(value):
                assert np.isnan(got[user][column]), (user, column)
            else:
                assert got[user][column] == value, (user, column)
    assert reader.read([UNKNOWN])[UNKNOWN]["recent_product_ids"] == []
    assert reader.read([]) == {}


def test_point_in_time_profile_is_the_end_of_the_previous_day(settings: Settings) -> None:
    """historical_user_history also returns the user_profile columns, under plain names, as
    the previous day's snapshot held them: what profiles_as_of computes from raw events."""
    buys = _purchases(_events(settings))
    entity = _entity(buys)
    out = historical_user_history(settings, entity)
    assert set(PROFILE_COLUMNS) <= set(out.columns)
    assert "purchase_count_30d" in out.columns and "country" in out.columns
    expected = _expected_profiles(settings, list(entity["user_id"]),
                                  list(entity["event_timestamp"]))
    for column in PROFILE_COLUMNS:
        mismatched = [i for i, (a, b) in enumerate(zip(out[column], expected[column],
                                                       strict=True)) if not _same(a, b)]
        assert not mismatched, (column, mismatched[:5])
    known = expected["purchase_count_30d"].notna()
    assert 0 < known.sum() < len(expected)  # first-time buyers have no profile yet
    assert out.loc[known.to_numpy(), "country"].notna().any()


def test_online_profile_is_the_latest_snapshot(settings: Settings) -> None:
    events = _events(settings)
    users = sorted(events["user_id"].unique())
    online = _online_everyone(settings, [*users, UNKNOWN])
    assert all(online[UNKNOWN][c] is None for c in STORED_PROFILE_COLUMNS)
    end = pd.Timestamp(Interval.for_day(LAST).end)
    offline = _offline_latest(settings, "user_profile", "user_id", end)
    expected = _expected_profiles(settings, users, [end] * len(users))
    # Read at the end of the last day, the stored rows are the rule's profiles then.
    as_read = read_profiles(pd.DataFrame([online[u] for u in users]), end)
    for i, user in enumerate(users):
        for column in STORED_PROFILE_COLUMNS:
            assert _same(online[user][column], offline[user][column]), (user, column)
        for column in PROFILE_COLUMNS:
            assert _same(as_read[column].iloc[i], expected[column].iloc[i]), (user, column)
    # The ranking reads a row as it is, and counts the days at its own time.
    profiles = Histories.from_row(online[users[0]]).profiles_at(end.timestamp())
    assert list(profiles.columns) == list(PROFILE_COLUMNS)
    assert _same(profiles[DAYS_SINCE_PURCHASE].iloc[0], expected[DAYS_SINCE_PURCHASE].iloc[0])


def test_materializing_a_day_twice_changes_nothing_online(own_settings: Settings) -> None:
    settings = own_settings
    events = _events(settings)
    users = [*sorted(events["user_id"].unique()), UNKNOWN]
    before = _online_everyone(settings, users)
    assert sum(bool(v["recent_product_ids"]) for v in before.values()) >= 10
    again = materialize_day(settings, LAST)
    assert again["start"] == "2026-01-04T23:00:00+00:00"  # one hour of allowed lateness
    assert again["end"] == "2026-01-06T00:00:00+00:00"
    assert again["views"] == list(MATERIALIZED_VIEWS)
    store = feature_store(settings)
    for view in MATERIALIZED_VIEWS:  # Feast recorded exactly that window for every view
        start, end = store.get_feature_view(view).materialization_intervals[-1]
        assert (_utc(start), _utc(end)) == (pd.Timestamp(again["start"]),
                                            pd.Timestamp(again["end"])), view
    assert _online_everyone(settings, users) == before


def test_rerunning_an_earlier_day_keeps_the_latest_snapshots_online(
    own_settings: Settings,
) -> None:
    settings = own_settings
    events = _events(settings)
    users = [*sorted(events["user_id"].unique())]
    before = _online_everyone(settings, users)
    materialize_day(settings, DAY_LIST[1])  # e.g. an operator clears an old task instance
    assert _online_everyone(settings, users) == before


def _offline_latest(settings: Settings, view: str, key: str,
                    at: pd.Timestamp) -> dict[str, dict]:
    """Each entity's latest offline row with event_timestamp <= ``at``, read from the
    partitions directly (not through Feast)."""
    files = sorted(str(p) for p in (settings.offline_root / view).glob("date=*/part-0.parquet"))
    frame = pads.dataset(files, format="parquet").to_table().to_pandas()
    frame = frame[frame["event_timestamp"] <= at]
    frame = frame.sort_values([key, "event_timestamp"], kind="stable")
    rows = pa.Table.from_pandas(frame.drop_duplicates(key, keep="last"), preserve_index=False)
    return {r[key]: r for r in rows.to_pylist()}


def test_online_equals_offline_at_the_interval_end(settings: Settings) -> None:
    """Every online feature of every materialized view equals the offline value of the
    entity's latest snapshot at or before the last interval's end, field by field."""
    end = pd.Timestamp(Interval.for_day(LAST).end)
    store = feature_store(settings)
    online_views = sorted(fv.name for fv in store.list_feature_views() if fv.online)
    # user_vectors is written online only, by serving.user_vectors (test_user_vectors.py)
    assert online_views == sorted([*MATERIALIZED_VIEWS, VECTORS])
    for view in MATERIALIZED_VIEWS:
        fv = store.get_feature_view(view)
        key = fv.entity_columns[0].name
        fields = [f.name for f in fv.features]
        offline = _offline_latest(settings, view, key, end)
        sample = sorted(offline)
        assert len(sample) >= 3, view
        online = store.get_online_features(
            features=[f"{view}:{f}" for f in fields],
            entity_rows=[{key: k} for k in [*sample, UNKNOWN]],
        ).to_dict(include_event_timestamps=True)
        assert online[key] == [*sample, UNKNOWN]
        for i, entity in enumerate(sample):
            row = offline[entity]
            for name in fields:
                assert online[name][i] == row[name], (view, entity, name)
            assert online[f"{fields[0]}__ts"][i] == int(row["event_timestamp"].timestamp()), (
                view, entity)
        assert all(online[name][-1] is None for name in fields), view  # nothing made up
        if view == "user_recent_products":  # some rows were materialized on earlier days
            assert min(offline[e]["event_timestamp"] for e in sample) < pd.Timestamp(
                Interval.for_day(LAST).start)


def test_partitions_of_an_older_release_get_the_new_column(own_settings: Settings) -> None:
    """A shop whose history partitions were written before ``purchased_product_ids``
    existed: the point-in-time join used to fail on the missing column (DuckDB reads the
    partitions as one table). The partitions get it as nulls once, then the join works and
    reads the list as unknown (empty)."""
    settings = own_settings
    folder = settings.offline_root / "user_recent_products"
    for path in folder.glob("date=*/*.parquet"):  # as an older release wrote them
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(["purchased_product_ids"]), path)
    marker = settings.offline_root / ".schemas" / "user_recent_products.json"
    marker.unlink(missing_ok=True)
    events = _events(settings)
    buys = events[events["event_type"] == "purchase"].head(5)
    out = historical_user_history(settings, _entity(buys))
    assert len(out) == len(buys) and marker.is_file()
    assert all(v == [] for v in out["purchased_product_ids"])
    assert all("purchased_product_ids" in pq.read_schema(p).names
               for p in folder.glob("date=*/*.parquet"))
