"""What a state folder holds, read straight from its stores: Airflow's runs and task states
(SQLite metadata DB), MLflow's versions, metrics and tags (SQLite store), the offline
feature partitions. For the operations tests, which drive shoprec in subprocesses."""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path

import pyarrow.parquet as pq

START = dt.date(2026, 1, 1)
FEATURE_TABLES = ("user_recent_products", "user_profile", "product_stats", "product_text",
                  "product_catalog")
DATA_TASKS = ("validate", "build_features", "materialize")
MODEL_TASKS = ("train", "evaluate", "register", "build_index", "promote", "reload_serving")
# |daily - backfill| allowed on the final model's metrics (float formatting only)
METRIC_TOLERANCE = 1e-6


def day(i: int) -> dt.date:
    """The i-th day of the synthetic shop (1-based)."""
    return START + dt.timedelta(days=i - 1)


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


def run_tag(home: Path, run_id: str, key: str) -> str | None:
    with sqlite3.connect(home / "mlflow.db") as conn:
        row = conn.execute("select value from tags where run_uuid = ? and key = ?",
                           (run_id, key)).fetchone()
    return row[0] if row else None


def timing_metric(key: str) -> bool:
    """Metrics that measure the machine, not the model (throughput, seconds)."""
    return any(part in key for part in ("seconds", "per_s", "examples_s", "duration", "time"))


def champion(home: Path) -> str | None:
    """The version behind the champion alias (MLflow's SQLite store)."""
    with sqlite3.connect(home / "mlflow.db") as conn:
        row = conn.execute("select version from registered_model_aliases "
                           "where alias = 'champion'").fetchone()
    return str(row[0]) if row else None
