"""Great Expectations suites for the landing zone, and the check of one day's partition.

The suites are code (``build_suite``), reviewed like code. ``validate_day`` runs them on one
data interval's partition of each table (one ephemeral GX context per call), writes the full
GX result per table as JSON under ``<home>/validation/date=YYYY-MM-DD/``, and returns a
``ValidationReport``. ``check_partition`` (the DAG's step) adds the consequences: a failing
partition is moved to quarantine (``features.quarantine``) with its results and a Data Docs
report, and ``PartitionInvalid`` names every failed expectation.

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

Files are read defensively: an unreadable file (zero bytes, truncated, not parquet, strings
that are not UTF-8) becomes a ``shoprec_file_readable`` failure naming the file and the
reader's error, never a stack trace.
"""

from __future__ import annotations

import datetime as dt
import functools
import io
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from features.contract import (
    EVENT_TYPES,
    OPTIONAL_COLUMNS,
    SCHEMAS,
    TABLES,
    TIME_COLUMN,
    ContractError,
    Interval,
    catalog_as_of,
    list_days,
    parse_day,
    partition_dir,
    read_partition,
    read_upto,
)
from core.settings import Settings

if TYPE_CHECKING:
    from features.quarantine import QuarantineRecord

log = logging.getLogger(__name__)

MAX_PRICE = 100_000.0
MAX_QUANTITY = 10_000
MAX_TITLE_CHARS = 500
# Rows that fail an expectation are shown up to this many times in the report.
EXAMPLES_PER_FAILURE = 5
# Name of the Data Docs site added to the ephemeral context ("local_site" is taken there).
DATA_DOCS_SITE = "shoprec_quarantine"

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


class PartitionInvalid(RuntimeError):
    """A partition failed validation; nothing downstream may use it."""

    def __init__(self, report: ValidationReport | None,
                 quarantine: QuarantineRecord | None = None, message: str | None = None):
        self.report = report
        self.quarantine = quarantine
        if message is None:
            message = report.summary() if report is not None else "partition is invalid"
            if quarantine is not None:
                message += "\n" + quarantine.describe()
        super().__init__(message)


class PartitionQuarantined(PartitionInvalid):
    """The day is in quarantine: it must be fixed and released before it is processed."""

    def __init__(self, record: QuarantineRecord):
        day = record.day.isoformat()
        where = ", ".join(str(f) for f in record.folders) or str(record.folder)
        super().__init__(None, record, (
            f"partition {day} is quarantined since {record.since} ({record.first_reason}); "
            f"fix it in {where} and run `shoprec data release {day} --reason ...`; "
            f"report: {record.report_html}"))


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


@dataclass
class TableResult:
    table: str
    rows: int
    success: bool
    failures: list[dict[str, Any]] = field(default_factory=list)
    evaluated: int = 0
    report_path: str = ""
    warnings: list[dict[str, Any]] = field(default_factory=list)
    observations: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


@dataclass
class _GxRun:
    """What Data Docs need to re-run the suites through a Checkpoint (kept in memory only)."""

    context: Any
    source: Any
    batch_definitions: dict[str, Any]
    suites: dict[str, Any]
    frames: dict[str, pd.DataFrame]


