"""``shoprec backfill``: a real Airflow backfill of shoprec_daily, waited for interval by
interval.

``run_backfill`` creates the backfill with ``airflow backfill create`` (DagRuns of run type
``backfill``, visible in the UI) and waits for a scheduler to run it: the one already running
for this metadata DB (production), or, in the embedded profile, an api-server and a scheduler
started for the duration and stopped afterwards (shoprec.embedded_airflow). ``watch_backfill``
reports each interval as it finishes, from the metadata DB.

Airflow reads its configuration when it is first imported: call ``Settings.prepare()``
(which exports AIRFLOW_HOME and friends) before anything here imports airflow.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core.settings import Settings
from shoprec import supervisor
from shoprec.embedded_airflow import EmbeddedAirflow
from shoprec.params import TRAIN_CHOICES
from shoprec.runs import DAG_ID, TASKS, migrate_metadata_db

log = logging.getLogger(__name__)

REPROCESS_CHOICES = ("none", "failed", "completed")
FINISHED = ("success", "failed")


@dataclass
class IntervalOutcome:
    """How one interval of a backfill ended."""

    day: dt.date
    state: str  # success | failed | quarantined | not run (<why>)
    seconds: float = 0.0
    tasks: dict[str, str] = field(default_factory=dict)
    promoted: dict | None = None
    run_id: str = ""
    log_hint: str = ""

    def line(self) -> str:
        failed = [t for t in TASKS if self.tasks.get(t) == "failed"]
        extra = ""
        if self.state == "quarantined":
            extra = f"  quarantined: {self.log_hint}"
        elif failed:
            extra = f"  failed at {failed[0]}; log: {self.log_hint}"
        elif self.promoted:
            verdict = "promoted" if self.promoted.get("promoted") else "kept champion"
            extra = (f"  model v{self.promoted['version']} {verdict} "
                     f"({self.promoted.get('reason', '')})")
        elif self.tasks.get("train") == "skipped":
            extra = "  data stages done; training skipped"
        return f"{self.day}  {self.state:<11} {self.seconds:6.1f}s{extra}"


@dataclass
class BackfillResult:
    """A whole backfill: its intervals' outcomes and the champion afterwards."""

    backfill_id: int
    start: dt.date
    end: dt.date
    intervals: list[IntervalOutcome]
    champion: str | None = None

    def count(self, state: str) -> int:
        return sum(1 for i in self.intervals if i.state == state)

    @property
    def ok(self) -> bool:
        return self.count("failed") == 0 and self.count("quarantined") == 0

    def summary(self) -> str:
        promoted = [i for i in self.intervals if i.promoted and i.promoted.get("promoted")]
        model = (f"promoted model v{promoted[-1].promoted['version']}" if promoted
                 else "no model promoted")
        not_run = sum(1 for i in self.intervals if i.state.startswith("not run"))
        return (f"backfill {self.backfill_id} {self.start}..{self.end}: "
                f"{self.count('success')} done, {self.count('failed')} failed, "
                f"{self.count('quarantined')} quarantined, {not_run} not run (already done "
                f"or running); {model}; champion now "
                f"{'v' + self.champion if self.champion else 'none'}")


class BackfillError(RuntimeError):
    """The backfill could not be created or run."""


class AnotherBackfillRunning(BackfillError):
    """Airflow allows one unfinished backfill per DAG."""


def _retry_locked(action: Callable[[], Any], tries: int = 10, wait: float = 2.0) -> Any:
    """Run a metadata-DB action again when SQLite reports a lock (a busy scheduler)."""
    from sqlalchemy.exc import OperationalError

    for attempt in range(tries):
        try:
            return action()
        except OperationalError as exc:
            if "locked" not in str(exc) or attempt == tries - 1:
                raise
            time.sleep(wait)
    return None


def _airflow_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """``airflow ARGS``, output captured."""
    return subprocess.run([supervisor.executable("airflow"), *args], env=env, capture_output=True, text=True)


