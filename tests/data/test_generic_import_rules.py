"""The generic importer's rules: contract bounds, filters and joins, computed columns, optional
template parts, column fallbacks, only-sold products, and per-user calendars for dateless
orders (issue 16: a shop's export imported without a pre-processing script).

Fixtures (tests/data/fixtures/):

* ``txn_export.csv`` + ``txn_products.csv`` + ``txn_mapping.yaml``: a transactions table with
  line values instead of unit prices, a return line, a test store, lines of non-product
  departments (fuel, postage: only the products file says so) and of a product the products
  file lacks, and two lines beyond the validation's bounds; a product table with empty
  brands, sizes, descriptions and departments, and a product never sold.
* ``dateless_orders.csv`` + ``dateless_orders_mapping.yaml``: Instacart-like order lines with
  per-user order numbers and days since the previous order, no dates (written by
  ``make_dateless_orders.py``).
"""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from data.test_generic_import import _doc, _read_all

from features.importers.generic import ImportReport, import_generic
from features.importers.generic_mapping import MappingError, parse_mapping
from features.importers.generic_rules import (
    Condition,
    RowFilter,
    RuleError,
    condition_holds,
    evaluate_expr,
    parse_expr,
)
from features.validation_suites import MAX_PRICE, MAX_QUANTITY

pytestmark = pytest.mark.fast

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TXN_MAPPING = FIXTURES / "txn_mapping.yaml"
DATELESS_MAPPING = FIXTURES / "dateless_orders_mapping.yaml"
UTC = "UTC"


@pytest.fixture(scope="module")
def txn_import(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, ImportReport]:
    root = str(tmp_path_factory.mktemp("txn") / "landing")
    # two lines break the validation's bounds: 2 of 8 rows dropped, over the default 1 %
    return root, import_generic(TXN_MAPPING, root, max_drop_share=None)


# --- import and validation agree ---------------------------------------------------------------


def test_lines_beyond_the_validation_bounds_are_dropped_by_reason(txn_import):
    root, report = txn_import
    assert report.dropped["quantity_out_of_bounds"] == 1  # B5-1: 20,000 > MAX_QUANTITY
    assert report.dropped["price_out_of_bounds"] == 1  # B5-2: 150,000.00 > MAX_PRICE
    assert sum(report.dropped.values()) == 2
    ev = _read_all(root, "events")
    assert not {"B5-1", "B5-2"} & set(ev["event_id"])
    assert ev["quantity"].max() <= MAX_QUANTITY and ev["price"].max() <= MAX_PRICE


def test_catalogue_rows_beyond_the_bounds_are_dropped_and_views_repaired(tmp_path):
    (tmp_path / "events.csv").write_text(
        "id,user,sku,kind,qty,price,when\n"
        "1,u1,A,purchase,1,10.0,2024-03-01 10:00\n"
        "2,u1,B,purchase,1,20.0,2024-03-01 11:00\n"
        "3,u1,C,purchase,1,30.0,2024-03-01 12:00\n"
        "4,u2,A,view,50000,250000.0,2024-03-01 13:00\n"  # a view: quantity 1, no price
    )
    (tmp_path / "catalogue.csv").write_text(
        f"sku,name,price\nA,Mug,10.0\nB,{'Long ' * 120},20.0\nC,Car,250000.0\n")
    doc = {
        "events": {"source": "events.csv", "columns": {
            "event_id": "id", "user_id": "user", "product_id": "sku", "event_type": "kind",
            "quantity": "qty", "price": "price", "ts": "when"}},
        "products": {"source": "catalogue.csv", "columns": {
            "product_id": "sku", "title": "name", "price": "price"}},
    }
    root = str(tmp_path / "landing")
    report = import_generic(parse_mapping(doc, tmp_path), root, max_drop_share=None)
    assert report.source("products").dropped["title_too_long"] == 1  # 600 characters
    assert report.source("products").dropped["price_out_of_bounds"] == 1
    view = _read_all(root, "events").set_index("event_id").loc["4"]
    assert view["quantity"] == 1 and pd.isna(view["price"])
    # B and C come back from their events, priced by them, titled by their ids
    products = _read_all(root, "products").set_index("product_id")
    assert products.loc["C", ["title", "price"]].tolist() == ["C", 30.0]
    assert (products["title"].str.len() <= 500).all()


