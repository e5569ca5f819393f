"""The Online Retail importer: drops each kind of bad row under its reason, writes the contract."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features import contract
from features.importers.online_retail import (
    DROP_REASONS,
    ImportReport,
    category_for,
    import_online_retail,
)

pytestmark = pytest.mark.fast

REAL_FILE = (
    Path(__file__).resolve().parents[2].parent
    / "shared" / "data" / "online-retail" / "online_retail.parquet"
)
# Marks of every test that reads the real file (applied to the class below, so the dirty-frame
# tests in this module run everywhere).
REAL_DATA = [
    pytest.mark.realdata,
    pytest.mark.skipif(
        not REAL_FILE.exists(),
        reason=f"Online Retail file not found at {REAL_FILE} (see shared/data/online-retail)",
    ),
]


def _read_all(root: str, table: str) -> pd.DataFrame:
    days = contract.list_days(root, table)
    frames = [contract.read_partition(root, table, d).assign(day=d) for d in days]
    return pd.concat(frames, ignore_index=True)


# --- a tiny dirty file: one row for each way a line can be bad --------------------------------

DIRTY_ROWS = [
    # InvoiceNo, StockCode, Description, Quantity, InvoiceDate, UnitPrice, CustomerID, Country
    ("536001", "85123a ", "WHITE HANGING HEART T-LIGHT HOLDER", 6, "2010-12-01 08:26", 2.55, 17850.0, "United Kingdom"),
    ("536001", "71053", "WHITE METAL LANTERN", 6, "2010-12-01 08:26", 3.39, 17850.0, "United Kingdom"),
    ("536002", "85123A", None, 2, "2010-12-02 09:00", 2.95, 17850.0, "France"),  # filled
    ("536003", "22633", "HAND WARMER UNION JACK", 3, "2010-12-02 10:00", 1.85, 12583.0, "France"),
    ("536004", "85123A", "nan", 1, "2010-12-03 11:00", 2.65, 12583.0, "France"),  # filled
    ("C536005", "85123A", "WHITE HANGING HEART T-LIGHT HOLDER", -1, "2010-12-03 12:00", 2.55, 17850.0, "United Kingdom"),
    ("C536006", "POST", "POSTAGE", -1, "2010-12-03 12:00", 18.0, None, "France"),  # cancellation first
    ("536007", "POST", "POSTAGE", 1, "2010-12-03 12:00", 18.0, 12583.0, "France"),
    ("536007", "gift_0001_20", "Dotcomgiftshop Gift Voucher £20.00", 1, "2010-12-03 12:00", 17.0, 12583.0, "France"),
    ("536007", "DCGSSGIRL", "GIRLS PARTY BAG", 1, "2010-12-03 12:00", 3.3, 12583.0, "France"),
    ("536007", "C2", "CARRIAGE", 1, "2010-12-03 12:00", 50.0, 12583.0, "France"),
    ("536008", "22633", "HAND WARMER UNION JACK", 12, "2010-12-03 13:00", 1.85, None, "United Kingdom"),
    ("536009", "22633", "HAND WARMER UNION JACK", 0, "2010-12-03 14:00", 1.85, 12583.0, "France"),
    ("536010", "22633", "?", -5, "2010-12-03 15:00", 0.0, 12583.0, "France"),  # quantity first
    ("536011", "22633", "HAND WARMER UNION JACK", 4, "2010-12-03 16:00", 0.0, 12583.0, "France"),
    ("536012", "90999", "nan", 1, "2010-12-03 17:00", 1.0, 12583.0, "France"),  # no title anywhere
    ("536013", "22633", "HAND WARMER UNION JACK", 2, "2010-12-04 10:00", 2.10, 12583.0, "Germany"),
]
EXPECTED_DROPS = {
    "cancellation": 2,
    "non_product_code": 4,
    "guest_checkout": 1,
    "non_positive_quantity": 2,
    "non_positive_price": 1,
    "missing_timestamp": 0,
    "missing_description": 1,
}


@pytest.fixture(scope="module")
def dirty(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, ImportReport]:
    folder = tmp_path_factory.mktemp("dirty")
    frame = pd.DataFrame(DIRTY_ROWS, columns=[
        "InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate", "UnitPrice",
        "CustomerID", "Country",
    ])
    frame["InvoiceDate"] = pd.to_datetime(frame["InvoiceDate"])
    path = folder / "dirty.parquet"
    frame.to_parquet(path)
    root = str(folder / "landing")
    return root, import_online_retail(str(path), root)


def test_each_bad_row_is_dropped_under_its_first_reason(dirty):
    _, report = dirty
    assert tuple(report.dropped) == DROP_REASONS
    assert report.dropped == EXPECTED_DROPS
    assert report.rows_in == len(DIRTY_ROWS)
    assert report.rows_kept == 6
    assert sum(report.dropped.values()) + report.rows_kept == report.rows_in
    assert (report.days, report.users, report.products, report.events) == (4, 2, 3, 6)
    text = str(report)
    assert "6 kept" in text and "non_product_code" in text and "guest_checkout" in text


def test_dirty_events(dirty):
    root, _ = dirty
    ev = _read_all(root, "events")
    assert sorted(ev.event_id) == sorted(
        ["536001-0", "536001-1", "536002-0", "536003-0", "536004-0", "536013-0"]
    )
    assert set(ev.event_type) == {"purchase"} and ev["query"].isna().all()
    assert set(ev.user_id) == {"C17850", "C12583"}
    assert set(ev.product_id) == {"85123A", "71053", "22633"}  # stripped, upper-cased
    row = ev.set_index("event_id").loc["536001-0"]
    assert row.quantity == 6 and row.price == 2.55
    assert row.ts == pd.Timestamp("2010-12-01 08:26", tz="UTC")
    assert (ev.ts.dt.date == ev.day).all()
    assert contract.list_days(root, "events") == [
        dt.date(2010, 12, 1), dt.date(2010, 12, 2), dt.date(2010, 12, 3), dt.date(2010, 12, 4)
    ]


def test_dirty_products_and_users(dirty):
    root, _ = dirty
    products = _read_all(root, "products").set_index("product_id")
    assert sorted(products.index) == ["22633", "71053", "85123A"]
    heart = products.loc["85123A"]
    assert heart.title == heart.description == "WHITE HANGING HEART T-LIGHT HOLDER"
    assert heart.category == "candles" and heart.brand is None
    assert heart.price == pytest.approx(2.65)  # median of 2.55, 2.95, 2.65
    assert heart.day == dt.date(2010, 12, 1)
    assert heart.updated_at == pd.Timestamp("2010-12-01 08:26", tz="UTC")
    assert products.loc["22633", "day"] == dt.date(2010, 12, 2)
    assert products.loc["22633", "price"] == pytest.approx((1.85 + 2.10) / 2)

    users = _read_all(root, "users").set_index("user_id")
    assert sorted(users.index) == ["C12583", "C17850"]
    assert users.loc["C17850", "country"] == "United Kingdom"  # 2 of 3 kept rows
    assert users.loc["C12583", "country"] == "France"  # 2 France, 1 Germany
    assert users.loc["C12583", "signup_date"] == dt.date(2010, 12, 2) == users.loc["C12583", "day"]


@pytest.mark.parametrize("title, category", [
    ("WHITE HANGING HEART T-LIGHT HOLDER", "candles"),
    ("JUMBO BAG RED RETROSPOT", "bags"),
    ("REGENCY CAKESTAND 3 TIER", "kitchen"),
    ("PAPER CHAIN KIT 50'S CHRISTMAS", "cards_paper"),
    ("LIGHT PINK FLOCK GLASS CANDLEHOLDER", "candles"),
    ("RED HEARTS LIGHT CHAIN", "lighting"),
    ("HEART OF WICKER SMALL", "decorations"),
    ("CHRISTMAS CRAFT LITTLE FRIENDS", "christmas"),
    ("INFLATABLE POLITICAL GLOBE", "other"),
])
def test_category_for(title, category):
    assert category_for(title) == category
    assert category_for(title.lower()) == category


# --- the real file -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, ImportReport]:
    if not REAL_FILE.exists():  # the class marks skip first; this guards direct fixture use
        pytest.skip(f"Online Retail file not found at {REAL_FILE}")
    root = str(tmp_path_factory.mktemp("online_retail"))
    return root, import_online_retail(str(REAL_FILE), root)


class TestRealFile:
    """The whole UCI file, imported once for the class (a few seconds)."""

    pytestmark = REAL_DATA

    def test_report_counts_are_plausible(self, real):
        _, report = real
        assert report.rows_in == 541_909
        assert sum(report.dropped.values()) + report.rows_kept == report.rows_in
        assert report.dropped["cancellation"] == 9_288
        assert report.dropped["guest_checkout"] > 100_000
        assert report.dropped["non_product_code"] > 1_000
        assert 390_000 < report.rows_kept < 400_000
        assert report.events == report.rows_kept
        assert 4_300 <= report.users < 4_400
        assert 3_600 <= report.products < 4_000
        assert 300 <= report.days <= 310

    def test_partitions_conform_and_are_clean(self, real):
        root, report = real
        ev = _read_all(root, "events")  # read_partition raises if a partition does not conform
        products = _read_all(root, "products")
        users = _read_all(root, "users")
        assert len(ev) == report.events and ev.event_id.is_unique
        assert len(products) == products.product_id.nunique() == report.products
        assert len(users) == users.user_id.nunique() == report.users
        # nothing the rules drop survives
        assert not ev.event_id.str.startswith("C").any()
        assert (ev.quantity > 0).all() and (ev.price > 0).all()
        assert ev.user_id.str.fullmatch(r"C\d{5}").all()
        assert ev.product_id.str.contains(r"\d").all()
        assert not ev.product_id.isin(["POST", "DOT", "C2", "M", "D", "S", "B", "PADS"]).any()
        assert not ev.product_id.str.startswith("GIFT_").any()
        assert (ev.product_id == ev.product_id.str.strip().str.upper()).all()
        assert set(ev.event_type) == {"purchase"}
        # every reference resolves, and products land on the day of their first sale
        assert ev.product_id.isin(products.product_id).all()
        assert ev.user_id.isin(users.user_id).all()
        first_sale = ev.groupby("product_id").day.min()
        assert (products.day.to_numpy() == first_sale.reindex(products.product_id).to_numpy()).all()
        first_buy = ev.groupby("user_id").day.min()
        assert (users.day.to_numpy() == first_buy.reindex(users.user_id).to_numpy()).all()
        # dates: partitions hold their own day, all inside the file's range
        assert (ev.ts.dt.date == ev.day).all()
        assert ev.day.min() == dt.date(2010, 12, 1) and ev.day.max() == dt.date(2011, 12, 9)
        assert contract.list_days(root, "events") == contract.list_days(root, "products")
        # titles and categories are real
        assert products.title.notna().all() and (products.title.str.len() > 0).all()
        assert not products.title.str.lower().eq("nan").any()
        assert (products.category != "other").mean() > 0.7
        assert (users.country == "United Kingdom").mean() > 0.85
        heart = products.set_index("product_id").loc["85123A"]
        assert heart.title == "WHITE HANGING HEART T-LIGHT HOLDER"
        assert np.isclose(heart.price, ev.loc[ev.product_id == "85123A", "price"].median())
