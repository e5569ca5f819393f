"""The check of one day's partition: validate it, and quarantine it when it fails.

``validate_day`` runs the suites of ``features.validation_suites`` on one data interval's
partition of each table (one ephemeral GX context per call), writes the full GX result per
table as JSON under ``<home>/validation/date=YYYY-MM-DD/``, and returns a ``ValidationReport``
(``features.validation_report``). ``check_partition`` (the DAG's step) adds the consequences:
a failing partition is moved to quarantine (``features.quarantine``) with its results and a
Data Docs report, and ``PartitionInvalid`` names every failed expectation.

Files are read defensively: an unreadable file (zero bytes, truncated, not parquet, strings
that are not UTF-8) becomes a ``shoprec_file_readable`` failure naming the file and the
reader's error, never a stack trace.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from core.settings import Settings
from features.contract import (
    SCHEMAS,
    TABLES,
    ContractError,
    Interval,
    parse_day,
    partition_dir,
)
from features.event_summaries import MIX_EVENT_TYPES, DaySummary, category_mix, day_summaries
from features.quarantine import QuarantineRecord, quarantine_day, quarantine_status
from features.running import running_catalog, running_users
from features.validation_report import (
    GxRun,
    TableResult,
    ValidationReport,
    describe_failure,
    failures_from_result,
    redact_gx_result,
)
from features.validation_suites import DayContext, ValidationPolicy, build_suite, psi_of_counts

log = logging.getLogger(__name__)


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
                 products_today: pd.DataFrame | None, events_today: pd.DataFrame | None,
                 snapshot_root: Path | None = None) -> tuple[DayContext, pd.DataFrame,
                                                             list[DaySummary]]:
    """Catalogue as of the day (a running snapshot under ``snapshot_root`` when given:
    ``features.running``) and the trailing days' event summaries (``features.event_summaries``,
    cached under ``snapshot_root``), for reference and drift checks. The suite's catalogue
    set holds the catalogue's products that today's events name (a value is in it exactly
    when it is in the catalogue): its size follows the day, not the catalogue."""
    catalog = _safe(running_catalog, root, day, snapshot_root)
    if catalog is None:
        # Today's products are broken (they fail their own suite): judge the events against
        # yesterday's catalogue plus whatever ids today's file names.
        catalog = _safe(running_catalog, root, day - dt.timedelta(days=1), snapshot_root)
        catalog = catalog if catalog is not None else SCHEMAS["products"].empty_table().to_pandas()
        if products_today is not None and "product_id" in products_today:
            extra = products_today[["product_id"]].dropna().astype(str)
            catalog = pd.concat([catalog, extra], ignore_index=True).drop_duplicates(
                "product_id", keep="first")
    history = day_summaries(root, day - dt.timedelta(days=policy.history_days), day,
                            snapshot_root)
    known = catalog["product_id"].dropna().astype(str)
    if events_today is not None and "product_id" in events_today:
        named = pd.Index(events_today["product_id"].dropna().astype(str).unique())
        known = known[known.isin(named)]
    ctx = DayContext(frozenset(known), tuple(s.rows for s in history))
    return ctx, catalog, history


def _event_observations(df: pd.DataFrame, root: str, day: dt.date, interval: Interval,
                        policy: ValidationPolicy, catalog: pd.DataFrame,
                        history: list[DaySummary],
                        snapshot_root: Path | None = None) -> tuple[dict, list[dict]]:
    """Counts the report shows for events (late rows, new users, drift) and drift findings."""
    obs: dict[str, Any] = {}
    findings: list[dict[str, Any]] = []
    if "ts" in df and isinstance(df["ts"].dtype, pd.DatetimeTZDtype):
        start = pd.Timestamp(interval.start)
        earliest = start - pd.Timedelta(hours=policy.allowed_lateness_hours)
        obs["late_rows_within_lateness"] = int(((df["ts"] >= earliest) & (df["ts"] < start)).sum())
    if "user_id" in df:
        seen = set(df["user_id"].dropna().astype(str))
        users = _safe(running_users, root, day, snapshot_root, sorted(seen))
        if users is None:  # today's users file is broken (it fails its own suite)
            users = _safe(running_users, root, day - dt.timedelta(days=1), snapshot_root,
                          sorted(seen))
        known = set(users["user_id"]) if users is not None else set()
        obs["users_first_seen_in_events"] = len(seen - known)
    counts = [s.rows for s in history]
    obs["history_days"] = len(counts)
    if len(counts) < policy.min_history_days:
        obs["drift"] = f"skipped: {len(counts)} of {policy.min_history_days} history days"
        return obs, findings
    obs["volume"] = {"rows": len(df), "trailing_mean": round(sum(counts) / len(counts), 1),
                     "band": list(policy.volume_band)}
    if {"product_id", "event_type"} <= set(df.columns) and len(catalog):
        category = catalog.drop_duplicates("product_id").set_index("product_id")["category"]
        seen = df[df["event_type"].isin(MIX_EVENT_TYPES)]["product_id"].map(category)
        if seen.notna().sum() < policy.min_psi_events:
            obs["category_psi"] = (f"skipped: {seen.notna().sum()} viewed or bought "
                                   f"products, fewer than {policy.min_psi_events}")
            return obs, findings
        psi = psi_of_counts(seen.value_counts(), category_mix(history, category))
        obs["category_psi"] = round(psi, 4)
        if psi > policy.psi_threshold:
            findings.append({"expectation": "shoprec_category_mix_psi", "column": "category",
                             "check": "category_mix_psi", "unexpected_count": None,
                             "observed_value": round(psi, 4),
                             "examples": [f"PSI {psi:.3f} > {policy.psi_threshold} vs the "
                                          f"previous {len(counts)} days"]})
    return obs, findings


def _new_run() -> GxRun:
    """One ephemeral GX context with the pandas source every table's asset hangs off."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    # GX draws a tqdm bar per validation: noise in task logs.
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return GxRun(context, context.data_sources.add_pandas("landing"), {}, {}, {})


