"""MLflow tracking and registry: runs, model versions, the `challenger` and `champion` aliases.

Local profile: SQLite tracking + registry under ``SHOPREC_HOME`` and artifacts in
``SHOPREC_HOME/mlartifacts``. Stages are deprecated in MLflow 3; shoprec uses aliases and
version tags only.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import os
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from core.settings import DEFAULT_MIN_TEST_USERS, PROJECT_ROOT, Settings, min_test_users

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
TAG_GATE = "shoprec.gate"
TAG_PREVIOUS = "shoprec.previous_champion"
TAG_PROMOTION = "shoprec.promotion"
# Tags copied from the training run onto the model version, for the registry's reviewers.
VERSION_TAGS = ("shoprec.interval", "shoprec.fingerprint", "shoprec.dataset_fingerprint",
                "shoprec.config_hash", "shoprec.git_commit", "shoprec.validation_report",
                "shoprec.cut")
HEADLINE_METRICS = ("recall_at_10", "recall_at_50", "ndcg_at_10", "best_baseline_recall_at_50",
                    "champion_recall_at_50", "holdout_users")


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
    tags = {k: v for k, v in run.data.tags.items() if k in VERSION_TAGS}
    tags.update({f"metric.{k}": f"{run.data.metrics[k]:.4f}" for k in HEADLINE_METRICS
                 if k in run.data.metrics})
    for key, value in tags.items():
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


def code_version() -> str:
    """The git commit of the code that runs (``+dirty`` with local changes), or
    ``$SHOPREC_GIT_COMMIT`` where the code is not a git checkout (e.g. an image)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, check=True,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=PROJECT_ROOT, check=True, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("SHOPREC_GIT_COMMIT", "unknown")


@dataclass(frozen=True)
class PromotionPolicy:
    """When `champion` may move. Read from the environment (``from_env``).

    Attributes:
        mode: "auto" (the DAG promotes when the gate passes) or "manual" (the DAG stops at
            `challenger`; a person moves the alias in the MLflow UI or with
            `shoprec model promote`). SHOPREC_PROMOTION_MODE.
        margin: the challenger must beat the champion's gate metric by this relative margin
            (0.01 = 1 %). SHOPREC_PROMOTION_MARGIN.
        beat_baseline: the challenger must also beat the best baseline measured on the same
            holdout. SHOPREC_PROMOTION_BEAT_BASELINE (1/0).
        confidence: the challenger's advantage over the champion and over the best baseline
            must hold at this confidence: the two-sided bootstrap interval of the paired
            difference (the same test users) lies above zero, so noise (a retraining with
            another seed) cannot move the champion. 0 compares point estimates only.
            SHOPREC_PROMOTION_CONFIDENCE.
        metric: the gate metric.
        min_test_users: a version evaluated on fewer test users than this is refused (its
            figures are noise). SHOPREC_MIN_TEST_USERS (0: no minimum).
    """

    mode: str = "auto"
    margin: float = 0.01
    beat_baseline: bool = True
    confidence: float = 0.95
    metric: str = GATE_METRIC
    min_test_users: int = DEFAULT_MIN_TEST_USERS

    @classmethod
    def from_env(cls) -> PromotionPolicy:
        env = os.environ
        mode = env.get("SHOPREC_PROMOTION_MODE", cls.mode)
        if mode not in ("auto", "manual"):
            raise ValueError(f"SHOPREC_PROMOTION_MODE={mode!r}: expected auto or manual")
        confidence = float(env.get("SHOPREC_PROMOTION_CONFIDENCE", cls.confidence))
        if not 0 <= confidence < 1:
            raise ValueError(f"SHOPREC_PROMOTION_CONFIDENCE={confidence}: expected 0 (point "
                             f"estimates) or a level in (0, 1), e.g. 0.95")
        return cls(mode=mode, confidence=confidence,
                   margin=float(env.get("SHOPREC_PROMOTION_MARGIN", cls.margin)),
                   beat_baseline=env.get("SHOPREC_PROMOTION_BEAT_BASELINE", "1").lower()
                   not in ("0", "false", "no"), min_test_users=min_test_users())


