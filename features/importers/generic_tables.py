"""The generic importer's tables: contract ``events``, ``products`` and ``users`` from read rows.

Each builder takes the rows ``generic_reading`` read, keeps those that meet the contract and
reports the others by reason (``SourceReport``), so an import says what it lost and why.

Event rows are checked in this order; a dropped row counts under the FIRST reason that applies
(``DROP_REASONS``):

1. ``missing_event_id``        the id (or a column its template uses) is empty.
2. ``missing_user_id``         the user id (or a column its template uses) is empty.
3. ``unmapped_event_type``     the type is not a key of the mapping's ``map`` (without a
                               map: not one of ``contract.EVENT_TYPES``).
4. ``missing_product_id``      a non-search event without a product.
5. ``missing_query``           a search event without a query.
6. ``unparsable_timestamp``    ts missing or not in the mapped format; for the sequence rule,
                               no usable sequence number, anchor date or hour.
7. ``non_positive_quantity``   a purchase whose quantity is not a whole number >= 1.
8. ``quantity_out_of_bounds``  a purchase whose quantity is above ``MAX_QUANTITY``.
9. ``non_positive_price``      a purchase whose price is given but not a number > 0.
10. ``price_out_of_bounds``    a purchase whose price is above ``MAX_PRICE``.
11. ``duplicate_event_id``     an id already taken by an earlier kept row (file order).
12. ``product_not_in_catalog`` its product could not be written to the catalogue (no title
                               or price from the products file, the events or a default).

The bounds are the daily validation's own (``features.validation_suites``), as is the
products' ``title_too_long`` (``MAX_TITLE_CHARS``): what the importer keeps, validation
accepts. Other event types keep their row: a bad or out-of-bounds quantity becomes 1, such a
price becomes null (on a view or a cart add they are informational; the contract needs
quantity >= 1).

Rows a mapping removes on purpose (its ``filter`` conditions; events whose product or user
the products or users filter removed, or, with ``require_product_in_catalog``, whose product
the products file lacks; with ``only_with_events``, catalogue rows without kept events) are
*filtered*, not dropped: reported by reason apart (``SourceReport.filtered``) and not counted
as loss.

Products and users come from their own source files when the mapping has one, else they are
derived from the kept events (one row per product or user, on the day of its first event).
Only days with events are written (a shop day without events is not a valid partition): a
product enters the catalogue on the day of its first event or of its earliest ``updated_at``,
whichever is first, and a user on the day of their first event or sign-up, whichever is first;
a date without events moves to the next day that has some (``updated_at`` then 00:00 UTC).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from features.importers.generic_mapping import (
    ID_SALT_ENV,
    ColumnSpec,
    DirectIdentifierError,
    ImportMapping,
    SourceSpec,
    TableMapping,
)
from features.importers.generic_reading import (
    event_types,
    number_values,
    sequence_times,
    text_values,
    time_values,
)
from features.importers.generic_rules import RowFilter
from features.validation_suites import MAX_PRICE, MAX_QUANTITY, MAX_TITLE_CHARS

DROP_REASONS = (
    "missing_event_id",
    "missing_user_id",
    "unmapped_event_type",
    "missing_product_id",
    "missing_query",
    "unparsable_timestamp",
    "non_positive_quantity",
    "quantity_out_of_bounds",
    "non_positive_price",
    "price_out_of_bounds",
    "duplicate_event_id",
    "product_not_in_catalog",
)
PRODUCT_DROP_REASONS = (
    "missing_product_id",
    "missing_title",
    "title_too_long",
    "unparsable_timestamp",
    "price_out_of_bounds",
    "missing_price",
    "no_event_day",
    "duplicate_product_id",
)
DERIVED_PRODUCT_DROP_REASONS = ("title_too_long", "missing_price")
# Reasons of rows filtered out on purpose by a mapping's joins (besides its own conditions).
NOT_IN_PRODUCTS_FILE = "product_not_in_products_file"
WITHOUT_EVENTS = "without_events"
# The drop reason of a row a mapping filtered out: past every real reason, so not counted.
FILTERED = np.iinfo(np.int64).max
USER_DROP_REASONS = ("missing_user_id", "duplicate_user_id", "no_event_day")

DEFAULT_CATEGORY = "unknown"
_EMAIL_VALUE = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_PHONE_VALUE = re.compile(r"\+\d[\d\s().\-/]{5,}\d")


@dataclass(frozen=True)
class SourceReport:
    """Rows one source (or a derivation from events) offered, kept and dropped by reason."""

    label: str
    rows_in: int
    rows_kept: int
    dropped: dict[str, int]  # reason -> rows, every reason of the source kind, in order
    filtered: dict[str, int] = field(default_factory=dict)  # on purpose, by the mapping

    @property
    def rows_filtered(self) -> int:
        """Rows the mapping's filters removed (not a loss)."""
        return sum(self.filtered.values())

    @property
    def rows_dropped(self) -> int:
        """Rows dropped for breaking the contract (a loss)."""
        return self.rows_in - self.rows_kept - self.rows_filtered


