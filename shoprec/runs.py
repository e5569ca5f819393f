"""Running shoprec_daily through Airflow from the command line, without a scheduler.

``run_days`` executes one real DagRun per day with ``dag.test()``: Airflow creates the run in
its metadata DB, resolves dependencies, runs every task in this process and records each
task instance, so the runs show up in the Airflow UI like scheduled ones: the same logical
date and data interval as the scheduler's run of that day, and the real moments the run
started and ended.

Airflow reads its configuration when it is first imported: call ``Settings.prepare()``
(which exports AIRFLOW_HOME and friends) before anything here imports airflow.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

from core.settings import DAGS_FOLDER, Settings
from shoprec import supervisor

DAG_ID = "shoprec_daily"
# Task order of the DAG, for summaries.
TASKS = ("validate", "build_features", "materialize", "train", "evaluate", "register",
         "build_index", "promote", "reload_serving")


@dataclass
class DayResult:
    """How one day's run ended: its state, wall time, task states, the promotion verdict."""

    day: dt.date
    state: str
    seconds: float
    tasks: dict[str, str] = field(default_factory=dict)
    promoted: dict | None = None
    log_path: str = ""

    def line(self) -> str:
        """One line for the command line's progress."""
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


def migrate_metadata_db(settings: Settings) -> None:
    """Create or upgrade Airflow's metadata DB (idempotent, ~4 s on SQLite)."""
    settings.prepare()
    env = {**os.environ, **settings.airflow_env()}
    subprocess.run([supervisor.executable("airflow"), "db", "migrate"], env=env, check=True,
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
    """Make ``dag.test`` create the run the scheduler would: logical date = interval start,
    start date = the moment it starts.

    ``dag.test`` infers a manual run's interval as the period *ending* at its logical date,
    so day D's run would carry logical date D + 1, while scheduled and backfill runs of
    day D carry D (``DagRunInfo.logical_date`` = interval start). Backfills find existing
    runs by logical date; with two identities a backfill would skip or clear the wrong
    interval. Here the run keeps dag.test's loop but gets logical date D and interval
    [D, D + 1), so ``shoprec run``, the scheduler and ``shoprec backfill`` agree.

    ``dag.test`` also creates the run with start date = its logical date (Airflow 3.3's
    ``get_or_create_dagrun(start_date=logical_date or run_after)``), so a run of a day
    months ago showed that many months as its duration in the UI. The scheduler sets a run's
    start date when it starts running it; here it is the wall-clock moment the run is
    created, just before dag.test runs its tasks. Its end date is already real: Airflow sets
    it when the run reaches a final state.
    """
    import airflow.models.dagrun as dagrun_module
    from airflow.timetables.base import DataInterval

    original = dagrun_module.get_or_create_dagrun

    def create(**kwargs):
        kwargs["data_interval"] = DataInterval(start, end)
        kwargs["start_date"] = dt.datetime.now(dt.UTC)
        return original(**kwargs)

    with mock.patch.object(dagrun_module, "get_or_create_dagrun", create):
        yield


def run_day(dag, day: dt.date, log_dir: Path | None = None,
            conf: dict | None = None) -> DayResult:
    """One DagRun for the data interval [day, day + 1), in this process (``dag.test``).

    The run gets the scheduler's identity (logical date = day, run after day + 1 00:00 UTC),
    so a later backfill of the same range sees it as done; its start and end dates are the
    real moments it ran.

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

