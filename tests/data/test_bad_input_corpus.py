"""A corpus of deliberately broken partitions: each is refused for its own reason and
quarantined whole (original bytes, GX results, an HTML report); a fixed one is released and
processed with every good row it arrived with.

Each case starts from the same good synthetic day and breaks one thing.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.settings import Settings
from features.contract import TABLES, Interval, read_partition
from features.quarantine import (
    is_quarantined,
    quarantine_dir,
    quarantine_status,
    release_day,
    report_dir,
)
from features.synth import generate_shop
from features.validation import PartitionInvalid, PartitionQuarantined, check_partition

pytestmark = pytest.mark.fast

START = dt.date(2026, 1, 1)
DAY = START + dt.timedelta(days=2)  # the last day: two days of history, products and searches
DAY_START = pd.Timestamp(Interval.for_day(DAY).start)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pristine") / "landing"
    generate_shop(str(root), days=3, users=40, products=30, seed=3, start=START)
    return root


@pytest.fixture
def shop(pristine: Path, tmp_path: Path) -> Settings:
    """A private copy of the good shop; its state folder holds validation and quarantine."""
    landing = tmp_path / "landing"
    shutil.copytree(pristine, landing)
    return Settings(home=tmp_path / "state", landing_root=str(landing))


def _file(settings: Settings, table: str) -> Path:
    return Path(settings.landing_root) / table / f"date={DAY}" / "part-0.parquet"


def _frame(table: str, change: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Settings], None]:
    """A mutation that rewrites the day's file of ``table`` with ``change(good rows)``."""
    def mutate(settings: Settings) -> None:
        path = _file(settings, table)
        change(pd.read_parquet(path)).to_parquet(path, index=False)
    return mutate


def _bytes(table: str, change: Callable[[bytes, pd.DataFrame], bytes]) -> Callable[[Settings], None]:
    """A mutation that replaces the day's file of ``table`` with other bytes."""
    def mutate(settings: Settings) -> None:
        path = _file(settings, table)
        path.write_bytes(change(path.read_bytes(), pd.read_parquet(path)))
    return mutate


def _searches(e: pd.DataFrame, query: str) -> pd.DataFrame:
    e = e.copy()
    e.loc[e["event_type"] == "search", "query"] = query
    return e


def _first_rows(e: pd.DataFrame, n: int, **values: object) -> pd.DataFrame:
    e = e.copy()
    for col, value in values.items():
        e[col] = e[col].astype(object) if value is None else e[col]
        e.loc[e.index[:n], col] = value
    return e


def _late_copies(e: pd.DataFrame) -> pd.DataFrame:
    """Four new events stamped 6 h before the day (allowed lateness: 1 h)."""
    late = e.head(4).assign(event_id=[f"E_LATE_{i}" for i in range(4)],
                            ts=DAY_START - pd.Timedelta(hours=6))
    return pd.concat([e, late], ignore_index=True)


def _invalid_utf8(_: bytes, e: pd.DataFrame) -> bytes:
    table = pa.Table.from_pandas(e, preserve_index=False)
    bad = pa.array([b"caf\xe9 mug"] * len(e), type=pa.binary()).view(pa.string())
    table = table.set_column(table.schema.get_field_index("query"), "query", bad)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


@dataclass(frozen=True)
class Case:
    name: str
    mutate: Callable[[Settings], None]
    table: str  # the table whose check must fail
    check: str  # meta.shoprec_check of the failed expectation
    expectation: str
    column: str | None = None
    error: str | None = None  # for unreadable files: part of the reader's error