@dataclass(frozen=True)
class EventJoins:
    """What the products and users files' filters say about the events' products and users.

    ``products`` and ``users`` map each id whose every row its file's filter removed to the
    reason of its first row (``names``: the filters' reasons, to list them all);
    ``listed_products`` (with ``require_product_in_catalog``) the product ids the products
    file has after its filter.
    """

    products: dict[str, str] = field(default_factory=dict)
    product_names: tuple[str, ...] = ()
    users: dict[str, str] = field(default_factory=dict)
    user_names: tuple[str, ...] = ()
    listed_products: set[str] | None = None

    def apply(self, rows: RowFilter, product_id: pd.Series, user_id: pd.Series) -> RowFilter:
        """Filter out the events of filtered products and users, then of unlisted products."""
        for ids, by_id, names in ((product_id, self.products, self.product_names),
                                  (user_id, self.users, self.user_names)):
            reason = ids.map(by_id)
            for name in names:
                rows = rows.add(name, (reason == name).fillna(False))
        if self.listed_products is not None:
            rows = rows.add(NOT_IN_PRODUCTS_FILE,
                            product_id.notna() & ~product_id.isin(self.listed_products))
        return rows


def pseudonymize(ids: pd.Series, salt: str) -> pd.Series:
    """HMAC-SHA256 of each stripped, lower-cased id, keyed with the salt (hex digest)."""
    key = salt.encode("utf-8")
    uniq = ids.dropna().unique()
    digest = {
        v: hmac.new(key, str(v).strip().casefold().encode("utf-8"), hashlib.sha256).hexdigest()
        for v in uniq
    }
    return ids.map(digest).astype("string")


def _refuse_direct_identifier_values(ids: pd.Series, spec: ColumnSpec) -> None:
    """Refuse user ids whose values are emails or phone numbers, whatever the column's name."""
    for kind, pattern in (("email", _EMAIL_VALUE), ("phone number", _PHONE_VALUE)):
        hits = ids.dropna().str.fullmatch(pattern.pattern)
        if bool(hits.any()):
            row = int(hits.idxmax())
            # the value itself is not repeated: it is the personal data being refused
            raise DirectIdentifierError(
                spec.key, f"values look like {kind}s ({int(hits.sum())} rows, first at data row "
                f"{row}); set hash_user_id: true (salt in ${ID_SALT_ENV} or id_salt) to import "
                "salted SHA-256 hashes instead")


