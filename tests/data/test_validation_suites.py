"""The GX suites accept a good partition and name what is wrong with a bad one."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pandas as pd
import pytest

from core.settings import Settings
from features.contract import catalog_as_of, write_partition
from features.synth import generate_shop
from features.validation import PartitionInvalid, validate_day
from features.validation_suites import (
    EMAIL_VALUE,
    PHONE_VALUE,
    PII_COLUMN_NAME,
    STREET_ADDRESS_VALUE,
    ValidationPolicy,
    category_psi,
)

pytestmark = pytest.mark.fast

START = dt.date(2026, 1, 1)
ONLINE_RETAIL = Path(__file__).resolve().parents[3] / "shared" / "data" / "online-retail" / (
    "online_retail.parquet")


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("landing"))
    generate_shop(root, days=3, users=40, products=30, seed=3, start=START)
    return root


def _raw_events(root: str, day: dt.date) -> pd.DataFrame:
    return pd.read_parquet(Path(root) / "events" / f"date={day}" / "part-0.parquet")


def _overwrite(root: str, day: dt.date, frame: pd.DataFrame) -> None:
    folder = Path(root) / "events" / f"date={day}"
    for f in folder.glob("*.parquet"):
        f.unlink()
    frame.to_parquet(folder / "part-0.parquet", index=False)


def test_good_partition_passes(shop: str, tmp_path: Path) -> None:
    report = validate_day(shop, START + dt.timedelta(days=1), tmp_path)
    assert report.success, report.summary()
    assert report.tables["events"].rows > 0
    assert (tmp_path / "date=2026-01-02" / "events.json").exists()


@pytest.mark.parametrize(
    ("name", "breaks", "expected"),
    [
        ("negative quantity", lambda e: e.assign(quantity=-e["quantity"]),
         "expect_column_values_to_be_between column=quantity"),
        ("duplicate event ids", lambda e: e.assign(event_id="E1"),
         "expect_column_values_to_be_unique column=event_id"),
        ("unknown event type", lambda e: e.assign(event_type="teleport"),
         "expect_column_values_to_be_in_set column=event_type"),
        ("timestamps of another day", lambda e: e.assign(ts=e["ts"] + pd.Timedelta(days=2)),
         "expect_column_values_to_be_between column=ts"),
        ("missing user ids", lambda e: e.assign(user_id=None),
         "expect_column_values_to_not_be_null column=user_id"),
        ("a PII column", lambda e: e.assign(email="someone@example.com"),
         "expect_table_column_names_to_not_match_regex"),
    ],
)
def test_bad_partition_is_refused_with_its_reason(shop: str, tmp_path: Path, name: str,
                                                   breaks, expected: str) -> None:
    root = str(tmp_path / "landing")
    day = START + dt.timedelta(days=1)
    events = _raw_events(shop, day)
    write_partition(root, "events", day, events)
    _overwrite(root, day, breaks(events))
    report = validate_day(root, day, tmp_path / "reports")
    assert not report.success, name
    message = str(PartitionInvalid(report))  # what check_partition raises with
    assert expected in message
    assert "report:" in message


def test_missing_events_partition_is_refused(shop: str, tmp_path: Path) -> None:
    report = validate_day(shop, START + dt.timedelta(days=30), tmp_path)
    assert not report.success
    assert "shoprec_partition_exists" in report.summary()


def _copy_day(shop: str, tmp_path: Path, day: dt.date) -> str:
    """A landing root holding the shop's days up to ``day``, the last one rewritable."""
    root = str(tmp_path / "landing")
    for table in ("products", "users", "events"):
        for d in range((day - START).days + 1):
            src = Path(shop) / table / f"date={START + dt.timedelta(days=d)}"
            if src.exists():
                write_partition(root, table, START + dt.timedelta(days=d),
                                pd.read_parquet(src / "part-0.parquet"))
    return root


def test_rows_inside_the_lateness_window_pass_and_are_counted(shop: str, tmp_path: Path) -> None:
    day = START + dt.timedelta(days=1)
    root = _copy_day(shop, tmp_path, day)
    events = _raw_events(root, day)
    start = pd.Timestamp(f"{day}T00:00:00Z")
    late = events.head(3).assign(event_id=["L1", "L2", "L3"], ts=start - pd.Timedelta(minutes=30))
    _overwrite(root, day, pd.concat([events, late], ignore_index=True))

    report = validate_day(root, day, tmp_path / "reports")
    assert report.success, report.summary()
    assert report.tables["events"].observations["late_rows_within_lateness"] == 3

    strict = validate_day(root, day, tmp_path / "reports",
                          ValidationPolicy(allowed_lateness_hours=0))
    assert "[ts_within_lateness]" in strict.summary()