@dataclass
class ValidationReport:
    day: dt.date
    tables: dict[str, TableResult]
    policy: ValidationPolicy = field(default_factory=ValidationPolicy)
    gx: _GxRun | None = field(default=None, repr=False, compare=False)

    @property
    def success(self) -> bool:
        return all(t.success for t in self.tables.values())

    @property
    def failures(self) -> list[dict[str, Any]]:
        """Every failure, each with its ``table``."""
        return [{"table": t.table, **f} for t in self.tables.values() for f in t.failures]

    @property
    def only_missing_partition(self) -> bool:
        """True when the only problem is that the events have not arrived (nothing is bad)."""
        return bool(self.failures) and all(
            f["expectation"] == "shoprec_partition_exists" for f in self.failures)

    def summary(self) -> str:
        """One line per failed expectation, naming table, expectation, column and count."""
        warnings = [f"  ! {t.table}: {_describe(w)} (warning)"
                    for t in self.tables.values() for w in t.warnings]
        if self.success:
            rows = ", ".join(f"{t.table}={t.rows}" for t in self.tables.values())
            return "\n".join([f"partition {self.day} is valid ({rows} rows)", *warnings])
        lines = [f"partition {self.day} failed validation:"]
        for t in self.tables.values():
            for f in t.failures:
                lines.append(f"  - {t.table}: {_describe(f)}")
            if not t.success:
                lines.append(f"    report: {t.report_path}")
        return "\n".join(lines + warnings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "day": self.day.isoformat(),
            "success": self.success,
            "policy": {k: list(v) if isinstance(v, tuple) else v
                       for k, v in self.policy.__dict__.items()},
            "tables": {
                name: {"rows": t.rows, "success": t.success, "failures": t.failures,
                       "warnings": t.warnings, "observations": t.observations,
                       "evaluated": t.evaluated, "report": t.report_path, "files": t.files}
                for name, t in self.tables.items()
            },
        }

    def build_data_docs(self, target: Path) -> Path:
        """Render GX Data Docs of this day's failing tables into ``target``.

        A filesystem site is added to the day's GX context, and each failing table runs once
        more, through a Checkpoint whose ``UpdateDataDocsAction`` writes its pages there.
        Only failing days pay for this; tables that passed are left out of the site, unless
        no GX-validated table failed (an unreadable file), when they show what did arrive.

        Args:
            target: folder of the site; its ``index.html`` is the entry page.

        Returns:
            The site's ``index.html``.

        Raises:
            RuntimeError: no table was validated by GX (e.g. every file unreadable).
        """
        import great_expectations as gx
        from great_expectations.checkpoint import UpdateDataDocsAction

        if self.gx is None or not self.gx.frames:
            raise RuntimeError("no table of this day could be validated by GX")
        run = self.gx
        failing = [t for t in run.frames if self.tables[t].failures] or list(run.frames)
        target.mkdir(parents=True, exist_ok=True)
        if DATA_DOCS_SITE not in run.context.list_data_docs_sites():
            run.context.add_data_docs_site(site_name=DATA_DOCS_SITE, site_config={
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                                  "base_directory": str(target)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                # The validation pages list every expectation with its result already;
                # suite and profiling pages would only add rendering time.
                "site_section_builders": {"expectations": "0", "profiling": "0"},
                "show_how_to_buttons": False,
            })
        for table in failing:
            vd = run.context.validation_definitions.add(gx.ValidationDefinition(
                name=f"landing_{table}", data=run.batch_definitions[table],
                suite=run.suites[table]))
            checkpoint = run.context.checkpoints.add(gx.Checkpoint(
                name=f"quarantine_{table}", validation_definitions=[vd],
                actions=[UpdateDataDocsAction(name="data_docs", site_names=[DATA_DOCS_SITE])],
                result_format="BASIC"))
            checkpoint.run(batch_parameters={"dataframe": run.frames[table]})
        index = target / "index.html"
        if not index.exists():
            raise RuntimeError(f"GX wrote no {index}")
        return index


def _describe(f: dict[str, Any]) -> str:
    col = f" column={f['column']}" if f.get("column") else ""
    check = f" [{f['check']}]" if f.get("check") else ""
    cnt = f" unexpected={f['unexpected_count']}" if f.get("unexpected_count") else ""
    obs = f" observed={f['observed_value']}" if f.get("observed_value") is not None else ""
    err = f" error={f['error']}" if f.get("error") else ""
    ex = f" e.g. {f['examples']}" if f.get("examples") else ""
    return f"{f['expectation']}{col}{check}{cnt}{obs}{err}{ex}"


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


# --- reading ----------------------------------------------------------------------------------


@dataclass
class RawPartition:
    """One table's partition as it arrived: the rows of the readable files and the problems
    of the others."""

    exists: bool
    frame: pd.DataFrame | None
    files: list[str] = field(default_factory=list)
    problems: list[dict[str, Any]] = field(default_factory=list)