def _paired(metrics: dict[str, float], against: str) -> str:
    """`` (paired +0.0123, 95% CI [+0.0040, +0.0210])`` when the evaluation logged it."""
    keys = [f"gate_vs_{against}_{part}" for part in ("diff", "low", "high")]
    if not all(k in metrics for k in keys):
        return ""
    diff, low, high = (metrics[k] for k in keys)
    level = metrics.get("gate_confidence", 0.95)
    return f" (paired {diff:+.4f}, {level:.0%} CI [{low:+.4f}, {high:+.4f}])"


def _within_noise(policy: PromotionPolicy, metrics: dict[str, float], against: str) -> str:
    """Why the advantage over ``against`` ("champion" or "baseline") is not sure at the
    policy's confidence, or "" (sure, or no interval logged, or the policy compares point
    estimates)."""
    low = metrics.get(f"gate_vs_{against}_low")
    if policy.confidence <= 0 or low is None or low > 0:
        return ""
    return ("the interval of the paired difference reaches zero"
            + _paired(metrics, against)
            + "; set SHOPREC_PROMOTION_CONFIDENCE=0 to compare point estimates")


def gate_decision(policy: PromotionPolicy, metrics: dict[str, float], interval: str,
                  champion: tuple[str, str] | None, candidate_version: str) -> tuple[bool, str]:
    """Whether a challenger may become champion, and why (a pure function: the rules).

    Args:
        policy: the promotion policy.
        metrics: the challenger run's metrics, measured on one holdout: the model's
            (``recall_at_50``), the champion's (``champion_*``, ``champion_version``) and the
            best baseline's (``best_baseline_*``); when the evaluation bootstrapped, the
            paired differences ``gate_vs_{champion,baseline}_{diff,low,high}`` at
            ``gate_confidence``.
        interval: the challenger's data interval.
        champion: (version, interval) of the current champion, or None.
        candidate_version: the challenger's version.

    Returns:
        (promote, reason)
    """
    m = policy.metric
    score = metrics.get(m)
    if score is None:
        return False, f"no {m}: the version was not evaluated"
    if champion is not None and champion[0] == candidate_version:
        return True, "already champion"
    users = metrics.get("holdout_users")
    if users is not None and users < policy.min_test_users:
        return False, (f"evaluated on only {int(users)} test users (fewer than "
                       f"SHOPREC_MIN_TEST_USERS={policy.min_test_users}): the figures are noise")
    if champion is not None and champion[1] > interval:
        # A rerun of an older interval must never roll back a newer champion.
        return False, f"champion v{champion[0]} is newer (trained on {champion[1]})"
    baseline = metrics.get(f"best_baseline_{m}")
    if policy.beat_baseline and baseline is not None and score <= baseline:
        return False, f"{m} {score:.4f} does not beat the best baseline {baseline:.4f}"
    noise = _within_noise(policy, metrics, "baseline")
    if policy.beat_baseline and noise:
        return False, (f"{m} {score:.4f} beats the best baseline {baseline:.4f} only within "
                       f"noise: {noise}")
    if champion is not None:
        evaluated_against = metrics.get("champion_version")
        champion_score = metrics.get(f"champion_{m}")
        if champion_score is None or evaluated_against is None \
                or int(evaluated_against) != int(champion[0]):
            against = (f"v{int(evaluated_against)}" if evaluated_against else "no champion")
            return False, (f"evaluated against {against}, but the champion is now "
                           f"v{champion[0]}: rerun evaluate to compare")
        needed = champion_score * (1 + policy.margin)
        if score < needed:
            return False, (f"{m} {score:.4f} < champion v{champion[0]} {champion_score:.4f} "
                           f"x (1 + margin {policy.margin:g})")
        noise = _within_noise(policy, metrics, "champion")
        if noise:
            return False, (f"{m} {score:.4f} vs champion v{champion[0]} "
                           f"{champion_score:.4f}: the advantage is within noise: {noise}")
        reason = (f"{m} {score:.4f} >= champion v{champion[0]} {champion_score:.4f} "
                  f"x (1 + margin {policy.margin:g})" + _paired(metrics, "champion"))
    else:
        reason = "no champion yet"
    if baseline is not None:
        reason += f"; beats the best baseline {baseline:.4f}" + _paired(metrics, "baseline")
    if policy.mode == "manual":
        return False, (f"gate passed ({reason}) but promotion is manual: move the champion "
                       f"alias in the MLflow UI or run `shoprec model promote {candidate_version}`")
    return True, reason