def scheduler_running() -> bool:
    """Whether a scheduler with a recent heartbeat serves this metadata DB."""
    from airflow.jobs.job import Job
    from airflow.utils.session import create_session
    from airflow.utils.state import JobState
    from sqlalchemy import select

    with create_session() as session:
        jobs = session.scalars(select(Job).where(Job.job_type == "SchedulerJob",
                                                 Job.state == JobState.RUNNING)
                               .order_by(Job.latest_heartbeat.desc()).limit(5))
        return any(job.is_alive() for job in jobs)


def _dag_serialized(dag_id: str) -> bool:
    """Whether a dag-processor (or ``airflow dags reserialize``) has stored the DAG."""
    from airflow.models.serialized_dag import SerializedDagModel
    from airflow.utils.session import create_session

    with create_session() as session:
        return SerializedDagModel.has_dag(dag_id, session=session)


def _set_paused(dag_id: str, paused: bool) -> bool:
    """Set the DAG's paused flag; returns the previous one."""
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session

    with create_session() as session:
        model = session.get(DagModel, dag_id)
        if model is None:
            raise BackfillError(f"DAG {dag_id} is not in the metadata DB (not parsed yet)")
        before = bool(model.is_paused)
        model.is_paused = paused
    return before


def _create_backfill_cli(env: dict[str, str], start: dt.date, end: dt.date, reprocess: str,
                         conf: dict, retry_seconds: float) -> int:
    """``airflow backfill create`` (the CLI the docs show); returns the new backfill's id."""
    from airflow.models.backfill import Backfill
    from airflow.utils.session import create_session
    from sqlalchemy import func, select

    with create_session() as session:
        before = session.scalar(select(func.max(Backfill.id))) or 0
    args = ["backfill", "create", "--dag-id", DAG_ID,
            "--from-date", start.isoformat(), "--to-date", end.isoformat(),
            "--reprocess-behavior", reprocess,
            # One interval at a time, in date order: a backfill's own default is 10 at once.
            "--max-active-runs", "1",
            "--dag-run-conf", json.dumps(conf)]
    deadline = time.monotonic() + retry_seconds
    locked_tries = 0
    while True:
        done = _airflow_cli(args, env)
        output = done.stdout + done.stderr
        if done.returncode == 0:
            break
        if "database is locked" in output and locked_tries < 5:
            # SQLite under a busy scheduler: a write waited too long; nothing was created.
            locked_tries += 1
            time.sleep(3)
            continue
        if "Another backfill is running" in output and time.monotonic() < deadline:
            # A finished backfill is marked complete by the scheduler every 30 s.
            time.sleep(5)
            continue
        if "Another backfill is running" in output:
            raise AnotherBackfillRunning(output.strip().splitlines()[-1])
        tail = "\n".join(line for line in output.strip().splitlines()[-6:])
        raise BackfillError(f"airflow backfill create failed ({done.returncode}):\n{tail}")
    with create_session() as session:
        created = session.scalar(select(Backfill.id).where(
            Backfill.dag_id == DAG_ID, Backfill.id > before).order_by(Backfill.id.desc()))
    if created is None:
        raise BackfillError("airflow backfill create succeeded but no backfill was recorded")
    return int(created)


def _state(value: Any) -> str:
    """A run's or task's state (an enum, a string or None) as a string."""
    return str(getattr(value, "value", value)) if value is not None else "none"


def _promote_xcom(session, run_id: str) -> dict | None:
    """What the run's promote task returned (the gate's verdict), if it returned a dict."""
    from airflow.models.xcom import XComModel
    from sqlalchemy import select

    row = session.scalars(select(XComModel).where(
        XComModel.dag_id == DAG_ID, XComModel.run_id == run_id,
        XComModel.task_id == "promote", XComModel.key == "return_value")).first()
    if row is None:
        return None
    value = XComModel.deserialize_value(row)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = json.loads(value)
    return value if isinstance(value, dict) else None