def read_raw_partition(root: str, table: str, day: dt.date) -> RawPartition:
    """Read a partition as it arrived (no casting), file by file, never raising on content.

    Args:
        root: landing-zone root.
        table: products, users or events.
        day: the partition's day.

    Returns:
        The partition; ``frame`` is None when the folder is absent or a file is unreadable
        (a partition is used whole or not at all), and each unreadable file is one
        ``shoprec_file_readable`` problem naming it and the reader's error.
    """
    fs, path = fsspec.core.url_to_fs(partition_dir(root, table, day))
    if not fs.exists(path):
        return RawPartition(False, None)
    files = sorted(p for p in fs.ls(path, detail=False) if str(p).endswith(".parquet"))
    frames, problems = [], []
    for f in files:
        name = str(f).rsplit("/", 1)[-1]
        try:
            with fs.open(f, "rb") as fh:
                data = fh.read()
            if not data:
                raise ValueError("zero-byte file")
            arrow = pq.read_table(io.BytesIO(data))
            # Arrow reads invalid UTF-8 into string columns without complaint; a full
            # validation is what notices it.
            arrow.validate(full=True)
            frames.append(arrow.to_pandas())
        except Exception as exc:  # noqa: BLE001 -- whatever the reader raises is a property of the file
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            problems.append({"expectation": "shoprec_file_readable", "column": None,
                             "check": "file_readable", "unexpected_count": None,
                             "file": name, "error": f"{type(exc).__name__}: {first_line}",
                             "examples": [name]})
    files = [str(f) for f in files]
    if problems:
        return RawPartition(True, None, files, problems)
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return RawPartition(True, frame, files, [])


def _normalise_for_gx(df: pd.DataFrame) -> pd.DataFrame:
    """Time-zone-aware timestamps to UTC microseconds, so one dtype check fits every writer
    (ns or us, any zone); naive timestamps stay naive and fail the type check."""
    out = df.copy()
    for col in out.columns:
        if isinstance(out[col].dtype, pd.DatetimeTZDtype):
            out[col] = out[col].dt.tz_convert("UTC").dt.as_unit("us")
    return out


def _safe(read: Any, *args: Any) -> pd.DataFrame | None:
    """Run a contract reader; a bad earlier partition must not break today's check."""
    try:
        return read(*args)
    except (ContractError, pa.ArrowException, OSError, ValueError) as exc:
        log.warning("could not read %s%s for validation context: %s", read.__name__, args, exc)
        return None


def _day_context(root: str, day: dt.date, policy: ValidationPolicy,
                 products_today: pd.DataFrame | None) -> tuple[DayContext, pd.DataFrame,
                                                               dict[dt.date, pd.DataFrame]]:
    """Catalogue as of the day and the trailing events, for reference and drift checks."""
    catalog = _safe(catalog_as_of, root, day)
    if catalog is None:
        # Today's products are broken (they fail their own suite): judge the events against
        # yesterday's catalogue plus whatever ids today's file names.
        catalog = _safe(catalog_as_of, root, day - dt.timedelta(days=1))
        catalog = catalog if catalog is not None else SCHEMAS["products"].empty_table().to_pandas()
        if products_today is not None and "product_id" in products_today:
            extra = products_today[["product_id"]].dropna().astype(str)
            catalog = pd.concat([catalog, extra], ignore_index=True).drop_duplicates(
                "product_id", keep="first")
    history: dict[dt.date, pd.DataFrame] = {}
    window_start = day - dt.timedelta(days=policy.history_days)
    for d in list_days(root, "events"):
        if window_start <= d < day:
            frame = _safe(read_partition, root, "events", d)
            if frame is not None and len(frame):
                history[d] = frame
    ctx = DayContext(frozenset(catalog["product_id"].dropna().astype(str)),
                     tuple(len(f) for f in history.values()))
    return ctx, catalog, history


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
    current, baseline = current.dropna(), baseline.dropna()
    if current.empty or baseline.empty:
        return 0.0
    cats = sorted(set(current) | set(baseline))
    p = current.value_counts().reindex(cats, fill_value=0).to_numpy() + smoothing
    q = baseline.value_counts().reindex(cats, fill_value=0).to_numpy() + smoothing
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum((p - q) * np.log(p / q)))


