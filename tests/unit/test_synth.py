"""The synthetic shop: conforms to the contract, is reproducible and carries learnable signal."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import pandas as pd
import pytest

from features import contract
from features.synth import CATEGORY_NAMES, SynthSummary, generate_shop

pytestmark = pytest.mark.fast

START = dt.date(2026, 1, 1)
DAYS = 8
# big enough for the behaviour checks (~2k events), small enough to build in a blink
SHOP = {"days": DAYS, "users": 150, "products": 60, "start": START}
TINY = {"days": 6, "users": 60, "products": 50, "start": START}


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthSummary]:
    root = tmp_path_factory.mktemp("shop")
    return root, generate_shop(str(root), seed=11, **SHOP)


@pytest.fixture(scope="module")
def tables(shop: tuple[Path, SynthSummary]) -> dict[str, pd.DataFrame]:
    root, _ = shop
    days = [START + dt.timedelta(days=i) for i in range(DAYS)]
    out = {}
    for table in contract.TABLES:
        frames = []
        for day in days:
            df = contract.read_partition(str(root), table, day)  # raises if it does not conform
            frames.append(df.assign(day=day))
        out[table] = pd.concat(frames, ignore_index=True)
    return out


def test_every_day_has_a_conforming_partition_of_every_table(shop):
    root, summary = shop
    days = [START + dt.timedelta(days=i) for i in range(DAYS)]
    for table in contract.TABLES:
        assert contract.list_days(str(root), table) == days
    assert summary.days == DAYS and summary.n_users == 150 and summary.n_products == 60
    assert "150 users" in str(summary) and str(root) in str(summary)


def test_summary_counts_match_the_files(shop, tables):
    _, summary = shop
    ev = tables["events"]
    assert summary.n_events == len(ev)
    assert summary.n_purchases == int((ev.event_type == "purchase").sum())
    assert summary.n_searches == int((ev.event_type == "search").sum())
    assert tables["users"].user_id.nunique() == len(tables["users"]) == summary.n_users
    assert tables["products"].product_id.nunique() == summary.n_products


def test_same_seed_gives_identical_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    generate_shop(str(a), seed=5, **TINY)
    generate_shop(str(b), seed=5, **TINY)
    ha, hb = _hashes(a), _hashes(b)
    assert len(ha) == 3 * TINY["days"]
    assert ha == hb


def test_different_seed_gives_different_data(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    generate_shop(str(a), seed=5, **TINY)
    generate_shop(str(b), seed=6, **TINY)
    ha, hb = _hashes(a), _hashes(b)
    assert ha.keys() == hb.keys()
    differing = [k for k in ha if ha[k] != hb[k]]
    assert any(k.startswith("events/") for k in differing)
    assert any(k.startswith("products/") for k in differing)


def test_events_reference_users_and_products_that_exist_by_that_day(tables):
    ev, users, products = tables["events"], tables["users"], tables["products"]
    first_user_day = users.groupby("user_id").day.min()
    first_product_day = products.groupby("product_id").day.min()
    assert ev.user_id.isin(first_user_day.index).all()
    assert (ev.day >= ev.user_id.map(first_user_day)).all()
    refs = ev[ev.product_id.notna()]
    assert refs.product_id.isin(first_product_day.index).all()
    assert (refs.day >= refs.product_id.map(first_product_day)).all()
    assert ev.event_id.is_unique


def test_event_types_and_search_events(tables):
    ev = tables["events"]
    assert set(ev.event_type) == set(contract.EVENT_TYPES)
    search = ev[ev.event_type == "search"]
    assert search.product_id.isna().all()
    assert search["query"].notna().all() and (search["query"].str.len() > 0).all()
    assert (search["query"] == search["query"].str.lower()).all()
    assert search["query"].str.split().str.len().between(1, 3).all()
    assert search.price.isna().all() and (search.quantity == 1).all()
    rest = ev[ev.event_type != "search"]
    assert rest.product_id.notna().all() and rest["query"].isna().all()
    assert (rest.price > 0).all() and (rest.quantity >= 1).all()
    assert (ev.loc[ev.event_type == "view", "quantity"] == 1).all()


def test_purchase_price_is_the_products_current_price(tables):
    products = tables["products"].sort_values(["product_id", "updated_at"])
    ev = tables["events"]
    for day in sorted(ev.day.unique()):
        current = products[products.day <= day].drop_duplicates("product_id", keep="last")
        price = current.set_index("product_id").price
        bought = ev[(ev.day == day) & (ev.event_type == "purchase")]
        assert (bought.price.to_numpy() == bought.product_id.map(price).to_numpy()).all()


def test_catalogue(tables):
    products = tables["products"]
    day0 = products[products.day == START]
    assert len(day0) >= 0.7 * 60  # most products exist from the start
    new = products[(products.day > START) & ~products.product_id.isin(day0.product_id)]
    assert new.product_id.nunique() >= 0.1 * 60  # new products arrive after day 0
    assert new.day.nunique() >= 3  # spread over the run, not one drop
    assert set(products.category) <= set(CATEGORY_NAMES)
    assert (products.price > 0).all() and (products.price.round(2) == products.price).all()
    assert products.product_id.str.fullmatch(r"P\d{6}").all()
    assert products.brand.notna().all() and products.image_url.isna().all()
    assert (products.updated_at.dt.date == products.day).all()


def test_users_carry_nothing_identifying(tables):
    users = tables["users"]
    assert list(users.columns) == [*contract.USERS.names, "day"]
    assert users.user_id.str.fullmatch(r"U\d{5}").all()
    assert (users.signup_date == users.day).all()
    assert (users.day == START).mean() > 0.5  # most users are there from day 0
    assert (users.country == "United Kingdom").mean() > 0.4


def test_ts_inside_its_day_and_increasing_within_a_session(tables):
    ev = tables["events"]
    assert (ev.ts.dt.date == ev.day).all()
    # Event ids run in session order, so the event before a cart is its view, and the one
    # before a purchase is its cart: same user and product, strictly earlier.
    ev = ev.sort_values("event_id").reset_index(drop=True)
    prev = ev.shift(1)
    for kind, before in (("add_to_cart", "view"), ("purchase", "add_to_cart")):
        rows = ev.event_type == kind
        assert rows.any()
        assert (prev.event_type[rows] == before).all()
        assert (prev.user_id[rows] == ev.user_id[rows]).all()
        assert (prev.product_id[rows] == ev.product_id[rows]).all()
        assert (prev.ts[rows] < ev.ts[rows]).all()
    # a search is followed by views of the same user, later
    search = ev.index[(ev.event_type == "search") & (ev.index < len(ev) - 1)]
    after = ev.loc[search + 1]
    same = after.user_id.to_numpy() == ev.loc[search, "user_id"].to_numpy()
    assert same.mean() > 0.9
    assert (after.ts.to_numpy()[same] > ev.loc[search, "ts"].to_numpy()[same]).all()


def test_repeat_buying(tables):
    bought = tables["events"][tables["events"].event_type == "purchase"]
    days_per_pair = bought.groupby(["user_id", "product_id"]).day.nunique()
    # chance alone gives a handful of such pairs in a shop this size; repeat buying gives 20+
    assert (days_per_pair >= 2).sum() >= 10


def test_purchases_follow_the_users_taste(tables):
    ev = tables["events"].merge(
        tables["products"].drop_duplicates("product_id")[["product_id", "category"]],
        on="product_id",
        how="left",
    )
    cut = START + dt.timedelta(days=DAYS - 2)
    history = ev[(ev.day < cut) & ev.product_id.notna()]
    favourite = history.groupby("user_id").category.agg(lambda s: s.value_counts().index[0])
    later = ev[(ev.day >= cut) & (ev.event_type == "purchase") & ev.user_id.isin(favourite.index)]
    assert later.user_id.nunique() >= 10
    hit = (later.category == later.user_id.map(favourite)).groupby(later.user_id).mean()
    # with 8 categories a taste-free shop would give ~1/8
    assert hit.mean() > 3 / len(CATEGORY_NAMES)


def test_tiny_and_quiet_days_still_conform(tmp_path):
    # one user, a single day: most days of such a shop have no events at all
    summary = generate_shop(str(tmp_path), days=3, users=1, products=8, progress=True)
    assert summary.days == 3 and summary.n_products == 8
    for table in contract.TABLES:
        assert len(contract.list_days(str(tmp_path), table)) == 3
        for day in contract.list_days(str(tmp_path), table):
            contract.read_partition(str(tmp_path), table, day)


@pytest.mark.parametrize("bad", [{"days": 0}, {"users": 0}, {"products": 3}])
def test_bad_arguments(tmp_path, bad):
    with pytest.raises(ValueError):
        generate_shop(str(tmp_path), **bad)
    assert not any(tmp_path.iterdir())  # nothing written
