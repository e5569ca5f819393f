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