def _event_observations(df: pd.DataFrame, root: str, day: dt.date, interval: Interval,
                        policy: ValidationPolicy, catalog: pd.DataFrame,
                        history: dict[dt.date, pd.DataFrame]) -> tuple[dict, list[dict]]:
    """Counts the report shows for events (late rows, new users, drift) and drift findings."""
    obs: dict[str, Any] = {}
    findings: list[dict[str, Any]] = []
    if "ts" in df and isinstance(df["ts"].dtype, pd.DatetimeTZDtype):
        start = pd.Timestamp(interval.start)
        earliest = start - pd.Timedelta(hours=policy.allowed_lateness_hours)
        obs["late_rows_within_lateness"] = int(((df["ts"] >= earliest) & (df["ts"] < start)).sum())
    if "user_id" in df:
        users = _safe(read_upto, root, "users", day)
        if users is None:  # today's users file is broken (it fails its own suite)
            users = _safe(read_upto, root, "users", day - dt.timedelta(days=1))
        known = set(users["user_id"]) if users is not None else set()
        seen = set(df["user_id"].dropna().astype(str))
        obs["users_first_seen_in_events"] = len(seen - known)
    counts = [len(f) for f in history.values()]
    obs["history_days"] = len(counts)
    if len(counts) < policy.min_history_days:
        obs["drift"] = f"skipped: {len(counts)} of {policy.min_history_days} history days"
        return obs, findings
    obs["volume"] = {"rows": len(df), "trailing_mean": round(sum(counts) / len(counts), 1),
                     "band": list(policy.volume_band)}
    if {"product_id", "event_type"} <= set(df.columns) and len(catalog):
        category = catalog.set_index("product_id")["category"]

        def mix(frame: pd.DataFrame) -> pd.Series:
            seen = frame[frame["event_type"].isin(["view", "purchase"])]
            return seen["product_id"].map(category)

        today = mix(df)
        if today.notna().sum() < policy.min_psi_events:
            obs["category_psi"] = (f"skipped: {today.notna().sum()} viewed or bought "
                                   f"products, fewer than {policy.min_psi_events}")
            return obs, findings
        psi = category_psi(today, mix(pd.concat(history.values(), ignore_index=True)))
        obs["category_psi"] = round(psi, 4)
        if psi > policy.psi_threshold:
            findings.append({"expectation": "shoprec_category_mix_psi", "column": "category",
                             "check": "category_mix_psi", "unexpected_count": None,
                             "observed_value": round(psi, 4),
                             "examples": [f"PSI {psi:.3f} > {policy.psi_threshold} vs the "
                                          f"previous {len(counts)} days"]})
    return obs, findings


def redact(value: Any) -> str:
    """``value`` as text with every e-mail address, phone number and street address masked.

    Args:
        value: an example value from a failed check.

    Returns:
        e.g. "contact me at <email>" for "contact me at jo@example.com".
    """
    text = str(value)
    for check, pattern in PII_VALUE_CHECKS.items():
        text = re.sub(pattern, f"<{check.split('_')[1]}>", text)
    return text


def _redact_gx_result(gx_json: dict[str, Any]) -> dict[str, Any]:
    """Mask the unexpected values the identifier checks list in a GX result (in place)."""
    for r in gx_json.get("results", []):
        if (r.get("expectation_config", {}).get("meta") or {}).get("shoprec_check") \
                not in PII_VALUE_CHECKS:
            continue
        res = r.get("result") or {}
        for key in ("partial_unexpected_list", "unexpected_list"):
            if res.get(key):
                res[key] = [redact(v) for v in res[key]]
        for item in res.get("partial_unexpected_counts") or []:
            item["value"] = redact(item.get("value"))
    return gx_json


def _exception(info: Any) -> dict[str, Any]:
    """The first raised exception of a GX result: its ``exception_info`` is either one
    record or, when a metric failed to compute, a dict of records keyed by metric id."""
    if not isinstance(info, dict):
        return {}
    records = [info] if "raised_exception" in info else list(info.values())
    return next((r for r in records if isinstance(r, dict) and r.get("raised_exception")), {})