def _interval_outcome(session, settings: Settings, association, dag_run) -> IntervalOutcome:
    """A finished interval's outcome; a failed validate with a quarantined partition counts
    as quarantined, with the report as its hint."""
    from airflow.models.taskinstance import TaskInstance
    from sqlalchemy import select

    day = association.logical_date.date()
    tis = session.scalars(select(TaskInstance).where(TaskInstance.dag_id == DAG_ID,
                                                     TaskInstance.run_id == dag_run.run_id))
    tasks = {ti.task_id: _state(ti.state) for ti in tis}
    seconds = ((dag_run.end_date - dag_run.start_date).total_seconds()
               if dag_run.end_date and dag_run.start_date else 0.0)
    state = _state(dag_run.state)
    hint = ""
    if state == "failed":
        failed = next((t for t in TASKS if tasks.get(t) == "failed"), None)
        hint = str(settings.airflow_home / "logs" / f"dag_id={DAG_ID}"
                   / f"run_id={dag_run.run_id}" / f"task_id={failed or 'validate'}")
        if failed == "validate":
            from features.quarantine import quarantine_status

            record = quarantine_status(settings.home, day)
            if record is not None and record.active:
                state, hint = "quarantined", str(record.report_html)
    promoted = _promote_xcom(session, dag_run.run_id) if tasks.get("promote") == "success" else None
    return IntervalOutcome(day, state, seconds, tasks, promoted, dag_run.run_id, hint)


def _champion_version(settings: Settings) -> str | None:
    """The registered model's champion version, None when there is none or MLflow fails."""
    try:
        from training.registry import CHAMPION, alias_version, mlflow_client

        champion = alias_version(mlflow_client(settings), settings.model_name, CHAMPION)
        return None if champion is None else str(champion.version)
    except Exception as exc:  # noqa: BLE001 - the summary must not fail on MLflow
        log.warning("cannot read the champion: %s", exc)
        return None


def watch_backfill(settings: Settings, backfill_id: int, *, echo=print, poll: float = 2.0,
                   timeout: float | None = None,
                   alive: Callable[[], None] | None = None) -> list[IntervalOutcome]:
    """Wait for every run of a backfill; echo one line per interval as it finishes.

    Args:
        settings: the shoprec settings (for report paths).
        backfill_id: the Airflow backfill.
        echo: where the per-interval lines go.
        poll: seconds between looks at the metadata DB.
        timeout: give up after this many seconds (None: wait).
        alive: raises when the scheduler that should run the backfill is gone.

    Returns:
        One outcome per interval, in date order.
    """
    from airflow.models.backfill import BackfillDagRun
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    reported: dict[int, IntervalOutcome] = {}
    started = time.monotonic()

    def look() -> tuple[int, int]:
        """Report the newly finished intervals; returns (intervals, still pending)."""
        with create_session() as session:
            rows = list(session.scalars(select(BackfillDagRun).where(
                BackfillDagRun.backfill_id == backfill_id).order_by(BackfillDagRun.sort_ordinal)))
            pending = 0
            for row in rows:
                if row.id in reported:
                    continue
                if row.dag_run_id is None:
                    reported[row.id] = IntervalOutcome(row.logical_date.date(),
                                                       f"not run ({row.exception_reason})")
                    echo(reported[row.id].line())
                    continue
                dag_run = session.get(DagRun, row.dag_run_id)
                if dag_run is None or _state(dag_run.state) not in FINISHED:
                    pending += 1
                    continue
                reported[row.id] = _interval_outcome(session, settings, row, dag_run)
                echo(reported[row.id].line())
            return len(rows), pending

    while True:
        total, pending = _retry_locked(look)
        if total and pending == 0:
            break
        if alive is not None:
            alive()
        if timeout is not None and time.monotonic() - started > timeout:
            raise BackfillError(f"backfill {backfill_id} not finished after {timeout:.0f}s")
        time.sleep(poll)
    return sorted(reported.values(), key=lambda o: o.day)


def _wait_marked_complete(backfill_id: int, timeout: float,
                          alive: Callable[[], None] | None) -> bool:
    """Wait until the scheduler marks the backfill complete (it checks every 30 s)."""
    from airflow.models.backfill import Backfill
    from airflow.utils.session import create_session

    def completed() -> bool:
        with create_session() as session:
            return session.get(Backfill, backfill_id).completed_at is not None

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _retry_locked(completed):
            return True
        if alive is not None:
            alive()
        time.sleep(2)
    return False


