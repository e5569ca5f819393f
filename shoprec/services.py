"""`shoprec up` / `shoprec down`: start and stop every component of a profile.

``up`` starts Airflow's api-server, scheduler, dag-processor and triggerer (each its own
process, after ``airflow db migrate``; never ``airflow standalone``, whose children outlive
a SIGTERM), the MLflow tracking server and the serving API, each in its own process group under
shoprec.keeper, which starts a component again when it exits after start-up (a PostgreSQL
restart makes Airflow's scheduler, dag-processor and triggerer exit).
It records every PID, process-group id and start time in ``$SHOPREC_HOME/run/services.json``,
waits until each component reports healthy and prints the URLs and the login. ``down`` stops
exactly the recorded processes: SIGTERM to each group, SIGKILL after a timeout (Airflow's
scheduler may ignore SIGTERM), and only after checking that a PID still belongs to the
process that ``up`` started (same boot, same start time), so a reused PID is never hit.
Starting, health waits and stopping are shoprec.supervisor's; secrets and logins are
shoprec.credentials'.

In the prod profile (``SHOPREC_PROFILE=prod``) Airflow's metadata DB and MLflow's backend and
auth stores live in PostgreSQL (databases created when missing), Airflow runs the
LocalExecutor with the simple auth manager's named users and roles, MLflow runs its
basic-auth app, and serving runs two uvicorn workers behind ``SHOPREC_ADMIN_TOKEN``. Every
secret comes from the environment, the ``SHOPREC_CONFIG`` file or ``secrets_dir``; missing
ones are generated there (mode 0600) on the first ``up``. Logs, the PID file and the output
name where a secret lives, never its value.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer

from core.settings import PROJECT_ROOT, SECRETS, Settings
from shoprec import credentials, supervisor

AIRFLOW_COMPONENTS = ("airflow-api-server", "airflow-scheduler", "airflow-dag-processor",
                      "airflow-triggerer")
COMPONENTS = (*AIRFLOW_COMPONENTS, "mlflow", "serving")
# Secrets each component's process needs in its environment (and nothing more).
_AIRFLOW_SECRETS = ("airflow_jwt_secret", "airflow_api_secret_key", "airflow_fernet_key")
STOP_TIMEOUT_S = 20.0


@dataclass
class Component:
    """One process that ``up`` starts."""

    name: str
    cmd: list[str]
    env: dict[str, str] = field(repr=False)
    url: str
    health: str  # the URL that answers 200 when the component is healthy


# ----------------------------------------------------------------------- PostgreSQL


def _postgres_target(url: str) -> tuple[str, str] | None:
    """(libpq conninfo of the server's ``postgres`` DB, database name) for a PostgreSQL URL."""
    parts = urlsplit(url)
    if not parts.scheme.startswith("postgresql"):
        return None
    name = parts.path.lstrip("/")
    conninfo = {"host": parts.hostname or "127.0.0.1", "port": str(parts.port or 5432),
                "user": parts.username or "postgres", "dbname": "postgres"}
    if parts.password:
        conninfo["password"] = parts.password
    return " ".join(f"{k}={v}" for k, v in conninfo.items()), name


def ensure_databases(urls: Iterable[str]) -> list[str]:
    """Create each PostgreSQL database named by ``urls`` that does not exist yet.

    Returns:
        The databases created.
    """
    import psycopg

    created = []
    for url in urls:
        target = _postgres_target(url) if url else None
        if target is None:
            continue
        conninfo, name = target
        with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as conn:
            if not conn.execute("select 1 from pg_database where datname = %s",
                                (name,)).fetchone():
                conn.execute(f'create database "{name}"')
                created.append(name)
    return created


# ---------------------------------------------------------------------- records


def run_dir(settings: Settings) -> Path:
    return settings.home / "run"


def pid_file(settings: Settings) -> Path:
    """``$SHOPREC_HOME/run/services.json``: what ``up`` started."""
    return run_dir(settings) / "services.json"


def log_dir(settings: Settings) -> Path:
    return settings.home / "logs"


def _read_records(settings: Settings) -> dict[str, dict[str, Any]]:
    path = pid_file(settings)
    if not path.exists():
        return {}
    return json.loads(path.read_text()).get("components", {})


def _write_records(settings: Settings, records: dict[str, dict[str, Any]]) -> None:
    path = pid_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"profile": settings.profile, "components": records}, indent=1))
    tmp.replace(path)