def test_users_first_seen_in_events_are_accepted_and_counted(shop: str, tmp_path: Path) -> None:
    day = START + dt.timedelta(days=1)
    root = _copy_day(shop, tmp_path, day)
    events = _raw_events(root, day)
    _overwrite(root, day, events.assign(user_id=events["user_id"].where(
        events.index >= 2, "U_NEVER_EXPORTED")))
    report = validate_day(root, day, tmp_path / "reports")
    assert report.success, report.summary()
    assert report.tables["events"].observations["users_first_seen_in_events"] == 1


def test_timestamps_in_any_unit_and_zone_are_accepted_but_naive_ones_are_not(
        shop: str, tmp_path: Path) -> None:
    day = START + dt.timedelta(days=1)
    root = _copy_day(shop, tmp_path, day)
    events = _raw_events(root, day)
    _overwrite(root, day, events.assign(
        ts=events["ts"].dt.as_unit("ns").dt.tz_convert("Europe/Berlin")))
    assert validate_day(root, day, tmp_path / "r1").success
    _overwrite(root, day, events.assign(ts=events["ts"].dt.tz_localize(None)))
    summary = validate_day(root, day, tmp_path / "r2").summary()
    assert "expect_column_type_to_be column=ts" in summary


@pytest.fixture(scope="module")
def long_shop(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Five days of a shop large enough for a stable category mix (PSI ~0.1 day to day),
    so the last day has the history the drift checks need."""
    root = str(tmp_path_factory.mktemp("long"))
    generate_shop(root, days=5, users=400, products=60, seed=5, start=START)
    return root


def _drifted(root: str, day: dt.date, kind: str) -> None:
    events = _raw_events(root, day)
    if kind == "volume":  # ten times the usual traffic, all new events
        events = pd.concat([events.assign(event_id=events["event_id"] + f"_{i}")
                            for i in range(10)], ignore_index=True)
    else:  # every view and purchase in one category
        catalog = catalog_as_of(root, day)
        one = catalog.loc[catalog["category"] == catalog["category"].iloc[0], "product_id"]
        seen = events["event_type"].isin(["view", "purchase"])
        events.loc[seen, "product_id"] = one.iloc[0]
    _overwrite(root, day, events)


@pytest.mark.parametrize(("kind", "check"), [("volume", "volume_within_band"),
                                             ("category", "category_mix_psi")])
def test_drift_warns_by_default_and_fails_when_strict(
        long_shop: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str,
        check: str) -> None:
    day = START + dt.timedelta(days=4)
    root = _copy_day(long_shop, tmp_path, day)
    calm = validate_day(root, day, tmp_path / "calm")
    assert calm.success and not calm.tables["events"].warnings, calm.summary()
    assert calm.tables["events"].observations["history_days"] == 4

    _drifted(root, day, kind)
    warned = validate_day(root, day, tmp_path / "warned", ValidationPolicy.from_env(Settings()))
    assert warned.success, warned.summary()
    assert check in {w["check"] for w in warned.tables["events"].warnings}
    assert f"[{check}]" in warned.summary() and "(warning)" in warned.summary()

    monkeypatch.setenv("SHOPREC_VALIDATION_STRICT_DRIFT", "1")
    strict = validate_day(root, day, tmp_path / "strict", ValidationPolicy.from_env(Settings()))
    assert not strict.success
    assert check in {f["check"] for f in strict.tables["events"].failures}


def test_cached_day_summaries_give_the_same_drift_figures(long_shop: str,
                                                         tmp_path: Path) -> None:
    """The drift checks read the earlier days' summaries (row counts, views and purchases
    per product) from a cache under the snapshot root instead of their partitions: the
    observations are the ones the partitions give, and a history day rewritten since its
    summary was cached is summarised again."""
    day = START + dt.timedelta(days=4)
    root = _copy_day(long_shop, tmp_path, day)
    running = tmp_path / "running"
    reference = validate_day(root, day, tmp_path / "ref").tables["events"].observations
    first = validate_day(root, day, tmp_path / "a", snapshot_root=running)
    cached = validate_day(root, day, tmp_path / "b", snapshot_root=running)
    assert len(list((running / "event_summaries").glob("date=*.parquet"))) == 4
    for report in (first, cached):
        assert report.tables["events"].observations == reference
    assert isinstance(reference["category_psi"], float)
    assert reference["volume"]["trailing_mean"] > 0

    earlier = START + dt.timedelta(days=2)  # every view and purchase of a history day doubled
    events = _raw_events(root, earlier)
    mix = events[events["event_type"].isin(["view", "purchase"])]
    _overwrite(root, earlier, pd.concat([events, mix.assign(
        event_id=mix["event_id"] + "_again")], ignore_index=True))
    changed = validate_day(root, day, tmp_path / "c").tables["events"].observations
    assert changed["volume"] != reference["volume"]
    again = validate_day(root, day, tmp_path / "d", snapshot_root=running)
    assert again.tables["events"].observations == changed


def test_policy_reads_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ValidationPolicy.from_env(Settings()) == ValidationPolicy()
    monkeypatch.setenv("SHOPREC_VALIDATION_VOLUME_BAND", "0.5,2")
    monkeypatch.setenv("SHOPREC_VALIDATION_PSI_THRESHOLD", "0.1")
    monkeypatch.setenv("SHOPREC_VALIDATION_STRICT_DRIFT", "true")
    policy = ValidationPolicy.from_env(Settings(allowed_lateness_hours=3))
    assert policy == ValidationPolicy(allowed_lateness_hours=3, volume_band=(0.5, 2.0),
                                      psi_threshold=0.1, strict_drift=True)


def test_category_psi() -> None:
    same = pd.Series(["mugs", "bags", "mugs", "lamps"] * 50)
    assert category_psi(same, same) == pytest.approx(0.0)
    assert category_psi(pd.Series(["mugs"] * 200), same) > 0.25
    assert category_psi(same.iloc[::-1], same) < 0.01


@pytest.mark.parametrize(("pattern", "text", "found"), [
    (EMAIL_VALUE, "contact me at jo@example.com", True),
    (EMAIL_VALUE, "a.b+shop@mail.co.uk", True),
    (EMAIL_VALUE, "jo at example dot com", False),
    (PHONE_VALUE, "call +44 20 7946 0958", True),
    (PHONE_VALUE, "(555) 123-4567", True),
    (PHONE_VALUE, "07700 900123", True),
    (PHONE_VALUE, "SET OF 12 100 200 CAKE CASES", False),
    (PHONE_VALUE, "2026-01-02 01:27:41", False),
    (PHONE_VALUE, "Gift Voucher £20.00", False),
    (STREET_ADDRESS_VALUE, "deliver to 221B Baker Street", True),
    (STREET_ADDRESS_VALUE, "12 Acacia Avenue, London", True),
    (STREET_ADDRESS_VALUE, "Hauptstrasse 5", True),
    (STREET_ADDRESS_VALUE, "12 RED ROSE PEG PLACE SETTINGS", False),
    (STREET_ADDRESS_VALUE, "S/3 PINK SQUARE PLANTERS ROSES", False),
    (PII_COLUMN_NAME, "email", True),
    (PII_COLUMN_NAME, "customerEmailAddress", True),
    (PII_COLUMN_NAME, "first_name", True),
    (PII_COLUMN_NAME, "ip", True),
    (PII_COLUMN_NAME, "zip", True),
    (PII_COLUMN_NAME, "description", False),
    (PII_COLUMN_NAME, "shipping_cost", False),
    (PII_COLUMN_NAME, "image_url", False),
])
def test_direct_identifier_patterns(pattern: str, text: str, found: bool) -> None:
    assert bool(re.search(pattern, text)) is found


@pytest.mark.realdata
@pytest.mark.skipif(not ONLINE_RETAIL.exists(), reason="Online Retail file not found")
def test_no_identifier_pattern_fires_on_real_product_titles() -> None:
    raw = pd.read_parquet(ONLINE_RETAIL, columns=["Description", "Country"])
    for col in raw:
        values = raw[col].dropna().astype(str).drop_duplicates()
        for pattern in (EMAIL_VALUE, PHONE_VALUE, STREET_ADDRESS_VALUE):
            hits = values[values.str.contains(pattern, regex=True)]
            assert hits.empty, (col, pattern, hits.head().tolist())
