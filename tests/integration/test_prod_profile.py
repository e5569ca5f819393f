"""The production profile for real: `shoprec up` on this machine's PostgreSQL and Redis
(Airflow api-server, scheduler, dag-processor and triggerer with the LocalExecutor, the MLflow
tracking server with basic auth, serving with 2 uvicorn workers), shoprec_daily triggered
through Airflow's REST API as the UI does, a 3-day `shoprec backfill`, recommendations from
the served champion, and `shoprec down`.

Fresh databases per session (dropped afterwards), a temporary SHOPREC_HOME, the tiny text
encoder and a small synthetic shop keep it to a few minutes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.prod]

START = dt.date(2026, 1, 1)
DAYS = 6  # training needs 5 days of history (3 to train, 1 to validate, 1 to test)
USERS = 500  # enough for the 100 training examples before the fifth day's validation cut
BACKFILL: dict[str, bool] = {}
DAG_ID = "shoprec_daily"
REPO = Path(__file__).resolve().parents[2]


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
    from conftest import _postgres_database, _redis_up, _service_missing

    if _postgres_database("postgres") is None:
        _service_missing("PostgreSQL")
    if not _redis_up(redis_db):
        _service_missing("Redis")
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
        **(extra_env or {}),
    })
    from features.synth import generate_shop
    from shoprec import services
    from shoprec.settings import Settings

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

    from shoprec.services import airflow_token

    return httpx.Client(base_url=f"{settings.airflow_url}/api/v2", timeout=30,
                        headers={"Authorization": f"Bearer {airflow_token(settings, user)}"})


def wait_for_dag(client, timeout: float = 120) -> None:
    """The dag-processor has parsed and serialized the DAG."""
    deadline = time.monotonic() + timeout
    while client.get(f"/dags/{DAG_ID}").status_code != 200:
        assert time.monotonic() < deadline, f"{DAG_ID} not parsed after {timeout} s"
        time.sleep(2)


def trigger_day(client, day: dt.date) -> str:
    """Unpause and trigger the DAG for ``day``'s data interval, as the UI's trigger form."""
    assert client.patch(f"/dags/{DAG_ID}", json={"is_paused": False}).status_code == 200
    start = dt.datetime.combine(day, dt.time(), dt.UTC)
    body = {"dag_run_id": f"manual__{day.isoformat()}", "logical_date": start.isoformat(),
            "data_interval_start": start.isoformat(),
            "data_interval_end": (start + dt.timedelta(days=1)).isoformat(), "conf": {}}
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


def known_user(settings) -> str:
    from features.contract import read_upto

    events = read_upto(settings.landing_root, "events", START + dt.timedelta(days=DAYS - 1))
    return str(events[events["event_type"] == "purchase"]["user_id"].value_counts().index[0])


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


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    with prod_stack(tmp_path_factory.mktemp("prod"), "prod", redis_db=11) as value:
        yield value


def test_up_starts_every_component_healthy_and_secured(stack) -> None:
    import httpx

    settings, result, output = stack
    assert list(result["components"]) == ["airflow-api-server", "airflow-scheduler",
                                          "airflow-dag-processor", "airflow-triggerer",
                                          "mlflow", "serving"]
    health = httpx.get(f"{settings.airflow_url}/api/v2/monitor/health").json()
    assert {health[k]["status"] for k in ("metadatabase", "scheduler", "triggerer",
                                          "dag_processor")} == {"healthy"}
    assert httpx.get(f"{settings.mlflow_server_url}/health").status_code == 200
    assert httpx.get(f"{settings.serving_url}/healthz").status_code == 200
    text = "\n".join(output)
    assert settings.airflow_url in text and settings.serving_url in text
    assert "passwords in" in text
    # Named users with roles: no anonymous access, a viewer cannot unpause.
    assert httpx.get(f"{settings.airflow_url}/api/v2/dags").status_code == 401
    assert api(settings, "viewer").patch(f"/dags/{DAG_ID}",
                                         json={"is_paused": False}).status_code == 403
    # MLflow basic auth: anonymous writes are refused, the service account gets in.
    create = f"{settings.mlflow_server_url}/api/2.0/mlflow/experiments/create"
    assert httpx.post(create, json={"name": "anonymous"}).status_code == 401
    assert httpx.get(f"{settings.mlflow_server_url}/api/2.0/mlflow/experiments/search",
                     params={"max_results": 1},
                     auth=(settings.mlflow_user, settings.secret("mlflow_password"))
                     ).status_code == 200
    # Serving admin calls need the token.
    assert httpx.post(f"{settings.serving_url}/admin/reload").status_code == 401
    # No secret value in what was printed, the logs or the PID file.
    from shoprec.services import log_dir, pid_file
    from shoprec.settings import SECRETS

    values = [settings.secret(n) for n in SECRETS]
    values += json.loads(settings.airflow_passwords_file.read_text()).values()
    texts = [text, pid_file(settings).read_text()]
    texts += [p.read_text(errors="replace") for p in log_dir(settings).glob("*.log")]
    for value in values:
        assert value and not any(value in t for t in texts)


def test_daily_runs_triggered_through_the_rest_api(stack) -> None:
    settings, _, _ = stack
    client = api(settings)
    wait_for_dag(client)
    for offset in (0, 1):  # the first two days: data stages (too little history to train)
        run = wait_for_run(client, trigger_day(client, START + dt.timedelta(days=offset)))
        assert run["state"] == "success", run["tasks"]
        assert run["tasks"]["validate"] == "success"
        assert run["tasks"]["materialize"] == "success"


def test_backfill_of_three_days_through_the_cli(stack) -> None:
    settings, _, _ = stack
    shoprec = str(Path(sys.executable).with_name("shoprec"))
    first, last = START + dt.timedelta(days=2), START + dt.timedelta(days=4)
    done = subprocess.run([shoprec, "backfill", "--start", first.isoformat(),
                           "--end", last.isoformat(), "--reprocess", "none", "--train", "last"],
                          capture_output=True, text=True, timeout=1500, env=os.environ)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    BACKFILL["ran"] = True
    client = api(settings)
    runs = client.get(f"/dags/{DAG_ID}/dagRuns", params={"run_type": "backfill"}).json()
    days = {r["data_interval_start"][:10] for r in runs["dag_runs"] if r["state"] == "success"}
    assert {(START + dt.timedelta(days=i)).isoformat() for i in (2, 3, 4)} <= days


def test_served_champion_recommends(stack) -> None:
    from serving.publish import champion_version

    settings, _, _ = stack
    assert BACKFILL.get("ran"), "the backfill test did not finish: nothing trained"
    assert champion_version(settings) is not None
    body = wait_for_recommendations(settings, known_user(settings))
    assert body["items"] and body["model_version"] == champion_version(settings)


def test_down_stops_every_recorded_process(stack) -> None:
    from shoprec import services

    settings, result, output = stack
    report = services.down(settings, echo=output.append)
    assert {r["component"] for r in report} == set(result["components"])
    assert not services.pid_file(settings).exists()
    for record in result["components"].values():
        assert not services._members(record), record
