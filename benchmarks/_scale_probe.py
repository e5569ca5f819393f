"""Per-task wall time, CPU time and peak RSS of a ``dag.test`` run in this process.

``dag.test`` runs every task in the calling process, one after another, so a task's figures
are this process's over the task's span: a ``ResourceSampler`` thread records (time, CPU
seconds, RSS) every 50 ms, Airflow's metadata DB gives each task instance's real start and
end, and ``task_figures`` cuts the samples at those moments. Child processes, if a task
starts any, are counted in both CPU and RSS.
"""

from __future__ import annotations

import bisect
import datetime as dt
import threading
import time
from dataclasses import dataclass

import psutil

MB = 1024 * 1024


def _cpu_and_rss(proc: psutil.Process) -> tuple[float, int]:
    """CPU seconds (user + system, with finished and live children) and RSS bytes (with
    live children) of ``proc``."""
    t = proc.cpu_times()
    cpu = t.user + t.system + t.children_user + t.children_system
    rss = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            ct = child.cpu_times()
            cpu += ct.user + ct.system
            rss += child.memory_info().rss
        except psutil.Error:  # it ended between the listing and the read
            continue
    return cpu, rss


class ResourceSampler:
    """A daemon thread sampling this process every ``interval`` seconds.

    Samples are kept from the last ``reset()`` on (one DAG run at a time), so a 180-day
    history does not hold 180 days of samples.
    """

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self._proc = psutil.Process()
        self._lock = threading.Lock()
        self._times: list[float] = []
        self._cpu: list[float] = []
        self._rss: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="resource-sampler", daemon=True)

    def __enter__(self) -> ResourceSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> tuple[float, float, int]:
        """Take one sample now (also used at a run's exact start and end)."""
        cpu, rss = _cpu_and_rss(self._proc)
        now = time.time()
        with self._lock:
            self._times.append(now)
            self._cpu.append(cpu)
            self._rss.append(rss)
        return now, cpu, rss

    def reset(self) -> None:
        with self._lock:
            self._times, self._cpu, self._rss = [], [], []

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def window(self, start: float, end: float) -> dict:
        """Wall, CPU and peak RSS between two moments (epoch seconds).

        CPU is the difference of the last sample at or before ``start`` and the first at or
        after ``end`` (so a span is never under-counted by more than one interval); the peak
        is the largest RSS sampled in between.
        """
        with self._lock:
            times, cpu, rss = list(self._times), list(self._cpu), list(self._rss)
        if not times:
            return {"wall_s": round(end - start, 2), "cpu_s": None, "peak_rss_mb": None}
        i = max(bisect.bisect_right(times, start) - 1, 0)
        j = min(bisect.bisect_left(times, end), len(times) - 1)
        return {
            "wall_s": round(end - start, 2),
            "cpu_s": round(cpu[j] - cpu[i], 2),
            "peak_rss_mb": round(max(rss[i:j + 1]) / MB, 1),
        }


@dataclass(frozen=True)
class TaskSpan:
    task_id: str
    state: str
    start: float  # epoch seconds
    end: float


def task_spans(dag_id: str, day: dt.date) -> list[TaskSpan]:
    """The task instances of ``dag_id``'s run for ``day`` (logical date = the day's start),
    in the order they started; skipped tasks have no span and are left out."""
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    logical = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
    with create_session() as session:
        run = session.scalars(select(DagRun).where(DagRun.dag_id == dag_id,
                                                   DagRun.logical_date == logical)).one()
        tis = session.scalars(select(TaskInstance).where(TaskInstance.dag_id == dag_id,
                                                         TaskInstance.run_id == run.run_id))
        spans = [TaskSpan(ti.task_id, str(getattr(ti.state, "value", ti.state)),
                          ti.start_date.timestamp(), ti.end_date.timestamp())
                 for ti in tis if ti.start_date and ti.end_date
                 and str(getattr(ti.state, "value", ti.state)) != "skipped"]
    return sorted(spans, key=lambda s: s.start)


def task_figures(sampler: ResourceSampler, spans: list[TaskSpan]) -> dict[str, dict]:
    """Each task's wall time, CPU time and peak RSS, by task id."""
    return {s.task_id: {"state": s.state, **sampler.window(s.start, s.end)} for s in spans}