def _failures_from_result(result: Any) -> list[dict[str, Any]]:
    failures = []
    for r in result.results:
        if r.success:
            continue
        cfg = r.expectation_config
        res = r.result or {}
        exc = _exception(r.exception_info)
        examples = res.get("partial_unexpected_list") or []
        check = (cfg.meta or {}).get("shoprec_check")
        if check in PII_VALUE_CHECKS:  # never copy an identifier into logs and reports
            examples = [redact(v) for v in examples]
        # A column-set mismatch is clearer as what is missing and what is unexpected.
        observed = (res.get("details") or {}).get("mismatched") or res.get("observed_value")
        failures.append({
            "expectation": cfg.type,
            "column": cfg.kwargs.get("column"),
            "check": check,
            "severity": str(getattr(cfg.severity, "value", cfg.severity) or "critical"),
            "unexpected_count": res.get("unexpected_count"),
            "examples": [str(v)[:80] for v in examples[:EXAMPLES_PER_FAILURE]],
            **({"observed_value": observed if isinstance(observed, int | float)
                else str(observed)[:200]} if observed is not None else {}),
            **({"error": str(exc.get("exception_message"))[:300]}
               if exc.get("raised_exception") else {}),
        })
    # A column of the wrong type makes its value checks raise; those errors only repeat
    # the type failure, so the report keeps the type failure alone.
    wrong_type = {f["column"] for f in failures if f["check"] == "column_type"}
    return [f for f in failures if not (f.get("error") and f["column"] in wrong_type)]


def _new_run() -> _GxRun:
    """One ephemeral GX context with the pandas source every table's asset hangs off."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    # GX draws a tqdm bar per validation: noise in task logs.
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return _GxRun(context, context.data_sources.add_pandas("landing"), {}, {}, {})


def _run_suite(run: _GxRun, table: str, interval: Interval, frame: pd.DataFrame,
               policy: ValidationPolicy, day_context: DayContext | None) -> Any:
    """Register the table's asset and suite in ``run`` and validate ``frame`` against it."""
    bd = run.source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("partition")
    suite = run.context.suites.add(
        build_suite(table, interval, list(frame.columns), policy, day_context))
    run.batch_definitions[table], run.suites[table], run.frames[table] = bd, suite, frame
    # A plain batch validation (no Checkpoint): ~30% cheaper, and most days pass. BASIC
    # still lists unexpected values; SUMMARY's extra counts cost ~40% more.
    return bd.get_batch(batch_parameters={"dataframe": frame}).validate(
        suite, result_format="BASIC")


def validate_frame(df: pd.DataFrame, table: str, interval: Interval,
                   policy: ValidationPolicy | None = None,
                   day_context: DayContext | None = None) -> tuple[bool, list[dict], dict]:
    """Validate one table's rows with its GX suite (in a context of its own).

    Args:
        df: the rows as they arrived.
        table: products, users or events.
        interval: the partition's data interval.
        policy: tolerances (default ``ValidationPolicy()``).
        day_context: catalogue and history (default: empty, so every product is unknown).

    Returns:
        (success, failures, full GX result as a JSON-able dict); warnings count as passing.
    """
    result = _run_suite(_new_run(), table, interval, _normalise_for_gx(df),
                        policy or ValidationPolicy(), day_context)
    failures = [f for f in _failures_from_result(result) if f["severity"] != "warning"]
    return not failures, failures, _redact_gx_result(result.to_json_dict())