@pytest.mark.parametrize("key, value, text", [
    ("quantity", {"column": "qty", "default": MAX_QUANTITY + 1}, "in 1..10000"),
    ("price", {"column": "price", "default": MAX_PRICE * 2}, "<= 100000"),
])
def test_defaults_beyond_the_bounds_are_refused(key, value, text):
    doc = _doc(TXN_MAPPING)
    doc["events"]["columns"][key] = value
    with pytest.raises(MappingError) as err:
        parse_mapping(doc, FIXTURES)
    assert err.value.key == f"mapping.events.columns.{key}.default" and text in str(err.value)


# --- filters and joins ---------------------------------------------------------------------------


def test_filter_conditions_remove_rows_under_their_reasons(txn_import):
    root, report = txn_import
    assert report.filtered == {
        "test_store": 1,                    # B3-1: store TEST
        "return_line": 1,                   # B4-2: qty -1 (not > 0)
        "non_product_department": 2,        # B1-2 fuel, B2-2 postage: a join on the products file
        "product_not_in_products_file": 1,  # B4-1: P9
    }
    assert (report.rows_in, report.rows_kept) == (13, 6)
    ev = _read_all(root, "events")
    assert sorted(ev["event_id"]) == ["B1-1", "B1-3", "B2-1", "B4-3", "B6-1", "B6-2"]
    text = str(report)
    assert "13 rows in, 6 kept (46.2%), 5 filtered out, 2 dropped" in text
    assert "filtered non_product_department" in text


def test_products_filter_takes_its_products_events_and_derives_nothing(txn_import):
    root, report = txn_import
    assert report.source("products").filtered == {"non_product_department": 2,
                                                  "without_events": 1}
    assert report.source("products from events") is None  # P4, P5 and P9 are not rebuilt
    assert sorted(_read_all(root, "products")["product_id"]) == ["P1", "P2", "P3", "P7"]


def test_users_filter_takes_its_users_events(tmp_path):
    # shop_mapping_catalog.yaml's users file: CUST-2's two rows are both FR
    doc = _doc(FIXTURES / "shop_mapping_catalog.yaml")
    doc["users"]["filter"] = [{"column": "country", "not_in": ["FR"], "reason": "left_out"}]
    root = str(tmp_path / "landing")
    report = import_generic(parse_mapping(doc, FIXTURES), root, max_drop_share=None)
    assert report.source("users").filtered == {"left_out": 2}
    assert report.filtered == {"left_out": 8}  # CUST-2's event rows, bad ones included
    assert "CUST-2" not in set(_read_all(root, "events")["user_id"])
    assert "CUST-2" not in set(_read_all(root, "users")["user_id"])  # not rebuilt from events


def test_filtered_rows_are_not_a_loss(tmp_path):
    # without the two out-of-bounds lines nothing is dropped: the default 1 % guard passes
    # although 5 of 11 rows and 3 of 7 catalogue rows are filtered out
    doc = _doc(TXN_MAPPING)
    doc["events"]["filter"].append({"column": "basket_id", "not_equals": "B5"})
    report = import_generic(parse_mapping(doc, FIXTURES), str(tmp_path / "landing"))
    assert report.filtered["filtered_out"] == 2 and sum(report.dropped.values()) == 0
    assert report.rows_kept == 6


@pytest.mark.parametrize("condition, kept", [
    ({"in": ["a", "b"]}, [True, True, False, False]),
    ({"not_in": ["a"]}, [False, True, True, True]),  # a missing value is not in the list
    ({"equals": "c"}, [False, False, True, False]),
    ({"not_equals": "c"}, [True, True, False, True]),
    ({"not_null": True}, [True, True, True, False]),
])
def test_text_conditions(condition, kept):
    op, value = next(iter(condition.items()))
    values = tuple(value) if isinstance(value, list) else (() if op == "not_null" else (value,))
    cond = Condition("k", "col", op, values)
    text = pd.Series(["a", "b", "c", pd.NA], dtype="string")
    assert condition_holds(cond, text, pd.Series([np.nan] * 4)).tolist() == kept


@pytest.mark.parametrize("op, kept", [("gt", [False, False, True, False]),
                                      ("ge", [False, True, True, False]),
                                      ("lt", [True, False, False, False]),
                                      ("le", [True, True, False, False])])
def test_numeric_conditions(op, kept):
    cond = Condition("k", "qty", op, number=0.0)
    numbers = pd.Series([-1.0, 0.0, 2.5, np.nan])  # not a number: fails every comparison
    assert condition_holds(cond, numbers.astype("string"), numbers).tolist() == kept


