"""Quarantine: a failing day is moved aside whole, never deleted, and released when fixed.

Layout under ``<home>/quarantine``::

    <table>/date=YYYY-MM-DD/...          the day's landing files of every table, original bytes
    reports/date=YYYY-MM-DD/
        quarantine.json                  state, since, reason, files and the history of
                                         quarantines and releases (release notes included)
        result.json                      the validation report: every failure and warning
        gx/<table>.json                  the full GX result per table
        data_docs/index.html             GX Data Docs of the failing tables
        report.html                      one page: each failed check, links to the above

Every table of the day moves, not only the failing one, so that nothing of that day is
processed. Moving copies the bytes first and deletes the source only once the copy is in
place; a file that would overwrite a different file of the same name gets a new name, so
quarantining twice loses nothing. ``release_day`` moves the files (as the operator left
them, fixed or replaced) back into the landing zone and records when and why in the
day's history; the next run validates them like any new partition.

It sits below ``features.validation`` (which calls ``quarantine_day``): it takes the failed
``ValidationReport`` (``features.validation_report``) and never runs a check itself.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec

from features.contract import TABLES, partition_dir
from features.validation_report import ValidationReport

log = logging.getLogger(__name__)

QUARANTINED = "quarantined"
RELEASED = "released"


class QuarantineError(RuntimeError):
    """A quarantine or release that cannot be done as asked (nothing was moved)."""


@dataclass(frozen=True)
class QuarantineRecord:
    """Where a day stands: its state, since when, why, and where its files and report are."""

    day: dt.date
    state: str
    since: str
    reason: str
    files: dict[str, list[str]]
    report_html: Path
    result_json: Path
    data_docs: Path | None
    folders: tuple[Path, ...] = ()
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def active(self) -> bool:
        """True while the day is quarantined (not yet released)."""
        return self.state == QUARANTINED

    @property
    def first_reason(self) -> str:
        """The first failed check, for one-line messages."""
        lines = [ln.strip(" -") for ln in self.reason.splitlines()[1:] if ln.startswith("  - ")]
        return lines[0] if lines else self.reason.splitlines()[0] if self.reason else "invalid"

    @property
    def folder(self) -> Path:
        """The day's report folder (the data folders are listed in ``folders``)."""
        return self.report_html.parent

    def describe(self) -> str:
        """Where the files and the report went, for the task's failure message."""
        moved = sum(len(v) for v in self.files.values())
        docs = f"; Data Docs: {self.data_docs}" if self.data_docs else ""
        folders = ", ".join(str(f) for f in self.folders) or "(no files had landed)"
        return (f"quarantined {moved} file(s) of {self.day} to {folders}; "
                f"report: {self.report_html}{docs}")


@dataclass(frozen=True)
class ReleaseNote:
    """What ``release_day`` did."""

    day: dt.date
    at: str
    reason: str
    files: dict[str, list[str]]

    def summary(self) -> str:
        moved = sum(len(v) for v in self.files.values())
        return (f"released {self.day}: {moved} file(s) back in the landing zone at {self.at} "
                f"({self.reason}); the next run validates them")


def quarantine_root(home: Path) -> Path:
    return Path(home) / "quarantine"


def quarantine_dir(home: Path, table: str, day: dt.date) -> Path:
    """Where the quarantined files of one table's day are (mirrors the landing layout)."""
    return quarantine_root(home) / table / f"date={day.isoformat()}"


def report_dir(home: Path, day: dt.date) -> Path:
    return quarantine_root(home) / "reports" / f"date={day.isoformat()}"


def _marker(home: Path, day: dt.date) -> Path:
    return report_dir(home, day) / "quarantine.json"


