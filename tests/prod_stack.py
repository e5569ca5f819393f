"""The production profile on this machine's PostgreSQL and Redis (``shoprec up``), for the
operations tier: bring a stack up and down, drive Airflow's REST API as the UI does, wait for
served recommendations. One stack serves tests/operations/test_prod_profile.py, whose fault
tests run last on it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from shops import TEST_SHOP_GATE

START = dt.date(2026, 1, 1)
# Days 1-2 run through the REST API, 3-5 through a backfill (training needs 5 days of
# history: 3 to train, 1 to validate, 1 to test), 6-7 around the PostgreSQL restart.
DAYS = 7
USERS = 500  # enough for the 100 training examples before the fifth day's validation cut
DAG_ID = "shoprec_daily"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _drop_databases(names: list[str]) -> None:
    import psycopg

    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres",
                         autocommit=True, connect_timeout=5) as conn:
        for name in names:
            conn.execute(f'drop database if exists "{name}" with (force)')


@contextlib.contextmanager
def prod_stack(root: Path, tag: str, redis_db: int, components: list[str] | None = None,
               extra_env: dict[str, str] | None = None) -> Iterator[tuple]:
    """Bring up the production profile in ``root``; yield (settings, up's result, output).

    Tears everything down (``shoprec down``), restores the environment and drops the
    session's databases afterwards, whatever happened.
    """
    from shops import postgres_database, redis_up, service_missing

    if postgres_database("postgres") is None:
        service_missing("PostgreSQL")
    if not redis_up(redis_db):
        service_missing("Redis")
    import redis

    redis.Redis(host="127.0.0.1", port=6379, db=redis_db).flushdb()
    prefix = f"shoprec_{tag}_{os.getpid()}"
    databases = {kind: f"{prefix}_{kind}" for kind in ("airflow", "mlflow", "auth", "feast")}
    url = "postgresql+psycopg://postgres@127.0.0.1:5432/"
    home = root / "state"
    saved = dict(os.environ)
    for key in [k for k in os.environ if k.startswith(("SHOPREC_", "AIRFLOW", "MLFLOW_"))]:
        os.environ.pop(key)
    os.environ.update({
        "SHOPREC_PROFILE": "prod", "SHOPREC_HOME": str(home),
        "SHOPREC_LANDING_ROOT": str(home / "landing"), "SHOPREC_TEXT_ENCODER": "tiny",
        "SHOPREC_AIRFLOW_PORT": str(_free_port()), "SHOPREC_MLFLOW_PORT": str(_free_port()),
        "SHOPREC_SERVING_PORT": str(_free_port()), "SHOPREC_SERVING_POLL_SECONDS": "3",
        "SHOPREC_AIRFLOW_DB_URL": url + databases["airflow"],
        "SHOPREC_MLFLOW_BACKEND_URI": url + databases["mlflow"],
        "SHOPREC_MLFLOW_AUTH_DB_URL": url + databases["auth"],
        "SHOPREC_FEAST_REGISTRY_URL": url + databases["feast"],
        "SHOPREC_REDIS_URL": f"127.0.0.1:6379,db={redis_db}",
        "SHOPREC_FEAST_PROJECT": f"{tag}_{os.getpid()}",
        # The first trained model becomes champion even where it only ties the best baseline
        # (on this small shop it may): the served champion is what these tests need, the
        # gate's rules are tested in tests/integration/test_promotion_gate.py.
        "SHOPREC_PROMOTION_BEAT_BASELINE": "0",
        **TEST_SHOP_GATE,
        **(extra_env or {}),
    })
    from core.settings import Settings
    from features.synth import generate_shop
    from shoprec import services

    output: list[str] = []
    try:
        settings = Settings.from_env()
        generate_shop(settings.landing_root, days=DAYS, users=USERS, products=80, seed=11,
                      start=START)
        result = services.up(settings, components, timeout=300, echo=output.append)
        os.environ.update(result["env"])  # as `source $SHOPREC_HOME/run/env.sh` does
        yield Settings.from_env().with_services(), result, output
    finally:
        try:
            services.down(Settings.from_env(), echo=output.append)
        finally:
            os.environ.clear()
            os.environ.update(saved)
            with contextlib.suppress(Exception):
                _drop_databases(list(databases.values()))


def api(settings, user: str = "ops"):
    """An httpx client on Airflow's REST API, logged in as ``user`` like the UI."""
    import httpx

    from shoprec.credentials import airflow_token

    return httpx.Client(base_url=f"{settings.airflow_url}/api/v2", timeout=30,
                        headers={"Authorization": f"Bearer {airflow_token(settings, user)}"})


def wait_for_dag(client, timeout: float = 120) -> None:
    """The dag-processor has parsed and serialized the DAG."""
    deadline = time.monotonic() + timeout
    while client.get(f"/dags/{DAG_ID}").status_code != 200:
        assert time.monotonic() < deadline, f"{DAG_ID} not parsed after {timeout} s"
        time.sleep(2)


def trigger_day(client, day: dt.date, conf: dict | None = None) -> str:
    """Unpause and trigger the DAG for ``day``'s data interval, as the UI's trigger form
    (``conf``: the run's params, e.g. ``{"train": "none"}``)."""
    assert client.patch(f"/dags/{DAG_ID}", json={"is_paused": False}).status_code == 200
    start = dt.datetime.combine(day, dt.time(), dt.UTC)
    body = {"dag_run_id": f"manual__{day.isoformat()}", "logical_date": start.isoformat(),
            "data_interval_start": start.isoformat(),
            "data_interval_end": (start + dt.timedelta(days=1)).isoformat(),
            "conf": conf or {}}
    response = client.post(f"/dags/{DAG_ID}/dagRuns", json=body)
    assert response.status_code == 200, response.text
    return response.json()["dag_run_id"]


def wait_for_run(client, run_id: str, timeout: float = 900) -> dict:
    """Wait for a DagRun to finish; on failure, name the failed tasks."""
    deadline = time.monotonic() + timeout
    while True:
        run = client.get(f"/dags/{DAG_ID}/dagRuns/{run_id}").json()
        if run["state"] in ("success", "failed"):
            break
        assert time.monotonic() < deadline, f"{run_id} still {run['state']} after {timeout} s"
        time.sleep(3)
    tasks = client.get(f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances").json()
    run["tasks"] = {t["task_id"]: t["state"] for t in tasks["task_instances"]}
    return run


def wait_for_recommendations(settings, user: str, timeout: float = 180) -> dict:
    """GET /recommend until every worker answers 200 with items (the poll loads the
    champion in each uvicorn worker)."""
    import httpx

    deadline = time.monotonic() + timeout
    streak, body = 0, {}
    while streak < 8:
        response = httpx.get(f"{settings.serving_url}/recommend/{user}", params={"k": 5},
                             timeout=30)
        if response.status_code == 200 and response.json()["items"]:
            streak, body = streak + 1, response.json()
        else:
            streak = 0
            assert time.monotonic() < deadline, f"no recommendations: {response.text}"
            time.sleep(2)
    return body