CASES = [
    Case("missing_column", _frame("events", lambda e: e.drop(columns=["event_type"])),
         "events", "required_column", "expect_column_to_exist", "event_type"),
    Case("wrong_type_price_as_text", _frame("events", lambda e: e.assign(price=e["price"].astype(str))),
         "events", "column_type", "expect_column_values_to_be_in_type_list", "price"),
    Case("naive_timestamps", _frame("events", lambda e: e.assign(ts=e["ts"].dt.tz_localize(None))),
         "events", "column_type", "expect_column_type_to_be", "ts"),
    Case("negative_price", _frame("events", lambda e: e.assign(price=-e["price"])),
         "events", "price_positive", "expect_column_values_to_be_between", "price"),
    Case("price_1e9", _frame("products", lambda p: p.assign(price=1e9)),
         "products", "price_at_most_max", "expect_column_values_to_be_between", "price"),
    Case("null_event_ids", _frame("events", lambda e: _first_rows(e, 3, event_id=None)),
         "events", "not_null", "expect_column_values_to_not_be_null", "event_id"),
    Case("null_user_ids", _frame("users", lambda u: _first_rows(u, 2, user_id=None)),
         "users", "not_null", "expect_column_values_to_not_be_null", "user_id"),
    Case("duplicate_events", _frame("events", lambda e: pd.concat([e, e.head(5)], ignore_index=True)),
         "events", "event_id_unique", "expect_column_values_to_be_unique", "event_id"),
    Case("future_timestamps", _frame("events", lambda e: _first_rows(
        e, 3, ts=DAY_START + pd.Timedelta(days=2))),
         "events", "ts_not_after_interval", "expect_column_values_to_be_between", "ts"),
    Case("late_rows_beyond_lateness", _frame("events", _late_copies),
         "events", "ts_within_lateness", "expect_column_values_to_be_between", "ts"),
    Case("partition_for_wrong_date", _frame("events", lambda e: e.assign(ts=e["ts"] - pd.Timedelta(days=2))),
         "events", "ts_partition_day", "expect_column_values_to_be_between", "ts"),
    Case("unknown_product_ids", _frame("events", lambda e: _first_rows(e, 3, product_id="P999999")),
         "events", "product_in_catalog", "expect_column_values_to_be_in_set", "product_id"),
    Case("event_type_outside_set", _frame("events", lambda e: _first_rows(e, 1, event_type="teleport")),
         "events", "event_type_in_set", "expect_column_values_to_be_in_set", "event_type"),
    Case("quantity_zero", _frame("events", lambda e: _first_rows(e, 1, quantity=0)),
         "events", "quantity_at_least_1", "expect_column_values_to_be_between", "quantity"),
    Case("signup_in_future", _frame("users", lambda u: u.assign(
        signup_date=DAY + dt.timedelta(days=5))),
         "users", "signup_not_in_future", "expect_column_values_to_be_between", "signup_date"),
    Case("pii_column_email", _frame("events", lambda e: e.assign(email="someone@example.com")),
         "events", "no_pii_column_names", "expect_table_column_names_to_not_match_regex"),
    Case("email_in_search_query", _frame("events", lambda e: _searches(
        e, "contact me at jo@example.com")),
         "events", "no_email_values", "expect_column_values_to_not_match_regex", "query"),
    Case("phone_in_description", _frame("products", lambda p: _first_rows(
        p, 1, description="Trade prices: call +44 20 7946 0958")),
         "products", "no_phone_values", "expect_column_values_to_not_match_regex", "description"),
    Case("street_address_in_query", _frame("events", lambda e: _searches(
        e, "deliver to 221B Baker Street")),
         "events", "no_street_address_values", "expect_column_values_to_not_match_regex", "query"),
    Case("products_without_titles", _frame("products", lambda p: p.drop(columns=["title"])),
         "products", "required_column", "expect_column_to_exist", "title"),
    Case("extra_unexpected_column", _frame("events", lambda e: e.assign(coupon_code="WINTER10")),
         "events", "column_set", "expect_table_columns_to_match_set"),
    Case("empty_partition", _frame("events", lambda e: e.iloc[0:0]),
         "events", "events_not_empty", "expect_table_row_count_to_be_between"),
    Case("title_100kB", _frame("products", lambda p: _first_rows(p, 1, title="x" * 100_000)),
         "products", "title_length", "expect_column_value_lengths_to_be_between", "title"),
    Case("zero_byte_file", _bytes("events", lambda b, e: b""),
         "events", "file_readable", "shoprec_file_readable", error="zero-byte file"),
    Case("truncated_parquet", _bytes("events", lambda b, e: b[: len(b) // 2]),
         "events", "file_readable", "shoprec_file_readable", error="magic bytes"),
    Case("latin1_csv_named_parquet", _bytes("events", lambda b, e: _searches(
        e, "café crème").to_csv(index=False).encode("latin-1")),
         "events", "file_readable", "shoprec_file_readable", error="not a parquet file"),
    Case("invalid_utf8_strings", _bytes("events", _invalid_utf8),
         "events", "file_readable", "shoprec_file_readable", error="Invalid UTF8"),
]
BY_NAME = {c.name: c for c in CASES}


def _landed(settings: Settings) -> dict[tuple[str, str], bytes]:
    """Every landing file of the day, by (table, name)."""
    out = {}
    for table in TABLES:
        folder = Path(settings.landing_root) / table / f"date={DAY}"
        for f in folder.glob("*") if folder.exists() else []:
            out[(table, f.name)] = f.read_bytes()
    return out


def test_the_corpus_is_large_and_its_reasons_are_distinct() -> None:
    assert len(CASES) >= 15
    reasons = [(c.table, c.check, c.expectation, c.column, c.error) for c in CASES]
    assert len(set(reasons)) == len(reasons)


def test_the_untouched_day_passes(shop: Settings) -> None:
    result = check_partition(shop, DAY)
    assert result["rows"]["events"] > 0
    assert not is_quarantined(shop.home, DAY)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_broken_partition_is_refused_for_its_reason_and_quarantined(
        case: Case, shop: Settings) -> None:
    case.mutate(shop)
    landed = _landed(shop)

    with pytest.raises(PartitionInvalid) as err:
        check_partition(shop, DAY)

    report = err.value.report
    hits = [f for f in report.tables[case.table].failures if f["check"] == case.check]
    assert hits, f"{case.name}: no {case.check} failure in\n{report.summary()}"
    hit = hits[0]
    assert (hit["expectation"], hit["column"]) == (case.expectation, case.column), hit
    if case.error:
        assert case.error in hit["error"] and hit["file"] == "part-0.parquet", hit
    message = str(err.value)
    assert f"{case.expectation}" in message and f"[{case.check}]" in message

    # Quarantined whole: nothing of the day is left to process, every byte is kept.
    record = err.value.quarantine
    assert record is not None and is_quarantined(shop.home, DAY)
    assert str(record.report_html) in message
    for table in TABLES:
        assert not (Path(shop.landing_root) / table / f"date={DAY}").exists()
    kept = {(t, n): (quarantine_dir(shop.home, t, DAY) / n).read_bytes() for t, n in landed}
    assert kept == landed

    # ... with the GX result JSON and an HTML report naming the check.
    result = json.loads(record.result_json.read_text())
    assert case.check in {f["check"] for f in result["tables"][case.table]["failures"]}
    assert (report_dir(shop.home, DAY) / "gx" / f"{case.table}.json").exists()
    assert case.check in record.report_html.read_text(encoding="utf-8")
    assert record.data_docs is not None and record.data_docs.name == "index.html"
    if case.expectation.startswith("expect_"):  # GX saw the table: its own page exists
        pages = list((record.data_docs.parent / "validations").rglob("*.html"))
        assert any(f"landing_{case.table}" in str(p) for p in pages), pages


def _drop_late(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["ts"] >= DAY_START - pd.Timedelta(hours=1)]


# How an operator fixes each quarantined file: from the bad file itself, or by re-delivery.
FIXES: dict[str, Callable[[pd.DataFrame], pd.DataFrame] | None] = {
    "duplicate_events": lambda bad: bad.drop_duplicates("event_id"),
    "pii_column_email": lambda bad: bad.drop(columns=["email"]),
    "late_rows_beyond_lateness": _drop_late,
    "truncated_parquet": None,
}


@pytest.mark.parametrize("name", list(FIXES))
def test_fixed_partition_is_released_and_keeps_every_good_row(
        name: str, shop: Settings, pristine: Path) -> None:
    good_file = pristine / "events" / f"date={DAY}" / "part-0.parquet"
    good_ids = set(pd.read_parquet(good_file)["event_id"])
    BY_NAME[name].mutate(shop)
    with pytest.raises(PartitionInvalid):
        check_partition(shop, DAY)

    # A rerun before the release is refused, saying why and what to do.
    with pytest.raises(PartitionQuarantined) as err:
        check_partition(shop, DAY)
    assert f"partition {DAY} is quarantined since" in str(err.value)
    assert f"shoprec data release {DAY}" in str(err.value)

    bad_file = quarantine_dir(shop.home, "events", DAY) / "part-0.parquet"
    fix = FIXES[name]
    if fix is None:
        bad_file.write_bytes(good_file.read_bytes())  # the shop re-delivered the file
    else:
        fix(pd.read_parquet(bad_file)).to_parquet(bad_file, index=False)
    note = release_day(shop.home, shop.landing_root, DAY, reason=f"fixed {name}")
    assert note.files["events"] and not is_quarantined(shop.home, DAY)

    result = check_partition(shop, DAY)
    assert set(read_partition(shop.landing_root, "events", DAY)["event_id"]) == good_ids
    assert result["rows"]["events"] == len(good_ids)
    history = quarantine_status(shop.home, DAY).history
    assert [h["event"] for h in history] == ["quarantined", "released"]
    assert history[-1]["reason"] == f"fixed {name}"


def test_absent_users_and_products_are_fine_but_a_day_without_events_is_not(
        shop: Settings) -> None:
    landing = Path(shop.landing_root)
    new_products = set(pd.read_parquet(_file(shop, "products"))["product_id"])
    shutil.rmtree(landing / "users" / f"date={DAY}")
    shutil.rmtree(landing / "products" / f"date={DAY}")
    # without today's products, events may only name products known before today
    _frame("events", lambda e: e[~e["product_id"].isin(new_products)])(shop)
    assert check_partition(shop, DAY)["rows"] == {
        "products": 0, "users": 0, "events": len(pd.read_parquet(_file(shop, "events")))}

    _frame("events", lambda e: e.iloc[0:0])(shop)
    with pytest.raises(PartitionInvalid) as err:
        check_partition(shop, DAY)
    assert "[events_not_empty]" in str(err.value)


@pytest.mark.parametrize(("name", "identifier"), [("email_in_search_query", "jo@example.com"),
                                                  ("phone_in_description", "7946 0958")])
def test_found_identifiers_are_masked_in_messages_and_reports(
        name: str, identifier: str, shop: Settings) -> None:
    BY_NAME[name].mutate(shop)
    with pytest.raises(PartitionInvalid) as err:
        check_partition(shop, DAY)
    record = err.value.quarantine
    assert "<" in str(err.value) and identifier not in str(err.value)
    for path in [record.result_json, record.report_html,
                 *(shop.home / "validation" / f"date={DAY}").glob("*.json"),
                 *(report_dir(shop.home, DAY) / "gx").glob("*.json")]:
        assert identifier not in path.read_text(encoding="utf-8"), path
    # the quarantined file itself keeps the original bytes for the operator to fix
    table = BY_NAME[name].table
    original = pd.read_parquet(quarantine_dir(shop.home, table, DAY) / "part-0.parquet")
    assert original.astype(str).apply(lambda c: c.str.contains(identifier)).any().any()