def validate_day(root: str, day: dt.date, report_dir: Path,
                 policy: ValidationPolicy | None = None) -> ValidationReport:
    """Validate the day's partition of every table and write one JSON result per table.

    A table with no partition that day is valid (a quiet day adds no products), except
    events, which must arrive for every day the pipeline processes.

    Args:
        root: landing-zone root.
        day: the data interval's day.
        report_dir: where ``date=YYYY-MM-DD/<table>.json`` reports are written.
        policy: tolerances (default ``ValidationPolicy()``).

    Returns:
        The report; it does not raise (see ``require_valid`` and ``check_partition``).
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    policy = policy or ValidationPolicy()
    interval = Interval.for_day(day)
    out = report_dir / f"date={day.isoformat()}"
    out.mkdir(parents=True, exist_ok=True)
    raw = {table: read_raw_partition(root, table, day) for table in TABLES}
    day_ctx, catalog, history = _day_context(root, day, policy, raw["products"].frame)
    gx_run = _new_run()
    tables: dict[str, TableResult] = {}
    for table in TABLES:
        path = out / f"{table}.json"
        part = raw[table]
        rows = 0 if part.frame is None else len(part.frame)
        result = TableResult(table, rows, True, report_path=str(path), files=part.files)
        gx_json: dict[str, Any] | None = None
        if not part.exists:
            if table == "events":
                result.failures.append({
                    "expectation": "shoprec_partition_exists", "column": None,
                    "check": "partition_exists", "unexpected_count": None,
                    "examples": [partition_dir(root, table, day)]})
        elif part.frame is None:
            result.failures.extend(part.problems)
        else:
            frame = _normalise_for_gx(part.frame)
            gx_result = _run_suite(gx_run, table, interval, frame, policy,
                                   day_ctx if table == "events" else None)
            gx_json = _redact_gx_result(gx_result.to_json_dict())
            found = _failures_from_result(gx_result)
            result.failures = [f for f in found if f["severity"] != "warning"]
            result.warnings = [f for f in found if f["severity"] == "warning"]
            result.evaluated = gx_json.get("statistics", {}).get("evaluated_expectations", 0)
            if table == "events":
                result.observations, drift = _event_observations(
                    frame, root, day, interval, policy, catalog, history)
                (result.failures if policy.strict_drift else result.warnings).extend(drift)
        result.success = not result.failures
        path.write_text(json.dumps(
            {"success": result.success, "failures": result.failures,
             "warnings": result.warnings, "observations": result.observations,
             "files": result.files, **({"gx_result": gx_json} if gx_json else {})},
            indent=2, default=str))
        tables[table] = result
    report = ValidationReport(day, tables, policy, gx_run)
    log.info(report.summary())
    return report


def require_valid(report: ValidationReport) -> ValidationReport:
    """Raise ``PartitionInvalid`` (naming each failed expectation) unless the report passed."""
    if not report.success:
        raise PartitionInvalid(report)
    return report


def check_partition(settings: Settings, day: str | dt.date, *,
                    quarantine: bool = True) -> dict[str, Any]:
    """The pipeline's validation step for one interval.

    A quarantined day is refused before anything is read. A failing partition is moved to
    quarantine (every table's files of that day, with the GX results and a Data Docs report)
    unless the only problem is that the events have not arrived yet: missing data is not bad
    data, and the day processes normally once it lands.

    Args:
        settings: where the landing zone, the reports and the quarantine are.
        day: the interval's day.
        quarantine: move a failing partition to quarantine (the DAG always does).

    Returns:
        A small JSON-able summary (row counts, report folder, warnings).

    Raises:
        PartitionQuarantined: the day is in quarantine and was not released.
        PartitionInvalid: the partition failed; the message names each failed expectation
            and the report's path.
    """
    from features.quarantine import quarantine_day, quarantine_status

    day = parse_day(day)
    record = quarantine_status(settings.home, day)
    if record is not None and record.active:
        raise PartitionQuarantined(record)
    report = validate_day(settings.landing_root, day, settings.home / "validation",
                          ValidationPolicy.from_env(settings))
    if not report.success:
        record = None
        if quarantine and not report.only_missing_partition:
            record = quarantine_day(settings.home, settings.landing_root, day, report)
        raise PartitionInvalid(report, record)
    return {"day": report.day.isoformat(),
            "summary": report.summary(),
            "rows": {name: t.rows for name, t in report.tables.items()},
            "warnings": [f"{t.table}: {_describe(w)}" for t in report.tables.values()
                         for w in t.warnings],
            "reports": str(settings.home / "validation" / f"date={report.day.isoformat()}")}
