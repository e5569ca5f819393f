"""The landing-zone contract: casting, refusal reasons, deterministic partitions."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pandas as pd
import pytest

from features.contract import (
    ContractError,
    catalog_as_of,
    conform,
    list_days,
    read_partition,
    write_partition,
)

pytestmark = pytest.mark.fast

DAY = dt.date(2026, 1, 2)


def _products(**overrides) -> pd.DataFrame:
    base = {
        "product_id": ["P1", "P2"],
        "title": ["Red Heart Candle", "Blue Mug"],
        "description": ["a candle", None],
        "category": ["candles", "mugs"],
        "brand": ["Lumo", None],
        "price": [3.5, 7.0],
        "image_url": [None, None],
        "updated_at": pd.to_datetime(["2026-01-02 10:00", "2026-01-02 11:00"], utc=True),
    }
    base.update(overrides)
    return pd.DataFrame(base)


def test_conform_adds_optional_columns_and_keeps_order() -> None:
    frame = _products().drop(columns=["description", "brand", "image_url"])
    table = conform(frame, "products")
    assert table.column_names == ["product_id", "title", "description", "category", "brand",
                                  "price", "image_url", "updated_at"]
    assert table.column("brand").null_count == 2


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: f.drop(columns=["price"]), "missing columns ['price']"),
        (lambda f: f.assign(email=["a@b.c", "d@e.f"]), "unexpected columns ['email']"),
        (lambda f: f.assign(price=["cheap", "dear"]), "column 'price' is not double"),
        (lambda f: f.assign(product_id=["P1", None]), "column 'product_id' has 1 null"),
    ],
)
def test_conform_names_the_problem(mutate, message: str) -> None:
    with pytest.raises(ContractError) as err:
        conform(mutate(_products()), "products")
    assert message in str(err.value)


def test_write_is_deterministic_and_replaces(tmp_path: Path) -> None:
    root = str(tmp_path / "landing")
    path = write_partition(root, "products", DAY, _products())
    first = Path(path).read_bytes()
    # shuffled input, same rows: same bytes
    write_partition(root, "products", DAY, _products().iloc[::-1])
    assert Path(path).read_bytes() == first
    # a rerun with other rows replaces the partition instead of appending
    write_partition(root, "products", DAY, _products().iloc[:1])
    assert list(read_partition(root, "products", DAY)["product_id"]) == ["P1"]
    assert list_days(root, "products") == [DAY]


def test_catalog_as_of_takes_the_latest_row(tmp_path: Path) -> None:
    root = str(tmp_path / "landing")
    write_partition(root, "products", DAY, _products())
    later = dt.date(2026, 1, 3)
    write_partition(root, "products", later, _products(
        product_id=["P2", "P3"], price=[9.0, 1.0],
        updated_at=pd.to_datetime(["2026-01-03 09:00", "2026-01-03 10:00"], utc=True)))
    assert sorted(catalog_as_of(root, DAY)["product_id"]) == ["P1", "P2"]
    now = catalog_as_of(root, later).set_index("product_id")
    assert list(now.index) == ["P1", "P2", "P3"]
    assert now.loc["P2", "price"] == 9.0