def _most_frequent(keys: pd.Series, values: pd.Series) -> pd.Series:
    """Per key, its most frequent non-null value; ties go to the smallest value."""
    pairs = pd.DataFrame({"k": keys.to_numpy(), "v": values.to_numpy()}).dropna()
    if pairs.empty:
        return pd.Series(dtype="object")
    counts = pairs.groupby(["k", "v"], sort=False).size().reset_index(name="n")
    counts = counts.sort_values(["k", "n", "v"], ascending=[True, False, True], kind="stable")
    return counts.drop_duplicates("k").set_index("k")["v"]


def _first_reason(checks: dict[str, pd.Series], reasons: tuple[str, ...], n: int) -> np.ndarray:
    """Index into ``reasons`` of the first check each row fails, -1 where it passes all."""
    reason = np.full(n, -1, dtype=np.int64)
    for name, failed in checks.items():
        mask = np.asarray(pd.Series(failed).fillna(False), dtype=bool)
        reason[(reason < 0) & mask] = reasons.index(name)
    return reason


def _counts(reason: np.ndarray, reasons: tuple[str, ...]) -> dict[str, int]:
    """Rows dropped per reason, every reason listed in order, zero or not."""
    return {r: int((reason == i).sum()) for i, r in enumerate(reasons)}


def build_events(raw: pd.DataFrame, m: ImportMapping, salt: str | None,
                 filtered: RowFilter | None = None,
                 joins: EventJoins | None = None) -> tuple[pd.DataFrame, np.ndarray, RowFilter]:
    """Events that pass the row checks (``_pos``: source row, ``day``: UTC date).

    Args:
        raw: the events source's rows.
        m: the mapping.
        salt: the user-id salt (None: ids as they are).
        filtered: the rows the events' own ``filter`` removes (None: none).
        joins: what the products and users files' filters remove (None: nothing).

    Returns:
        The events, each source row's drop reason (index into ``DROP_REASONS``, -1 where it
        passes, ``FILTERED`` where the mapping filtered it out) and the filtered rows.
    """
    cols = m.events.columns
    n = len(raw)
    event_id = text_values(raw, cols["event_id"])
    user_id = text_values(raw, cols["user_id"])
    if salt is None:
        _refuse_direct_identifier_values(user_id, cols["user_id"])
    product_id = text_values(raw, cols["product_id"])
    event_type = event_types(raw, cols["event_type"])
    ts_spec = cols["ts"]
    if ts_spec.sequence is not None:
        ts = sequence_times(raw, ts_spec.sequence, user_id, ts_spec.key, m.events.source)
    else:
        ts = time_values(raw[ts_spec.column], ts_spec.format, ts_spec.timezone, ts_spec.key,
                         ts_spec.column)
    source = m.events.source
    if "quantity" in cols:
        quantity, quantity_bad = number_values(raw, cols["quantity"], source)
    else:
        quantity, quantity_bad = pd.Series(1.0, index=range(n)), pd.Series(False, index=range(n))
    if "price" in cols:
        price, price_bad = number_values(raw, cols["price"], source)
    else:
        price, price_bad = pd.Series(np.nan, index=range(n)), pd.Series(False, index=range(n))
    query = (text_values(raw, cols["query"]) if "query" in cols
             else pd.Series(pd.NA, index=range(n), dtype="string"))

    hashed_user_id = pseudonymize(user_id, salt) if salt is not None else user_id
    filtered = filtered if filtered is not None else RowFilter.keep_all(n)
    if joins is not None:
        filtered = joins.apply(filtered, product_id, hashed_user_id)

    purchase = (event_type == "purchase").fillna(False).astype(bool)
    quantity_ok = (quantity >= 1) & (quantity == np.floor(quantity)) & ~quantity_bad
    quantity_in = quantity <= MAX_QUANTITY
    price_ok = ~price_bad & (price.isna() | (price > 0))
    price_in = price.isna() | (price <= MAX_PRICE)
    checks = {
        "missing_event_id": event_id.isna(),
        "missing_user_id": user_id.isna(),
        "unmapped_event_type": event_type.isna(),
        "missing_product_id": product_id.isna() & (event_type != "search"),
        "missing_query": query.isna() & (event_type == "search"),
        "unparsable_timestamp": ts.isna(),
        "non_positive_quantity": purchase & ~quantity_ok,
        "quantity_out_of_bounds": purchase & ~quantity_in,
        "non_positive_price": purchase & ~price_ok,
        "price_out_of_bounds": purchase & ~price_in,
    }
    reason = _first_reason(checks, DROP_REASONS, n)
    reason[filtered.out] = FILTERED
    passing = np.flatnonzero(reason < 0)
    duplicate = event_id.iloc[passing].duplicated(keep="first").to_numpy()
    reason[passing[duplicate]] = DROP_REASONS.index("duplicate_event_id")
    keep = reason < 0

    events = pd.DataFrame({
        "event_id": event_id[keep].astype(object),
        "user_id": hashed_user_id[keep].astype(object),
        "product_id": product_id[keep].astype(object),
        "event_type": event_type[keep].astype(object),
        "query": query[keep].astype(object),
        # other event types keep their row: quantity 1, no price where the source's was bad
        "quantity": quantity.where(quantity_ok & quantity_in, 1.0)[keep].astype("int64"),
        "price": price.where(price_ok & price_in)[keep].astype("float64"),
        "ts": ts[keep],
        "_pos": np.flatnonzero(keep),
    })
    events = events.sort_values(["ts", "event_id"], kind="stable").reset_index(drop=True)
    events["day"] = events["ts"].dt.date
    return events, reason, filtered