def run_backfill(settings: Settings, start: dt.date, end: dt.date, *, reprocess: str = "none",
                 train: str = "last", echo=print, timeout: float | None = None) -> BackfillResult:
    """Backfill shoprec_daily over [start, end] (days, inclusive) as a real Airflow backfill.

    Creates the backfill with ``airflow backfill create`` (one DagRun of run type
    ``backfill`` per interval, max one active, in date order; the run conf carries the
    training policy and the backfill's last interval) and waits for it. When no scheduler
    serves this metadata DB (the embedded profile; none is running unless
    ``SHOPREC_AIRFLOW_API_URL`` says so), an api-server and a scheduler run as child
    processes until the backfill is done, and the DAG's paused flag is restored afterwards.

    Args:
        settings: the shoprec settings.
        start: first interval's day.
        end: last interval's day.
        reprocess: none (skip intervals that already have a finished run), failed (rerun
            failed ones) or completed (rerun every interval).
        train: training policy for the backfill's runs: last, each or none.
        echo: where progress lines go.
        timeout: give up waiting after this many seconds.

    Returns:
        The outcome of every interval and the champion afterwards.
    """
    if reprocess not in REPROCESS_CHOICES:
        raise ValueError(f"reprocess={reprocess!r}: expected one of {REPROCESS_CHOICES}")
    if train not in TRAIN_CHOICES:
        raise ValueError(f"train={train!r}: expected one of {TRAIN_CHOICES}")
    if start > end:
        raise ValueError(f"start {start} is after end {end}")
    settings.prepare()
    env = dict(os.environ)
    external = bool(os.environ.get("SHOPREC_AIRFLOW_API_URL"))
    log_dir = settings.home / "logs" / "backfill"
    if not external:
        migrate_metadata_db(settings)
        external = scheduler_running()
    if not external or not _dag_serialized(DAG_ID):
        # What a dag-processor does: parse the DAG folder into the metadata DB.
        done = _airflow_cli(["dags", "reserialize"], env)
        if done.returncode != 0:
            raise BackfillError(f"airflow dags reserialize failed:\n{done.stderr[-2000:]}")
    conf = {"train": train, "backfill_end": end.isoformat()}
    embedded = None if external else EmbeddedAirflow(env, log_dir)
    was_paused = None
    try:
        # Queued runs of a paused DAG never start; the embedded scheduler does not schedule.
        was_paused = _retry_locked(lambda: _set_paused(DAG_ID, False))
        if was_paused and external:
            echo(f"{DAG_ID} was paused: unpaused it so the scheduler runs the backfill")
        backfill_id = None
        if embedded is not None:
            # Created before the scheduler starts: no SQLite lock contention. An unfinished
            # earlier backfill (its scheduler stopped early) is completed by ours first.
            with contextlib.suppress(AnotherBackfillRunning):
                backfill_id = _create_backfill_cli(env, start, end, reprocess, conf, 0)
            echo(f"no scheduler serves {settings.airflow_home}: starting an api-server and a "
                 f"scheduler for this backfill (logs in {log_dir})")
            embedded.start()
        alive = embedded.check_alive if embedded is not None else None
        if backfill_id is None:
            backfill_id = _create_backfill_cli(env, start, end, reprocess, conf,
                                               retry_seconds=75 if embedded else 0)
        echo(f"backfill {backfill_id}: {DAG_ID} {start}..{end}, reprocess={reprocess}, "
             f"train={train}; one line per interval as it finishes")
        outcomes = watch_backfill(settings, backfill_id, echo=echo, timeout=timeout, alive=alive)
        if embedded is not None:
            _wait_marked_complete(backfill_id, timeout=40, alive=alive)
    except supervisor.ProcessFailed as exc:  # the embedded api-server or scheduler
        raise BackfillError(str(exc)) from exc
    finally:
        if embedded is not None:
            embedded.stop()
            if was_paused:
                with contextlib.suppress(Exception):
                    _set_paused(DAG_ID, True)
    return BackfillResult(backfill_id, start, end, outcomes, _champion_version(settings))

