"""Shared fixtures. Every test gets its own SHOPREC_HOME; nothing touches ./state."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

REPO = Path(__file__).resolve().parents[1]
# Airflow reads its configuration once, when this process first imports it, and whichever
# test does that first decides for the whole session: give it the project's DAG folder (its
# DAG bundle; the same value Settings.airflow_env sets). Tests that need their own metadata
# DB point the ORM at it (test_pipeline_end_to_end) or run Airflow in a subprocess.
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(REPO / "dags"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
ONLINE_RETAIL = REPO.parent / "shared" / "data" / "online-retail" / "online_retail.parquet"


@pytest.fixture
def shop_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh state folder exported as SHOPREC_HOME (and everything derived from it)."""
    home = tmp_path / "state"
    monkeypatch.setenv("SHOPREC_HOME", str(home))
    monkeypatch.setenv("SHOPREC_LANDING_ROOT", str(home / "landing"))
    monkeypatch.setenv("SHOPREC_TEXT_ENCODER", "tiny")
    for key in ("SHOPREC_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)
    return home


def _postgres_database(name: str) -> str | None:
    """Create (once) and return the URL of a test database, or None if PostgreSQL is down."""
    try:
        import psycopg

        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres",
                             autocommit=True, connect_timeout=3) as conn:
            exists = conn.execute("select 1 from pg_database where datname = %s",
                                  (name,)).fetchone()
            if not exists:
                conn.execute(f'create database "{name}"')
    except Exception:  # noqa: BLE001 - any failure means "not available here"
        return None
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def _redis_up(db: int) -> bool:
    try:
        import redis

        return bool(redis.Redis(host="127.0.0.1", port=6379, db=db, socket_timeout=3).ping())
    except Exception:  # noqa: BLE001
        return False


def _service_missing(what: str) -> None:
    if os.environ.get("SHOPREC_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{what} is required (SHOPREC_REQUIRE_SERVICES=1) but not reachable")
    pytest.skip(f"{what} not reachable on 127.0.0.1")


@pytest.fixture(params=["local", pytest.param("prod", marks=pytest.mark.prod)])
def feast_profile(request: pytest.FixtureRequest, shop_home: Path,
                  monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a Feast test on the local profile (SQLite) and on the production profile
    (SQL registry in PostgreSQL, Redis online store), each isolated per test."""
    profile = request.param
    if profile == "prod":
        url = _postgres_database("shoprec_test")
        if url is None:
            _service_missing("PostgreSQL")
        if not _redis_up(13):
            _service_missing("Redis")
        import redis

        redis.Redis(host="127.0.0.1", port=6379, db=13).flushdb()
        # A project per test keeps registries apart inside the one test database.
        project = f"t{abs(hash(request.node.nodeid)) % 10**8}_{os.getpid()}"
        monkeypatch.setenv("SHOPREC_PROFILE", "prod")
        monkeypatch.setenv("SHOPREC_FEAST_REGISTRY_URL", url)
        monkeypatch.setenv("SHOPREC_REDIS_URL", "127.0.0.1:6379,db=13")
        monkeypatch.setenv("SHOPREC_FEAST_PROJECT", project)
    return profile