def test_row_filter_counts_the_first_reason_and_lists_every_reason():
    rows = RowFilter.keep_all(4).add("a", [True, True, False, False])
    rows = rows.add("b", [False, True, True, False]).add("c", [False, False, False, False])
    assert rows.counts() == {"a": 2, "b": 1, "c": 0}
    ids = pd.Series(["x", "x", "y", "z"])
    assert rows.by_id(ids) == {"x": "a", "y": "b"}  # z keeps a row


# --- computed columns, optional template parts, fallbacks ----------------------------------------


def test_expr_computes_the_unit_price(txn_import):
    root, _ = txn_import
    price = _read_all(root, "events").set_index("event_id")["price"]
    assert price["B1-1"] == pytest.approx(12.9)  # 25.80 / 2
    assert price["B6-1"] == pytest.approx(4.5)  # 9.00 / 2
    assert price["B6-2"] == pytest.approx(12.9)  # 38.70 / 3
    products = _read_all(root, "products").set_index("product_id")
    assert products.loc["P1", "price"] == pytest.approx(12.9)  # the median event price


@pytest.mark.parametrize("text, expected", [
    ("a / b", [2.0, np.nan, np.nan]),       # 4/2; a division by zero; a missing value
    ("a + b * 2", [8.0, 3.0, np.nan]),      # * before +
    ("(a + b) * 2", [12.0, 6.0, np.nan]),
    ("-a + 10", [6.0, 7.0, np.nan]),
    ("`line value` - 1.5e0", [0.5, -0.5, 2.5]),
])
def test_expressions(text, expected):
    cols = {"a": pd.Series([4.0, 3.0, np.nan]), "b": pd.Series([2.0, 0.0, 1.0]),
            "line value": pd.Series([2.0, 1.0, 4.0])}
    out = evaluate_expr(parse_expr(text, "k"), cols, 3)
    np.testing.assert_allclose(out.to_numpy(), expected)


@pytest.mark.parametrize("text, problem", [
    ("a +", "ends where a number or column is needed"),
    ("(a + b", "unbalanced parentheses"),
    ("a ** b", "unexpected '*'"),
    ("2 * 3", "uses no column"),
    ("a; import os", "cannot read ';"),
    ("a b", "unexpected 'b'"),
])
def test_bad_expressions_are_refused(text, problem):
    with pytest.raises(RuleError) as err:
        parse_expr(text, "mapping.events.columns.price.expr")
    assert err.value.key == "mapping.events.columns.price.expr" and problem in str(err.value)


def test_template_optional_parts_and_column_fallbacks(txn_import):
    root, report = txn_import
    products = _read_all(root, "products").set_index("product_id")
    assert products["title"].to_dict() == {
        "P1": "Acme Red Mug 350ml",
        "P2": "Blue Bowl",         # no brand, no size: not missing_title
        "P3": "Lumo Brass Lamp",   # no size
        "P7": "Acme Plate",
    }
    assert report.source("products").dropped["missing_title"] == 0
    assert products.loc["P2", "description"] == "Blue Bowl"  # [description, name]
    assert products.loc["P3", "category"] == "lamps"  # [department, aisle]
    assert products.loc["P1", ["description", "category"]].tolist() == ["Stoneware mug",
                                                                         "KITCHEN"]


@pytest.mark.parametrize("template, rows", [
    ("{a?} {b}", {("x", "y"): "x y", (None, "y"): "y"}),
    ("{a} ({b?})", {("x", "y"): "x (y)", ("x", None): "x"}),
    ("{a?}-{b?}-{c}", {("x", None): "x-z", (None, None): "z", (None, "y"): "y-z"}),
    ("{a?}/{b?}", {(None, None): None}),  # every part missing: missing
    ("{a}-{b}", {("x", None): None}),  # required parts as before
])
def test_optional_template_parts(tmp_path, template, rows):
    lines = ["id,a,b,c,when"] + [f"{i},{a or ''},{b or ''},z,2024-03-01"
                                 for i, (a, b) in enumerate(rows)]
    (tmp_path / "e.csv").write_text("\n".join(lines) + "\n")
    doc = {"events": {"source": "e.csv", "columns": {
        "event_id": "id", "user_id": {"value": "u1"}, "product_id": "id",
        "event_type": {"value": "search"}, "query": {"template": template}, "ts": "when",
        "price": {"default": 1.0}}}}
    root = str(tmp_path / "landing")
    report = import_generic(parse_mapping(doc, tmp_path), root, max_drop_share=None)
    ev = _read_all(root, "events")
    got = ev.set_index("event_id")["query"].to_dict() if len(ev) else {}
    want = {str(i): v for i, v in enumerate(rows.values()) if v is not None}
    assert got == want
    assert report.dropped["missing_query"] == len(rows) - len(want)


