"""The production profile's secrets and logins: generated once, kept private, never printed.

``ensure_secrets`` generates every secret that the environment, the ``SHOPREC_CONFIG`` file
or ``secrets_dir`` does not already hold (files of mode 0600 in a 0700 folder) and the
simple auth manager's password file; ``airflow_password`` / ``airflow_token`` log a client in
to Airflow's REST API as the UI does; ``mlflow_auth_config`` and ``ensure_mlflow_user`` set up
MLflow's basic-auth app and the service account the pipeline and serving use on it. Callers
print where a secret lives, never its value.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from core.settings import SECRETS, Settings


def _generate(name: str) -> str:
    """A new value for the secret ``name`` (Airflow's Fernet key has its own format)."""
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