# ---------------------------------------------------------------------- components


def _secret_env(settings: Settings, names: Iterable[str]) -> dict[str, str]:
    return {SECRETS[n]: value for n in names if (value := settings.secret(n))}


def components(settings: Settings) -> list[Component]:
    """The processes of this profile, with their commands and environments.

    Args:
        settings: ``Settings.with_services()`` (MLflow through its server, URLs set).
    """
    prod = settings.profile == "prod"
    base = {**os.environ, **settings.service_env(),
            "SHOPREC_MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
            "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
            "SHOPREC_AIRFLOW_API_URL": settings.airflow_api_url,
            "SHOPREC_SERVING_URL": settings.serving_url,
            "PYTHONUNBUFFERED": "1"}
    for variable in (*SECRETS.values(), "MLFLOW_TRACKING_USERNAME", "MLFLOW_AUTH_ADMIN_USERNAME"):
        base.pop(variable, None)  # each component gets exactly the secrets it needs, below
    client = {**settings.client_credentials(), **_secret_env(settings, ["serving_admin_token"])}
    airflow_env = {**base, **client,
                   **(_secret_env(settings, _AIRFLOW_SECRETS) if prod else
                      {"AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True"})}
    airflow = supervisor.executable("airflow")
    out = [
        Component("airflow-api-server",
                  [airflow, "api-server", "--host", settings.airflow_host,
                   "--port", str(settings.airflow_port)],
                  airflow_env, settings.airflow_url,
                  f"{settings.airflow_url}/api/v2/monitor/health"),
        Component("airflow-scheduler", [airflow, "scheduler"], airflow_env, "", ""),
        Component("airflow-dag-processor", [airflow, "dag-processor"], airflow_env, "", ""),
        Component("airflow-triggerer", [airflow, "triggerer"], airflow_env, "", ""),
    ]
    mlflow_cmd = [supervisor.executable("mlflow"), "server", "--host", settings.mlflow_host,
                  "--port", str(settings.mlflow_port), "--workers", "1"]
    mlflow_env = dict(base)
    # URLs that carry a password go through the environment, never the command line (ps).
    for flag, variable, value in (
            ("--backend-store-uri", "MLFLOW_BACKEND_STORE_URI", settings.mlflow_backend_uri),
            ("--artifacts-destination", "MLFLOW_ARTIFACTS_DESTINATION",
             settings.mlflow_artifacts_destination)):
        if urlsplit(value).password:
            mlflow_env[variable] = value
        else:
            mlflow_cmd += [flag, value]
    if prod:
        mlflow_cmd += ["--app-name", "basic-auth"]
        mlflow_env.update({
            "MLFLOW_AUTH_CONFIG_PATH": str(credentials.mlflow_auth_config(settings)),
            "MLFLOW_AUTH_ADMIN_USERNAME": settings.mlflow_admin_user,
            **_secret_env(settings, ["mlflow_admin_password", "mlflow_flask_secret_key"]),
        })
    out.append(Component("mlflow", mlflow_cmd, mlflow_env, settings.mlflow_server_url,
                         f"{settings.mlflow_server_url}/health"))
    serving_env = {**base, **client}
    # The champion poll is the retry loop: one poll must not hang in MLflow's own retries
    # (7 with exponential backoff by default) while the tracking server is down.
    serving_env.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    serving_env.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    serving_url = f"http://{settings.serving_host}:{settings.serving_port}"
    out.append(Component(
        "serving",
        [supervisor.executable("uvicorn"), "--factory", "serving.app:create_app",
         "--host", settings.serving_host, "--port", str(settings.serving_port), "--workers", str(settings.serving_workers)],
        serving_env, serving_url, f"{serving_url}/healthz"))
    return out


def _start(component: Component, settings: Settings) -> dict[str, Any]:
    """Start one component (its own process group) under ``shoprec.keeper``, which starts
    it again whenever it exits after start-up (Airflow's scheduler exits when its database
    connection dies); its record, with its URLs."""
    kept = [sys.executable, "-m", "shoprec.keeper", "--name", component.name, "--",
            *component.cmd]
    record = supervisor.start(kept, component.env,
                              log_dir(settings) / f"{component.name}.log", by="shoprec up",
                              cwd=PROJECT_ROOT)
    return {**record, "url": component.url, "health": component.health}