def quarantine_status(home: Path, day: dt.date) -> QuarantineRecord | None:
    """The day's quarantine record (active or released), or None if it was never quarantined.

    Args:
        home: the state folder (``Settings.home``).
        day: the partition's day.
    """
    path = _marker(home, day)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return QuarantineRecord(
        day=dt.date.fromisoformat(data["day"]), state=data["state"], since=data["since"],
        reason=data["reason"], files=data["files"], report_html=Path(data["report_html"]),
        result_json=Path(data["result_json"]),
        data_docs=Path(data["data_docs"]) if data.get("data_docs") else None,
        folders=tuple(Path(p) for p in data.get("folders", [])), history=data["history"])


def is_quarantined(home: Path, day: dt.date) -> bool:
    """True while ``day`` is in quarantine (quarantined and not released since)."""
    record = quarantine_status(home, day)
    return record is not None and record.active


def list_quarantined(home: Path) -> list[QuarantineRecord]:
    """Every day currently in quarantine, oldest first."""
    reports = quarantine_root(home) / "reports"
    if not reports.exists():
        return []
    days = sorted(dt.date.fromisoformat(p.name.split("=", 1)[1])
                  for p in reports.glob("date=*"))
    records = [quarantine_status(home, d) for d in days]
    return [r for r in records if r is not None and r.active]


def _write_marker(home: Path, record: QuarantineRecord) -> None:
    path = _marker(home, record.day)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({
        "day": record.day.isoformat(), "state": record.state, "since": record.since,
        "reason": record.reason, "files": record.files, "report_html": str(record.report_html),
        "result_json": str(record.result_json),
        "data_docs": str(record.data_docs) if record.data_docs else None,
        "folders": [str(f) for f in record.folders], "history": record.history,
    }, indent=2))
    tmp.replace(path)  # atomic: a crash never leaves a half-written marker


def _free_name(target: Path) -> Path:
    """``part-0.parquet`` -> ``part-0.1.parquet``, ``part-0.2.parquet``... whichever is free."""
    n = 1
    while True:
        candidate = target.with_name(f"{target.stem}.{n}{target.suffix}")
        if not candidate.exists():
            return candidate
        n += 1


def _versions(target: Path) -> list[Path]:
    """``target`` and the renamed versions ``_free_name`` gave it, those that exist."""
    renamed = target.parent.glob(f"{target.stem}.*{target.suffix}")
    return [p for p in [target, *sorted(renamed)] if p.is_file()]


def _move_to_quarantine(landing_root: str, table: str, day: dt.date, dest: Path) -> list[str]:
    """Move every file of one table's landing partition into ``dest``; returns the new paths."""
    fs, src = fsspec.core.url_to_fs(partition_dir(landing_root, table, day))
    if not fs.exists(src):
        return []
    moved = []
    for f in sorted(fs.find(src)):
        rel = str(f)[len(str(src).rstrip("/")) + 1:]
        data = fs.cat_file(f)
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        same = next((v for v in _versions(target) if v.read_bytes() == data), None)
        if same is not None:
            target = same  # these bytes are already safe in quarantine
        else:
            # Quarantined before and not released: keep every version, under a new name.
            target = _free_name(target) if target.exists() else target
            tmp = target.with_name(target.name + ".partial")
            tmp.write_bytes(data)
            tmp.replace(target)
        # Only now that the bytes are safely in quarantine may the landing copy go.
        fs.rm(f)
        moved.append(str(target))
    if fs.exists(src):
        fs.rm(src, recursive=True)
    return moved


def _copy_results(report: ValidationReport, out: Path) -> Path:
    """The validation report and the per-table GX results, next to the quarantined files."""
    (out / "gx").mkdir(parents=True, exist_ok=True)
    for t in report.tables.values():
        if t.report_path and Path(t.report_path).exists():
            shutil.copyfile(t.report_path, out / "gx" / f"{t.table}.json")
    result = out / "result.json"
    result.write_text(json.dumps(report.to_dict(), indent=2, default=str))
    return result


