"""`shoprec backfill`: real Airflow backfills (run type backfill) on the embedded profile.

Each backfill here is the command an operator runs, in a subprocess: it creates the backfill
with `airflow backfill create`, starts an api-server and a scheduler for the duration (no
scheduler serves the test's metadata DB) and waits. What is checked reads the Airflow and
MLflow SQLite databases and the feature partitions directly.

The acceptance test: 14 scheduled daily runs (``shoprec run``, one DagRun per day, training
every trainable day, each warm-started from the champion) against a 14-day backfill that
trains on every interval too (``--train each``). Same data, same windows, same seed, same
chain of warm starts: the features must be identical partition by partition and the final
model's metrics identical (CPU training is deterministic for a fixed seed and thread count;
``METRIC_TOLERANCE`` only absorbs float formatting). With the default ``--train last`` the
backfill trains one model from scratch instead of ten warm-started ones, so its two-tower
metrics differ by design (measured once: see the README's Operations section); the policy
tests above check what ``last`` does.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

START = dt.date(2026, 1, 1)
SHOPREC = str(Path(sys.executable).with_name("shoprec"))
FEATURE_TABLES = ("user_recent_products", "user_profile", "product_stats", "product_text",
                  "product_catalog")
DATA_TASKS = ("validate", "build_features", "materialize")
MODEL_TASKS = ("train", "evaluate", "register", "build_index", "promote", "reload_serving")
# |daily - backfill| allowed on the final model's metrics (float formatting only)
METRIC_TOLERANCE = 1e-6


def day(i: int) -> dt.date:
    """The i-th day of the synthetic shop (1-based)."""
    return START + dt.timedelta(days=i - 1)


def shop_env(home: Path) -> dict[str, str]:
    """A clean environment for one state folder: nothing inherited from other tests."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW", "SHOPREC_", "MLFLOW_"))}
    env.update({"SHOPREC_HOME": str(home), "SHOPREC_LANDING_ROOT": str(home / "landing"),
                "SHOPREC_TEXT_ENCODER": "tiny", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "GX_ANALYTICS_ENABLED": "False"})
    return env


def shoprec(home: Path, *args: str, timeout: float = 1500) -> subprocess.CompletedProcess:
    started = time.monotonic()
    done = subprocess.run([SHOPREC, *args], env=shop_env(home), capture_output=True, text=True,
                          timeout=timeout)
    done.seconds = time.monotonic() - started  # type: ignore[attr-defined]
    return done


def synth(home: Path, days: int, users: int = 250, products: int = 80, seed: int = 11) -> None:
    done = shoprec(home, "data", "synth", "--days", str(days), "--users", str(users),
                   "--products", str(products), "--seed", str(seed),
                   "--start", START.isoformat())
    assert done.returncode == 0, done.stderr[-3000:]


def airflow_rows(home: Path, sql: str, *args) -> list[tuple]:
    with sqlite3.connect(home / "airflow" / "airflow.db") as db:
        return db.execute(sql, args).fetchall()


def backfill_runs(home: Path, backfill_id: int) -> list[dict]:
    rows = airflow_rows(home, """
        select run_id, run_type, logical_date, data_interval_start, conf, start_date, end_date,
               state
        from dag_run where dag_id = 'shoprec_daily' and backfill_id = ?
        order by logical_date""", backfill_id)
    keys = ("run_id", "run_type", "logical_date", "interval_start", "conf", "start", "end",
            "state")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def task_states(home: Path, run_id: str) -> dict[str, str]:
    return dict(airflow_rows(home, "select task_id, state from task_instance "
                                   "where dag_id = 'shoprec_daily' and run_id = ?", run_id))


def last_backfill_id(home: Path) -> int:
    return airflow_rows(home, "select max(id) from backfill")[0][0]


def model_versions(home: Path) -> list[dict]:
    """Registered versions with their interval tag and run id (MLflow's SQLite store)."""
    db = home / "mlflow.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        if not conn.execute("select name from sqlite_master where name = 'model_versions'"
                            ).fetchone():
            return []
        rows = conn.execute("""
            select v.version, v.run_id, t.value from model_versions v
            left join model_version_tags t on t.name = v.name and t.version = v.version
                 and t.key = 'shoprec.interval'
            order by v.version""").fetchall()
    return [{"version": str(v), "run_id": r, "interval": i} for v, r, i in rows]


def run_metrics(home: Path, run_id: str) -> dict[str, float]:
    with sqlite3.connect(home / "mlflow.db") as conn:
        return dict(conn.execute("select key, value from latest_metrics where run_uuid = ?",
                                 (run_id,)).fetchall())


