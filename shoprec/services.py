"""`shoprec up` / `shoprec down`: start and stop every component of a profile.

``up`` starts Airflow's api-server, scheduler, dag-processor and triggerer (each its own
process, after ``airflow db migrate``; never ``airflow standalone``, whose children outlive
a SIGTERM), the MLflow tracking server and the serving API, each in its own process group.
It records every PID, process-group id and start time in ``$SHOPREC_HOME/run/services.json``,
waits until each component reports healthy and prints the URLs and the login. ``down`` stops
exactly the recorded processes: SIGTERM to each group, SIGKILL after a timeout (Airflow's
scheduler may ignore SIGTERM), and only after checking that a PID still belongs to the
process that ``up`` started (same boot, same start time), so a reused PID is never hit.

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
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer

from core.settings import PROJECT_ROOT, SECRETS, Settings

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


# ----------------------------------------------------------------------------- secrets


def _generate(name: str) -> str:
    if name == "airflow_fernet_key":
        from cryptography.fernet import Fernet

        return Fernet.generate_key().decode()
    return secrets.token_urlsafe(32)


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only (created 0600, never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)


def airflow_users(settings: Settings) -> dict[str, str]:
    """The simple auth manager's users and their roles (``name:role,...``)."""
    users = {}
    for item in settings.airflow_users.split(","):
        name, _, role = item.strip().partition(":")
        if name:
            users[name] = role.split(":")[0] or "viewer"
    return users


def ensure_secrets(settings: Settings) -> dict[str, str]:
    """Generate every secret that is set nowhere into ``settings.secrets_dir`` (0600).

    Returns:
        Where each secret comes from ("environment" or a file path): for printing, no values.
    """
    sources: dict[str, str] = {}
    for name, variable in SECRETS.items():
        if os.environ.get(variable) or _config_has(settings, variable):
            sources[name] = f"${variable}"
            continue
        path = settings.secrets_dir / name
        if not path.exists() or not path.read_text().strip():
            _write_private(path, _generate(name) + "\n")
        sources[name] = str(path)
    # The simple auth manager reads passwords from a JSON file; add any user it lacks, so
    # Airflow never generates (and prints) one itself.
    passwords_file = settings.airflow_passwords_file or settings.secrets_dir / "airflow_passwords.json"
    passwords = json.loads(passwords_file.read_text() or "{}") if passwords_file.exists() else {}
    missing = [u for u in airflow_users(settings) if u not in passwords]
    if missing or not passwords_file.exists():
        passwords.update({u: secrets.token_urlsafe(18) for u in missing})
        _write_private(passwords_file, json.dumps(passwords, indent=1) + "\n")
    sources["airflow_passwords"] = str(passwords_file)
    return sources


def _config_has(settings: Settings, variable: str) -> bool:
    if not settings.config_file:
        return False
    from core.settings import read_config_file

    return bool(read_config_file(settings.config_file).get(variable))


def airflow_password(settings: Settings, user: str | None = None) -> str:
    """The Airflow password of ``user`` (default: the CLI's ``settings.airflow_user``):
    ``SHOPREC_AIRFLOW_PASSWORD`` for the CLI's user, else the simple auth manager's file."""
    user = user or settings.airflow_user
    if user == settings.airflow_user and os.environ.get("SHOPREC_AIRFLOW_PASSWORD"):
        return os.environ["SHOPREC_AIRFLOW_PASSWORD"]
    path = settings.airflow_passwords_file or settings.secrets_dir / "airflow_passwords.json"
    try:
        return json.loads(path.read_text())[user]
    except (OSError, KeyError, ValueError) as exc:
        raise RuntimeError(f"no Airflow password for {user!r} in {path} "
                           f"(run `shoprec up` or set SHOPREC_AIRFLOW_PASSWORD)") from exc


def airflow_token(settings: Settings, user: str | None = None, *, timeout: float = 10.0) -> str:
    """A bearer token for Airflow's REST API, as the UI gets one (``POST /auth/token``).

    Args:
        settings: where the api-server runs (``airflow_api_url`` or ``airflow_url``).
        user: the user to log in as (default ``settings.airflow_user``, role op).

    Returns:
        The access token.
    """
    import httpx

    user = user or settings.airflow_user
    base = settings.airflow_api_url or settings.airflow_url
    response = httpx.post(f"{base}/auth/token", timeout=timeout,
                          json={"username": user, "password": airflow_password(settings, user)})
    response.raise_for_status()
    return response.json()["access_token"]


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


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for printing)."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