def test_fallback_prices_take_the_first_number(tmp_path):
    (tmp_path / "e.csv").write_text("id,unit,list,when\n1,abc,5.0,2024-03-01\n2,,7.5,2024-03-01\n"
                                    "3,2.0,9.0,2024-03-01\n")
    doc = {"events": {"source": "e.csv", "columns": {
        "event_id": "id", "user_id": {"value": "u1"}, "product_id": "id",
        "event_type": {"value": "purchase"}, "ts": "when",
        "price": {"column": ["unit", "list"]}}}}
    root = str(tmp_path / "landing")
    import_generic(parse_mapping(doc, tmp_path), root)
    price = _read_all(root, "events").set_index("event_id")["price"].to_dict()
    assert price == {"1": 5.0, "2": 7.5, "3": 2.0}


# --- exports without dates: per-user gaps, aligned ends ----------------------------------------


def _window_share(root: str, days: int = 30) -> tuple[int, int]:
    """Users with an event in the last ``days`` days of the import, and all users."""
    ev = _read_all(root, "events")
    end = ev["ts"].max().normalize() + pd.Timedelta(days=1)
    recent = ev[ev["ts"] >= end - pd.Timedelta(days=days)]
    return recent["user_id"].nunique(), ev["user_id"].nunique()


def test_per_user_gaps_and_an_aligned_end_fill_the_test_window(tmp_path):
    root = str(tmp_path / "aligned")
    report = import_generic(DATELESS_MAPPING, root)  # the default drop guard: nothing lost
    assert report.rows_kept == report.rows_in == 70
    ev = _read_all(root, "events").set_index("event_id")
    # user 1: orders 1001, 1002 (7 days later), 1003 (30 days later) on 30 June
    assert ev.loc[["1001-0", "1001-1", "1002-0", "1003-0"], "ts"].tolist() == [
        pd.Timestamp("2024-05-24 12:00", tz=UTC), pd.Timestamp("2024-05-24 12:00", tz=UTC),
        pd.Timestamp("2024-05-31 13:00", tz=UTC), pd.Timestamp("2024-06-30 07:00", tz=UTC)]
    last = ev.groupby("user_id")["day"].max()
    assert set(last) == {dt.date(2024, 6, 30)}  # every user's last order on align_end
    first = ev.groupby("user_id")["day"].min()
    assert first.nunique() > 5  # each on their own calendar
    assert _window_share(root) == (16, 16)

    # the fixed-step rule on the same export: few users reach the last 30 days
    doc = _doc(DATELESS_MAPPING)
    doc["events"]["columns"]["ts"] = {"from_sequence": "order_number", "start": "2024-01-01",
                                      "step_days": 7, "hour": "order_hour_of_day"}
    plain = str(tmp_path / "plain")
    import_generic(parse_mapping(doc, FIXTURES), plain)
    assert _window_share(plain) == (2, 16)


def test_gaps_count_from_start_and_a_missing_gap_uses_step_days(tmp_path):
    (tmp_path / "o.csv").write_text(
        "order,user,n,gap\n"
        "1,a,1,\n2,a,2,3\n3,a,3,\n4,a,4,10\n"  # order 3 has no gap: step_days (7)
        "5,b,1,\n6,b,2,-4\n"  # a negative gap: step_days too
    )
    doc = {"events": {"source": "o.csv", "columns": {
        "event_id": "order", "user_id": "user", "product_id": {"value": "p"},
        "event_type": {"value": "purchase"}, "price": {"default": 1.0},
        "ts": {"from_sequence": "n", "gap_days_column": "gap", "start": "2024-01-01",
               "step_days": 7}}}}
    root = str(tmp_path / "landing")
    import_generic(parse_mapping(doc, tmp_path), root)
    days = _read_all(root, "events").set_index("event_id")["day"].to_dict()
    assert days == {"1": dt.date(2024, 1, 1), "2": dt.date(2024, 1, 4), "3": dt.date(2024, 1, 11),
                    "4": dt.date(2024, 1, 21), "5": dt.date(2024, 1, 1), "6": dt.date(2024, 1, 8)}
    # without step_days, an order without a usable gap has no time
    del doc["events"]["columns"]["ts"]["step_days"]
    report = import_generic(parse_mapping(doc, tmp_path), str(tmp_path / "x"),
                            max_drop_share=None)
    assert report.dropped["unparsable_timestamp"] == 2  # orders 3 and 6


# --- invalid mappings ----------------------------------------------------------------------------


