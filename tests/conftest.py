"""Shared fixtures and helpers. Every test gets its own SHOPREC_HOME (a fresh one, a copy
of a built one, or a shared one it only reads); nothing touches ./state."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from shops import TEST_SHOP_GATE

# The tiers (fast, integration, operations): markers, and a collection check that every test
# is in exactly one (tests/tiers.py); pytester, to test that check.
pytest_plugins = ["tiers", "pytester"]

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
    for key, value in TEST_SHOP_GATE.items():
        monkeypatch.setenv(key, value)
    for key in ("SHOPREC_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)
    return home


@pytest.fixture(autouse=True)
def _collector_unfrozen():
    """A served bundle's load ends with ``gc.freeze()`` (``serving.runtime.no_gc_pauses``);
    a test process loads many apps, so what they froze goes back to the collector after
    each test (frozen objects that later become cyclic garbage are never collected)."""
    yield
    import gc

    gc.unfreeze()
