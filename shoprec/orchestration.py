"""Running shoprec_daily through Airflow from the command line, without a scheduler.

``run_days`` executes one real DagRun per day with ``dag.test()``: Airflow creates the run in
its metadata DB, resolves dependencies, runs every task in this process and records each
task instance, so the runs show up in the Airflow UI like scheduled ones.

``run_backfill`` creates a real Airflow backfill (``airflow backfill create``: DagRuns of
run type ``backfill``, visible in the UI) and waits for a scheduler to run it: the one already
running for this metadata DB (production), or, in the embedded profile, an api-server and a
scheduler started as child processes for the duration and stopped afterwards.

The task-side rules live here too, so the DAG file stays declarative: ``check_run_params``,
``training_decision`` (the backfill training policy) and ``report_task_failure`` (the
failure callback).

Airflow reads its configuration when it is first imported: call ``Settings.prepare()``
(which exports AIRFLOW_HOME and friends) before anything here imports airflow.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

from core.settings import DAGS_FOLDER, Settings

log = logging.getLogger(__name__)

DAG_ID = "shoprec_daily"
# Task order of the DAG, for summaries.
TASKS = ("validate", "build_features", "materialize", "train", "evaluate", "register",
         "build_index", "promote", "reload_serving")


@dataclass
class DayResult:
    day: dt.date
    state: str
    seconds: float
    tasks: dict[str, str] = field(default_factory=dict)
    promoted: dict | None = None
    log_path: str = ""

    def line(self) -> str:
        skipped = [t for t in TASKS if self.tasks.get(t) == "skipped"]
        failed = [t for t in TASKS if self.tasks.get(t) == "failed"]
        extra = ""
        if failed:
            extra = f"  failed at {failed[0]}; log: {self.log_path}"
        elif self.promoted:
            verdict = "promoted" if self.promoted.get("promoted") else "kept champion"
            extra = (f"  model v{self.promoted['version']} {verdict} "
                     f"({self.promoted.get('reason', '')})")
        elif skipped:
            extra = f"  {skipped[0]} and later steps skipped (history too short to train yet)"
        return f"{self.day}  {self.state:<8} {self.seconds:6.1f}s{extra}"


def airflow_bin() -> str:
    """The airflow executable of this interpreter's environment."""
    candidate = Path(sys.executable).with_name("airflow")
    return str(candidate) if candidate.exists() else "airflow"


def migrate_metadata_db(settings: Settings) -> None:
    """Create or upgrade Airflow's metadata DB (idempotent, ~4 s on SQLite)."""
    settings.prepare()
    env = {**os.environ, **settings.airflow_env()}
    subprocess.run([airflow_bin(), "db", "migrate"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def load_dag(settings: Settings):
    """Parse the DAG folder like the dag-processor does and return shoprec_daily."""
    settings.prepare()
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS_FOLDER))
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {bag.import_errors}")
    return bag.get_dag(DAG_ID)


