"""Great Expectations suites for the landing zone: what a valid partition is, as code.

``build_suite`` makes one table's suite for one data interval; it is reviewed like code and
run by ``features.validation``. ``ValidationPolicy`` holds the tolerances that depend on the
shop rather than on the contract; ``DayContext`` what a day is compared against.

What the suites check, per table (each expectation carries ``meta.shoprec_check``, the name
reports and tests use):

* schema and types: required columns exist, no unexpected column, each column's dtype;
* keys: non-null, unique ``product_id`` / ``user_id`` / ``event_id``;
* values: prices in (0, ``MAX_PRICE``], quantities in [1, ``MAX_QUANTITY``], ``event_type``
  in the contract's set, titles non-blank and at most ``MAX_TITLE_CHARS``, sign-ups not in
  the future;
* time: every timestamp before the interval's end; none earlier than the interval's start
  minus the allowed lateness (rows inside the lateness window are accepted and counted as
  ``late_rows_within_lateness``); most rows inside the interval (else the partition is for
  another day);
* references: every event's product is in ``contract.catalog_as_of(root, day)``. Users are
  *not* required to have a users row: many shops export users rarely, so an event's user is
  either known (users partitions up to the day) or first seen in this events partition; the
  latter are accepted and counted as ``users_first_seen_in_events``;
* no direct identifiers: no column named like an e-mail, phone, name, address, post code or
  IP column, and no string value that looks like an e-mail address, phone number or street
  address (GX regex expectations, so they show in the GX result and Data Docs);
* drift, as warnings by default (``ValidationPolicy``), once 3 earlier days exist: the
  events row count within 0.2x..5x of the trailing 7-day mean, and the PSI of the category
  mix of viewed and bought products against the previous 7 days at most 0.25 (computed from
  200 such events up; fewer swing by chance). ``SHOPREC_VALIDATION_STRICT_DRIFT=1`` (or
  ``ValidationPolicy(strict_drift=True)``) makes them fail the partition.

The counts and the category-mix PSI need data beyond the partition; ``features.validation``
computes them next to the GX run (with ``category_psi`` from here).
"""

from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from core.settings import Settings
from features.contract import EVENT_TYPES, OPTIONAL_COLUMNS, SCHEMAS, TABLES, TIME_COLUMN, Interval

MAX_PRICE = 100_000.0
MAX_QUANTITY = 10_000
MAX_TITLE_CHARS = 500

# Column names that are direct identifiers. Strong words match anywhere in the name
# ("customer_email", "EmailAddress"); short ones only as a whole word ("name", "ip", "zip",
# "tel"), so that "description" or "shipping" do not trip it.
PII_COLUMN_NAME = (
    r"(?i)(?:e[-_ ]?mail|phone|mobile|address|street|post[-_ ]?code|zip[-_ ]?code"
    r"|first[-_ ]?name|last[-_ ]?name|full[-_ ]?name|surname"
    r"|(?:^|[^a-z])(?:name|ip|zip|tel)(?:[^a-z]|$))"
)
# Values that look like direct identifiers inside free text.
# The look-behind lets a match start only where a word starts: without it, a long run of
# letters with no "@" costs quadratic time (a 100 kB title took 15 s).
EMAIL_VALUE = r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
# 9 to 15 digits with the usual separators, not glued to a word, not an ISO date. Tuned on
# the Online Retail descriptions and the synthetic shop: no false positives there.
PHONE_VALUE = (
    r"(?<![\w.])(?!\d{4}-\d{2}-\d{2})(?=(?:[\s().+/-]{0,3}\d){9,15})"
    r"\+?\(?\d[\d\s().+/-]{7,22}\d(?!\w)"
)
# A house number, one to four words and a street word that ends the address ("221B Baker
# Street", "12 Acacia Avenue, London"), or a German "...strasse 5". Requiring the street
# word to end the phrase keeps product titles such as "12 RED ROSE PEG PLACE SETTINGS" out.
STREET_ADDRESS_VALUE = (
    r"(?i)(?:\b\d{1,5}[a-z]?,?\s+(?:[a-z'.-]+\s+){1,4}"
    r"(?:street|st|road|rd|avenue|ave|lane|ln|drive|dr|boulevard|blvd|way|close|crescent"
    r"|terrace|court|ct|place|pl|square|sq|gardens)\.?(?=\s*(?:[,;]|$|\d))"
    r"|\b[a-zäöüß]+(?:strasse|straße|str\.)\s+\d{1,4}\b)"
)
# The checks that find identifiers in values; reports and logs show their examples with the
# identifier masked (the quarantined files and their Data Docs keep the originals).
PII_VALUE_CHECKS = {"no_email_values": EMAIL_VALUE, "no_phone_values": PHONE_VALUE,
                    "no_street_address_values": STREET_ADDRESS_VALUE}
