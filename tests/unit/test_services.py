"""shoprec up/down without real services: secrets, the PID file, stopping only what was
started, and no secret value in any output, log or record."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.settings import SECRETS, Settings
from shoprec import credentials, services, supervisor

pytestmark = pytest.mark.fast


@pytest.fixture
def prod_home(shop_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SHOPREC_PROFILE", "prod")
    for variable in (*SECRETS.values(), "SHOPREC_CONFIG", "SHOPREC_SECRETS_DIR",
                     "SHOPREC_AIRFLOW_PASSWORDS_FILE", "MLFLOW_TRACKING_USERNAME"):
        monkeypatch.delenv(variable, raising=False)
    return shop_home


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _secret_values(settings: Settings) -> list[str]:
    values = [settings.secret(name) for name in SECRETS]
    passwords = json.loads(settings.airflow_passwords_file.read_text())
    return [v for v in values + list(passwords.values()) if v]


def test_secrets_are_generated_once_private_and_outside_the_repo(prod_home: Path) -> None:
    settings = Settings.from_env()
    sources = credentials.ensure_secrets(settings)
    assert settings.secrets_dir == prod_home / "secrets"
    assert stat.S_IMODE(settings.secrets_dir.stat().st_mode) == 0o700
    for name in SECRETS:
        path = settings.secrets_dir / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, name
        assert len(path.read_text().strip()) >= 32, name  # MLflow wants >= 12 characters
        assert sources[name] == str(path)
    users = json.loads(settings.airflow_passwords_file.read_text())
    assert set(users) == {"admin", "ops", "viewer"}
    first = _secret_values(settings)
    credentials.ensure_secrets(settings)  # a second up keeps them
    assert _secret_values(settings) == first
    assert Settings.from_env().admin_token == settings.secret("serving_admin_token")
    assert "admin_token" not in repr(Settings.from_env())


def test_a_secret_from_the_environment_is_not_written(prod_home: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOPREC_ADMIN_TOKEN", "from-the-operator-0123456789")
    settings = Settings.from_env()
    sources = credentials.ensure_secrets(settings)
    assert sources["serving_admin_token"] == "$SHOPREC_ADMIN_TOKEN"
    assert not (settings.secrets_dir / "serving_admin_token").exists()
    assert settings.secret("serving_admin_token") == "from-the-operator-0123456789"


def test_config_file_with_secrets_must_live_outside_the_repo(
        prod_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outside = tmp_path / "shoprec.toml"
    outside.write_text('SHOPREC_MLFLOW_PORT = 5123\nMLFLOW_TRACKING_PASSWORD = "s3cret-s3cret"\n')
    monkeypatch.setenv("SHOPREC_CONFIG", str(outside))
    settings = Settings.from_env()
    assert settings.mlflow_port == 5123
    assert settings.secret("mlflow_password") == "s3cret-s3cret"
    monkeypatch.setenv("SHOPREC_MLFLOW_PORT", "5999")  # the environment wins
    assert Settings.from_env().mlflow_port == 5999

    from core.settings import PROJECT_ROOT, read_config_file

    inside = PROJECT_ROOT / "tests" / f".tmp-config-{os.getpid()}.yaml"
    inside.write_text("MLFLOW_TRACKING_PASSWORD: nope-nope-nope\n")
    try:
        with pytest.raises(ValueError, match="inside the repository"):
            read_config_file(inside)
    finally:
        inside.unlink()


def test_prod_airflow_settings(prod_home: Path) -> None:
    env = Settings.from_env().airflow_env()
    assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert env["AIRFLOW__CORE__PARALLELISM"] == "4"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg://")
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC"] == \
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] == "False"
    assert "viewer:viewer" in env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"]
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"].endswith("/execution/")
    local = Settings(home=prod_home).airflow_env()
    assert local["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("sqlite:///")


REAL_COMPONENTS = services.components


def _fake_components(settings: Settings, ports: dict[str, int]) -> list[services.Component]:
    """Stand-ins for MLflow and serving: tiny HTTP servers started with the real components'
    environments (secrets included), so a leak into a log or record would show."""
    real = {c.name: c for c in REAL_COMPONENTS(settings)}
    out = []
    for name, port in ports.items():
        code = ("import http.server, sys; print('serving on', sys.argv[1], flush=True); "
                "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), "
                "http.server.SimpleHTTPRequestHandler).serve_forever()")
        out.append(services.Component(name, [sys.executable, "-c", code, str(port)],
                                      real[name].env, f"http://127.0.0.1:{port}",
                                      f"http://127.0.0.1:{port}/"))
    return out


def test_up_and_down_leak_no_secret_and_stop_what_they_started(
        prod_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ports = {"mlflow": _free_port(), "serving": _free_port()}
    monkeypatch.setenv("SHOPREC_MLFLOW_PORT", str(ports["mlflow"]))
    monkeypatch.setenv("SHOPREC_SERVING_PORT", str(ports["serving"]))
    monkeypatch.setattr(services, "ensure_databases", lambda urls: [])
    monkeypatch.setattr(credentials, "ensure_mlflow_user", lambda settings: True)
    monkeypatch.setattr(services, "components",
                        lambda settings: _fake_components(settings, ports))
    printed: list[str] = []
    result = services.up(Settings.from_env(), ["mlflow", "serving"], timeout=30,
                         echo=printed.append)
    settings = Settings.from_env()
    try:
        assert set(result["components"]) == {"mlflow", "serving"}
        record = json.loads(services.pid_file(settings).read_text())["components"]["serving"]
        assert supervisor.same_process(record["pid"], record["start"])
        assert "bearer token in" in "\n".join(printed)
        assert str(settings.airflow_passwords_file) in "\n".join(printed)
    finally:
        report = services.down(settings, echo=printed.append)
    assert {r["component"]: r["stopped"] for r in report} == {"serving": "SIGTERM",
                                                              "mlflow": "SIGTERM"}
    assert not services.pid_file(settings).exists()
    for rec in result["components"].values():
        assert not supervisor.same_process(rec["pid"], rec["start"])
    # No secret value anywhere: printed lines, logs, the PID file, env.sh, the result.
    texts = ["\n".join(printed), json.dumps(result), Path(result["env_file"]).read_text()]
    texts += [p.read_text() for p in services.log_dir(settings).glob("*.log")]
    secrets = _secret_values(settings)
    assert len(secrets) >= len(SECRETS)
    for value in secrets:
        for text in texts:
            assert value not in text
    assert 'MLFLOW_TRACKING_PASSWORD="$(cat ' in Path(result["env_file"]).read_text()


def _record_of(proc: subprocess.Popen) -> dict:
    info = supervisor.proc_stat(proc.pid)
    return {"pid": proc.pid, "pgid": proc.pid, "start": info[2], "boot_id": supervisor.boot_id(),
            "cmd": proc.args, "url": "", "health": "", "log": "/dev/null"}


def test_down_escalates_to_sigkill_and_spares_reused_pids(
        shop_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                               "signal.SIG_IGN); print('ready', flush=True); time.sleep(300)"],
        start_new_session=True, stdout=subprocess.PIPE, text=True)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                                 start_new_session=True)
    try:
        assert stubborn.stdout.readline().strip() == "ready"  # SIGTERM is ignored from here
        settings = Settings.from_env()
        foreign = _record_of(bystander)
        foreign["start"] -= 1  # as if the recorded process had died and its PID was reused
        services._write_records(settings, {"airflow-scheduler": _record_of(stubborn),
                                           "mlflow": foreign})
        started = time.monotonic()
        report = {r["component"]: r for r in services.down(settings, timeout=1.0,
                                                           echo=lambda line: None)}
        assert time.monotonic() - started < 15
        assert report["airflow-scheduler"]["stopped"] == "SIGKILL after 1 s"
        assert report["mlflow"]["stopped"] == "not running"
        assert stubborn.wait(timeout=10) == -signal.SIGKILL
        assert bystander.poll() is None  # not ours any more: untouched
    finally:
        for proc in (stubborn, bystander):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
