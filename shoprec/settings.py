"""Infrastructure settings: where state lives and how the services are reached.

One typed object, read from the environment (``SHOPREC_*``). Nothing here has side effects:
reading the settings creates no folder and configures no library; ``Settings.prepare()``
does that, explicitly, when a command or task is about to use them.

Model and training hyper-parameters are *not* here: they live in
``training.config.TrainConfig`` and are logged to MLflow as params.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FEATURE_REPO = PROJECT_ROOT / "features" / "feature_repo"
DAGS_FOLDER = PROJECT_ROOT / "dags"

PROFILES = ("local", "prod")


def _env_path(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).expanduser().resolve() if value else default


@dataclass(frozen=True)
class Settings:
    """Where shoprec keeps its state and how it reaches its services.

    Every field can be set through the environment variable named in its metadata.
    The local profile keeps everything under ``home`` (SQLite files, parquet, artifacts).
    """

    profile: str = "local"
    home: Path = field(default_factory=lambda: Path("state").resolve())
    landing_root: str = ""
    model_name: str = "shoprec-two-tower"
    experiment_name: str = "shoprec-two-tower"
    mlflow_tracking_uri: str = ""
    serving_host: str = "127.0.0.1"
    serving_port: int = 8000
    serving_url: str = ""
    admin_token: str = ""
    serving_poll_seconds: float = 60.0
    index_exact_max: int = 50_000
    index_min_recall: float = 0.95
    text_encoder: str = "minilm"
    allowed_lateness_hours: int = 1
    feast_project: str = "shoprec"
    # Production profile services (PostgreSQL holds the Feast registry, Redis the online store).
    redis_url: str = "127.0.0.1:6379,db=0"
    feast_registry_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/shoprec"

    @classmethod
    def from_env(cls) -> Settings:
        """Read the settings from ``SHOPREC_*`` environment variables.

        Returns:
            The settings, with defaults for the local profile filled in.
        """
        env = os.environ
        profile = env.get("SHOPREC_PROFILE", "local")
        if profile not in PROFILES:
            raise ValueError(f"SHOPREC_PROFILE={profile!r}: expected one of {PROFILES}")
        home = _env_path("SHOPREC_HOME", Path("state").resolve())
        return cls(
            profile=profile,
            home=home,
            landing_root=env.get("SHOPREC_LANDING_ROOT", str(home / "landing")),
            model_name=env.get("SHOPREC_MODEL_NAME", cls.model_name),
            experiment_name=env.get("SHOPREC_EXPERIMENT", cls.experiment_name),
            mlflow_tracking_uri=env.get(
                "SHOPREC_MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}"
            ),
            serving_host=env.get("SHOPREC_SERVING_HOST", cls.serving_host),
            serving_port=int(env.get("SHOPREC_SERVING_PORT", cls.serving_port)),
            serving_url=env.get("SHOPREC_SERVING_URL", ""),
            admin_token=env.get("SHOPREC_ADMIN_TOKEN", ""),
            serving_poll_seconds=float(env.get("SHOPREC_SERVING_POLL_SECONDS",
                                               cls.serving_poll_seconds)),
            index_exact_max=int(env.get("SHOPREC_INDEX_EXACT_MAX", cls.index_exact_max)),
            index_min_recall=float(env.get("SHOPREC_INDEX_MIN_RECALL",
                                           cls.index_min_recall)),
            text_encoder=env.get("SHOPREC_TEXT_ENCODER", cls.text_encoder),
            allowed_lateness_hours=int(
                env.get("SHOPREC_ALLOWED_LATENESS_HOURS", cls.allowed_lateness_hours)
            ),
            feast_project=env.get("SHOPREC_FEAST_PROJECT", cls.feast_project),
            redis_url=env.get("SHOPREC_REDIS_URL", cls.redis_url),
            feast_registry_url=env.get("SHOPREC_FEAST_REGISTRY_URL", cls.feast_registry_url),
        )

    # Derived locations. Kept as properties so that one SHOPREC_HOME moves them all.
    @property
    def airflow_home(self) -> Path:
        return self.home / "airflow"

    @property
    def mlflow_artifact_root(self) -> Path:
        return self.home / "mlartifacts"

    @property
    def offline_root(self) -> Path:
        """Offline feature tables, one parquet partition per data interval."""
        return self.home / "features"

    @property
    def feast_data(self) -> Path:
        """Feast registry and SQLite online store of the local profile."""
        return self.home / "feast"

    @property
    def cache_dir(self) -> Path:
        """Derived, recomputable data (text embeddings keyed by text hash)."""
        return self.home / "cache"

    @property
    def feast_yaml(self) -> Path:
        """The Feast configuration of this profile (both live in the one feature repo)."""
        name = "feature_store.prod.yaml" if self.profile == "prod" else "feature_store.yaml"
        return FEATURE_REPO / name

    def feast_env(self) -> dict[str, str]:
        """Variables that the feature repo's ``feature_store*.yaml`` files expand."""
        return {
            "SHOPREC_FEAST_PROJECT": self.feast_project,
            "SHOPREC_FEAST_REGISTRY": str(self.feast_data / "registry.db"),
            "SHOPREC_FEAST_ONLINE_PATH": str(self.feast_data / "online.db"),
            "SHOPREC_FEAST_REGISTRY_URL": self.feast_registry_url,
            "SHOPREC_REDIS_URL": self.redis_url,
            "SHOPREC_OFFLINE_ROOT": str(self.offline_root),
        }

    def airflow_env(self) -> dict[str, str]:
        """Variables for an embedded Airflow: SQLite metadata DB under ``home``."""
        return {
            "AIRFLOW_HOME": str(self.airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.airflow_home / 'airflow.db'}",
        }

    def service_env(self) -> dict[str, str]:
        """Everything a child process (Airflow task, server) needs to see the same state."""
        return {
            "SHOPREC_PROFILE": self.profile,
            "SHOPREC_HOME": str(self.home),
            "SHOPREC_LANDING_ROOT": self.landing_root,
            "SHOPREC_MLFLOW_TRACKING_URI": self.mlflow_tracking_uri,
            "MLFLOW_TRACKING_URI": self.mlflow_tracking_uri,
            **self.feast_env(),
            **self.airflow_env(),
        }

    def prepare(self) -> Settings:
        """Create the state folders and export the derived variables into this process.

        Returns:
            self, for chaining.
        """
        for path in (self.home, self.airflow_home, self.mlflow_artifact_root,
                     self.offline_root, self.feast_data, self.cache_dir):
            path.mkdir(parents=True, exist_ok=True)
        if "://" not in self.landing_root:
            Path(self.landing_root).mkdir(parents=True, exist_ok=True)
        # setdefault: an operator's explicit AIRFLOW__*/MLFLOW_* variables win.
        for key, value in self.service_env().items():
            os.environ.setdefault(key, value)
        os.environ.update(self.feast_env())
        return self