def drop_uncatalogued(events: pd.DataFrame, reason: np.ndarray, catalogue: set[str],
                      filtered: RowFilter) -> tuple[pd.DataFrame, SourceReport]:
    """Drop the events whose product is not in ``catalogue`` as ``product_not_in_catalog``.

    Args:
        events: what ``build_events`` kept.
        reason: each source row's drop reason from ``build_events``; updated in place.
        catalogue: the product ids that will be written.
        filtered: the rows the mapping filtered out (from ``build_events``).

    Returns:
        The events that stay, and the events source's report.
    """
    orphan = (events["product_id"].notna() & ~events["product_id"].isin(catalogue)).to_numpy()
    reason[events["_pos"].to_numpy()[orphan]] = DROP_REASONS.index("product_not_in_catalog")
    kept = events[~orphan].reset_index(drop=True)
    return kept, SourceReport("events", len(reason), len(kept), _counts(reason, DROP_REASONS),
                              filtered.counts())

def _snap(dates: pd.Series, event_days: np.ndarray) -> pd.Series:
    """Each date moved to the first day of events on or after it (None past the last one).

    Every written day has events (a shop day without any is not a valid partition), so
    catalogue and customer rows dated on other days land with the next day of events.
    """
    out = pd.Series([None] * len(dates), index=dates.index, dtype=object)
    if not len(event_days):
        return out
    days = pd.to_datetime(pd.Series(dates, dtype=object), errors="coerce").to_numpy("datetime64[D]")
    known = ~np.isnat(days)
    idx = np.searchsorted(event_days, days[known], side="left")
    snapped = np.full(len(idx), None, dtype=object)
    inside = idx < len(event_days)
    snapped[inside] = [d.item() for d in event_days[idx[inside]]]
    out[known] = snapped
    return out


def _day_start(day: dt.date) -> pd.Timestamp:
    return pd.Timestamp(day, tz="UTC")