def _healthy(record: dict[str, Any], name: str, airflow_health: dict | None) -> bool:
    """Airflow's scheduler, dag-processor and triggerer: as the api-server's health endpoint
    reports them; the others: their own health URL answers 200."""
    if name.startswith("airflow-") and name != "airflow-api-server":
        key = name.removeprefix("airflow-").replace("-", "_")
        status = (airflow_health or {}).get(key, {}).get("status")
        return status == "healthy"
    return supervisor.http_ok(record["health"])


def _airflow_health(settings: Settings) -> dict | None:
    import httpx

    try:
        response = httpx.get(f"{settings.airflow_url}/api/v2/monitor/health", timeout=5)
        return response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def wait_healthy(settings: Settings, names: Iterable[str], records: dict[str, dict[str, Any]],
                 timeout: float, echo: Callable[[str], None] = print) -> None:
    """Wait until every named component answers healthy.

    Raises:
        supervisor.ProcessFailed: one exited or is not healthy within ``timeout`` (names
            its log).
    """
    def healthy_now(pending: list[str]) -> list[str]:
        health = _airflow_health(settings) if any(n.startswith("airflow") for n in pending) \
            else None
        return [n for n in pending if _healthy(records[n], n, health)]

    supervisor.wait_healthy({n: records[n] for n in names}, healthy_now, timeout, echo)


def env_lines(settings: Settings) -> list[str]:
    """Shell lines that point a shell's `shoprec`, `airflow` and `mlflow` at the running
    services; secrets are read from their files at eval time, never written out."""
    settings = settings.with_services()
    values = {**settings.service_env(),
              "SHOPREC_MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
              "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
              "SHOPREC_AIRFLOW_API_URL": settings.airflow_api_url,
              "SHOPREC_SERVING_URL": settings.serving_url}
    lines = [f"export {k}={shlex.quote(v)}" for k, v in sorted(values.items())]
    if settings.profile == "prod":
        lines.append(f"export MLFLOW_TRACKING_USERNAME={shlex.quote(settings.mlflow_user)}")
        for name, variable in (("mlflow_password", "MLFLOW_TRACKING_PASSWORD"),
                               ("serving_admin_token", "SHOPREC_ADMIN_TOKEN")):
            if (settings.secrets_dir / name).exists():  # else the operator's variable
                path = shlex.quote(str(settings.secrets_dir / name))
                lines.append(f'export {variable}="$(cat {path})"')
    return lines


def login_lines(settings: Settings) -> list[str]:
    """Who logs in where, and where each password lives (never the password)."""
    if settings.profile != "prod":
        return ["Airflow: no login (local profile: everyone is admin); MLflow: no auth"]
    passwords = settings.airflow_passwords_file or settings.secrets_dir / "airflow_passwords.json"
    users = ", ".join(f"{u} ({r})" for u, r in credentials.airflow_users(settings).items())
    where = (f"${SECRETS['mlflow_admin_password']}"
             if os.environ.get(SECRETS["mlflow_admin_password"])
             else settings.secrets_dir / "mlflow_admin_password")
    token = ("$SHOPREC_ADMIN_TOKEN" if os.environ.get("SHOPREC_ADMIN_TOKEN")
             else settings.secrets_dir / "serving_admin_token")
    return [f"Airflow users: {users}; passwords in {passwords}",
            f"MLflow: user {settings.mlflow_admin_user!r} (admin), password in {where}; "
            f"the pipeline and serving log in as {settings.mlflow_user!r}",
            f"Serving admin calls (POST /admin/reload): bearer token in {token}"]


