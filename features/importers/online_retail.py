"""Import the UCI Online Retail transactions into the landing-zone contract.

The file (541,909 invoice lines of a UK gift-ware shop, 2010-12-01..2011-12-09) is dirty on
purpose. Each row is checked against these reasons, in this order, and a dropped row is
counted under the FIRST one that applies (``DROP_REASONS``):

1. ``cancellation``          InvoiceNo starts with "C".
2. ``non_product_code``      StockCode is postage, fees, manual adjustments, samples, gift
                             vouchers and the like (``NON_PRODUCT_CODES``, ``gift_*``, or any
                             code without a digit).
3. ``guest_checkout``        CustomerID is missing.
4. ``non_positive_quantity`` Quantity <= 0 (stock corrections).
5. ``non_positive_price``    UnitPrice <= 0 (adjustments, free samples).
6. ``missing_timestamp``     InvoiceDate is missing or unparseable.
7. ``missing_description``   no valid description on the row and none for its product on
                             any other row of the file.

A missing (or "nan") description is filled with the product's most frequent valid
description, preferring kept rows and falling back to any row of the same stock code.

What is written (one partition per day that has kept rows, for each table):

* ``events``: one ``purchase`` per kept line; ``event_id`` = "<InvoiceNo>-<line index>", the
  line's 0-based position inside its invoice in the file, so ids are stable across reruns.
  ``user_id`` = "C<CustomerID>" (the file has no names, only numeric ids).
* ``products``: each product once, on the day it is first sold, with its most frequent
  description as title and description, a coarse keyword category (``CATEGORY_KEYWORDS``),
  the median kept UnitPrice, ``updated_at`` = first sale.
* ``users``: each customer once, on the day of their first purchase, with their most frequent
  country and ``signup_date`` = that day.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from features import contract

DROP_REASONS = (
    "cancellation",
    "non_product_code",
    "guest_checkout",
    "non_positive_quantity",
    "non_positive_price",
    "missing_timestamp",
    "missing_description",
)
# Stock codes that are not products: postage, discounts, manual lines, bank and marketplace
# fees, charity, padding, carriage, samples, bad-debt adjustments.
NON_PRODUCT_CODES = frozenset({
    "POST", "D", "M", "DOT", "BANK CHARGES", "AMAZONFEE", "CRUK", "PADS", "C2", "S", "B",
})

# Coarse category from the title's words: the first rule with a matching word wins, so the
# specific object types come before themes (a "CHRISTMAS CANDLE" is a candle, a "HEART
# CUSHION" a cushion). Words match whole, with a plural "S"/"ES" allowed; "LIGHT" followed by a
# colour is a shade, not a lamp. Titles matching nothing are "other" (about a fifth of them).
CATEGORY_KEYWORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("clocks", ("CLOCK",)),
    ("frames", ("FRAME",)),
    ("cushions", ("CUSHION", "FILLER")),
    ("bags", ("BAG", "HANDBAG", "WASHBAG", "TOTE", "SHOPPER", "PURSE", "BACKPACK", "RUCKSACK")),
    ("jewellery", ("NECKLACE", "NECKL", "BRACELET", "EARRINGS", "RING", "BROOCH", "HAIRCLIP",
                   "HAIR", "CHARM", "DIAMANTE")),
    ("candles", ("CANDLE", "CANDLEHOLDER", "CANDLEPOT", "CANDLESTICK", "VOTIVE", "T-LIGHT",
                 "TLIGHT", "TEALIGHT", "HOLDER", "LANTERN", "INCENSE")),
    ("lighting", ("LIGHT", "LAMP", "NIGHTLIGHT", "LED", "LAMPSHADE", "CHANDELIER")),
    ("mugs_tea", ("MUG", "CUP", "TEA", "TEACUP", "TEAPOT", "SAUCER", "COFFEE", "BEAKER")),
    ("kitchen", ("KITCHEN", "CAKE", "CAKESTAND", "BAKING", "CUTTER", "CUTLERY", "PLATE",
                 "BOWL", "JAR", "APRON", "NAPKIN", "LUNCH", "RECIPE", "JUG", "SPOON", "TRAY",
                 "DOILY", "CASES", "SPATULA", "OVEN", "PAN", "DISH", "PLACEMAT", "CHOPPING")),
    ("cards_paper", ("CARD", "WRAP", "PAPER", "NOTEBOOK", "JOURNAL", "BOOK", "STICKER",
                     "ENVELOPE", "PENCIL", "PEN", "NOTE", "NOTEPAD", "STATIONERY", "TAPE",
                     "CALENDAR", "DIARY", "CRAYON", "CHALK", "ERASER", "RIBBON", "TAG")),
    ("boxes_tins", ("BOX", "TIN", "STORAGE", "BASKET", "TRUNK", "CRATE")),
    ("signs", ("SIGN", "PLAQUE", "TILE")),
    ("toys_games", ("TOY", "GAME", "PUZZLE", "DOLL", "JIGSAW", "DOMINOES", "SKITTLES",
                    "SPACEBOY", "MARBLES", "BALLOON", "PLAYHOUSE", "TEDDY", "KIT", "SOLDIER")),
    ("garden", ("GARDEN", "PLANT", "PLANTER", "WATERING", "BIRD", "FLOWER", "POT",
                "BIRDHOUSE", "FEEDER", "PARASOL", "UMBRELLA", "WINDMILL")),
    ("christmas", ("CHRISTMAS", "XMAS", "ADVENT", "BAUBLE", "SNOWFLAKE", "REINDEER",
                   "SANTA", "STAR", "TREE", "NATIVITY", "ANGEL")),
    ("decorations", ("HEART", "DECORATION", "HANGING", "BUNTING", "GARLAND", "WREATH",
                     "ORNAMENT", "CHIME", "MOBILE", "DOORSTOP", "HOOK", "MIRROR", "BEAD",
                     "WICKER", "EASTER", "ART")),
)
_KEYWORD_CATEGORY = {w: c for c, words in reversed(CATEGORY_KEYWORDS) for w in words}
_CATEGORY_RANK = {c: i for i, (c, _) in enumerate(CATEGORY_KEYWORDS)}
_WORD = re.compile(r"[A-Z0-9]+(?:-[A-Z0-9]+)*")
_LIGHT_SHADE = re.compile(
    r"\bLIGHT (?=PINK|BLUE|GREEN|BROWN|GREY|GRAY|PURPLE|YELLOW|RED|GOLD|SILVER|IVORY|CREAM)"
)


@dataclass(frozen=True)
class ImportReport:
    """What ``import_online_retail`` read, kept, dropped and wrote."""

    rows_in: int
    rows_kept: int
    dropped: dict[str, int]  # reason -> rows, every reason of DROP_REASONS, in that order
    days: int
    users: int
    products: int
    events: int

    def __str__(self) -> str:
        share = self.rows_kept / self.rows_in if self.rows_in else 0.0
        lines = [
            f"Online Retail import: {self.rows_in:,} rows in, {self.rows_kept:,} kept "
            f"({share:.1%}), {self.rows_in - self.rows_kept:,} dropped",
        ]
        width = max(len(r) for r in self.dropped) if self.dropped else 0
        lines += [f"  dropped {r:<{width}}  {n:>9,}" for r, n in self.dropped.items()]
        lines.append(
            f"wrote {self.days:,} days: {self.events:,} purchase events, "
            f"{self.users:,} users, {self.products:,} products"
        )
        return "\n".join(lines)


def category_for(title: str) -> str:
    """The coarse category of a product title, by ``CATEGORY_KEYWORDS``.

    Args:
        title: product title (any case).

    Returns:
        The category of the earliest rule with a matching word, or "other".
    """
    best = len(CATEGORY_KEYWORDS)
    for word in _WORD.findall(_LIGHT_SHADE.sub("", title.upper())):
        for candidate in (word, word[:-1] if word.endswith("S") else "",
                          word[:-2] if word.endswith("ES") else ""):
            cat = _KEYWORD_CATEGORY.get(candidate)
            if cat is not None:
                best = min(best, _CATEGORY_RANK[cat])
    return CATEGORY_KEYWORDS[best][0] if best < len(CATEGORY_KEYWORDS) else "other"


def _valid_description(desc: pd.Series) -> pd.Series:
    """Strip descriptions; missing, empty and the literal "nan" become NA."""
    s = desc.astype("string").str.strip()
    return s.mask(s.isna() | (s == "") | (s.str.lower() == "nan"))


def _most_frequent(keys: pd.Series, values: pd.Series) -> pd.Series:
    """Per key, its most frequent non-null value; ties go to the smallest value (stable)."""
    pairs = pd.DataFrame({"k": keys, "v": values}).dropna()
    if pairs.empty:
        return pd.Series(dtype="object")
    counts = pairs.groupby(["k", "v"], sort=False).size().reset_index(name="n")
    counts = counts.sort_values(["k", "n", "v"], ascending=[True, False, True], kind="stable")
    return counts.drop_duplicates("k").set_index("k")["v"]


def _day_slices(days: np.ndarray) -> dict[dt.date, slice]:
    """Rows of a day-sorted array, by day."""
    if not len(days):
        return {}
    uniq, first = np.unique(days, return_index=True)
    bounds = [*first[1:], len(days)]
    return {d: slice(int(a), int(b)) for d, a, b in zip(uniq, first, bounds, strict=True)}


def import_online_retail(path: str, root: str, *, progress: bool = False) -> ImportReport:
    """Clean the Online Retail file and write it as daily contract partitions under ``root``.

    Args:
        path: the Online Retail parquet file (columns InvoiceNo, StockCode, Description,
            Quantity, InvoiceDate, UnitPrice, CustomerID, Country).
        root: landing-zone root to write ``events``, ``products`` and ``users`` under.
        progress: show a progress bar over the days written.

    Returns:
        Counts of rows read, kept and dropped (by reason) and of what was written.
    """
    raw = pd.read_parquet(path, columns=[
        "InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate", "UnitPrice",
        "CustomerID", "Country",
    ])
    rows_in = len(raw)
    invoice = raw["InvoiceNo"].astype("string").str.strip()
    # the line's position inside its invoice in the file: a stable part of the event id
    line = raw.groupby(invoice, sort=False, dropna=False).cumcount()
    code = raw["StockCode"].astype("string").str.strip().str.upper()
    quantity = pd.to_numeric(raw["Quantity"], errors="coerce")
    price = pd.to_numeric(raw["UnitPrice"], errors="coerce")
    ts = pd.to_datetime(raw["InvoiceDate"], errors="coerce")
    ts = ts.dt.tz_localize("UTC") if ts.dt.tz is None else ts.dt.tz_convert("UTC")
    desc = _valid_description(raw["Description"])
    customer = pd.to_numeric(raw["CustomerID"], errors="coerce")

    checks = {
        "cancellation": invoice.str.startswith("C").fillna(False).to_numpy(bool),
        "non_product_code": (
            code.isna() | code.isin(NON_PRODUCT_CODES) | code.str.startswith("GIFT_")
            | ~code.str.contains(r"\d", regex=True)
        ).fillna(True).to_numpy(bool),
        "guest_checkout": customer.isna().to_numpy(),
        "non_positive_quantity": ~(quantity > 0).fillna(False).to_numpy(bool),
        "non_positive_price": ~(price > 0).fillna(False).to_numpy(bool),
        "missing_timestamp": ts.isna().to_numpy(),
    }
    reason = np.full(rows_in, -1, dtype=np.int64)
    for i, name in enumerate(checks):
        reason[(reason < 0) & checks[name]] = i

    # Titles: the most frequent valid description on otherwise-kept rows, else on any row.
    passing = reason < 0
    title = {
        **_most_frequent(code, desc).to_dict(),
        **_most_frequent(code[passing], desc[passing]).to_dict(),  # wins where both exist
    }
    no_title = passing & ~code.isin(list(title)).to_numpy(bool)
    reason[no_title] = DROP_REASONS.index("missing_description")
    keep = reason < 0
    dropped = {r: int((reason == i).sum()) for i, r in enumerate(DROP_REASONS)}

    kept = pd.DataFrame({
        "event_id": invoice[keep] + "-" + line[keep].astype("string"),
        "user_id": "C" + customer[keep].astype("int64").astype("string"),
        "product_id": code[keep],
        "quantity": quantity[keep].astype("int64"),
        "price": price[keep].astype("float64"),
        "ts": ts[keep],
        "country": raw.loc[keep, "Country"].astype("string").str.strip(),
    })
    kept = kept.sort_values(["ts", "event_id"], kind="stable").reset_index(drop=True)
    kept["day"] = kept["ts"].dt.date

    first = kept.drop_duplicates("product_id").reset_index(drop=True)  # time order: first sale
    median_price = kept.groupby("product_id")["price"].median()
    products = pd.DataFrame({
        "product_id": first["product_id"],
        "title": first["product_id"].map(title),
        "price": first["product_id"].map(median_price),
        "updated_at": first["ts"],
        "day": first["day"],
    })
    products["description"] = products["title"]
    # categorise each distinct title once (titles are shared by a few codes)
    categories = {t: category_for(t) for t in products["title"].unique()}
    products["category"] = products["title"].map(categories)
    products["brand"] = None
    products["image_url"] = None

    first_user = kept.drop_duplicates("user_id").reset_index(drop=True)
    country = _most_frequent(kept["user_id"], kept["country"])
    users = pd.DataFrame({
        "user_id": first_user["user_id"],
        "country": first_user["user_id"].map(country),
        "signup_date": first_user["day"],
        "day": first_user["day"],
    })

    events = kept.drop(columns=["country", "day"]).assign(event_type="purchase", query=None)
    ev_days = kept["day"].to_numpy()
    ev_slices = _day_slices(ev_days)
    # first-seen frames are already in time order, so their day slices are contiguous too
    pr_slices = _day_slices(products["day"].to_numpy())
    us_slices = _day_slices(users["day"].to_numpy())
    products = products.drop(columns="day")
    users = users.drop(columns="day")
    empty = slice(0, 0)
    for day in tqdm(ev_slices, desc="online retail", unit="day", disable=not progress):
        contract.write_partition(root, "events", day, events.iloc[ev_slices[day]])
        contract.write_partition(root, "products", day, products.iloc[pr_slices.get(day, empty)])
        contract.write_partition(root, "users", day, users.iloc[us_slices.get(day, empty)])

    return ImportReport(
        rows_in=rows_in,
        rows_kept=int(keep.sum()),
        dropped=dropped,
        days=len(ev_slices),
        users=len(users),
        products=len(products),
        events=len(events),
    )