def _run_suite(run: GxRun, table: str, interval: Interval, frame: pd.DataFrame,
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


def validate_day(root: str, day: dt.date, report_dir: Path,
                 policy: ValidationPolicy | None = None,
                 snapshot_root: Path | None = None) -> ValidationReport:
    """Validate the day's partition of every table and write one JSON result per table.

    A table with no partition that day is valid (a quiet day adds no products), except
    events, which must arrive for every day the pipeline processes.

    Args:
        root: landing-zone root.
        day: the data interval's day.
        report_dir: where ``date=YYYY-MM-DD/<table>.json`` reports are written.
        policy: tolerances (default ``ValidationPolicy()``).
        snapshot_root: where the running catalogue's snapshots live (None: every products
            partition is read).

    Returns:
        The report; it does not raise (``check_partition`` does).
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    policy = policy or ValidationPolicy()
    interval = Interval.for_day(day)
    out = report_dir / f"date={day.isoformat()}"
    out.mkdir(parents=True, exist_ok=True)
    raw = {table: read_raw_partition(root, table, day) for table in TABLES}
    day_ctx, catalog, history = _day_context(root, day, policy, raw["products"].frame,
                                             raw["events"].frame, snapshot_root)
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
            gx_json = redact_gx_result(gx_result.to_json_dict())
            found = failures_from_result(gx_result)
            result.failures = [f for f in found if f["severity"] != "warning"]
            result.warnings = [f for f in found if f["severity"] == "warning"]
            result.evaluated = gx_json.get("statistics", {}).get("evaluated_expectations", 0)
            if table == "events":
                result.observations, drift = _event_observations(
                    frame, root, day, interval, policy, catalog, history, snapshot_root)
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
    day = parse_day(day)
    record = quarantine_status(settings.home, day)
    if record is not None and record.active:
        raise PartitionQuarantined(record)
    report = validate_day(settings.landing_root, day, settings.home / "validation",
                          ValidationPolicy.from_env(settings), settings.home / "running")
    if not report.success:
        record = None
        if quarantine and not report.only_missing_partition:
            record = quarantine_day(settings.home, settings.landing_root, day, report)
        raise PartitionInvalid(report, record)
    return {"day": report.day.isoformat(),
            "summary": report.summary(),
            "rows": {name: t.rows for name, t in report.tables.items()},
            "warnings": [f"{t.table}: {describe_failure(w)}" for t in report.tables.values()
                         for w in t.warnings],
            "reports": str(settings.home / "validation" / f"date={report.day.isoformat()}")}