def _build_docs(report: ValidationReport, out: Path) -> tuple[Path | None, str | None]:
    """GX Data Docs of the failing tables, or (None, why) when they cannot be built."""
    docs = out / "data_docs"
    if docs.exists():
        shutil.rmtree(docs)  # a fresh site per quarantine, not an accumulation of old runs
    try:
        return report.build_data_docs(docs), None
    except Exception as exc:  # noqa: BLE001 -- Data Docs are a convenience; the fallback page stands in
        log.warning("Data Docs for %s could not be built: %s", report.day, exc)
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _report_html(report: ValidationReport, record: QuarantineRecord,
                 docs_error: str | None) -> str:
    """A self-contained page: every failed check in a table, and where the rest is."""
    esc = html.escape

    def rows(items: list[dict[str, Any]]) -> str:
        out = []
        for f in items:
            detail = f.get("error") or ", ".join(str(e) for e in f.get("examples") or [])
            out.append("<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in (
                f.get("table", ""), f.get("check") or "", f["expectation"], f.get("column") or "",
                f.get("unexpected_count") if f.get("unexpected_count") is not None
                else f.get("observed_value", ""), (detail or "")[:300])) + "</tr>")
        return "\n".join(out)

    head = ("<tr><th>table</th><th>check</th><th>expectation</th><th>column</th>"
            "<th>unexpected / observed</th><th>examples or error</th></tr>")
    warnings = [{"table": t.table, **w} for t in report.tables.values() for w in t.warnings]
    if record.data_docs is not None:
        docs = ('<p>Great Expectations Data Docs: <a href="data_docs/index.html">'
                'data_docs/index.html</a></p>')
    else:
        docs = (f"<p><b>GX Data Docs could not be built ({esc(docs_error or 'unknown error')})"
                "; this table is the fallback report.</b></p>")
    files = "".join(f"<li>{esc(p)}</li>" for paths in record.files.values() for p in paths)
    observations = esc(json.dumps({t.table: t.observations for t in report.tables.values()
                                   if t.observations}, indent=2, default=str))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>shoprec quarantine {record.day}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}}