def up(settings: Settings | None = None, components_to_start: Iterable[str] | None = None,
       *, timeout: float = 300.0, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Start every component of the profile that is not already running; wait until healthy.

    Args:
        settings: the settings (default: from the environment).
        components_to_start: a subset of ``COMPONENTS`` (default: all).
        timeout: seconds to wait for each group of components to become healthy.
        echo: where progress lines go.

    Returns:
        {"components": {name: record}, "urls": {...}, "login": [...], "env": {...},
        "env_file": path}; ``env`` is what a client (the CLI, a test) exports to use them.

    Raises:
        RuntimeError: a port is taken or a component fails to start (what was started by
            this call is stopped again).
    """
    settings = (settings or Settings.from_env()).with_services()
    wanted = list(components_to_start or COMPONENTS)
    unknown = set(wanted) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; choose from {COMPONENTS}")
    # Secrets first: prepare() exports the MLflow client's password once its file exists.
    sources = credentials.ensure_secrets(settings) if settings.profile == "prod" else {}
    settings.prepare()
    records = _read_records(settings)
    running = {n for n, r in records.items() if supervisor.members(r)}
    for name in set(records) - running:
        records.pop(name)
    todo = [n for n in COMPONENTS if n in wanted and n not in running]
    echo(f"shoprec up ({settings.profile} profile, home {settings.home})"
         + (f"; already running: {', '.join(sorted(running))}" if running else ""))
    if settings.profile == "prod":
        echo(f"  secrets in {settings.secrets_dir} (mode 0600; "
             f"{sum(v.startswith('$') for v in sources.values())} from the environment)")
        created = ensure_databases([settings.airflow_db_url, settings.mlflow_backend_uri,
                                    settings.mlflow_auth_db_url, settings.feast_registry_url])
        if created:
            echo(f"  created PostgreSQL databases: {', '.join(created)}")
        # the serving admin token may have just been generated
        settings = replace(settings, admin_token=settings.admin_token
                           or settings.secret("serving_admin_token"))
    plan = {c.name: c for c in components(settings) if c.name in todo}
    ports = {"airflow-api-server": (settings.airflow_host, settings.airflow_port),
             "mlflow": (settings.mlflow_host, settings.mlflow_port),
             "serving": (settings.serving_host, settings.serving_port)}
    for name in plan:
        if name in ports and not supervisor.port_free(*ports[name]):
            host, port = ports[name]
            raise RuntimeError(f"{name}: {host}:{port} is taken by another process; choose "
                               f"another port (SHOPREC_AIRFLOW_PORT / SHOPREC_MLFLOW_PORT / "
                               f"SHOPREC_SERVING_PORT)")
    started: list[str] = []
    try:
        if any(n in plan for n in AIRFLOW_COMPONENTS):
            echo("  airflow db migrate ...")
            migrate_log = log_dir(settings) / "airflow-db-migrate.log"
            migrate_log.parent.mkdir(parents=True, exist_ok=True)
            with open(migrate_log, "ab") as log:
                done = subprocess.run([supervisor.executable("airflow"), "db", "migrate"],
                                      cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                      env=plan[next(n for n in AIRFLOW_COMPONENTS if n in plan)].env)
            if done.returncode != 0:
                raise RuntimeError(f"airflow db migrate failed; see {migrate_log}")
        first = [n for n in plan if n != "serving"]
        for name in first:
            records[name] = _start(plan[name], settings)
            started.append(name)
            _write_records(settings, records)
        wait_healthy(settings, first, records, timeout, echo)
        if "mlflow" in plan and settings.profile == "prod":
            if credentials.ensure_mlflow_user(settings):
                echo(f"  MLflow user {settings.mlflow_user!r} created")
        if "serving" in plan:
            records["serving"] = _start(plan["serving"], settings)
            started.append("serving")
            _write_records(settings, records)
            wait_healthy(settings, ["serving"], records, timeout, echo)
    except BaseException:
        echo("  start-up failed: stopping what this call started")
        _stop({n: records[n] for n in started if n in records})
        for name in started:
            records.pop(name, None)
        if records:
            _write_records(settings, records)
        else:
            pid_file(settings).unlink(missing_ok=True)
        raise
    env_file = run_dir(settings) / "env.sh"
    lines = env_lines(settings)
    env_file.write_text("# source this file: points shoprec, airflow and mlflow at the "
                        "services `shoprec up` started\n" + "\n".join(lines) + "\n")
    urls = {n: r["url"] for n, r in records.items() if r.get("url")}
    login = login_lines(settings)
    echo("")
    for name, url in urls.items():
        echo(f"  {name:<22} {url}")
    for line in login:
        echo(f"  {line}")
    echo(f"  logs in {log_dir(settings)}/<component>.log; PIDs in {pid_file(settings)}")
    echo(f"  for the CLI: source {env_file}  (SHOPREC_AIRFLOW_API_URL={settings.airflow_api_url})")
    client_env = {k: v for k, v in settings.service_env().items()}
    client_env.update({"SHOPREC_MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
                       "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
                       "SHOPREC_AIRFLOW_API_URL": settings.airflow_api_url,
                       "SHOPREC_SERVING_URL": settings.serving_url})
    if settings.profile == "prod":
        client_env["MLFLOW_TRACKING_USERNAME"] = settings.mlflow_user
    return {"components": records, "urls": urls, "login": login, "env": client_env,
            "env_file": str(env_file)}


def _stop(records: dict[str, dict[str, Any]],
          timeout: float = STOP_TIMEOUT_S) -> list[dict[str, Any]]:
    """Stop the recorded components, in the reverse order of their start."""
    order = [n for n in reversed(COMPONENTS) if n in records] + \
            [n for n in records if n not in COMPONENTS]
    return supervisor.stop({n: records[n] for n in order}, grace=timeout)


def down(settings: Settings | None = None, components_to_stop: Iterable[str] | None = None,
         *, timeout: float = STOP_TIMEOUT_S,
         echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Stop exactly what ``up`` recorded, remove the PID file, report what was stopped.

    Args:
        settings: the settings (default: from the environment).
        components_to_stop: a subset (default: all); the others stay recorded.
        timeout: seconds between SIGTERM and SIGKILL.

    Returns:
        One dict per component: component, pid, processes (how many were live), stopped
        ("SIGTERM", "SIGKILL after N s" or "not running").
    """
    settings = settings or Settings.from_env()
    records = _read_records(settings)
    chosen = {n: r for n, r in records.items()
              if components_to_stop is None or n in set(components_to_stop)}
    if not chosen:
        echo(f"nothing to stop: no such component recorded in {pid_file(settings)}")
        return []
    report = _stop(chosen, timeout)
    rest = {n: r for n, r in records.items() if n not in chosen}
    if rest:
        _write_records(settings, rest)
    else:
        pid_file(settings).unlink(missing_ok=True)
    for row in report:
        echo(f"  {row['component']:<22} pid {row['pid']:<7} {row['stopped']}"
             f" ({row['processes']} process(es))")
    echo(f"stopped {sum(r['processes'] > 0 for r in report)} component(s); "
         + (f"still recorded: {', '.join(rest)}" if rest else f"removed {pid_file(settings)}"))
    return report


def status(settings: Settings | None = None) -> list[dict[str, Any]]:
    """Each recorded component: pid, whether it is running and healthy, its URL and log."""
    settings = (settings or Settings.from_env()).with_services()
    records = _read_records(settings)
    health = _airflow_health(settings) if any(n.startswith("airflow") for n in records) else None
    rows = []
    for name, record in records.items():
        alive = bool(supervisor.members(record))
        rows.append({"component": name, "pid": record["pid"], "running": alive,
                     "healthy": alive and _healthy(record, name, health),
                     "restarts": restarts(Path(record["log"])),
                     "url": record.get("url", ""), "log": record["log"]})
    return rows


def restarts(log: Path) -> int:
    """How often shoprec.keeper started the component again since ``up`` last started it
    (the restart lines after the log's last start header)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return 0
    since_start = text[text.rfind("\n=== "):]
    return sum(1 for line in since_start.splitlines()
               if line.startswith("shoprec.keeper:") and "; restart #" in line)


# --------------------------------------------------------------------------- CLI

def up_command(
    component: Annotated[list[str] | None, typer.Option(
        "--component", "-c", help=f"only these (repeatable): {', '.join(COMPONENTS)}")] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for health")] = 300.0,
) -> None:
    """Start every component of the profile (SHOPREC_PROFILE), print URLs and the login."""
    try:
        up(Settings.from_env(), component, timeout=timeout, echo=typer.echo)
    except (RuntimeError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def down_command(
    component: Annotated[list[str] | None, typer.Option(
        "--component", "-c", help="only these (repeatable); default: all")] = None,
    timeout: Annotated[float, typer.Option(help="seconds between SIGTERM and SIGKILL")] =
    STOP_TIMEOUT_S,
) -> None:
    """Stop exactly the processes `shoprec up` recorded (SIGTERM, then SIGKILL)."""
    down(Settings.from_env(), component, timeout=timeout, echo=typer.echo)


def status_command() -> None:
    """Show the recorded components: running, healthy, URL, log."""
    rows = status(Settings.from_env())
    if not rows:
        typer.echo("nothing running (no PID file)")
    for row in rows:
        state = "healthy" if row["healthy"] else "running" if row["running"] else "stopped"
        again = f"restarted {row['restarts']}x" if row["restarts"] else ""
        typer.echo(f"{row['component']:<22} pid {row['pid']:<7} {state:<8} {again:<13} "
                   f"{row['url']}  {row['log']}")