def products_from_events(events: pd.DataFrame, raw: pd.DataFrame, section: TableMapping | None,
                         only: set[str] | None, label: str, price_default: float | None,
                         source: SourceSpec | None = None) -> tuple[pd.DataFrame, SourceReport]:
    """One product per product_id of the events, on the day of its first event.

    ``section`` (a products section without a source) names events-file columns for the
    attributes, each product taking its most frequent value; else the title is the product id.
    The price is the median of the mapped price column (values in (0, MAX_PRICE], read with
    the events ``source``'s number format), else of the event prices, else ``price_default``
    (the mapping's ``products.columns.price.default``, which also prices the products a
    products source lacks); a product without any price, or with a title longer than
    ``MAX_TITLE_CHARS``, is dropped.
    """
    ev = events[events["product_id"].notna()]
    if only is not None:
        ev = ev[ev["product_id"].isin(only)]
    first = ev.drop_duplicates("product_id").reset_index(drop=True)  # time order: first event
    products = pd.DataFrame({
        "product_id": first["product_id"],
        "updated_at": first["ts"],
        "day": first["day"],
    })
    cols = section.columns if section is not None else {}
    rows = raw.iloc[ev["_pos"].to_numpy()].reset_index(drop=True)
    keys = ev["product_id"].reset_index(drop=True)
    for name in ("title", "description", "category", "brand", "image_url"):
        if name in cols:
            values = text_values(rows, cols[name])
            products[name] = products["product_id"].map(_most_frequent(keys, values))
        else:
            products[name] = None
    products["title"] = products["title"].fillna(products["product_id"])
    products["category"] = products["category"].fillna(DEFAULT_CATEGORY)
    price_spec = cols.get("price")
    if price_spec is not None and not _only_default(price_spec):
        values, _ = number_values(rows, price_spec, source, use_default=False)
        values = values.where((values > 0) & (values <= MAX_PRICE))
    else:
        values = ev["price"].reset_index(drop=True)
    median = pd.Series(values.to_numpy(), index=keys.to_numpy()).groupby(level=0).median()
    products["price"] = products["product_id"].map(median)
    if price_default is not None:
        products["price"] = products["price"].fillna(price_default)
    checks = {"title_too_long": products["title"].str.len() > MAX_TITLE_CHARS,
              "missing_price": products["price"].isna()}
    reason = _first_reason(checks, DERIVED_PRODUCT_DROP_REASONS, len(products))
    kept = products[reason < 0].reset_index(drop=True)
    report = SourceReport(label, len(products), len(kept),
                          _counts(reason, DERIVED_PRODUCT_DROP_REASONS))
    return kept, report


def _only_default(spec: ColumnSpec) -> bool:
    """A price that is only ``{default: ...}``, no column, constant or expression."""
    return (spec.column is None and spec.fallback is None and spec.expr is None
            and spec.value is None)