def partitions(home: Path, days: list[dt.date]) -> dict[tuple[str, str], object]:
    """Every offline feature partition of the given days, as Arrow tables."""
    out = {}
    for table in FEATURE_TABLES:
        for d in days:
            path = home / "features" / table / f"date={d.isoformat()}" / "part-0.parquet"
            assert path.exists(), path
            out[(table, d.isoformat())] = pq.read_table(path)
    return out


def assert_same_partitions(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    different = [key for key in left if not left[key].equals(right[key])]
    assert different == [], f"partitions differ: {different}"


# --- train policy, ordering and idempotency on a 7-day shop ------------------------------------

@pytest.fixture(scope="module")
def policy_shop(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Days 1-4 through `shoprec run --train none`, then three backfills of days 5-7:

    A: --start day 4 (already run) --reprocess none --train none
    B: --reprocess completed --train last
    C: the same again (idempotency)
    """
    home = tmp_path_factory.mktemp("backfill") / "state"
    synth(home, days=7)
    prefix = shoprec(home, "run", "--start", day(1).isoformat(), "--end", day(4).isoformat(),
                     "--train", "none")
    assert prefix.returncode == 0, prefix.stdout + prefix.stderr[-3000:]
    out: dict = {"home": home, "steps": {}}
    steps = {
        "none": ("--start", day(4).isoformat(), "--end", day(7).isoformat(),
                 "--reprocess", "none", "--train", "none"),
        "last": ("--start", day(5).isoformat(), "--end", day(7).isoformat(),
                 "--reprocess", "completed", "--train", "last"),
        "again": ("--start", day(5).isoformat(), "--end", day(7).isoformat(),
                  "--reprocess", "completed", "--train", "last"),
    }
    for name, args in steps.items():
        done = shoprec(home, "backfill", *args)
        print(f"backfill {name}: {done.seconds:.0f}s, exit {done.returncode}\n{done.stdout}")
        assert done.returncode == 0, done.stdout + done.stderr[-3000:]
        backfill_id = last_backfill_id(home)
        out["steps"][name] = {
            "rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr,
            "seconds": done.seconds, "backfill_id": backfill_id,
            "runs": backfill_runs(home, backfill_id),
            "states": {r["run_id"]: task_states(home, r["run_id"])
                       for r in backfill_runs(home, backfill_id)},
            "partitions": partitions(home, [day(5), day(6), day(7)]),
            "versions": model_versions(home),
        }
    return out


def test_backfill_runs_are_real_backfill_runs_in_date_order(policy_shop: dict) -> None:
    home = policy_shop["home"]
    step = policy_shop["steps"]["none"]
    assert step["rc"] == 0, step["stdout"] + step["stderr"][-3000:]
    runs = step["runs"]
    # day 4 already had a finished run (shoprec run): reprocess none leaves it alone
    assert [r["logical_date"][:10] for r in runs] == [day(i).isoformat() for i in (5, 6, 7)]
    assert {r["run_type"] for r in runs} == {"backfill"}
    assert all(r["logical_date"] == r["interval_start"] for r in runs)
    assert all(json.loads(r["conf"]) == {"train": "none", "backfill_end": day(7).isoformat()}
               for r in runs)
    assert all(r["state"] == "success" for r in runs)
    # one interval at a time, in date order
    for earlier, later in zip(runs, runs[1:], strict=False):
        assert earlier["end"] <= later["start"], (earlier, later)
    lines = step["stdout"].splitlines()
    assert any(line.startswith(f"{day(4)}  not run (already exists)") for line in lines)
    assert sum(1 for line in lines if line[:10] in {day(i).isoformat() for i in (5, 6, 7)}
               and "success" in line) == 3
    summary = next(line for line in lines if line.startswith("backfill ") and " done, " in line)
    assert "3 done, 0 failed, 0 quarantined, 1 not run" in summary
    # the embedded scheduler and api-server are gone, and the backfill is marked complete
    assert airflow_rows(home, "select completed_at is not null from backfill where id = ?",
                        step["backfill_id"]) == [(1,)]


def test_train_none_runs_the_data_stages_only(policy_shop: dict) -> None:
    step = policy_shop["steps"]["none"]
    for run in step["runs"]:
        states = step["states"][run["run_id"]]  # as that backfill left them
        assert all(states[t] == "success" for t in DATA_TASKS), states
        assert all(states[t] == "skipped" for t in MODEL_TASKS), states
    assert step["versions"] == []


def test_train_last_trains_exactly_one_model_on_the_last_interval(policy_shop: dict) -> None:
    home = policy_shop["home"]
    step = policy_shop["steps"]["last"]
    assert step["rc"] == 0, step["stdout"] + step["stderr"][-3000:]
    runs = step["runs"]
    # reprocess completed: the same three runs, cleared and run again as backfill runs
    assert [r["run_id"] for r in runs] == [r["run_id"] for r in policy_shop["steps"]["none"]
                                           ["runs"]]
    trained = {r["logical_date"][:10]: task_states(home, r["run_id"])["train"] for r in runs}
    assert trained == {day(5).isoformat(): "skipped", day(6).isoformat(): "skipped",
                       day(7).isoformat(): "success"}
    assert [v["interval"] for v in step["versions"]] == [day(7).isoformat()]
    assert all(json.loads(r["conf"])["train"] == "last" for r in runs)
    summary = step["stdout"].splitlines()[-2]
    assert "3 done, 0 failed" in summary and "champion now" in summary


def test_rerunning_a_completed_range_is_idempotent(policy_shop: dict) -> None:
    steps = policy_shop["steps"]
    assert steps["again"]["rc"] == 0, steps["again"]["stdout"] + steps["again"]["stderr"]
    # same feature partitions every time the range is processed
    assert_same_partitions(steps["none"]["partitions"], steps["last"]["partitions"])
    assert_same_partitions(steps["last"]["partitions"], steps["again"]["partitions"])
    # no new model version: the interval's MLflow run and version are reused
    assert steps["again"]["versions"] == steps["last"]["versions"]
    assert len(steps["again"]["versions"]) == 1


# --- acceptance: a 14-day backfill against 14 scheduled daily runs -----------------------------

ACCEPTANCE_DAYS = 14


@pytest.fixture(scope="module")
def daily_and_backfill(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("acceptance")
    daily_home, backfill_home = root / "daily" / "state", root / "backfill" / "state"
    for home in (daily_home, backfill_home):
        synth(home, days=ACCEPTANCE_DAYS, users=250, products=80, seed=11)
    last = day(ACCEPTANCE_DAYS).isoformat()
    daily = shoprec(daily_home, "run", "--start", day(1).isoformat(), "--end", last)
    print(f"14 daily runs: {daily.seconds:.0f}s\n{daily.stdout}")
    backfill = shoprec(backfill_home, "backfill", "--start", day(1).isoformat(), "--end", last,
                       "--train", "each")
    print(f"14-day backfill: {backfill.seconds:.0f}s\n{backfill.stdout}")
    return {"daily": daily, "backfill": backfill, "daily_home": daily_home,
            "backfill_home": backfill_home}


def test_backfill_of_14_days_matches_14_daily_runs(daily_and_backfill: dict) -> None:
    daily, backfill = daily_and_backfill["daily"], daily_and_backfill["backfill"]
    assert daily.returncode == 0, daily.stdout + daily.stderr[-3000:]
    assert backfill.returncode == 0, backfill.stdout + backfill.stderr[-3000:]
    daily_home, backfill_home = daily_and_backfill["daily_home"], \
        daily_and_backfill["backfill_home"]
    days = [day(i) for i in range(1, ACCEPTANCE_DAYS + 1)]

    # 1. the features are identical, partition by partition
    assert_same_partitions(partitions(daily_home, days), partitions(backfill_home, days))

    # 2. the same model versions, interval by interval, and the same champion
    daily_versions = model_versions(daily_home)
    backfill_versions = model_versions(backfill_home)
    assert len(daily_versions) >= 2
    assert [v["interval"] for v in backfill_versions] == [v["interval"] for v in daily_versions]
    assert champion(daily_home) == champion(backfill_home) is not None

    # 3. the final model's metrics: every one the same
    last = days[-1].isoformat()
    final_daily = next(v for v in daily_versions if v["interval"] == last)
    final_backfill = next(v for v in backfill_versions if v["interval"] == last)
    ours = run_metrics(daily_home, final_daily["run_id"])
    theirs = run_metrics(backfill_home, final_backfill["run_id"])
    assert ours.keys() == theirs.keys()
    assert {"recall_at_50", "ndcg_at_10", "new_recall_at_50", "two_tower_recall_at_50",
            "baseline_repeat_recall_at_50"} <= ours.keys()
    different = {k: (ours[k], theirs[k]) for k in ours
                 if abs(ours[k] - theirs[k]) > METRIC_TOLERANCE and not _timing(k)}
    assert different == {}, different
    print("final model metrics (daily = backfill):",
          json.dumps({k: ours[k] for k in ("recall_at_50", "ndcg_at_10", "new_recall_at_50",
                                            "two_tower_recall_at_50")}))


def _timing(key: str) -> bool:
    """Metrics that measure the machine, not the model (throughput, seconds)."""
    return any(part in key for part in ("seconds", "per_s", "examples_s", "duration", "time"))


def champion(home: Path) -> str | None:
    """The version behind the champion alias (MLflow's SQLite store)."""
    with sqlite3.connect(home / "mlflow.db") as conn:
        row = conn.execute("select version from registered_model_aliases "
                           "where alias = 'champion'").fetchone()
    return str(row[0]) if row else None
