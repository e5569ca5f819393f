"""MLflow tracking and registry: runs, model versions, the `challenger` and `champion` aliases.

Local profile: SQLite tracking + registry under ``SHOPREC_HOME`` and artifacts in
``SHOPREC_HOME/mlartifacts``. Stages are deprecated in MLflow 3; shoprec uses aliases and
version tags only.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from shoprec.settings import Settings

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

CHALLENGER = "challenger"
CHAMPION = "champion"
# The metric that gates promotion, and the tags that identify one interval's run.
GATE_METRIC = "recall_at_50"
TAG_INTERVAL = "shoprec.interval"
TAG_FINGERPRINT = "shoprec.fingerprint"


def mlflow_client(settings: Settings) -> MlflowClient:
    """Point MLflow at this profile's tracking + registry store and return a client."""
    import mlflow
    from mlflow import MlflowClient

    settings.prepare()
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)
    return MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)


def experiment_id(settings: Settings, client: MlflowClient) -> str:
    """The shoprec experiment, created with an explicit artifact location.

    Without one, MLflow would write artifacts to ``./mlruns`` of whatever directory the
    process happens to run in.
    """
    exp = client.get_experiment_by_name(settings.experiment_name)
    if exp is not None:
        return exp.experiment_id
    location = (settings.mlflow_artifact_root.as_uri() if settings.profile == "local"
                else None)
    return client.create_experiment(settings.experiment_name, artifact_location=location,
                                    tags={"project": "shoprec"})


def find_run(client: MlflowClient, exp_id: str, tags: dict[str, str]) -> Run | None:
    """The latest FINISHED run carrying all ``tags``, if any."""
    clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()] + ["attributes.status = 'FINISHED'"]
    runs = client.search_runs([exp_id], " and ".join(clauses),
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def delete_unfinished_runs(client: MlflowClient, exp_id: str, tags: dict[str, str]) -> int:
    """Delete the runs for these tags that did not finish (a crashed attempt), so that a
    rerun leaves exactly one run per interval."""
    clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    deleted = 0
    for run in client.search_runs([exp_id], " and ".join(clauses), max_results=100):
        if run.info.status != "FINISHED":
            client.delete_run(run.info.run_id)
            deleted += 1
    return deleted


def _model_uri_of_run(client: MlflowClient, run_id: str) -> str:
    """The logged model of a run (``models:/m-...``), as MLflow 3 records it."""
    run = client.get_run(run_id)
    outputs = getattr(run, "outputs", None)
    model_outputs = getattr(outputs, "model_outputs", None) or []
    if model_outputs:
        return f"models:/{model_outputs[0].model_id}"
    return f"runs:/{run_id}/model"


def register_run(settings: Settings, mlflow_run_id: str) -> dict[str, Any]:
    """Register the run's model as a version (once) and point `challenger` at it.

    Idempotent: a rerun finds the version already created from this run and reuses it.

    Returns:
        {"version": "N", "mlflow_run_id": ..., "reused": bool}
    """
    import mlflow

    client = mlflow_client(settings)
    name = settings.model_name
    existing = [v for v in client.search_model_versions(f"name = '{name}'")
                if v.run_id == mlflow_run_id]
    if existing:
        version, reused = existing[0], True
    else:
        version = mlflow.register_model(_model_uri_of_run(client, mlflow_run_id), name)
        reused = False
    run = client.get_run(mlflow_run_id)
    tags = {k: v for k, v in run.data.tags.items() if k.startswith("shoprec.")}
    for key, value in {**tags, **{f"metric.{k}": f"{v:.6f}" for k, v in run.data.metrics.items()
                                  if not k.startswith("epoch")}}.items():
        client.set_model_version_tag(name, version.version, key, value)
    client.update_registered_model(
        name, description="Two-tower retrieval model of shoprec (user tower + item tower over "
                          "product text). Aliases: champion serves, challenger is the latest "
                          "candidate. See each version's tags for its interval and metrics.")
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    log.info("model %s version %s (%s) is %s", name, version.version,
             "reused" if reused else "new", CHALLENGER)
    return {"version": str(version.version), "mlflow_run_id": mlflow_run_id, "reused": reused}


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version an alias points at, or None when the alias (or model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def promote_if_better(settings: Settings, version: str) -> dict[str, Any]:
    """Move `champion` to ``version`` when its gate metric beats the champion's.

    Both metrics were measured by the evaluation step on the same temporal holdout (the
    challenger's run logs ``champion_<metric>``), so the comparison is like for like.
    A version that is already champion stays champion (reruns change nothing).

    Returns:
        {"version", "promoted", "champion", "reason"} for XCom and the logs.
    """
    client = mlflow_client(settings)
    name = settings.model_name
    candidate = client.get_model_version(name, version)
    metrics = client.get_run(candidate.run_id).data.metrics
    current = alias_version(client, name, CHAMPION)
    challenger_score = metrics.get(GATE_METRIC)
    if challenger_score is None:
        raise RuntimeError(f"version {version} has no {GATE_METRIC}: was it evaluated?")
    if current is None:
        promote, reason = True, "no champion yet"
    elif current.version == candidate.version:
        promote, reason = True, "already champion"
    else:
        champion_score = metrics.get(f"champion_{GATE_METRIC}")
        evaluated_against = metrics.get("champion_version")
        champion_interval = current.tags.get(TAG_INTERVAL, "")
        if champion_interval > candidate.tags.get(TAG_INTERVAL, ""):
            # A rerun of an older interval must never roll back a newer champion.
            promote = False
            reason = f"champion v{current.version} is newer (trained on {champion_interval})"
        elif champion_score is None or evaluated_against is None or \
                int(evaluated_against) != int(current.version):
            promote = False
            reason = (f"evaluated against v{evaluated_against and int(evaluated_against)}, but the "
                      f"champion is now v{current.version}: rerun evaluate to compare")
        elif challenger_score >= champion_score:
            promote = True
            reason = (f"{GATE_METRIC} {challenger_score:.4f} >= champion v{current.version} "
                      f"{champion_score:.4f}")
        else:
            promote = False
            reason = (f"{GATE_METRIC} {challenger_score:.4f} < champion v{current.version} "
                      f"{champion_score:.4f}")
    client.set_model_version_tag(name, version, "shoprec.gate",
                                 json.dumps({"promoted": promote, "reason": reason}))
    if promote:
        client.set_registered_model_alias(name, CHAMPION, version)
    champion = version if promote else current.version
    log.info("promotion of %s v%s: %s (%s)", name, version, promote, reason)
    return {"version": version, "promoted": promote, "champion": str(champion), "reason": reason}
