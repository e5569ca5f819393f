"""The generic importer: any shop's CSV/parquet export, through a YAML mapping, into the contract.

Fixtures (tests/data/fixtures/):

* ``shop_export.csv`` + ``shop_mapping.yaml``: a semicolon CSV with renamed columns, decimal
  commas, Berlin local time in ``%d.%m.%Y %H:%M`` and the shop's own action names; one row for
  each way a row can be bad. ``shop_mapping_catalog.yaml`` adds ``shop_products.csv`` and
  ``shop_users.csv`` as sources.
* ``order_lines.parquet`` + ``order_lines_mapping.yaml``: order lines with only a per-user
  order sequence number (written by ``make_order_lines.py``).
* ``pii_export.csv``: user ids that are e-mail addresses.
* ``txn_mapping.yaml`` and ``dateless_orders_mapping.yaml`` (filters, joins, computed columns,
  per-user gaps: ``test_generic_import_rules.py``) join the determinism and validation tests.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import hmac
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from features import contract
from features.importers.generic import ImportReport, TooManyDrops, import_generic
from features.importers.generic_mapping import (
    DirectIdentifierError,
    MappingError,
    load_mapping,
    parse_mapping,
)
from features.importers.generic_tables import DROP_REASONS

pytestmark = pytest.mark.fast

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CSV_MAPPING = FIXTURES / "shop_mapping.yaml"
CATALOG_MAPPING = FIXTURES / "shop_mapping_catalog.yaml"
SEQUENCE_MAPPING = FIXTURES / "order_lines_mapping.yaml"
TXN_MAPPING = FIXTURES / "txn_mapping.yaml"  # filters, joins, expr: test_generic_import_rules.py
DATELESS_MAPPING = FIXTURES / "dateless_orders_mapping.yaml"
MAR1, MAR2, MAR3 = dt.date(2024, 3, 1), dt.date(2024, 3, 2), dt.date(2024, 3, 3)
UTC = "UTC"


def _read_all(root: str, table: str) -> pd.DataFrame:
    """Every partition of a table, read back through the contract, with its ``day``."""
    days = contract.list_days(root, table)
    frames = [contract.read_partition(root, table, d).assign(day=d) for d in days]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _doc(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- a CSV export: renamed columns, local time, the shop's own event names ---------------------


@pytest.fixture(scope="module")
def csv_import(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, ImportReport]:
    root = str(tmp_path_factory.mktemp("csv") / "landing")
    return root, import_generic(CSV_MAPPING, root, max_drop_share=None)


def test_csv_rows_land_on_their_utc_day(csv_import):
    root, _ = csv_import
    for table in contract.TABLES:  # all three tables, for each day that has events
        assert contract.list_days(root, table) == [MAR1, MAR2, MAR3]
    ev = _read_all(root, "events").set_index("event_id")
    # 02.03.2024 00:30 in Berlin (UTC+1) is 1 March, 23:30 UTC: the 1 March partition
    assert ev.loc["O1-1", "ts"] == pd.Timestamp("2024-03-01 23:30", tz=UTC)
    assert ev.loc["O1-1", "day"] == MAR1
    assert ev.loc["S1-1", "ts"] == pd.Timestamp("2024-03-01 08:15", tz=UTC)
    assert ev.loc["O3-1", "ts"] == pd.Timestamp("2024-03-03 22:59", tz=UTC)
    assert (ev["ts"].dt.date == ev["day"]).all()


def test_csv_event_types_quantities_and_prices_are_mapped(csv_import):
    root, _ = csv_import
    ev = _read_all(root, "events").set_index("event_id")
    assert ev.loc["S1-1", "event_type"] == "view"
    assert ev.loc["S1-3", "event_type"] == "add_to_cart"
    assert ev.loc["O1-1", "event_type"] == "purchase"
    assert ev.loc["S3-1", "event_type"] == "search"
    assert ev.loc["S3-1", "query"] == "blue mug" and ev.loc["S3-1", "product_id"] is None
    assert ev.loc["O1-1", ["user_id", "product_id"]].tolist() == ["CUST-1", "SKU-A"]
    assert ev.loc["O1-1", "quantity"] == 2 and ev.loc["O1-1", "price"] == 12.5  # "12,50"
    assert ev.loc["O1-2", "price"] == 1234.0  # "1.234,00": thousands dot, decimal comma
    assert ev.loc["S1-1", "quantity"] == 1 and pd.isna(ev.loc["S1-1", "price"])  # default 1
    # a view with quantity 0 and price 0 keeps its row: quantity 1, no price
    assert ev.loc["S3-3", "quantity"] == 1 and pd.isna(ev.loc["S3-3", "price"])


def test_csv_bad_rows_are_dropped_and_counted_by_reason(csv_import):
    root, report = csv_import
    assert tuple(report.dropped) == DROP_REASONS
    assert report.dropped == {
        "missing_event_id": 1,        # empty ref
        "missing_user_id": 1,         # S2-3
        "unmapped_event_type": 1,     # "wishlist"
        "missing_product_id": 1,      # S2-4, a view without a product
        "missing_query": 1,           # S3-5, a search without a query
        "unparsable_timestamp": 1,    # 31.02.2024
        "non_positive_quantity": 1,   # O2-1, a purchase of 0
        "quantity_out_of_bounds": 0,
        "non_positive_price": 1,      # O2-2, a purchase at -3,00
        "price_out_of_bounds": 0,
        "duplicate_event_id": 1,      # O3-1 exported twice
        "product_not_in_catalog": 1,  # S3-4: SKU-D has no price anywhere
    }
    assert (report.rows_in, report.rows_kept) == (20, 10)
    ev = _read_all(root, "events")
    assert sorted(ev["event_id"]) == sorted(
        ["S1-1", "S1-2", "S1-3", "O1-1", "O1-2", "S2-1", "O3-1", "S3-1", "S3-2", "S3-3"])
    assert (report.days, report.events, report.products, report.users) == (3, 10, 3, 3)
    text = str(report)
    assert "20 rows in, 10 kept" in text and "unmapped_event_type" in text
    assert "wrote 3 days (2024-03-01..2024-03-03): 10 events, 3 users, 3 products" in text


def test_csv_products_and_users_are_derived_from_events(csv_import):
    root, report = csv_import
    products = _read_all(root, "products").set_index("product_id")
    assert sorted(products.index) == ["SKU-A", "SKU-B", "SKU-C"]
    assert products.loc["SKU-A", ["title", "category"]].tolist() == ["Red Mug", "Kitchen"]
    assert products.loc["SKU-A", "price"] == pytest.approx(12.5)  # median kept event price
    assert products.loc["SKU-C", ["title", "category", "price"]].tolist() == [
        "Brass Lamp", "Lighting", 1234.0]
    assert products.loc["SKU-B", "updated_at"] == pd.Timestamp("2024-03-01 08:16", tz=UTC)
    assert report.source("products from events").dropped == {
        "title_too_long": 0, "missing_price": 1}  # SKU-D
    users = _read_all(root, "users").set_index("user_id")
    assert users["country"].to_dict() == {"CUST-1": "DE", "CUST-2": "FR", "CUST-3": "NL"}
    assert users.loc["CUST-2", "signup_date"] == MAR2 == users.loc["CUST-2", "day"]


# --- products and users sources ------------------------------------------------------------------


def test_catalogue_and_customer_sources(tmp_path):
    root = str(tmp_path / "landing")
    report = import_generic(CATALOG_MAPPING, root, max_drop_share=None)
    assert report.source("products").dropped == {
        "missing_product_id": 1, "missing_title": 1, "title_too_long": 0,
        "unparsable_timestamp": 0, "price_out_of_bounds": 0, "missing_price": 0,
        "no_event_day": 0, "duplicate_product_id": 1,
    }
    products = _read_all(root, "products").set_index("product_id")
    assert sorted(products.index) == ["SKU-A", "SKU-B", "SKU-C", "SKU-F"]
    assert products.loc["SKU-A", ["title", "price"]].tolist() == ["Red Mug (new)", 13.9]
    assert products.loc["SKU-B", "category"] == "unknown"  # empty dept
    assert products.loc["SKU-C", "price"] == 1234.0  # "abc": the median event price instead
    # never sold: in the catalogue from the import's first day
    assert products.loc["SKU-F", "updated_at"] == pd.Timestamp("2024-03-01", tz=UTC)

    assert report.source("users").dropped == {
        "missing_user_id": 1, "duplicate_user_id": 1, "no_event_day": 0}
    users = _read_all(root, "users").set_index("user_id")
    assert sorted(users.index) == ["CUST-1", "CUST-2", "CUST-3", "CUST-9"]
    # signed up before the export's first day of events: first seen on that day
    assert users.loc["CUST-1", "signup_date"] == dt.date(2024, 2, 15)
    assert users.loc["CUST-1", "day"] == MAR1 == users.loc["CUST-9", "day"]
    assert pd.isna(users.loc["CUST-2", "signup_date"]) and users.loc["CUST-2", "day"] == MAR2
    assert report.source("users from events").rows_kept == 1  # CUST-3 is not in the file
    assert contract.list_days(root, "users") == [MAR1, MAR2, MAR3]  # only days with events


def test_dated_catalogue_rows_land_on_days_with_events(tmp_path):
    (tmp_path / "catalogue.csv").write_text(
        "sku,name,price,changed\n"
        "SKU-A,Red Mug,12.90,2024-03-02T12:00:00Z\n"   # a snapshot dated after the first sale
        "SKU-A,Red Mug XL,15.90,2024-03-02T15:00:00Z\n"
        "SKU-B,Blue Bowl,8.00,2024-02-10T09:00:00Z\n"  # before the export: its first day
        "SKU-C,Brass Lamp,99.00,2024-04-01T00:00:00Z\n"
        "SKU-F,Card Holder,4.50,2024-04-01T00:00:00Z\n"  # after the last day, never sold
    )
    doc = _doc(CATALOG_MAPPING)
    doc["products"] = {
        "source": str(tmp_path / "catalogue.csv"),
        "columns": {"product_id": "sku", "title": "name", "price": "price",
                    "updated_at": {"column": "changed", "format": "iso"}},
    }
    del doc["users"]
    root = str(tmp_path / "landing")
    report = import_generic(parse_mapping(doc, FIXTURES), root, max_drop_share=None)
    products = _read_all(root, "products")
    rows = {(r.product_id, r.day): r for r in products.itertuples()}
    assert sorted(rows) == [("SKU-A", MAR1), ("SKU-A", MAR2), ("SKU-B", MAR1), ("SKU-C", MAR1)]
    # the earliest version reaches back to the first event; later ones keep their time
    assert rows["SKU-A", MAR1].title == "Red Mug"
    assert rows["SKU-A", MAR1].updated_at == pd.Timestamp("2024-03-01 08:15", tz=UTC)
    assert rows["SKU-A", MAR2].title == "Red Mug XL"
    assert rows["SKU-A", MAR2].updated_at == pd.Timestamp("2024-03-02 15:00", tz=UTC)
    assert rows["SKU-B", MAR1].updated_at == pd.Timestamp("2024-03-01", tz=UTC)
    assert report.source("products").dropped["no_event_day"] == 1  # SKU-F
    assert (products["updated_at"].dt.date == products["day"]).all()


def test_price_default_prices_products_the_catalogue_lacks(tmp_path):
    # events without prices, a catalogue without prices and without SKU-Z: every product's
    # price is the mapping's default, also for SKU-Z, derived from the events
    (tmp_path / "events.csv").write_text(
        "id,user,sku,when\n"
        "1,u1,SKU-A,2024-03-01 10:00\n"
        "2,u1,SKU-B,2024-03-01 11:00\n"
        "3,u2,SKU-Z,2024-03-02 09:00\n"
    )
    (tmp_path / "catalogue.csv").write_text("sku,name\nSKU-A,Red Mug\nSKU-B,Blue Bowl\n")
    doc = {
        "events": {"source": "events.csv", "columns": {
            "event_id": "id", "user_id": "user", "product_id": "sku",
            "event_type": {"value": "purchase"}, "ts": "when"}},
        "products": {"source": "catalogue.csv", "columns": {
            "product_id": "sku", "title": "name", "price": {"default": 2.5}}},
    }
    root = str(tmp_path / "landing")
    report = import_generic(parse_mapping(doc, tmp_path), root)  # the default drop guard: 1 %
    products = _read_all(root, "products").set_index("product_id")
    assert products["price"].to_dict() == {"SKU-A": 2.5, "SKU-B": 2.5, "SKU-Z": 2.5}
    assert sorted(_read_all(root, "events")["event_id"]) == ["1", "2", "3"]  # every event kept
    assert products.loc["SKU-Z", "title"] == "SKU-Z"  # derived: the product id as title
    assert report.source("products from events").dropped == {
        "title_too_long": 0, "missing_price": 0}
    assert report.dropped["product_not_in_catalog"] == 0
    assert sorted(_read_all(root, "events")["event_id"]) == ["1", "2", "3"]


# --- an export with only an order sequence number -------------------------------------------


def test_sequence_numbers_become_dates(tmp_path):
    root = str(tmp_path / "landing")
    report = import_generic(SEQUENCE_MAPPING, root, max_drop_share=None)
    ev = _read_all(root, "events").set_index("event_id")
    # start + (n - 1) * 7 days + order_hour_of_day; n is the user's n-th order
    assert ev["ts"].to_dict() == {
        "11-0": pd.Timestamp("2024-01-01 08:00", tz=UTC),
        "11-1": pd.Timestamp("2024-01-01 08:00", tz=UTC),
        "12-0": pd.Timestamp("2024-01-08 14:00", tz=UTC),
        "13-0": pd.Timestamp("2024-01-15 09:00", tz=UTC),
        "21-0": pd.Timestamp("2024-01-01 23:00", tz=UTC),
        "22-0": pd.Timestamp("2024-01-08 10:00", tz=UTC),
        "22-1": pd.Timestamp("2024-01-08 10:00", tz=UTC),
        # user 3's export starts at order 4: their first order here is n = 1
        "34-0": pd.Timestamp("2024-01-01 07:00", tz=UTC),
        "35-0": pd.Timestamp("2024-01-08 07:00", tz=UTC),
    }
    assert contract.list_days(root, "events") == [
        dt.date(2024, 1, 1), dt.date(2024, 1, 8), dt.date(2024, 1, 15)]
    assert set(ev["event_type"]) == {"purchase"}
    assert ev.loc["22-1", ["user_id", "product_id"]].tolist() == ["u2", "300"]
    assert report.dropped["unparsable_timestamp"] == 2  # no order number; hour 25
    assert report.dropped["missing_user_id"] == 1
    assert report.rows_kept == 9
    products = _read_all(root, "products").set_index("product_id")
    assert products["price"].to_dict() == {"100": 1.0, "200": 1.0, "300": 1.0}  # the default
    assert products.loc["300", "category"] == "unknown"  # no aisle in the export
    assert products.loc["100", "title"] == "Banana"


def test_sequence_rule_anchored_on_signup_dates(tmp_path):
    doc = _doc(SEQUENCE_MAPPING)
    doc["events"]["columns"]["ts"]["anchor"] = "signup"  # start stays, for users without one
    root = str(tmp_path / "landing")
    import_generic(parse_mapping(doc, FIXTURES), root, max_drop_share=None)
    ts = _read_all(root, "events").set_index("event_id")["ts"]
    assert ts["11-0"] == pd.Timestamp("2023-12-01 08:00", tz=UTC)
    assert ts["13-0"] == pd.Timestamp("2023-12-15 09:00", tz=UTC)
    assert ts["21-0"] == pd.Timestamp("2023-12-10 23:00", tz=UTC)
    assert ts["34-0"] == pd.Timestamp("2024-01-01 07:00", tz=UTC)  # no signup: start


# --- determinism ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mapping", [CSV_MAPPING, CATALOG_MAPPING, SEQUENCE_MAPPING, TXN_MAPPING,
                                     DATELESS_MAPPING], ids=lambda p: p.stem)
def test_same_input_gives_the_same_bytes(tmp_path, mapping):
    first, second = tmp_path / "a", tmp_path / "b"
    import_generic(mapping, str(first), max_drop_share=None)
    import_generic(mapping, str(second), max_drop_share=None)
    files = _files(first)
    assert files and files == _files(second)
    import_generic(mapping, str(first), max_drop_share=None)  # a rerun replaces its own partitions
    assert _files(first) == files


# --- invalid mappings ----------------------------------------------------------------------------


def _rename(cols: dict, old: str, new: str) -> None:
    cols[new] = cols.pop(old)


INVALID = [
    # (id, change to shop_mapping.yaml, key of the error, text in the message)
    ("unknown_column", lambda d: _rename(d["events"]["columns"], "product_id", "prodcut_id"),
     "mapping.events.columns.prodcut_id",
     "unknown contract column for events; did you mean 'product_id'?"),
    ("missing_required", lambda d: d["events"]["columns"].pop("ts"),
     "mapping.events.columns.ts", "missing: events need a mapping for 'ts'"),
    ("unknown_format", lambda d: d["events"]["columns"]["ts"].update(format="dd/mm"),
     "mapping.events.columns.ts", "unknown format 'dd/mm'"),
    ("unknown_directive", lambda d: d["events"]["columns"]["ts"].update(format="%d/%m/%Q"),
     "mapping.events.columns.ts", "no directive %Q"),
    ("unknown_timezone", lambda d: d["events"]["columns"]["ts"].update(timezone="Mars/Base"),
     "mapping.events.columns.ts", "unknown timezone 'Mars/Base'"),
    ("map_to_unknown_type",
     lambda d: d["events"]["columns"]["event_type"]["map"].update(order="buy"),
     "mapping.events.columns.event_type.map.order", "'buy' is not an event type"),
    ("constant_unknown_type", lambda d: d["events"]["columns"].update(event_type={"value": "buy"}),
     "mapping.events.columns.event_type.value", "'buy' is not an event type"),
    ("column_and_value",
     lambda d: d["events"]["columns"].update(product_id={"column": "sku", "value": "X"}),
     "mapping.events.columns.product_id", "give exactly one of"),
    ("unknown_option", lambda d: d["events"]["columns"]["ts"].update(fromat="iso"),
     "mapping.events.columns.ts.fromat", "did you mean 'format'?"),
    ("unknown_section", lambda d: d.update(event=d.pop("events")),
     "mapping.event", "did you mean 'events'?"),
    ("user_id_from_events_only", lambda d: d["users"]["columns"].update(user_id="customer"),
     "mapping.users.columns.user_id", "users without a source are derived from events"),
    ("sequence_without_start",
     lambda d: d["events"]["columns"].update(
         ts={"from_sequence": "line", "per": "user_id", "step_days": 7}),
     "mapping.events.columns.ts.start", "needs start (a date) or anchor"),
    ("no_price_anywhere", lambda d: (d["events"]["columns"].pop("price"),
                                     d["products"]["columns"].pop("title")),
     "mapping.products.columns.price", "the events carry no price"),
    ("bad_template", lambda d: d["events"]["columns"].update(event_id={"template": "{ref:03d}"}),
     "mapping.events.columns.event_id.template", "format specs are not supported"),
]


@pytest.mark.parametrize("change, key, text", [c[1:] for c in INVALID],
                         ids=[c[0] for c in INVALID])
def test_invalid_mapping_names_the_bad_key(change, key, text):
    doc = copy.deepcopy(_doc(CSV_MAPPING))
    change(doc)
    with pytest.raises(MappingError) as err:
        parse_mapping(doc, FIXTURES)
    assert isinstance(err.value, ValueError)
    assert err.value.key == key
    assert str(err.value).startswith(f"{key}: ")
    assert text in str(err.value)


def test_source_column_not_in_the_file_lists_the_files_columns(tmp_path):
    doc = _doc(CSV_MAPPING)
    doc["events"]["columns"]["product_id"] = "SKU"
    with pytest.raises(MappingError) as err:
        import_generic(parse_mapping(doc, FIXTURES), str(tmp_path))
    assert err.value.key == "mapping.events.columns.product_id"
    assert "source column 'SKU' is not in the events file shop_export.csv" in str(err.value)
    assert "(did you mean 'sku'?)" in str(err.value)
    assert ("the file has: ref, line, customer, sku, action, local_time, qty, unit_price, "
            "item_name, dept, country, terms") in str(err.value)
    assert not list(tmp_path.iterdir())  # nothing written


def test_wrong_delimiter_is_hinted(tmp_path):
    doc = _doc(CSV_MAPPING)
    del doc["events"]["source"]["delimiter"]
    with pytest.raises(MappingError, match=r"is the delimiter right\?"):
        import_generic(parse_mapping(doc, FIXTURES), str(tmp_path))


def test_no_file_matches_the_path(tmp_path):
    doc = _doc(CSV_MAPPING)
    doc["events"]["source"]["path"] = "exports/*.csv"
    with pytest.raises(MappingError) as err:
        import_generic(parse_mapping(doc, FIXTURES), str(tmp_path))
    assert err.value.key == "mapping.events.source.path"
    assert "no file matches 'exports/*.csv'" in str(err.value)


def test_import_dropping_more_than_its_share_writes_nothing(tmp_path):
    # the fixture drops 10 of 20 event rows (one per reason) and 1 of 4 derived products
    root = tmp_path / "landing"
    with pytest.raises(TooManyDrops) as caught:
        import_generic(CSV_MAPPING, str(root))
    assert [s.label for s in caught.value.over] == ["events", "products from events"]
    message = str(caught.value)
    assert "events: 10 of 20 rows (50.0%)" in message
    assert "products from events: 1 of 4 rows (25.0%): missing_price 1" in message
    assert "nothing was written" in message and not root.exists()
    # a share above every source's loss lets it through; None accepts any loss
    assert import_generic(CSV_MAPPING, str(root), max_drop_share=0.5).rows_kept == 10
    assert contract.list_days(str(root), "events") == [MAR1, MAR2, MAR3]


def test_cli_imports_and_exits_2_on_a_bad_mapping(tmp_path, shop_home):
    from typer.testing import CliRunner

    from shoprec.cli import app

    # INPUT replaces the mapping's path
    export = tmp_path / "renamed_export.csv"
    shutil.copy(FIXTURES / "shop_export.csv", export)
    root = tmp_path / "landing"
    runner = CliRunner()
    args = ["data", "import", "generic", "--mapping", str(CSV_MAPPING), "--root", str(root),
            str(export)]
    # half the rows would be lost: exit 1, the reasons named, nothing written
    refused = runner.invoke(app, args)
    assert refused.exit_code == 1, refused.output
    assert "20 rows in, 10 kept" in refused.output
    assert "events: 10 of 20 rows (50.0%): duplicate_event_id 1, missing_event_id 1" in refused.output
    assert "--allow-drops" in refused.output
    assert not root.exists()
    ok = runner.invoke(app, [*args, "--allow-drops"])
    assert ok.exit_code == 0, ok.output
    assert "20 rows in, 10 kept" in ok.output
    assert contract.list_days(str(root), "events") == [MAR1, MAR2, MAR3]

    bad = tmp_path / "bad.yaml"
    doc = _doc(CSV_MAPPING)
    doc["events"]["columns"]["ts"]["format"] = "dd/mm"
    bad.write_text(yaml.safe_dump(doc))
    result = runner.invoke(app, ["data", "import", "generic", "--mapping", str(bad),
                                 "--root", str(tmp_path / "other"), str(export)])
    assert result.exit_code == 2
    assert "mapping.events.columns.ts: unknown format 'dd/mm'" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "other").exists()


# --- direct identifiers ----------------------------------------------------------------------------


def _pii_doc(**top: Any) -> dict[str, Any]:
    return {
        **top,
        "events": {
            "source": str(FIXTURES / "pii_export.csv"),
            "columns": {
                "event_id": "order", "user_id": "customer_email", "product_id": "sku",
                "event_type": {"value": "purchase"}, "ts": "created",
                "price": {"default": 5.0},
            },
        },
    }


@pytest.mark.parametrize("column", ["customer_email", "EMail", "phone", "mobileNumber",
                                    "full_name", "billing_address", "tel"])
def test_direct_identifier_columns_are_refused(column):
    doc = _pii_doc()
    doc["events"]["columns"]["user_id"] = {"template": "{" + column + "}"}
    with pytest.raises(DirectIdentifierError) as err:
        parse_mapping(doc, FIXTURES)
    assert err.value.key == "mapping.events.columns.user_id"
    assert repr(column) in str(err.value) and "hash_user_id: true" in str(err.value)


def test_email_values_are_refused_whatever_the_column_is_called(tmp_path, monkeypatch):
    monkeypatch.delenv("SHOPREC_ID_SALT", raising=False)
    export = tmp_path / "export.csv"
    export.write_text((FIXTURES / "pii_export.csv").read_text().replace("customer_email", "cust"))
    doc = _pii_doc()
    doc["events"]["source"] = str(export)
    doc["events"]["columns"]["user_id"] = "cust"
    with pytest.raises(DirectIdentifierError) as err:
        import_generic(parse_mapping(doc, FIXTURES), str(tmp_path / "landing"))
    assert "look like emails (3 rows" in str(err.value)
    assert "example" not in str(err.value)  # the message does not repeat the personal data
    assert not (tmp_path / "landing").exists()


def test_hash_user_id_imports_salted_hashes(tmp_path, monkeypatch):
    monkeypatch.setenv("SHOPREC_ID_SALT", "pepper-from-env")
    root = str(tmp_path / "landing")
    report = import_generic(parse_mapping(_pii_doc(hash_user_id=True), FIXTURES), root, max_drop_share=None)
    assert report.rows_kept == 3
    ev = _read_all(root, "events").set_index("event_id")
    expected = hmac.new(b"pepper-from-env", b"ann@example.com", hashlib.sha256).hexdigest()
    # "Ann@Example.com" and "ann@example.com " are the same person
    assert ev.loc["A1", "user_id"] == ev.loc["A2", "user_id"] == expected
    assert ev.loc["A2", "ts"] == pd.Timestamp("2024-03-01 10:00", tz=UTC)  # ISO with an offset
    users = _read_all(root, "users")
    assert len(users) == 2 and expected in set(users["user_id"])
    for table in contract.TABLES:
        frame = _read_all(root, table)
        assert not frame.astype(str).apply(lambda c: c.str.contains("@")).any().any()


def test_salt_from_env_wins_over_the_mapping_and_one_is_required(tmp_path, monkeypatch):
    monkeypatch.delenv("SHOPREC_ID_SALT", raising=False)
    with pytest.raises(MappingError) as err:
        import_generic(parse_mapping(_pii_doc(hash_user_id=True), FIXTURES), str(tmp_path / "x"))
    assert err.value.key == "mapping.hash_user_id" and "SHOPREC_ID_SALT" in str(err.value)

    doc = _pii_doc(hash_user_id=True, id_salt="salt-in-file")
    import_generic(parse_mapping(doc, FIXTURES), str(tmp_path / "file"), max_drop_share=None)
    from_file = set(_read_all(str(tmp_path / "file"), "events")["user_id"])
    assert hmac.new(b"salt-in-file", b"bob@example.org", hashlib.sha256).hexdigest() in from_file
    monkeypatch.setenv("SHOPREC_ID_SALT", "salt-in-env")
    import_generic(parse_mapping(doc, FIXTURES), str(tmp_path / "env"), max_drop_share=None)
    from_env = set(_read_all(str(tmp_path / "env"), "events")["user_id"])
    assert from_env.isdisjoint(from_file)


# --- time formats ------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, fmt, tz, expected", [
    ("1709287200", "epoch_s", None, "2024-03-01 10:00"),
    ("1709287200000", "epoch_ms", None, "2024-03-01 10:00"),
    ("2024-03-01 05:00", "iso", "America/New_York", "2024-03-01 10:00"),
    ("2024-03-01T12:00:00+02:00", "iso", "America/New_York", "2024-03-01 10:00"),
    ("03/01/2024 10:00 AM", "%m/%d/%Y %I:%M %p", None, "2024-03-01 10:00"),
    # a wall-clock time that the spring DST change skips moves forward (02:30 -> 03:00 CEST)
    ("2024-03-31 02:30", "iso", "Europe/Berlin", "2024-03-31 01:00"),
])
def test_time_formats_convert_to_utc(tmp_path, raw, fmt, tz, expected):
    (tmp_path / "e.csv").write_text(f"id,user,sku,when\n1,u1,p1,{raw}\n")
    ts: dict[str, Any] = {"column": "when", "format": fmt}
    if tz:
        ts["timezone"] = tz
    doc = {"events": {"source": str(tmp_path / "e.csv"), "columns": {
        "event_id": "id", "user_id": "user", "product_id": "sku",
        "event_type": {"value": "view"}, "ts": ts, "price": {"default": 1.0}}}}
    root = str(tmp_path / "landing")
    report = import_generic(parse_mapping(doc, tmp_path), root, max_drop_share=None)
    assert report.rows_kept == 1, report
    assert _read_all(root, "events")["ts"].tolist() == [pd.Timestamp(expected, tz=UTC)]


def test_load_mapping_reports_yaml_errors(tmp_path):
    bad = tmp_path / "m.yaml"
    bad.write_text("events: [unclosed\n")
    with pytest.raises(MappingError, match=r"^mapping: .* is not valid YAML"):
        load_mapping(bad)


# --- the pipeline accepts what the importer writes ------------------------------------------------


@pytest.mark.parametrize("mapping", [CSV_MAPPING, CATALOG_MAPPING, SEQUENCE_MAPPING, TXN_MAPPING,
                                     DATELESS_MAPPING], ids=lambda p: p.stem)
def test_imported_partitions_pass_validation(tmp_path, mapping):
    # what the importer keeps, the daily validation accepts: txn_export.csv has a quantity
    # and a price beyond the validation's bounds, which the importer drops by reason
    from features.validation import validate_day

    root = str(tmp_path / "landing")
    import_generic(mapping, root, max_drop_share=None)
    for day in contract.list_days(root, "events"):
        report = validate_day(root, day, tmp_path / "validation")
        assert report.success, report.summary()