def _ts(doc: dict) -> dict:
    return doc["events"]["columns"]["ts"]


INVALID = [
    # (id, mapping, change, key of the error, text in the message)
    ("filter_not_a_list", TXN_MAPPING,
     lambda d: d["events"].update(filter={"column": "store", "not_equals": "TEST"}),
     "mapping.events.filter", "expected a list of conditions"),
    ("filter_two_ops", TXN_MAPPING,
     lambda d: d["events"]["filter"][0].update(equals="S1"),
     "mapping.events.filter[0]", "give exactly one of"),
    ("filter_unknown_op", TXN_MAPPING,
     lambda d: d["events"]["filter"][1].update(greater=1),
     "mapping.events.filter[1].greater", "unknown condition key"),
    ("filter_numeric_op_text", TXN_MAPPING,
     lambda d: d["events"]["filter"][1].update(gt="zero"),
     "mapping.events.filter[1].gt", "expected a number"),
    ("filter_bad_reason", TXN_MAPPING,
     lambda d: d["events"]["filter"][0].update(reason="Test Store"),
     "mapping.events.filter[0].reason", "snake_case"),
    ("filter_on_derived_products", DATELESS_MAPPING,
     lambda d: d["products"].update(filter=[{"column": "aisle", "not_null": True}]),
     "mapping.products.filter", "derived from the kept events"),
    ("require_without_products_file", DATELESS_MAPPING,
     lambda d: d["events"].update(require_product_in_catalog=True),
     "mapping.events.require_product_in_catalog", "needs a products file"),
    ("only_with_events_not_bool", TXN_MAPPING,
     lambda d: d["products"].update(only_with_events="yes"),
     "mapping.products.only_with_events", "expected true or false"),
    ("expr_and_column", TXN_MAPPING,
     lambda d: d["events"]["columns"]["price"].update(column="line_value"),
     "mapping.events.columns.price", "give exactly one of column, value, expr"),
    ("expr_syntax", TXN_MAPPING,
     lambda d: d["events"]["columns"]["price"].update(expr="line_value / (qty"),
     "mapping.events.columns.price.expr", "unbalanced parentheses"),
    ("expr_on_text", TXN_MAPPING,
     lambda d: d["products"]["columns"].update(brand={"expr": "a + b"}),
     "mapping.products.columns.brand.expr", "unknown option"),
    ("fallback_for_time", TXN_MAPPING,
     lambda d: d["events"]["columns"].update(ts={"column": ["sold_at", "other"]}),
     "mapping.events.columns.ts.column", "only for ids, text, quantities and prices"),
    ("fallback_not_names", TXN_MAPPING,
     lambda d: d["products"]["columns"].update(description={"column": ["description", 3]}),
     "mapping.products.columns.description.column", "expected source column names"),
    ("align_end_with_start", DATELESS_MAPPING, lambda d: _ts(d).update(start="2024-01-01"),
     "mapping.events.columns.ts.align_end", "not with start"),
    ("align_end_not_a_date", DATELESS_MAPPING, lambda d: _ts(d).update(align_end="June"),
     "mapping.events.columns.ts.align_end", "is not a date"),
    ("no_step_and_no_gaps", DATELESS_MAPPING, lambda d: _ts(d).pop("gap_days_column"),
     "mapping.events.columns.ts.step_days", "or gap_days_column"),
    ("gap_column_without_sequence", TXN_MAPPING,
     lambda d: d["events"]["columns"].update(ts={"column": "sold_at",
                                                 "gap_days_column": "gap"}),
     "mapping.events.columns.ts.gap_days_column", "only with from_sequence"),
]


@pytest.mark.parametrize("path, change, key, text", [c[1:] for c in INVALID],
                         ids=[c[0] for c in INVALID])
def test_invalid_rule_names_the_bad_key(path, change, key, text):
    doc = copy.deepcopy(_doc(path))
    change(doc)
    with pytest.raises(MappingError) as err:
        parse_mapping(doc, FIXTURES)
    assert err.value.key == key, str(err.value)
    assert str(err.value).startswith(f"{key}: ")
    assert text in str(err.value)


def test_filter_column_not_in_the_file_names_the_condition(tmp_path):
    doc = _doc(TXN_MAPPING)
    doc["products"]["filter"][0]["column"] = "dept"
    with pytest.raises(MappingError) as err:
        import_generic(parse_mapping(doc, FIXTURES), str(tmp_path))
    assert err.value.key == "mapping.products.filter[0]"
    assert "source column 'dept' is not in the products file txn_products.csv" in str(err.value)