def _record(client: MlflowClient, name: str, version: str, key: str, value: dict) -> None:
    client.set_model_version_tag(name, version, key, json.dumps(value, sort_keys=True))


def set_champion(settings: Settings, version: str, *, reason: str,
                 actor: str | None = None,
                 before: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Point `champion` at ``version`` and record who, when, why and what it replaced.

    Args:
        before: called with the version before the alias moves when it moves (e.g.
            ``serving.user_vectors.before_promotion``: what the servers that follow the
            alias will read); a failure there is logged and the alias moves anyway.

    Returns:
        {"version", "previous", "reason"}
    """
    client = mlflow_client(settings)
    name = settings.model_name
    client.get_model_version(name, version)  # raises if there is no such version
    current = alias_version(client, name, CHAMPION)
    previous = str(current.version) if current is not None else None
    if previous is not None and previous != str(version):
        client.set_model_version_tag(name, version, TAG_PREVIOUS, str(previous))
    _record(client, name, version, TAG_PROMOTION, {
        "by": actor or getpass.getuser(), "at": dt.datetime.now(dt.UTC).isoformat(),
        "reason": reason, "previous": previous})
    if before is not None and previous != str(version):
        try:
            before(str(version))
        except Exception as exc:  # noqa: BLE001 - preparation only: servers compute it
            log.warning("before the champion moves to v%s: %s: %s (moving it anyway)",
                        version, type(exc).__name__, exc)
    client.set_registered_model_alias(name, CHAMPION, version)
    log.info("champion of %s: v%s (was v%s): %s", name, version, previous, reason)
    return {"version": str(version), "previous": previous, "reason": reason}


def rollback(settings: Settings, *, to: str | None = None, reason: str,
             actor: str | None = None) -> dict[str, Any]:
    """Move `champion` back to the version it replaced (or to ``to``).

    Raises:
        RuntimeError: no champion, or no recorded previous champion and no ``to``.
    """
    client = mlflow_client(settings)
    current = alias_version(client, settings.model_name, CHAMPION)
    if current is None:
        raise RuntimeError(f"model {settings.model_name} has no champion to roll back")
    target = to or current.tags.get(TAG_PREVIOUS)
    if not target:
        raise RuntimeError(f"champion v{current.version} records no previous champion; "
                           "name the version to roll back to with --to")
    return set_champion(settings, target, reason=f"rollback from v{current.version}: {reason}",
                        actor=actor)


def promote_if_better(settings: Settings, version: str,
                      policy: PromotionPolicy | None = None, *,
                      before: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """The pipeline's promotion step: apply the gate to a registered challenger.

    ``before`` is ``set_champion``'s (called before the alias moves).

    The challenger's evaluation measured it, the champion and the baselines on the same
    temporal holdout, so every comparison is like for like. The decision and its reason are
    tagged on the version (``shoprec.gate``) whether or not the alias moves.

    Returns:
        {"version", "promoted", "champion", "reason"} for XCom and the logs.
    """
    policy = policy or PromotionPolicy.from_env()
    client = mlflow_client(settings)
    name = settings.model_name
    candidate = client.get_model_version(name, version)
    metrics = client.get_run(candidate.run_id).data.metrics
    current = alias_version(client, name, CHAMPION)
    champion = (None if current is None
                else (str(current.version), current.tags.get(TAG_INTERVAL, "")))
    promote, reason = gate_decision(policy, metrics, candidate.tags.get(TAG_INTERVAL, ""),
                                    champion, str(candidate.version))
    _record(client, name, version, TAG_GATE, {"promoted": promote, "reason": reason,
                                               "policy": asdict(policy)})
    if promote and (current is None or str(current.version) != str(version)):
        set_champion(settings, version, reason=f"gate: {reason}", actor="shoprec_daily",
                     before=before)
    champ = version if promote else (current.version if current is not None else None)
    log.info("promotion of %s v%s: %s (%s)", name, version, promote, reason)
    return {"version": str(version), "promoted": promote,
            "champion": None if champ is None else str(champ), "reason": reason}