th{{background:#eee}}</style></head><body>
<h1>Partition {record.day} is quarantined</h1>
<p>Since {esc(record.since)}. Fix the files in the quarantine folders below (or replace them),
then run <code>shoprec data release {record.day} --reason "..."</code>; the next run
validates them again.</p>
{docs}
<h2>Failed checks</h2>
<table>{head}
{rows(report.failures)}
</table>
<h2>Warnings</h2>
<table>{head}
{rows(warnings)}
</table>
<h2>Observations</h2><pre>{observations}</pre>
<h2>Quarantined files</h2><ul>{files or "<li>(none had landed)</li>"}</ul>
<p>Full results: <a href="result.json">result.json</a>, per table in <code>gx/</code>.</p>
</body></html>
"""


def quarantine_day(home: Path, landing_root: str, day: dt.date, report: ValidationReport,
                   *, now: dt.datetime | None = None) -> QuarantineRecord:
    """Move a failing day out of the landing zone, with its results and a Data Docs report.

    Args:
        home: the state folder (``Settings.home``); the quarantine is under it.
        landing_root: the landing zone (local path or fsspec URL).
        day: the partition's day.
        report: the failed validation report of that day.
        now: the time recorded as ``since`` (default: the wall clock; it is an audit
            timestamp, not a data interval).

    Returns:
        The record; ``describe()`` says where everything went.
    """
    now = now or dt.datetime.now(dt.UTC)
    out = report_dir(home, day)
    out.mkdir(parents=True, exist_ok=True)
    previous = quarantine_status(home, day)
    history = list(previous.history) if previous else []
    history.append({"event": QUARANTINED, "at": now.isoformat(timespec="seconds"),
                    "failures": [ln.strip() for ln in report.summary().splitlines()[1:]
                                 if ln.startswith("  - ")]})
    record = QuarantineRecord(
        day=day, state=QUARANTINED, since=now.isoformat(timespec="seconds"),
        reason=report.summary(), files={}, report_html=out / "report.html",
        result_json=out / "result.json", data_docs=None,
        folders=tuple(quarantine_dir(home, t, day) for t in TABLES), history=history)
    # The marker goes first: should the move below crash half-way, reruns are refused
    # rather than processing what is left of the day.
    _write_marker(home, record)
    result_json = _copy_results(report, out)
    docs, docs_error = _build_docs(report, out)
    files = {}
    for table in TABLES:
        moved = _move_to_quarantine(landing_root, table, day, quarantine_dir(home, table, day))
        if moved:
            files[table] = moved
    # Files already waiting in quarantine from an earlier, unreleased quarantine stay listed.
    for table in TABLES:
        folder = quarantine_dir(home, table, day)
        if folder.exists():
            files[table] = sorted({*files.get(table, []),
                                   *(str(p) for p in folder.rglob("*") if p.is_file())})
    record = QuarantineRecord(
        day=day, state=QUARANTINED, since=record.since, reason=record.reason, files=files,
        report_html=out / "report.html", result_json=result_json, data_docs=docs,
        folders=tuple(quarantine_dir(home, t, day) for t in files), history=history)
    record.report_html.write_text(_report_html(report, record, docs_error), encoding="utf-8")
    _write_marker(home, record)
    log.warning("%s", record.describe())
    return record


def release_day(home: Path, landing_root: str, day: dt.date, *, reason: str,
                now: dt.datetime | None = None) -> ReleaseNote:
    """Re-admit a quarantined day: move its files (as they are now) back to the landing zone.

    Args:
        home: the state folder (``Settings.home``).
        landing_root: the landing zone (local path or fsspec URL).
        day: the quarantined day.
        reason: why it may be processed now (recorded in the release note).
        now: the time recorded (default: the wall clock).

    Returns:
        The release note (also appended to the day's ``quarantine.json`` history).

    Raises:
        QuarantineError: the day is not quarantined, no reason was given, or a landing file
            of the same name with other bytes is in the way (nothing is moved then).
    """
    if not reason.strip():
        raise QuarantineError("a release needs a reason (it is recorded in the release note)")
    record = quarantine_status(home, day)
    if record is None or not record.active:
        raise QuarantineError(f"partition {day} is not quarantined; nothing to release")
    now = now or dt.datetime.now(dt.UTC)
    plan: list[tuple[Path, Any, str]] = []
    conflicts = []
    for table in TABLES:
        folder = quarantine_dir(home, table, day)
        if not folder.exists():
            continue
        fs, dest = fsspec.core.url_to_fs(partition_dir(landing_root, table, day))
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            target = f"{dest}/{f.relative_to(folder).as_posix()}"
            if fs.exists(target) and fs.cat_file(target) != f.read_bytes():
                conflicts.append(target)
            plan.append((f, fs, target))
    if conflicts:
        raise QuarantineError(f"partition {day}: the landing zone already holds other files "
                              f"of the same name: {conflicts}; move them away first")
    files: dict[str, list[str]] = {}
    for src, fs, target in plan:
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(target, src.read_bytes())
        src.unlink()
        files.setdefault(src.relative_to(quarantine_root(home)).parts[0], []).append(target)
    for table in TABLES:
        shutil.rmtree(quarantine_dir(home, table, day), ignore_errors=True)
    at = now.isoformat(timespec="seconds")
    history = [*record.history, {"event": RELEASED, "at": at, "reason": reason,
                                 "files": files}]
    _write_marker(home, QuarantineRecord(
        day=day, state=RELEASED, since=record.since, reason=record.reason, files={},
        report_html=record.report_html, result_json=record.result_json,
        data_docs=record.data_docs, folders=(), history=history))
    note = ReleaseNote(day, at, reason, files)
    log.info("%s", note.summary())
    return note