def product_rows(praw: pd.DataFrame, section: TableMapping, events: pd.DataFrame,
                 filtered: RowFilter | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """The products file's rows as contract columns (``updated_at`` as in the file, NaT when
    unmapped) and each row's drop reason so far (-1 where it passes, ``FILTERED`` where the
    section's ``filter`` removed it)."""
    cols = section.columns
    n = len(praw)
    product_id = text_values(praw, cols["product_id"])
    frame = pd.DataFrame({"product_id": product_id.astype(object)})
    for name in ("title", "description", "category", "brand", "image_url"):
        frame[name] = (text_values(praw, cols[name]).astype(object) if name in cols
                       else pd.Series([None] * n, dtype=object))
    frame["category"] = frame["category"].fillna(DEFAULT_CATEGORY)
    if "price" in cols and not _only_default(cols["price"]):
        price, bad = number_values(praw, cols["price"], section.source, use_default=False)
        too_high = (~bad & (price > MAX_PRICE)).to_numpy()
        price = price.where(~bad & (price > 0) & (price <= MAX_PRICE))
    else:
        price = pd.Series(np.nan, index=range(n))
        too_high = np.zeros(n, dtype=bool)
    # missing or bad source price: the median event price, then the mapping's default
    price = price.fillna(product_id.map(events.groupby("product_id")["price"].median()))
    if "price" in cols and cols["price"].default is not None:
        price = price.fillna(cols["price"].default)
    frame["price"] = price.astype("float64")
    if "updated_at" in cols:
        spec = cols["updated_at"]
        updated = time_values(praw[spec.column], spec.format, spec.timezone, spec.key,
                              spec.column)
        unparsable = updated.isna()
    else:
        updated = pd.Series(pd.NaT, index=range(n), dtype="datetime64[ns, UTC]")
        unparsable = pd.Series(False, index=range(n))
    frame["updated_at"] = updated
    frame["_pos"] = np.arange(n)
    checks = {
        "missing_product_id": frame["product_id"].isna(),
        "missing_title": frame["title"].isna(),
        "title_too_long": frame["title"].str.len() > MAX_TITLE_CHARS,
        "unparsable_timestamp": unparsable,
        "price_out_of_bounds": pd.Series(too_high),
        "missing_price": frame["price"].isna(),
    }
    reason = _first_reason(checks, PRODUCT_DROP_REASONS, n)
    if filtered is not None:
        reason[filtered.out] = FILTERED
    return frame, reason


def place_products(frame: pd.DataFrame, reason: np.ndarray, events: pd.DataFrame,
                   event_days: np.ndarray, filtered: RowFilter | None = None,
                   only_with_events: bool = False) -> tuple[pd.DataFrame, SourceReport]:
    """Put the products file's passing rows on days of events.

    A product is in the catalogue from its first event or its earliest ``updated_at``,
    whichever comes first (exports are often snapshots dated after the sales); without either,
    from the import's first day. Rows dated on a day without events land, stamped 00:00 UTC,
    on the next day with events; one row per product and day, the latest one winning. With
    ``only_with_events``, rows whose product has no kept event are filtered out
    (``without_events``), as the section's ``filter`` (``filtered``) did before.
    """
    reason = reason.copy()
    filtered = filtered if filtered is not None else RowFilter.keep_all(len(frame))
    if only_with_events:
        never = (reason != FILTERED) & ~frame["product_id"].isin(set(events["product_id"]))
        filtered = filtered.add(WITHOUT_EVENTS, never.to_numpy())
        reason[filtered.out] = FILTERED
    first_ts = events[events["product_id"].notna()].drop_duplicates("product_id")
    first_ts = frame["product_id"].map(first_ts.set_index("product_id")["ts"])
    fallback = _day_start(event_days[0].item()) if len(event_days) else pd.NaT
    when = frame["updated_at"].fillna(first_ts).fillna(fallback)
    passing = frame[reason < 0].assign(_when=when[reason < 0])
    earliest = passing.sort_values(["_when", "_pos"], kind="stable").drop_duplicates("product_id")
    pulled = earliest["_when"].where(~(first_ts[earliest.index] < earliest["_when"]),
                                     first_ts[earliest.index])
    when[earliest.index] = pulled
    day = _snap(when.dt.date, event_days)
    on_own_day = day == when.dt.date
    frame = frame.assign(
        updated_at=when.where(on_own_day, pd.to_datetime(day.map(_day_start_or_nat), utc=True)),
        day=day,
    )
    reason[(reason < 0) & day.isna().to_numpy()] = PRODUCT_DROP_REASONS.index("no_event_day")
    passing = frame[reason < 0].sort_values(["updated_at", "_pos"], kind="stable")
    superseded = passing["_pos"][passing.duplicated(["product_id", "day"], keep="last")]
    reason[superseded.to_numpy()] = PRODUCT_DROP_REASONS.index("duplicate_product_id")
    kept = frame[reason < 0].drop(columns="_pos").reset_index(drop=True)
    return kept, SourceReport("products", len(frame), len(kept),
                              _counts(reason, PRODUCT_DROP_REASONS), filtered.counts())


def _day_start_or_nat(day: dt.date | None) -> pd.Timestamp:
    return _day_start(day) if day is not None else pd.NaT


def users_from_events(events: pd.DataFrame, raw: pd.DataFrame, section: TableMapping | None,
                      only: set[str] | None, event_days: np.ndarray,
                      label: str) -> tuple[pd.DataFrame, SourceReport]:
    """One user per user_id of the events, first seen on the day of their first event (or
    on the first day of events on or after a mapped earlier sign-up date)."""
    ev = events if only is None else events[events["user_id"].isin(only)]
    first = ev.drop_duplicates("user_id").reset_index(drop=True)
    users = pd.DataFrame({"user_id": first["user_id"]})
    cols = section.columns if section is not None else {}
    rows = raw.iloc[ev["_pos"].to_numpy()].reset_index(drop=True)
    keys = ev["user_id"].reset_index(drop=True)
    if "country" in cols:
        country = _most_frequent(keys, text_values(rows, cols["country"]))
        users["country"] = users["user_id"].map(country)
    else:
        users["country"] = None
    signup = first["day"]
    if "signup_date" in cols:
        spec = cols["signup_date"]
        dates = time_values(rows[spec.column], spec.format, "UTC", spec.key, spec.column)
        earliest = dates.groupby(keys.to_numpy()).min().dt.date
        signup = users["user_id"].map(earliest).where(lambda s: s.notna(), first["day"])
    users["signup_date"] = signup
    users["day"] = _snap(pd.Series([min(a, b) for a, b in zip(signup, first["day"], strict=True)],
                                   dtype=object), event_days)
    return users, SourceReport(label, len(users), len(users), {})


def users_from_source(uraw: pd.DataFrame, section: TableMapping, events: pd.DataFrame,
                      event_days: np.ndarray, salt: str | None,
                      filtered: RowFilter | None = None) -> tuple[pd.DataFrame, SourceReport]:
    """The users file's rows, first seen on the first day of events on or after the earlier
    of their sign-up date and first event (neither: the import's first day); ``filtered``:
    the rows the section's ``filter`` removed."""
    cols = section.columns
    n = len(uraw)
    user_id = text_values(uraw, cols["user_id"])
    if salt is None:
        _refuse_direct_identifier_values(user_id, cols["user_id"])
    else:
        user_id = pseudonymize(user_id, salt)
    frame = pd.DataFrame({"user_id": user_id.astype(object)})
    frame["country"] = (text_values(uraw, cols["country"]).astype(object) if "country" in cols
                        else None)
    if "signup_date" in cols:
        spec = cols["signup_date"]
        # an unreadable sign-up date is an optional attribute lost, not a reason to drop
        signup = time_values(uraw[spec.column], spec.format, "UTC", spec.key, spec.column)
        signup = signup.dt.date.where(signup.notna(), None)
    else:
        signup = pd.Series([None] * n, dtype=object)
    frame["signup_date"] = signup
    first_day = user_id.map(events.drop_duplicates("user_id").set_index("user_id")["day"])
    fallback = event_days[0].item() if len(event_days) else None
    seen = [min((d for d in (a, b) if isinstance(d, dt.date)), default=fallback)
            for a, b in zip(signup, first_day, strict=True)]
    frame["day"] = _snap(pd.Series(seen, dtype=object), event_days)
    checks = {
        "missing_user_id": frame["user_id"].isna(),
        "duplicate_user_id": pd.Series(False, index=range(n)),
        "no_event_day": frame["day"].isna(),
    }
    reason = _first_reason(checks, USER_DROP_REASONS, n)
    filtered = filtered if filtered is not None else RowFilter.keep_all(n)
    reason[filtered.out] = FILTERED
    passing = np.flatnonzero(reason < 0)
    duplicate = frame["user_id"].iloc[passing].duplicated(keep="first").to_numpy()
    reason[passing[duplicate]] = USER_DROP_REASONS.index("duplicate_user_id")
    kept = frame[reason < 0].reset_index(drop=True)
    return kept, SourceReport("users", n, len(kept), _counts(reason, USER_DROP_REASONS),
                              filtered.counts())