# ---------------------------------------------------------------------- processes


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, pgid, start time in clock ticks since boot) of a live process, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    if fields[0] == "Z":  # a zombie has exited; only its parent's wait is missing
        return None
    return int(fields[1]), int(fields[2]), int(fields[19])


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _same_process(pid: int, start: int) -> bool:
    info = _stat(pid)
    return info is not None and info[2] == start


def _members(record: dict[str, Any]) -> list[tuple[int, int]]:
    """The live processes of one recorded component, as (pid, start time) pairs.

    A process counts when it is the recorded leader (same PID *and* start time), or lives in
    the recorded process group or descends from the leader and started no earlier than it.
    Nothing else is ever returned, so ``down`` cannot hit a process it did not start.
    """
    if record.get("boot_id") != _boot_id():
        return []  # the machine rebooted: every recorded process is gone
    pid, pgid, start = record["pid"], record["pgid"], record["start"]
    leader = _stat(pid)
    if leader is not None and leader[2] != start:
        # The PID was reused: the recorded group ended (Linux never hands out a PID that is
        # still some group's id), so nothing of ours is left under these numbers.
        return []
    table = {p: info for p in _all_pids() if (info := _stat(p)) is not None}
    ours = {pid} if leader is not None else set()
    ours |= {p for p, (_, group, began) in table.items() if group == pgid and began >= start}
    changed = True
    while changed:  # children that left the group (setsid) but descend from one of ours
        grown = {p for p, (ppid, _, began) in table.items()
                 if ppid in ours and began >= start} - ours
        ours |= grown
        changed = bool(grown)
    ours.discard(os.getpid())
    return sorted((p, table[p][2]) for p in ours if p in table)


def _signal(members: Iterable[tuple[int, int]], sig: int) -> None:
    for pid, start in members:
        if _same_process(pid, start):  # re-check right before signalling
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


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


def _bin(name: str) -> str:
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def _secret_env(settings: Settings, names: Iterable[str]) -> dict[str, str]:
    return {SECRETS[n]: value for n in names if (value := settings.secret(n))}


def mlflow_auth_config(settings: Settings) -> Path:
    """Write MLflow's basic-auth config (no password in it: the admin's comes through
    MLFLOW_AUTH_ADMIN_PASSWORD) beside the secrets, 0600 (its DB URL may carry one)."""
    path = settings.secrets_dir / "mlflow_basic_auth.ini"
    text = ("[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = {settings.mlflow_auth_db_url}\n"
            f"admin_username = {settings.mlflow_admin_user}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    _write_private(path, text)
    return path


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
    airflow = _bin("airflow")
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
    mlflow_cmd = [_bin("mlflow"), "server", "--host", settings.mlflow_host,
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
            "MLFLOW_AUTH_CONFIG_PATH": str(mlflow_auth_config(settings)),
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
        [_bin("uvicorn"), "--factory", "serving.app:create_app", "--host", settings.serving_host,
         "--port", str(settings.serving_port), "--workers", str(settings.serving_workers)],
        serving_env, serving_url, f"{serving_url}/healthz"))
    return out


def _start(component: Component, settings: Settings) -> dict[str, Any]:
    log_path = log_dir(settings) / f"{component.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} shoprec up: "
                  f"{shlex.join(component.cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(component.cmd, env=component.env, cwd=PROJECT_ROOT,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group and session
    info = _stat(proc.pid)
    return {"pid": proc.pid, "pgid": proc.pid, "start": info[2] if info else 0,
            "boot_id": _boot_id(), "cmd": component.cmd, "url": component.url,
            "health": component.health, "log": str(log_path), "started_at": time.time()}