@contextlib.contextmanager
def _output_to(path: Path):
    """Send this process's stdout/stderr (file descriptors, so C extensions too) to a file.

    ``dag.test`` prints every task's log lines; the command line shows one line per day and
    keeps the full log beside the Airflow metadata.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with path.open("ab") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


@contextlib.contextmanager
def _scheduler_identity(start: dt.datetime, end: dt.datetime):
    """Make ``dag.test`` create the run the scheduler would: logical date = interval start.

    ``dag.test`` infers a manual run's interval as the period *ending* at its logical date,
    so day D's run would carry logical date D + 1, while scheduled and backfill runs of
    day D carry D (``DagRunInfo.logical_date`` = interval start). Backfills find existing
    runs by logical date; with two identities a backfill would skip or clear the wrong
    interval. Here the run keeps dag.test's loop but gets logical date D and interval
    [D, D + 1), so ``shoprec run``, the scheduler and ``shoprec backfill`` agree.
    """
    import airflow.models.dagrun as dagrun_module
    from airflow.timetables.base import DataInterval

    original = dagrun_module.get_or_create_dagrun

    def create(**kwargs):
        kwargs["data_interval"] = DataInterval(start, end)
        return original(**kwargs)

    with mock.patch.object(dagrun_module, "get_or_create_dagrun", create):
        yield


def run_day(dag, day: dt.date, log_dir: Path | None = None,
            conf: dict | None = None) -> DayResult:
    """One DagRun for the data interval [day, day + 1), in this process (``dag.test``).

    The run gets the scheduler's identity (logical date = day, run after day + 1 00:00 UTC),
    so a later backfill of the same range sees it as done.

    Args:
        dag: the parsed shoprec_daily.
        day: the interval's day.
        log_dir: when given, the run's output goes to ``<log_dir>/<day>.log``.
        conf: the run's conf (the DAG's params, e.g. ``{"train": "none"}``).
    """
    start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
    started = time.monotonic()
    log_path = log_dir / f"{day.isoformat()}.log" if log_dir else None
    with _output_to(log_path) if log_path else contextlib.nullcontext(), \
            _scheduler_identity(start, start + dt.timedelta(days=1)):
        dagrun = dag.test(logical_date=start, run_after=start + dt.timedelta(days=1),
                          run_conf=conf)
    tasks = {ti.task_id: str(ti.state.value if hasattr(ti.state, "value") else ti.state)
             for ti in dagrun.get_task_instances()}
    promoted = None
    if tasks.get("promote") == "success":
        promoted = next((ti.xcom_pull(task_ids="promote") for ti in dagrun.get_task_instances()
                         if ti.task_id == "promote"), None)
    state = str(dagrun.state.value if hasattr(dagrun.state, "value") else dagrun.state)
    return DayResult(day, state, time.monotonic() - started, tasks, promoted,
                     str(log_path or ""))


def run_days(settings: Settings, start: dt.date, end: dt.date, *, echo=print,
             train: str = "auto") -> list[DayResult]:
    """Run shoprec_daily for every day from ``start`` to ``end`` inclusive, in date order.

    Stops at the first failed day: later days depend on its features.

    Args:
        train: the runs' training policy: auto/each (every day), last (only ``end``),
            none (data stages only).
    """
    conf = {"train": train}
    if train == "last":
        conf["backfill_end"] = end.isoformat()
    migrate_metadata_db(settings)
    with _output_to(settings.home / "logs" / "dag_test" / "parse.log"):
        dag = load_dag(settings)
    results = []
    day = start
    while day <= end:
        result = run_day(dag, day, settings.home / "logs" / "dag_test", conf=conf)
        results.append(result)
        echo(result.line())
        if result.state != "success":
            break
        day += dt.timedelta(days=1)
    return results


# --- Run parameters and the training policy (called inside the DAG's tasks) -----------------

TRAIN_CHOICES = ("each", "last", "none")
BACKFILL_RUN_TYPE = "backfill"  # DagRunType.BACKFILL_JOB.value


def check_run_params(params: Mapping[str, Any]) -> str | None:
    """Rules across params that one JSON schema per param cannot express.

    Returns:
        What is wrong with the run's params, or None.
    """
    if params.get("force_promotion") and not str(params.get("promotion_reason") or "").strip():
        return "force_promotion needs a non-empty promotion_reason (it is recorded on the version)"
    end = params.get("backfill_end")
    if end:
        try:
            dt.date.fromisoformat(str(end))
        except ValueError:
            return f"backfill_end {end!r} is not a date (YYYY-MM-DD)"
    root = params.get("landing_root")
    if root and "://" not in str(root) and not Path(str(root)).is_dir():
        return f"landing_root {root!r} is not a folder"
    return None


def _run_type_value(run_type: Any) -> str:
    return str(getattr(run_type, "value", run_type))


def train_policy(params: Mapping[str, Any], run_type: Any) -> str:
    """The run's effective training policy: each, last or none.

    ``auto`` (the default) means ``each`` for scheduled and manual runs and ``last`` for
    backfill runs; ``skip_training`` forces ``none``.
    """
    if params.get("skip_training"):
        return "none"
    policy = str(params.get("train") or "auto")
    if policy == "auto":
        return "last" if _run_type_value(run_type) == BACKFILL_RUN_TYPE else "each"
    if policy not in TRAIN_CHOICES:
        raise ValueError(f"train={policy!r}: expected auto, each, last or none")
    return policy


def training_decision(day: str, params: Mapping[str, Any], conf: Mapping[str, Any],
                      run_type: Any, queued_runs: Callable[[], int] | None = None) -> str | None:
    """Whether this interval trains; the skip reason when it does not.

    ``last`` trains on the backfill's last interval only. That interval is the run conf's
    ``backfill_end`` (``shoprec backfill`` always sets it); for a backfill created elsewhere
    without it (the UI's form), the last interval is the one that runs when no queued run of
    the DAG is left (backfill runs are created queued and run one at a time, in date order).
    A single run that is not part of a backfill is its own last interval.

    Args:
        day: the interval's day, YYYY-MM-DD.
        params: the run's params (DAG defaults merged with the run conf).
        conf: the run's conf as given.
        run_type: the DagRun's run type.
        queued_runs: counts this DAG's queued runs (only asked for when needed).

    Returns:
        None to train, or why training is skipped.
    """
    policy = train_policy(params, run_type)
    if policy == "none":
        why = "skip_training" if params.get("skip_training") else "train=none"
        return f"training is off for this run ({why}): data stages only"
    if policy == "each":
        return None
    end = params.get("backfill_end") or conf.get("backfill_end")
    if end:
        if day < str(end):
            return f"train=last: this backfill trains once, on its last interval {end}"
        return None
    if _run_type_value(run_type) != BACKFILL_RUN_TYPE or queued_runs is None:
        return None
    waiting = queued_runs()
    if waiting > 0:
        return f"train=last: {waiting} later interval(s) of this backfill still queued"
    return None


# --- The failure callback -----------------------------------------------------------------------

ALERT_TIMEOUT_SECONDS = 5.0


def _report_link(day: dt.date | None) -> str | None:
    """The validation/quarantine report of the interval, when there is one."""
    if day is None:
        return None
    try:
        from features.quarantine import quarantine_status

        settings = Settings.from_env()
        record = quarantine_status(settings.home, day)
        if record is not None and record.active:
            return str(record.report_html)
        folder = settings.home / "validation" / f"date={day.isoformat()}"
        return str(folder) if folder.exists() else None
    except Exception:  # noqa: BLE001 - a missing report must not break the alert
        return None


def failure_summary(context: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON an alert carries, from a task's Airflow context."""
    ti = context.get("ti") or context.get("task_instance")
    dag_run = context.get("dag_run")
    start = context.get("data_interval_start")
    end = context.get("data_interval_end")
    day = start.date() if start is not None else None
    error = context.get("exception")
    try:
        log_url = ti.log_url if ti is not None else None
    except Exception:  # noqa: BLE001 - no api base url configured
        log_url = None
    return {
        "dag_id": getattr(ti, "dag_id", None) or getattr(dag_run, "dag_id", None),
        "run_id": getattr(ti, "run_id", None) or getattr(dag_run, "run_id", None),
        "interval": day.isoformat() if day else None,
        "interval_start": start.isoformat() if start is not None else None,
        "interval_end": end.isoformat() if end is not None else None,
        "task_id": getattr(ti, "task_id", None),
        "try_number": getattr(ti, "try_number", None),
        "log_url": log_url,
        "report": _report_link(day),
        "error": (f"{type(error).__name__}: {error}" if error is not None else None),
    }


def post_alert(url: str, payload: dict[str, Any], timeout: float = ALERT_TIMEOUT_SECONDS) -> bool:
    """POST the payload as JSON; True when the webhook answered 2xx. Never raises."""
    body = json.dumps(payload, default=str).encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return 200 <= response.status < 300
    except Exception as exc:  # noqa: BLE001 - an alert must never fail the task's teardown
        log.warning("alert webhook failed (%s): %s", type(exc).__name__, exc)
        return False


def report_task_failure(context: Mapping[str, Any]) -> dict[str, Any]:
    """``on_failure_callback`` of shoprec_daily's tasks: a log line and an optional webhook.

    The webhook is ``SHOPREC_ALERT_WEBHOOK`` (unset: log only); the POST times out after
    ``SHOPREC_ALERT_TIMEOUT_SECONDS`` (default 5). Never raises.

    Returns:
        The payload (also what was posted).
    """
    try:
        payload = failure_summary(context)
    except Exception as exc:  # noqa: BLE001
        payload = {"error": f"could not summarise the failure: {exc}"}
    error = (payload.get("error") or "").splitlines()
    log.error("shoprec task failed: %s %s %s try %s: %s%s", payload.get("dag_id"),
              payload.get("interval"), payload.get("task_id"), payload.get("try_number"),
              error[0][:300] if error else "?",
              f" (report: {payload['report']})" if payload.get("report") else "")
    url = os.environ.get("SHOPREC_ALERT_WEBHOOK", "").strip()
    if url:
        try:
            timeout = float(os.environ.get("SHOPREC_ALERT_TIMEOUT_SECONDS", ALERT_TIMEOUT_SECONDS))
        except ValueError:
            timeout = ALERT_TIMEOUT_SECONDS
        payload["posted"] = post_alert(url, payload, timeout)
    return payload


# --- Backfills ------------------------------------------------------------------------------

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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class _Component:
    name: str
    process: subprocess.Popen
    log_path: Path


class EmbeddedAirflow:
    """An api-server and a scheduler for one backfill, as child processes of this one.

    The LocalExecutor's task processes reach the metadata DB through the api-server's
    Execution API, hence the api-server. The scheduler runs with ``use_job_schedule=False``:
    it only starts queued runs (the backfill's), so unpausing the DAG does not make it
    schedule today's interval. Each component is started in its own session (process
    group) and stopped by its PID's group: SIGTERM, then SIGKILL (the scheduler has been
    seen to ignore SIGTERM), so no orphaned task process survives.
    """

    def __init__(self, env: dict[str, str], log_dir: Path):
        self.port = _free_port()
        self.log_dir = log_dir
        self.env = {
            **env,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{self.port}/execution/",
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{self.port}/",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            # The scheduler serves task logs on 8793 by default: clash-free with a running stack.
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(_free_port()),
        }
        # Tokens the scheduler issues must verify in the api-server: one shared secret.
        self.env.setdefault("AIRFLOW__API_AUTH__JWT_SECRET", secrets.token_urlsafe(32))
        self.components: list[_Component] = []

    def start(self) -> EmbeddedAirflow:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._spawn("api-server", ["api-server", "--port", str(self.port),
                                   "--host", "127.0.0.1", "--workers", "1"])
        self._wait_for_api(timeout=120)
        self._spawn("scheduler", ["scheduler"])
        return self

    def _spawn(self, name: str, args: list[str]) -> None:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as out:
            process = subprocess.Popen([airflow_bin(), *args], env=self.env, stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        self.components.append(_Component(name, process, log_path))
        log.debug("started airflow %s (pid %d), log %s", name, process.pid, log_path)

    def _wait_for_api(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}/api/v2/monitor/health"
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with urllib.request.urlopen(url, timeout=2):  # noqa: S310
                    return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(1)
        raise BackfillError(f"airflow api-server did not answer within {timeout:.0f}s; "
                            f"see {self.log_dir / 'api-server.log'}")

    def check_alive(self) -> None:
        for component in self.components:
            code = component.process.poll()
            if code is not None:
                raise BackfillError(f"airflow {component.name} exited with {code}; "
                                    f"see {component.log_path}")

    def stop(self) -> None:
        for component in reversed(self.components):
            _stop_group(component.process)
        self.components.clear()

    def __enter__(self) -> EmbeddedAirflow:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _stop_group(process: subprocess.Popen, grace: float = 15.0) -> None:
    """Stop a child started with start_new_session=True, and everything it started."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # The group may outlive its leader (task processes): make sure it is gone.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _airflow_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([airflow_bin(), *args], env=env, capture_output=True, text=True)


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
    return str(getattr(value, "value", value)) if value is not None else "none"


def _promote_xcom(session, run_id: str) -> dict | None:
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
    finally:
        if embedded is not None:
            embedded.stop()
            if was_paused:
                with contextlib.suppress(Exception):
                    _set_paused(DAG_ID, True)
    return BackfillResult(backfill_id, start, end, outcomes, _champion_version(settings))
