"""Great Expectations suites for the landing zone, and the check of one day's partition.

The suites are code (``build_suite``), reviewed like code. ``validate_day`` runs them on one
data interval's partition of each table, writes the full GX result per table as JSON under
``<home>/validation/date=YYYY-MM-DD/``, and raises ``PartitionInvalid`` naming every failed
expectation when the partition must not go further.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd
import pyarrow.parquet as pq

from features.contract import (
    EVENT_TYPES,
    OPTIONAL_COLUMNS,
    SCHEMAS,
    TABLES,
    ContractError,
    Interval,
    conform,
    parse_day,
    partition_dir,
)
from shoprec.settings import Settings

log = logging.getLogger(__name__)

MAX_PRICE = 100_000.0
MAX_QUANTITY = 10_000
MAX_TITLE_CHARS = 500
# Rows that fail an expectation are shown up to this many times in the report.
EXAMPLES_PER_FAILURE = 5


class PartitionInvalid(RuntimeError):
    """A partition failed validation; nothing downstream may use it."""

    def __init__(self, report: ValidationReport):
        self.report = report
        super().__init__(report.summary())


@dataclass
class TableResult:
    table: str
    rows: int
    success: bool
    failures: list[dict[str, Any]] = field(default_factory=list)
    evaluated: int = 0
    report_path: str = ""


@dataclass
class ValidationReport:
    day: dt.date
    tables: dict[str, TableResult]

    @property
    def success(self) -> bool:
        return all(t.success for t in self.tables.values())

    def summary(self) -> str:
        """One line per failed expectation, naming table, expectation, column and count."""
        if self.success:
            rows = ", ".join(f"{t.table}={t.rows}" for t in self.tables.values())
            return f"partition {self.day} is valid ({rows} rows)"
        lines = [f"partition {self.day} failed validation:"]
        for t in self.tables.values():
            for f in t.failures:
                col = f" column={f['column']}" if f.get("column") else ""
                cnt = f" unexpected={f['unexpected_count']}" if f.get("unexpected_count") else ""
                ex = f" e.g. {f['examples']}" if f.get("examples") else ""
                lines.append(f"  - {t.table}: {f['expectation']}{col}{cnt}{ex}")
            if not t.success:
                lines.append(f"    report: {t.report_path}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "day": self.day.isoformat(),
            "success": self.success,
            "tables": {
                name: {"rows": t.rows, "success": t.success, "failures": t.failures,
                       "evaluated": t.evaluated, "report": t.report_path}
                for name, t in self.tables.items()
            },
        }


def build_suite(table: str, interval: Interval) -> Any:
    """The expectation suite of one table for one data interval.

    Args:
        table: products, users or events.
        interval: the partition's day; timestamps must fall inside it.

    Returns:
        A ``great_expectations.ExpectationSuite`` (not yet added to a context).
    """
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    suite = gx.ExpectationSuite(name=f"landing_{table}")
    required = [c for c in SCHEMAS[table].names if c not in OPTIONAL_COLUMNS[table]]
    for col in required:
        suite.add_expectation(gxe.ExpectColumnToExist(column=col))
    start = pd.Timestamp(interval.start)
    end = pd.Timestamp(interval.end)
    if table == "products":
        suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column="product_id"))
        suite.add_expectation(gxe.ExpectColumnValuesToBeUnique(column="product_id"))
        suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column="title"))
        suite.add_expectation(gxe.ExpectColumnValueLengthsToBeBetween(
            column="title", min_value=1, max_value=MAX_TITLE_CHARS))
        suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column="category"))
        suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(
            column="price", min_value=0, max_value=MAX_PRICE, strict_min=True))
        suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(
            column="updated_at", min_value=start, max_value=end, strict_max=True))
    elif table == "users":
        suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column="user_id"))
        suite.add_expectation(gxe.ExpectColumnValuesToBeUnique(column="user_id"))
    elif table == "events":
        for col in ("event_id", "user_id", "event_type", "ts"):
            suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=col))
        suite.add_expectation(gxe.ExpectColumnValuesToBeUnique(column="event_id"))
        suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(
            column="event_type", value_set=list(EVENT_TYPES)))
        suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(
            column="quantity", min_value=1, max_value=MAX_QUANTITY))
        suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(
            column="price", min_value=0, max_value=MAX_PRICE, strict_min=True,
            mostly=1.0))
        suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(
            column="ts", min_value=start, max_value=end, strict_max=True))
        # Every non-search event names a product.
        suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(
            column="product_id", row_condition=Column("event_type") != "search"))
    else:
        raise ValueError(f"unknown table {table!r}")
    return suite


def read_raw_partition(root: str, table: str, day: dt.date) -> pd.DataFrame | None:
    """Read a partition as it arrived (no casting), or None if the day has no folder."""
    fs, path = fsspec.core.url_to_fs(partition_dir(root, table, day))
    if not fs.exists(path):
        return None
    files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet"))
    frames = []
    for f in files:
        with fs.open(f, "rb") as fh:
            frames.append(pq.read_table(fh).to_pandas())
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _failures_from_result(result: Any) -> list[dict[str, Any]]:
    failures = []
    for r in result.results:
        if r.success:
            continue
        cfg = r.expectation_config
        res = r.result or {}
        exc = (r.exception_info or {}) if isinstance(r.exception_info, dict) else {}
        examples = res.get("partial_unexpected_list") or []
        failures.append({
            "expectation": cfg.type,
            "column": cfg.kwargs.get("column"),
            "unexpected_count": res.get("unexpected_count"),
            "examples": [str(v)[:80] for v in examples[:EXAMPLES_PER_FAILURE]],
            **({"error": str(exc.get("exception_message"))[:300]}
               if exc.get("raised_exception") else {}),
        })
    return failures


def validate_frame(df: pd.DataFrame, table: str, interval: Interval) -> tuple[bool, list[dict], dict]:
    """Validate one table's rows: the contract's types first, then the GX suite.

    Returns:
        (success, failures, full GX result as a JSON-able dict).
    """
    import great_expectations as gx

    failures: list[dict[str, Any]] = []
    try:
        conform(df, table)
    except ContractError as exc:
        failures.extend({"expectation": "shoprec_contract_schema", "column": None,
                         "unexpected_count": None, "examples": [p]} for p in exc.problems)

    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    # GX draws a tqdm bar per validation: noise in task logs.
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = context.data_sources.add_pandas("landing").add_dataframe_asset(table)
    batch_def = asset.add_batch_definition_whole_dataframe("partition")
    suite = context.suites.add(build_suite(table, interval))
    result = batch_def.get_batch(batch_parameters={"dataframe": df}).validate(suite)
    failures.extend(_failures_from_result(result))
    return not failures, failures, result.to_json_dict()


def validate_day(root: str, day: dt.date, report_dir: Path) -> ValidationReport:
    """Validate the day's partition of every table and write one JSON result per table.

    A table with no partition that day is valid (a quiet day adds no products), except
    events, which must arrive for every day the pipeline processes.

    Args:
        root: landing-zone root.
        day: the data interval's day.
        report_dir: where ``date=YYYY-MM-DD/<table>.json`` reports are written.

    Returns:
        The report; it does not raise (see ``require_valid``).
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    interval = Interval.for_day(day)
    out = report_dir / f"date={day.isoformat()}"
    out.mkdir(parents=True, exist_ok=True)
    tables: dict[str, TableResult] = {}
    for table in TABLES:
        path = out / f"{table}.json"
        df = read_raw_partition(root, table, day)
        if df is None:
            ok = table != "events"
            failures = [] if ok else [{"expectation": "shoprec_partition_exists", "column": None,
                                       "unexpected_count": None,
                                       "examples": [partition_dir(root, table, day)]}]
            tables[table] = TableResult(table, 0, ok, failures, 0, str(path))
            path.write_text(json.dumps({"success": ok, "failures": failures}, indent=2))
            continue
        ok, failures, raw = validate_frame(df, table, interval)
        path.write_text(json.dumps({"success": ok, "failures": failures, "gx_result": raw},
                                   indent=2, default=str))
        tables[table] = TableResult(table, len(df), ok, failures,
                                    raw.get("statistics", {}).get("evaluated_expectations", 0),
                                    str(path))
    report = ValidationReport(day, tables)
    log.info(report.summary())
    return report


def require_valid(report: ValidationReport) -> ValidationReport:
    """Raise ``PartitionInvalid`` (naming each failed expectation) unless the report passed."""
    if not report.success:
        raise PartitionInvalid(report)
    return report


def check_partition(settings: Settings, day: str | dt.date) -> dict[str, Any]:
    """The pipeline's validation step for one interval.

    Args:
        settings: where the landing zone and the reports are.
        day: the interval's day.

    Returns:
        A small JSON-able summary (row counts, report folder).

    Raises:
        PartitionInvalid: the partition failed; the message names each failed expectation.
    """
    report = require_valid(validate_day(settings.landing_root, parse_day(day),
                                        settings.home / "validation"))
    return {"day": report.day.isoformat(),
            "rows": {name: t.rows for name, t in report.tables.items()},
            "reports": str(settings.home / "validation" / f"date={report.day.isoformat()}")}
