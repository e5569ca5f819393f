"""The validation report of one day, and what goes into it from a GX result.

``ValidationReport`` holds each table's failures, warnings and observations (``TableResult``)
and renders them: ``summary`` for logs and task failures, ``to_dict`` for the JSON kept with a
quarantined day, ``build_data_docs`` for the GX Data Docs of the failing tables. Values that
the identifier checks found are masked (``redact``) before they reach a log or report.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from features.validation_suites import PII_VALUE_CHECKS, ValidationPolicy

# Rows that fail an expectation are shown up to this many times in the report.
EXAMPLES_PER_FAILURE = 5
# Name of the Data Docs site added to the ephemeral context ("local_site" is taken there).
DATA_DOCS_SITE = "shoprec_quarantine"


@dataclass
class TableResult:
    """One table's outcome for the day: its failures (which fail the day), warnings,
    observations (counts the report shows), the files read and where its JSON result is."""

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
class GxRun:
    """What Data Docs need to re-run the suites through a Checkpoint (kept in memory only)."""

    context: Any
    source: Any
    batch_definitions: dict[str, Any]
    suites: dict[str, Any]
    frames: dict[str, pd.DataFrame]


@dataclass
class ValidationReport:
    """One day's validation: every table's result under the policy it was judged by, and the
    GX run that Data Docs re-use."""

    day: dt.date
    tables: dict[str, TableResult]
    policy: ValidationPolicy = field(default_factory=ValidationPolicy)
    gx: GxRun | None = field(default=None, repr=False, compare=False)

    @property
    def success(self) -> bool:
        """True when no table failed (warnings do not count)."""
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
        warnings = [f"  ! {t.table}: {describe_failure(w)} (warning)"
                    for t in self.tables.values() for w in t.warnings]
        if self.success:
            rows = ", ".join(f"{t.table}={t.rows}" for t in self.tables.values())
            return "\n".join([f"partition {self.day} is valid ({rows} rows)", *warnings])
        lines = [f"partition {self.day} failed validation:"]
        for t in self.tables.values():
            for f in t.failures:
                lines.append(f"  - {t.table}: {describe_failure(f)}")
            if not t.success:
                lines.append(f"    report: {t.report_path}")
        return "\n".join(lines + warnings)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-able data (kept as ``result.json`` with a quarantined day)."""
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


def describe_failure(f: dict[str, Any]) -> str:
    """One failure (or warning) on one line: expectation, column, check, counts, examples."""
    col = f" column={f['column']}" if f.get("column") else ""
    check = f" [{f['check']}]" if f.get("check") else ""
    cnt = f" unexpected={f['unexpected_count']}" if f.get("unexpected_count") else ""
    obs = f" observed={f['observed_value']}" if f.get("observed_value") is not None else ""
    err = f" error={f['error']}" if f.get("error") else ""
    ex = f" e.g. {f['examples']}" if f.get("examples") else ""
    return f"{f['expectation']}{col}{check}{cnt}{obs}{err}{ex}"


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


def redact_gx_result(gx_json: dict[str, Any]) -> dict[str, Any]:
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


def failures_from_result(result: Any) -> list[dict[str, Any]]:
    """The failed expectations of a GX validation result as plain dicts (expectation, column,
    check, severity, counts, examples with identifiers masked, the error if one was raised)."""
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