def _healthy(record: dict[str, Any], name: str, airflow_health: dict | None) -> bool:
    import httpx

    if name.startswith("airflow-") and name != "airflow-api-server":
        key = name.removeprefix("airflow-").replace("-", "_")
        status = (airflow_health or {}).get(key, {}).get("status")
        return status == "healthy"
    try:
        return httpx.get(record["health"], timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


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
        RuntimeError: one exited or is not healthy within ``timeout`` (names its log).
    """
    pending = list(names)
    deadline = time.monotonic() + timeout
    while pending:
        health = _airflow_health(settings) if any(n.startswith("airflow") for n in pending) \
            else None
        for name in list(pending):
            record = records[name]
            if not _same_process(record["pid"], record["start"]):
                raise RuntimeError(f"{name} exited during start-up; see {record['log']}")
            if _healthy(record, name, health):
                echo(f"  {name:<22} healthy  (pid {record['pid']})")
                pending.remove(name)
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"not healthy after {timeout:.0f} s: {', '.join(pending)}; "
                               f"see {log_dir(settings)}")
        if pending:
            time.sleep(1.0)


def ensure_mlflow_user(settings: Settings) -> bool:
    """Create the service account the pipeline and serving use on MLflow's basic-auth app.

    It creates the experiment and the registered model, so it owns them; everyone else
    gets the default READ permission. Returns True when the user was created now.
    """
    import httpx

    admin = (settings.mlflow_admin_user, settings.secret("mlflow_admin_password"))
    response = httpx.post(f"{settings.mlflow_server_url}/api/2.0/mlflow/users/create",
                          auth=admin, timeout=30,
                          json={"username": settings.mlflow_user,
                                "password": settings.secret("mlflow_password")})
    if response.status_code == 200:
        return True
    if "RESOURCE_ALREADY_EXISTS" in response.text:
        return False
    raise RuntimeError(f"could not create the MLflow user {settings.mlflow_user!r}: "
                       f"HTTP {response.status_code}")


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
    users = ", ".join(f"{u} ({r})" for u, r in airflow_users(settings).items())
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
    sources = ensure_secrets(settings) if settings.profile == "prod" else {}
    settings.prepare()
    records = _read_records(settings)
    running = {n for n, r in records.items() if _members(r)}
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
        if name in ports and not _port_free(*ports[name]):
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
                done = subprocess.run([_bin("airflow"), "db", "migrate"], cwd=PROJECT_ROOT,
                                      env=plan[next(n for n in AIRFLOW_COMPONENTS if n in plan)].env,
                                      stdout=log, stderr=subprocess.STDOUT)
            if done.returncode != 0:
                raise RuntimeError(f"airflow db migrate failed; see {migrate_log}")
        first = [n for n in plan if n != "serving"]
        for name in first:
            records[name] = _start(plan[name], settings)
            started.append(name)
            _write_records(settings, records)
        wait_healthy(settings, first, records, timeout, echo)
        if "mlflow" in plan and settings.profile == "prod":
            if ensure_mlflow_user(settings):
                echo(f"  MLflow user {settings.mlflow_user!r} created")
        if "serving" in plan:
            records["serving"] = _start(plan["serving"], settings)
            started.append("serving")
            _write_records(settings, records)
            wait_healthy(settings, ["serving"], records, timeout, echo)
    except BaseException:
        echo("  start-up failed: stopping what this call started")
        _stop(settings, {n: records[n] for n in started if n in records})
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
            "env_file": str(env_file), "started": started}


def _stop(settings: Settings, records: dict[str, dict[str, Any]],
          timeout: float = STOP_TIMEOUT_S) -> list[dict[str, Any]]:
    """SIGTERM every recorded component's processes, SIGKILL what is left after ``timeout``."""
    order = [n for n in reversed(COMPONENTS) if n in records] + \
            [n for n in records if n not in COMPONENTS]
    members = {n: _members(records[n]) for n in order}
    for name in order:
        _signal(members[name], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(
            _same_process(p, s) for m in members.values() for p, s in m):
        time.sleep(0.2)
    report = []
    for name in order:
        left = [(p, s) for p, s in members[name] if _same_process(p, s)]
        _signal(left, signal.SIGKILL)
        how = ("not running" if not members[name]
               else f"SIGKILL after {timeout:.0f} s" if left else "SIGTERM")
        report.append({"component": name, "pid": records[name]["pid"],
                       "processes": len(members[name]), "stopped": how})
    end = time.monotonic() + 5
    while time.monotonic() < end and any(
            _same_process(p, s) for m in members.values() for p, s in m):
        time.sleep(0.1)
    return report


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
    report = _stop(settings, chosen, timeout)
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
        alive = bool(_members(record))
        rows.append({"component": name, "pid": record["pid"], "running": alive,
                     "healthy": alive and _healthy(record, name, health),
                     "url": record.get("url", ""), "log": record["log"]})
    return rows


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
        typer.echo(f"{row['component']:<22} pid {row['pid']:<7} {state:<8} {row['url']}  "
                   f"{row['log']}")
