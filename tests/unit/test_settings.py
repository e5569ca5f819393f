"""Infrastructure settings: read from the environment, no side effects until prepare()."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.settings import PROJECT_ROOT, Settings

pytestmark = pytest.mark.fast


def _isolate(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    """Make prepare()'s exports undoable: monkeypatch restores whatever it touched."""
    for key in settings.service_env():
        monkeypatch.setenv(key, "placeholder")  # records the original value (or absence)
        monkeypatch.delenv(key)


def test_defaults_live_under_shoprec_home(shop_home: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHOPREC_LANDING_ROOT")
    monkeypatch.delenv("SHOPREC_PROFILE", raising=False)
    s = Settings.from_env()
    assert s.profile == "local"
    assert s.home == shop_home.resolve()
    assert s.landing_root == str(shop_home / "landing")
    assert s.offline_root == shop_home / "features"
    assert s.feast_data == shop_home / "feast"
    assert s.cache_dir == shop_home / "cache"
    assert s.airflow_home == shop_home / "airflow"
    assert s.mlflow_artifact_root == shop_home / "mlartifacts"
    assert s.mlflow_tracking_uri == f"sqlite:///{shop_home / 'mlflow.db'}"
    assert s.text_encoder == "tiny"  # from the fixture's SHOPREC_TEXT_ENCODER
    assert s.allowed_lateness_hours == 1
    assert not shop_home.exists()  # reading settings creates nothing


def test_environment_overrides(shop_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOPREC_PROFILE", "prod")
    monkeypatch.setenv("SHOPREC_LANDING_ROOT", "s3://bucket/landing")
    monkeypatch.setenv("SHOPREC_SERVING_PORT", "9100")
    monkeypatch.setenv("SHOPREC_ALLOWED_LATENESS_HOURS", "3")
    monkeypatch.setenv("SHOPREC_MLFLOW_TRACKING_URI", "http://mlflow:5000")
    s = Settings.from_env()
    assert (s.profile, s.landing_root, s.serving_port, s.allowed_lateness_hours,
            s.mlflow_tracking_uri) == ("prod", "s3://bucket/landing", 9100, 3,
                                       "http://mlflow:5000")


@pytest.mark.parametrize("profile", ["staging", "LOCAL", ""])
def test_unknown_profile_is_refused(shop_home: Path, monkeypatch: pytest.MonkeyPatch,
                                    profile: str) -> None:
    monkeypatch.setenv("SHOPREC_PROFILE", profile)
    with pytest.raises(ValueError, match=f"SHOPREC_PROFILE='{profile}'"):
        Settings.from_env()


def test_feast_env_names_what_feature_store_yaml_expands(shop_home: Path) -> None:
    s = Settings.from_env()
    assert s.feast_env() == {
        "SHOPREC_FEAST_PROJECT": "shoprec",
        "SHOPREC_FEAST_REGISTRY": str(shop_home / "feast" / "registry.db"),
        "SHOPREC_FEAST_ONLINE_PATH": str(shop_home / "feast" / "online.db"),
        "SHOPREC_FEAST_REGISTRY_URL": "postgresql+psycopg://postgres@127.0.0.1:5432/shoprec",
        "SHOPREC_REDIS_URL": "127.0.0.1:6379,db=0",
        "SHOPREC_OFFLINE_ROOT": str(shop_home / "features"),
    }
    repo = PROJECT_ROOT / "features" / "feature_repo"
    local = (repo / "feature_store.yaml").read_text()
    for key in ("SHOPREC_FEAST_PROJECT", "SHOPREC_FEAST_REGISTRY", "SHOPREC_FEAST_ONLINE_PATH"):
        assert f"${{{key}}}" in local
    prod = (repo / "feature_store.prod.yaml").read_text()
    for key in ("SHOPREC_FEAST_PROJECT", "SHOPREC_FEAST_REGISTRY_URL", "SHOPREC_REDIS_URL"):
        assert f"${{{key}}}" in prod


def test_profile_selects_the_feast_configuration(shop_home: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings.from_env().feast_yaml.name == "feature_store.yaml"
    monkeypatch.setenv("SHOPREC_PROFILE", "prod")
    assert Settings.from_env().feast_yaml.name == "feature_store.prod.yaml"


def test_prepare_creates_folders_and_exports_variables(
    shop_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = Settings.from_env()
    _isolate(monkeypatch, s)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://operator:5000")  # an explicit choice
    monkeypatch.setenv("SHOPREC_FEAST_REGISTRY", "/stale/registry.db")  # from another home
    assert not shop_home.exists()

    assert s.prepare() is s
    for path in (s.home, s.airflow_home, s.mlflow_artifact_root, s.offline_root,
                 s.feast_data, s.cache_dir, Path(s.landing_root)):
        assert path.is_dir(), path
    for key, value in s.feast_env().items():
        assert os.environ[key] == value  # Feast variables always follow these settings
    assert os.environ["AIRFLOW_HOME"] == str(shop_home / "airflow")
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://operator:5000"  # not overridden
    s.prepare()  # twice is fine


def test_importing_settings_has_no_side_effects(tmp_path: Path) -> None:
    home = tmp_path / "untouched"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SHOPREC_", "AIRFLOW", "MLFLOW_"))}
    env["SHOPREC_HOME"] = str(home)
    code = ("import os, core.settings as m; s = m.Settings.from_env(); "
            "print(sorted(k for k in os.environ if k.startswith(('SHOPREC_FEAST', "
            "'SHOPREC_OFFLINE', 'AIRFLOW', 'MLFLOW'))))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=PROJECT_ROOT,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert not home.exists()


def test_the_ranking_stage_is_one_of_the_four(shop_home: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings.from_env().ranking_stage == "auto"
    monkeypatch.setenv("SHOPREC_RANKING_STAGE", " Trees ")
    assert Settings.from_env().ranking_stage == "trees"
    monkeypatch.setenv("SHOPREC_RANKING_STAGE", "forest")
    with pytest.raises(ValueError, match="SHOPREC_RANKING_STAGE='forest': expected one of auto"):
        Settings.from_env()
