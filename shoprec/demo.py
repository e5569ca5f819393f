"""`shoprec demo`: the whole chain on a synthetic shop, on the embedded local profile.

synthetic landing data -> shoprec_daily through Airflow, one run per day -> MLflow champion
-> the HTTP server -> real recommendations printed for a few users.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from core.settings import Settings
from shoprec import supervisor

DEMO_START = dt.date(2026, 1, 1)
DEMO_SEED = 7


def _record_file(settings: Settings) -> Path:
    """Where the demo keeps its server's process record (shoprec.supervisor's)."""
    return settings.home / "run" / "demo-serving.json"


def stop_server(settings: Settings) -> bool:
    """Stop the server a previous demo left running (its record says which); True when one
    was still running."""
    path = _record_file(settings)
    if not path.exists():
        return False
    record = json.loads(path.read_text())
    path.unlink()
    report = supervisor.stop({"serving": record}, grace=5.0)
    return report[0]["processes"] > 0


def start_server(settings: Settings, port: int, timeout: float = 120.0) -> tuple[int, str]:
    """Start `uvicorn serving.app` in its own process group and wait until /readyz says
    ready.

    Returns:
        (pid, base url)
    """
    url = f"http://127.0.0.1:{port}"
    record = supervisor.start(
        [sys.executable, "-m", "uvicorn", "--factory", "serving.app:create_app",
         "--host", "127.0.0.1", "--port", str(port)],
        {**os.environ, **settings.service_env()}, settings.home / "logs" / "serving.log",
        by="shoprec demo")
    path = _record_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    try:
        supervisor.wait_healthy(
            {"serving": record},
            lambda pending: pending if supervisor.http_ok(f"{url}/readyz", timeout=2) else [],
            timeout)
    except supervisor.ProcessFailed:
        stop_server(settings)  # do not leave a server that never became ready
        raise
    return record["pid"], url


def demo_users(settings: Settings, last_day: dt.date, n: int = 3) -> list[str]:
    """The most active buyers of the last week: their recommendations are worth reading."""
    from features.contract import read_range

    days = [last_day - dt.timedelta(days=i) for i in range(7)]
    events = read_range(settings.landing_root, "events", days)
    buyers = events[events["event_type"] == "purchase"]["user_id"].value_counts()
    return sorted(buyers.index[:n])


def _ensure_champion(settings: Settings, echo: Callable[[str], None]) -> None:
    """If no version passed the gate, say why and promote the latest one by hand, as a
    reviewer would with `shoprec model promote` (recorded on the version as such)."""
    from training.registry import CHAMPION, TAG_GATE, alias_version, mlflow_client, set_champion

    client = mlflow_client(settings)
    if alias_version(client, settings.model_name, CHAMPION) is not None:
        return
    versions = client.search_model_versions(f"name = '{settings.model_name}'")
    if not versions:
        return
    latest = max(versions, key=lambda v: int(v.version))
    gate = json.loads(latest.tags.get(TAG_GATE, "{}")).get("reason", "not evaluated")
    echo(f"      no version passed the promotion gate on this short synthetic history "
         f"(v{latest.version}: {gate});")
    echo(f"      the demo promotes v{latest.version} by hand, as `shoprec model promote "
         f"{latest.version}` would")
    set_champion(settings, str(latest.version),
                 reason="demo: no version passed the gate on the synthetic history",
                 actor="shoprec demo")


def run_demo(settings: Settings, *, days: int, users: int, products: int, port: int,
             keep_serving: bool, echo: Callable[[str], None] = print) -> bool:
    """Run the demo end to end; True when recommendations were served."""
    from features.synth import generate_shop
    from shoprec.runs import run_days

    started = time.monotonic()
    last_day = DEMO_START + dt.timedelta(days=days - 1)
    echo(f"[1/4] synthetic shop: {days} days, {users} users, {products} products "
         f"-> {settings.landing_root}")
    echo("      " + str(generate_shop(settings.landing_root, days=days, users=users,
                                      products=products, seed=DEMO_SEED, start=DEMO_START)))
    echo(f"[2/4] shoprec_daily through Airflow for {DEMO_START} .. {last_day} "
         f"(metadata DB: {settings.airflow_home / 'airflow.db'})")
    results = run_days(settings, DEMO_START, last_day, echo=lambda line: echo("      " + line))
    if not results or results[-1].state != "success":
        echo("the pipeline failed; see the task logs under "
             f"{settings.airflow_home / 'logs'}")
        return False
    _ensure_champion(settings, echo)
    echo(f"[3/4] serving the champion on port {port}")
    stop_server(settings)
    pid, url = start_server(settings, port)
    version = httpx.get(f"{url}/version", timeout=10).json()
    echo(f"      {version['model_name']} v{version['model_version']} trained on "
         f"{version['interval']}, {version['index_kind']} index over "
         f"{version['index_size']} products (pid {pid})")
    echo("[4/4] recommendations")
    for user_id in [*demo_users(settings, last_day), "U-new-visitor"]:
        body = httpx.get(f"{url}/recommend/{user_id}", params={"k": 5}, timeout=30).json()
        label = " (new visitor: popular fallback)" if body["cold_start"] else ""
        echo(f"  GET /recommend/{user_id}?k=5{label}")
        for item in body["items"]:
            echo(f"      {item['score']:8.3f}  {item['product_id']}  {item['title'][:48]:<48}"
                 f"  {item['reason']}")
    if not keep_serving:
        stop_server(settings)
    minutes = (time.monotonic() - started) / 60
    home = settings.home
    echo(f"\nDone in {minutes:.1f} min. State lives in {home}.")
    echo("Look around:")
    if keep_serving:
        echo(f"  API docs     {url}/docs    (try: curl {url}/recommend/{demo_users(settings, last_day, 1)[0]})")
        echo(f"  stop server  kill -TERM -{pid}   (its process group)")
    echo('  environment  eval "$(.venv/bin/shoprec env)"   # then airflow/mlflow see this state')
    echo("  Airflow UI   AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=True "
         ".venv/bin/airflow api-server --port 8080   -> http://127.0.0.1:8080")
    echo(f"  MLflow UI    .venv/bin/mlflow ui --backend-store-uri {settings.mlflow_tracking_uri} "
         "--port 5000   -> http://127.0.0.1:5000")
    return True
