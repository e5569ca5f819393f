"""A task killed mid-run (SIGKILL: no cleanup, no exception handler) leaves no partial or
duplicated partition, and its rerun completes with exactly the outputs of a clean run.

Two levels: the feature build itself killed while a parquet file is half written, and a
whole Airflow DagRun (``dag.test`` in a child process, as `shoprec run` does) killed inside
its build_features task and then run again through Airflow.
"""

from __future__ import annotations

import datetime as dt
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from shops import shop_env, shoprec, synth

pytestmark = pytest.mark.operations

START = dt.date(2026, 1, 1)
FEATURE_TABLES = ("user_recent_products", "user_profile", "product_stats", "product_text",
                  "product_catalog")


KEYS = {"user_recent_products": "user_id", "user_profile": "user_id",
        "product_stats": "product_id", "product_text": "product_id",
        "product_catalog": "product_id"}

# A child process that runs CODE with pyarrow's writer slowed down: its KILL_AT-th parquet
# write into the offline feature store (a path under a "features" folder; the running
# snapshots validation and the build also write are not counted) writes half the rows to the
# file, leaves it without a footer, prints WRITING (on the original stdout) and waits to be
# killed.
_HARNESS = """
import os, sys, time
import pyarrow.parquet as pq
# the pipe to the test, kept even when the code sends fd 1 to a log file (shoprec run does)
signal_out = os.fdopen(os.dup(1), "w")
calls = [0]
real = pq.write_table
def write_table(table, where, *args, **kwargs):
    if "/features/" not in str(where):
        return real(table, where, *args, **kwargs)
    calls[0] += 1
    if calls[0] != {kill_at}:
        return real(table, where, *args, **kwargs)
    writer = pq.ParquetWriter(where, table.schema)
    writer.write_table(table.slice(0, max(1, table.num_rows // 2)))
    print("WRITING", where, file=signal_out, flush=True)
    time.sleep(300)
pq.write_table = write_table
{code}
"""


def _killed_mid_write(home: Path, code: str, kill_at: int, timeout: float = 300) -> str:
    """Run ``code`` in a child, SIGKILL it while its kill_at-th parquet file is half written.

    Returns:
        The path that was being written.
    """
    script = _HARNESS.format(kill_at=kill_at, code=textwrap.dedent(code))
    child = subprocess.Popen([sys.executable, "-c", script], env=shop_env(home),
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + timeout
    try:
        for line in child.stdout:
            if line.startswith("WRITING"):
                child.send_signal(signal.SIGKILL)
                child.wait(timeout=30)
                return line.split(" ", 1)[1].strip()
            if time.monotonic() > deadline:
                break
        raise AssertionError(f"the child never reached write #{kill_at} (exit {child.poll()})")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def _partition(root: Path, table: str, day: dt.date) -> Path:
    return root / table / f"date={day.isoformat()}" / "part-0.parquet"


def _assert_clean(offline_root: Path, reference_root: Path, day: dt.date) -> None:
    for table in FEATURE_TABLES:
        data = pq.read_table(_partition(offline_root, table, day))
        keys = data.column(KEYS[table]).to_pylist()
        assert len(keys) == len(set(keys)), f"{table} {day}: duplicate {KEYS[table]}"
        assert data.equals(pq.read_table(_partition(reference_root, table, day))), table
    leftovers = sorted(str(p) for p in offline_root.rglob(f"date={day.isoformat()}/*")
                       if p.name != "part-0.parquet")
    assert leftovers == []


@pytest.fixture
def small_shop(tmp_path: Path) -> Path:
    home = tmp_path / "state"
    synth(home, days=3, users=120, products=40, seed=3)
    return home


def test_feature_build_killed_while_writing_then_rerun(small_shop: Path) -> None:
    from features.build import build_features

    home = small_shop
    landing, offline = str(home / "landing"), home / "features"
    reference = home / "reference"
    for i in range(3):  # a clean build of every day, the reference
        build_features(landing, reference, START + dt.timedelta(days=i))
    for i in range(2):
        build_features(landing, offline, START + dt.timedelta(days=i))
    day3 = START + dt.timedelta(days=2)

    # day 3 for the first time: killed while writing its fourth table (product_stats)
    code = f"""
    import datetime as dt
    from features.build import build_features
    build_features({landing!r}, __import__("pathlib").Path({str(offline)!r}),
                   dt.date.fromisoformat({day3.isoformat()!r}))
    """
    half = _killed_mid_write(home, code, kill_at=4)
    assert "product_stats" in half and half.endswith(".tmp")
    # the half-written file never became the partition: readers see none for that table
    assert not _partition(offline, "product_stats", day3).exists()
    with pytest.raises(Exception):  # noqa: B017 - any parquet error: it has no footer
        pq.read_table(half)

    # day 3 rebuilt after it had completed: killed again, the complete partition survives
    build_features(landing, offline, day3)
    complete = pq.read_table(_partition(offline, "product_stats", day3))
    _killed_mid_write(home, code, kill_at=4)
    assert pq.read_table(_partition(offline, "product_stats", day3)).equals(complete)

    # the rerun completes: exactly a clean run's partitions, no duplicate keys, no leftovers
    build_features(landing, offline, day3)
    _assert_clean(offline, reference, day3)


def test_dag_run_killed_in_build_features_then_rerun_through_airflow(small_shop: Path) -> None:
    from features.build import build_features

    home = small_shop
    first = START
    reference = home / "reference"
    build_features(str(home / "landing"), reference, first)

    # `shoprec run` for day 1 in a child, SIGKILLed while build_features writes
    code = f"""
    import datetime as dt
    from core.settings import Settings
    from shoprec.runs import run_days
    settings = Settings.from_env().prepare()
    day = dt.date.fromisoformat({first.isoformat()!r})
    run_days(settings, day, day, train="none")
    """
    _killed_mid_write(home, code, kill_at=2)
    with sqlite3.connect(home / "airflow" / "airflow.db") as db:
        killed = dict(db.execute("select task_id, state from task_instance "
                                 "where dag_id = 'shoprec_daily'").fetchall())
    assert killed["validate"] == "success"
    assert killed["build_features"] == "running"  # died without telling anyone

    # the rerun, through Airflow again, completes the interval
    rerun = shoprec(home, "run", "--start", first.isoformat(), "--train", "none")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr[-3000:]
    with sqlite3.connect(home / "airflow" / "airflow.db") as db:
        runs = db.execute("select run_id, state, logical_date from dag_run "
                          "where dag_id = 'shoprec_daily'").fetchall()
        states = dict(db.execute("select task_id, state from task_instance "
                                 "where dag_id = 'shoprec_daily'").fetchall())
    assert len(runs) == 1 and runs[0][1] == "success"
    assert runs[0][2].startswith(first.isoformat())  # the scheduler's identity: logical = day
    assert {states[t] for t in ("validate", "build_features", "materialize")} == {"success"}
    _assert_clean(home / "features", reference, first)
    shutil.rmtree(reference)