# Columns that hold identifiers or enumerations: only e-mails are looked for there (a
# numeric customer id must not read as a phone number).
NOT_FREE_TEXT = {"product_id", "user_id", "event_id", "event_type", "image_url"}

# Accepted pandas dtypes per contract type (the contract casts ints to floats, so an int
# price column is fine). Timestamps are normalised to UTC microseconds before the check.
_STRING_TYPES = ["str", "StringDtype"]
_FLOAT_TYPES = ["float64", "float32", "int64", "int32", "int16", "Float64Dtype", "Int64Dtype"]
_INT_TYPES = ["int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "Int64Dtype"]
_TIMESTAMP_TYPE = "datetime64[us, UTC]"


@dataclass(frozen=True)
class ValidationPolicy:
    """Tolerances of the checks that depend on the shop, not on the contract.

    Attributes:
        allowed_lateness_hours: rows stamped up to this long before the interval start
            are accepted (and counted); older ones fail.
        volume_band: accepted events row count as (low, high) multiples of the trailing mean.
        history_days: how many previous days form the trailing window (volume and PSI).
        min_history_days: drift checks need at least this many previous days of events.
        psi_threshold: category-mix PSI above this is drift.
        min_psi_events: the PSI needs this many viewed or bought products today (on fewer,
            the mix of a small shop swings by chance alone).
        strict_drift: drift fails the partition instead of being a warning.
    """

    allowed_lateness_hours: int = 1
    volume_band: tuple[float, float] = (0.2, 5.0)
    history_days: int = 7
    min_history_days: int = 3
    psi_threshold: float = 0.25
    min_psi_events: int = 200
    strict_drift: bool = False

    @classmethod
    def from_env(cls, settings: Settings | None = None) -> ValidationPolicy:
        """The policy from ``Settings`` (lateness) and ``SHOPREC_VALIDATION_*`` variables.

        ``SHOPREC_VALIDATION_STRICT_DRIFT`` (1/true/yes), ``SHOPREC_VALIDATION_VOLUME_BAND``
        ("0.2,5") and ``SHOPREC_VALIDATION_PSI_THRESHOLD`` ("0.25") override the defaults.

        Args:
            settings: where the lateness comes from (default: ``Settings.from_env()``).

        Returns:
            The policy.
        """
        settings = settings or Settings.from_env()
        env = os.environ
        band = cls.volume_band
        if env.get("SHOPREC_VALIDATION_VOLUME_BAND"):
            low, high = (float(v) for v in env["SHOPREC_VALIDATION_VOLUME_BAND"].split(","))
            band = (low, high)
        return cls(
            allowed_lateness_hours=settings.allowed_lateness_hours,
            volume_band=band,
            psi_threshold=float(env.get("SHOPREC_VALIDATION_PSI_THRESHOLD", cls.psi_threshold)),
            strict_drift=env.get("SHOPREC_VALIDATION_STRICT_DRIFT", "").lower()
            in {"1", "true", "yes"},
        )


@functools.cache
def _column_names_expectation() -> type:
    """The custom GX expectation that no column name matches a regex (built once, lazily,
    so that importing this module does not import GX)."""
    from typing import ClassVar

    from great_expectations.expectations.expectation import BatchExpectation

    class ExpectTableColumnNamesToNotMatchRegex(BatchExpectation):
        """Expect that no column name matches ``regex`` (e.g. direct-identifier columns)."""

        regex: str

        metric_dependencies: ClassVar[tuple[str, ...]] = ("table.columns",)
        success_keys: ClassVar[tuple[str, ...]] = ("regex",)
        args_keys: ClassVar[tuple[str, ...]] = ("regex",)

        def _validate(self, metrics: dict, runtime_configuration: dict | None = None,
                      execution_engine: Any = None) -> dict:
            pattern = re.compile(self.configuration.kwargs["regex"])
            matching = [c for c in metrics["table.columns"] if pattern.search(str(c))]
            return {"success": not matching, "result": {"observed_value": matching}}

    return ExpectTableColumnNamesToNotMatchRegex


@dataclass(frozen=True)
class DayContext:
    """What a day's suites compare against: the catalogue and the trailing history."""

    product_ids: frozenset[str] = frozenset()
    history_event_counts: tuple[int, ...] = ()


def build_suite(table: str, interval: Interval, columns: list[str] | None = None,
                policy: ValidationPolicy | None = None,
                context: DayContext | None = None) -> Any:
    """The expectation suite of one table for one data interval.

    Args:
        table: products, users or events.
        interval: the partition's day; timestamps must fall inside it.
        columns: the columns the partition arrived with (value checks are added for those
            present; missing required ones fail ``expect_column_to_exist``). Default: the
            contract's columns.
        policy: lateness and drift tolerances.
        context: catalogue product ids and trailing event counts (events only).

    Returns:
        A ``great_expectations.ExpectationSuite`` (not yet added to a context).
    """
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.expectations.metadata_types import FailureSeverity
    from great_expectations.expectations.row_conditions import Column

    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}")
    policy = policy or ValidationPolicy()
    context = context or DayContext()
    schema = SCHEMAS[table]
    columns = list(schema.names) if columns is None else [str(c) for c in columns]
    present = set(columns)
    expectations: list[Any] = []

    def add(kind: type, check: str, why: str, **kwargs: Any) -> None:
        # meta names the check for reports and tests; notes explain it in Data Docs.
        expectations.append(kind(**kwargs, meta={"shoprec_check": check}, notes=why))

    # --- schema and types ----------------------------------------------------------------
    required = [c for c in schema.names if c not in OPTIONAL_COLUMNS[table]]
    for col in required:
        add(gxe.ExpectColumnToExist, "required_column", "The contract requires this column.",
            column=col)
    add(gxe.ExpectTableColumnsToMatchSet, "column_set",
        "Exactly the contract's columns (optional ones may be absent).",
        column_set=required + sorted(present & OPTIONAL_COLUMNS[table]), exact_match=True)
    add(_column_names_expectation(), "no_pii_column_names",
        "Direct identifiers (e-mail, phone, name, address, post code, IP) must not land.",
        regex=PII_COLUMN_NAME)
    for f in schema:
        if f.name not in present:
            continue
        if pa.types.is_string(f.type):
            add(gxe.ExpectColumnValuesToBeInTypeList, "column_type", "Contract type: string.",
                column=f.name, type_list=_STRING_TYPES)
        elif pa.types.is_floating(f.type):
            add(gxe.ExpectColumnValuesToBeInTypeList, "column_type", "Contract type: number.",
                column=f.name, type_list=_FLOAT_TYPES)
        elif pa.types.is_integer(f.type):
            add(gxe.ExpectColumnValuesToBeInTypeList, "column_type", "Contract type: integer.",
                column=f.name, type_list=_INT_TYPES)
        elif pa.types.is_timestamp(f.type):
            add(gxe.ExpectColumnTypeToBe, "column_type",
                "Contract type: timestamp with a time zone (UTC).",
                column=f.name, type_=_TIMESTAMP_TYPE)
        if not f.nullable:
            add(gxe.ExpectColumnValuesToNotBeNull, "not_null",
                "The contract's keys and required fields are never null.", column=f.name)

    # --- no direct identifiers in values ---------------------------------------------------
    string_columns = [f.name for f in schema if pa.types.is_string(f.type) and f.name in present]
    # Unexpected columns fail the schema check anyway; their values are still searched so
    # that the report says *what* leaked.
    string_columns += [c for c in columns if c not in schema.names]
    for col in string_columns:
        add(gxe.ExpectColumnValuesToNotMatchRegex, "no_email_values",
            "No e-mail addresses in any string column.", column=col, regex=EMAIL_VALUE)
        if col in NOT_FREE_TEXT:
            continue
        add(gxe.ExpectColumnValuesToNotMatchRegex, "no_phone_values",
            "No phone numbers in free text.", column=col, regex=PHONE_VALUE)
        add(gxe.ExpectColumnValuesToNotMatchRegex, "no_street_address_values",
            "No street addresses in free text.", column=col, regex=STREET_ADDRESS_VALUE)

    # --- values ----------------------------------------------------------------------------
    key = {"products": "product_id", "users": "user_id", "events": "event_id"}[table]
    if key in present:
        add(gxe.ExpectColumnValuesToBeUnique, f"{key}_unique", "One row per key in a partition.",
            column=key)
    if "price" in present:
        add(gxe.ExpectColumnValuesToBeBetween, "price_positive", "Prices are above zero.",
            column="price", min_value=0, strict_min=True)
        add(gxe.ExpectColumnValuesToBeBetween, "price_at_most_max",
            f"Prices are at most {MAX_PRICE:,.0f}.", column="price", max_value=MAX_PRICE)
    if table == "products" and "title" in present:
        add(gxe.ExpectColumnValueLengthsToBeBetween, "title_length",
            f"Titles have 1..{MAX_TITLE_CHARS} characters.",
            column="title", min_value=1, max_value=MAX_TITLE_CHARS)
        add(gxe.ExpectColumnValuesToNotMatchRegex, "title_not_blank", "Titles are not blank.",
            column="title", regex=r"^\s*$")
    if table == "users" and "signup_date" in present:
        add(gxe.ExpectColumnValuesToBeBetween, "signup_not_in_future",
            "Nobody signs up after the partition's day.",
            column="signup_date", max_value=interval.day)
    if table == "events":
        add(gxe.ExpectTableRowCountToBeBetween, "events_not_empty",
            "A shop day without a single event is not a valid day.", min_value=1)
        if "event_type" in present:
            add(gxe.ExpectColumnValuesToBeInSet, "event_type_in_set",
                f"Event types are {', '.join(EVENT_TYPES)}.",
                column="event_type", value_set=list(EVENT_TYPES))
        if "quantity" in present:
            add(gxe.ExpectColumnValuesToBeBetween, "quantity_at_least_1",
                "Quantities are at least 1.", column="quantity", min_value=1)
            add(gxe.ExpectColumnValuesToBeBetween, "quantity_at_most_max",
                f"Quantities are at most {MAX_QUANTITY}.", column="quantity",
                max_value=MAX_QUANTITY)
        if {"product_id", "event_type"} <= present:
            add(gxe.ExpectColumnValuesToNotBeNull, "product_id_unless_search",
                "Every non-search event names a product.",
                column="product_id", row_condition=Column("event_type") != "search")
        if "product_id" in present:
            add(gxe.ExpectColumnValuesToBeInSet, "product_in_catalog",
                "Events reference products in the catalogue as of the partition's day.",
                column="product_id", value_set=sorted(context.product_ids))
        if {"query", "event_type"} <= present:
            add(gxe.ExpectColumnValuesToNotBeNull, "search_has_query",
                "Search events carry their query.",
                column="query", row_condition=Column("event_type") == "search")
        counts = context.history_event_counts
        if len(counts) >= policy.min_history_days:
            mean = sum(counts) / len(counts)
            low, high = policy.volume_band
            add(gxe.ExpectTableRowCountToBeBetween, "volume_within_band",
                f"Row count within {low}x..{high}x of the trailing {len(counts)}-day mean "
                f"({mean:.0f}); a warning unless the policy is strict.",
                min_value=int(math.floor(low * mean)), max_value=int(math.ceil(high * mean)),
                severity=FailureSeverity.CRITICAL if policy.strict_drift
                else FailureSeverity.WARNING)

    # --- time ------------------------------------------------------------------------------
    time_col = TIME_COLUMN.get(table)
    if time_col and time_col in present:
        start, end = pd.Timestamp(interval.start), pd.Timestamp(interval.end)
        earliest = start - pd.Timedelta(hours=policy.allowed_lateness_hours)
        add(gxe.ExpectColumnValuesToBeBetween, f"{time_col}_not_after_interval",
            "Nothing is stamped after the interval's end.",
            column=time_col, max_value=end, strict_max=True)
        add(gxe.ExpectColumnValuesToBeBetween, f"{time_col}_within_lateness",
            f"Rows may be up to {policy.allowed_lateness_hours} h late; older ones belong to "
            "an earlier partition.", column=time_col, min_value=earliest)
        add(gxe.ExpectColumnValuesToBeBetween, f"{time_col}_partition_day",
            "Most rows lie inside the partition's own day (else it is for another date).",
            column=time_col, min_value=start, max_value=end, strict_max=True, mostly=0.5)
    # One constructor call: add_expectation compares each new one with all before it.
    return gx.ExpectationSuite(name=f"landing_{table}", expectations=expectations)


def category_psi(current: pd.Series, baseline: pd.Series, smoothing: float = 0.5) -> float:
    """Population stability index of two categorical samples.

    Args:
        current: today's categories, one per event.
        baseline: the reference window's categories.
        smoothing: pseudo-count added to every category on both sides, so that a category
            absent on one side gives a large but finite term instead of an infinite one.

    Returns:
        PSI = sum((p - q) * ln(p / q)); 0 for identical mixes, > 0.25 is a large shift.
    """
    return psi_of_counts(current.dropna().value_counts(), baseline.dropna().value_counts(),
                         smoothing)


def psi_of_counts(current: pd.Series, baseline: pd.Series, smoothing: float = 0.5) -> float:
    """``category_psi`` of two samples given as counts per category (category -> count)."""
    current, baseline = current[current > 0], baseline[baseline > 0]
    if current.empty or baseline.empty:
        return 0.0
    cats = sorted(set(current.index) | set(baseline.index))
    p = current.reindex(cats, fill_value=0).to_numpy(dtype=np.float64) + smoothing
    q = baseline.reindex(cats, fill_value=0).to_numpy(dtype=np.float64) + smoothing
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum((p - q) * np.log(p / q)))
