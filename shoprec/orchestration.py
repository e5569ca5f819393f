"""Running shoprec_daily through Airflow from the command line, without a scheduler.

``run_days`` executes one real DagRun per day with ``dag.test()``: Airflow creates the run in
its metadata DB, resolves dependencies, runs every task in this process and records each
task instance, so the runs show up in the Airflow UI like scheduled ones.

Airflow reads its configuration when it is first imported: call ``Settings.prepare()``
(which exports AIRFLOW_HOME and friends) before anything here imports airflow.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shoprec.settings import DAGS_FOLDER, Settings

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


def run_day(dag, day: dt.date, log_dir: Path | None = None) -> DayResult:
    """One DagRun for the data interval [day, day + 1).

    The DAG's timetable infers the data interval that ends at the run's logical date, so the
    run for day D is created at D + 1 00:00 UTC, exactly as the scheduler would.

    Args:
        dag: the parsed shoprec_daily.
        day: the interval's day.
        log_dir: when given, the run's output goes to ``<log_dir>/<day>.log``.
    """
    logical = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC) + dt.timedelta(days=1)
    started = time.monotonic()
    log_path = log_dir / f"{day.isoformat()}.log" if log_dir else None
    with _output_to(log_path) if log_path else contextlib.nullcontext():
        dagrun = dag.test(logical_date=logical)
    tasks = {ti.task_id: str(ti.state.value if hasattr(ti.state, "value") else ti.state)
             for ti in dagrun.get_task_instances()}
    promoted = None
    if tasks.get("promote") == "success":
        promoted = next((ti.xcom_pull(task_ids="promote") for ti in dagrun.get_task_instances()
                         if ti.task_id == "promote"), None)
    state = str(dagrun.state.value if hasattr(dagrun.state, "value") else dagrun.state)
    return DayResult(day, state, time.monotonic() - started, tasks, promoted,
                     str(log_path or ""))


def run_days(settings: Settings, start: dt.date, end: dt.date, *, echo=print) -> list[DayResult]:
    """Run shoprec_daily for every day from ``start`` to ``end`` inclusive, in date order.

    Stops at the first failed day: later days depend on its features.
    """
    migrate_metadata_db(settings)
    with _output_to(settings.home / "logs" / "dag_test" / "parse.log"):
        dag = load_dag(settings)
    results = []
    day = start
    while day <= end:
        result = run_day(dag, day, settings.home / "logs" / "dag_test")
        results.append(result)
        echo(result.line())
        if result.state != "success":
            break
        day += dt.timedelta(days=1)
    return results
