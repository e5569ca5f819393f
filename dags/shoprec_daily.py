"""
### shoprec_daily

One run per day of shop data (one data interval = one landing partition):

1. **validate** the day's products / users / events partition with Great Expectations; a
   failing partition is moved to quarantine (`$SHOPREC_HOME/quarantine/`) with its GX result
   JSON and a Data Docs report, the task fails (no retries) naming each failed expectation
   and the report's path, and nothing downstream runs. Fix the files in quarantine, run
   `shoprec data release YYYY-MM-DD`, then clear this task to rerun the interval;
2. **build_features**: the day's offline feature partitions (user histories, catalogue);
3. **materialize** exactly the interval (plus the allowed lateness) into the online store;
   then, beside training, **user_vectors** writes the champion's user-side vectors for the
   users whose rows the interval changed (`serving/user_vectors.py`; skipped without a
   champion or with `SHOPREC_USER_VECTORS_DAYS=0`);
4. **train** the two-tower model on point-in-time features (skipped, not failed, while the
   history is too short to train on, or when the run's training policy says so);
5. **evaluate** Recall@10/50 on the temporal holdout, for the challenger and the champion;
6. **register** the model version in MLflow with alias `challenger`;
7. **build_index**: a FAISS index per vector space the model retrieves from (two-tower,
   text, ALS), each checked against exact search;
8. **promote** to `champion` when the gate passes (or when the run forces it); before the
   alias moves, the new version's user vectors are written for the users of the last
   `SHOPREC_USER_VECTORS_DAYS` intervals, so that servers following the alias find them;
9. **reload_serving**: tell a running server to load the new champion.

#### Run parameters (the trigger form)

| param | default | meaning |
| --- | --- | --- |
| `train` | `auto` | training policy: `each` trains on this interval; `last` trains only on the last interval of a backfill (the run conf's `backfill_end`, else: no queued run of this DAG is left); `none` never trains (train..promote are *skipped*, not failed); `auto` = `each` for scheduled and manual runs, `last` for backfill runs |
| `skip_training` | `false` | same as `train: none` for this run: data stages only |
| `force_promotion` | `false` | make this run's model version champion even if the gate says no |
| `promotion_reason` | `null` | why (recorded on the version); required, non-empty, when `force_promotion` is true |
| `landing_root` | `null` | read this run's partition from this landing root (path or fsspec URL) instead of `$SHOPREC_LANDING_ROOT` |
| `backfill_end` | `null` | the last interval (YYYY-MM-DD) of the backfill this run belongs to; `shoprec backfill` sets it |

#### Backfills

Backfill runs (Airflow UI: the DAG's *Backfill* button; `airflow backfill create`;
`shoprec backfill`) run one interval at a time in date order (`max_active_runs=1`; give the
backfill *Max active runs = 1* too). validate, build_features and materialize run for every
interval; training follows `train` (default `last`: one model for the whole range). Every task
is idempotent for its interval: a rerun replaces its own outputs and reuses the MLflow run and
model version it registered before.

#### Assets (data-aware scheduling)

`shoprec://landing/daily` (validate: a partition was accepted), `shoprec://features/daily`
(materialize: features offline and online), `shoprec://model/daily` (register: a model
version), `shoprec://index/daily` (build_index: a FAISS index for that version). Each event
carries `{"day": ..., ...}` in its extra. `shoprec_index_published` shows a DAG scheduled on
the index asset.

#### Failures

Tasks retry twice with exponential backoff (validation never retries: bad data does not
get better). A task's final failure logs one line and, when `SHOPREC_ALERT_WEBHOOK` is set,
POSTs `{dag_id, run_id, interval, task_id, try_number, log_url, report, error}` to it.

This file only orchestrates: the work is in `features/`, `training/` and `serving/`, imported
inside the tasks.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Asset, Param, dag, get_current_context, task
from airflow.timetables.interval import CronDataIntervalTimetable

from core.settings import train_executor_config

LANDING = Asset(name="shoprec_landing", uri="shoprec://landing/daily")
FEATURES = Asset(name="shoprec_features", uri="shoprec://features/daily")
MODEL = Asset(name="shoprec_model", uri="shoprec://model/daily")
INDEX = Asset(name="shoprec_index", uri="shoprec://index/daily")

TRAIN_POLICIES = ("auto", "each", "last", "none")

PARAMS = {
    "train": Param("auto", enum=list(TRAIN_POLICIES), title="Training policy",
                   description="each: train on this interval; last: only on the last interval "
                               "of a backfill; none: never; auto: each, or last for backfills"),
    "skip_training": Param(False, type="boolean", title="Skip training",
                           description="Run the data stages only (same as train: none)"),
    "force_promotion": Param(False, type="boolean", title="Force promotion",
                             description="Make this run's model champion even if the gate "
                                         "says no (needs a reason)"),
    "promotion_reason": Param(None, type=["null", "string"], maxLength=500,
                              title="Promotion reason",
                              description="Why the promotion is forced (recorded on the "
                                          "model version); required with force_promotion"),
    "landing_root": Param(None, type=["null", "string"], title="Landing root",
                          description="Read this run's partition from here instead of "
                                      "$SHOPREC_LANDING_ROOT (path or fsspec URL)"),
    "backfill_end": Param(None, type=["null", "string"], format="date",
                          title="Backfill end (set by shoprec backfill)",
                          description="Last interval (YYYY-MM-DD) of the backfill this run "
                                      "belongs to; train: last trains only there"),
}


def _on_failure(context) -> None:
    """Task failure callback: one log line and, if configured, a webhook POST."""
    from shoprec.alerts import report_task_failure

    report_task_failure(context)


def _interval_day() -> str:
    """The day (YYYY-MM-DD) of the running data interval: tasks never look at now()."""
    start = get_current_context()["data_interval_start"]
    return start.date().isoformat()


def _run_policy_inputs() -> tuple:
    """(params, conf, run type, queued-runs counter) of the running task's DAG run: what
    ``shoprec.params.training_decision`` and ``later_intervals`` decide on."""
    context = get_current_context()
    dag_run = context["dag_run"]
    return (context["params"], dag_run.conf or {}, str(dag_run.run_type),
            lambda: context["ti"].get_dr_count(dag_id=dag_run.dag_id, states=["queued"]))


def _settings():
    """Settings for this run: the environment's, with the run's landing root if it sets one."""
    from dataclasses import replace

    from core.settings import Settings

    settings = Settings.from_env()
    root = get_current_context()["params"].get("landing_root")
    return replace(settings, landing_root=root) if root else settings


def _emit(asset: Asset, extra: dict) -> None:
    """Attach small metadata to this task's asset event (for data-aware consumers)."""
    get_current_context()["outlet_events"][asset].extra = extra


@dag(
    dag_id="shoprec_daily",
    # Data intervals, not trigger points: the run for day D covers [D, D+1) and runs after it.
    schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    # One interval at a time: a day's features roll forward from the day before.
    max_active_runs=1,
    tags=["shoprec", "recsys", "daily"],
    params=PARAMS,
    default_args={
        "owner": "shoprec",
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=15),
        "on_failure_callback": _on_failure,
    },
    doc_md=__doc__,
)
def shoprec_daily():
    @task(outlets=[LANDING])
    def validate() -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from features.validation import PartitionInvalid, check_partition
        from shoprec.params import check_run_params

        context = get_current_context()
        problem = check_run_params(context["params"])
        if problem:  # a wrong form does not get better on retry either
            raise AirflowFailException(problem)
        try:
            # A failing partition is moved to quarantine with its report before this raises.
            result = check_partition(_settings(), _interval_day())
        except PartitionInvalid as exc:  # bad data does not get better on retry: no retries
            raise AirflowFailException(str(exc)) from exc
        _emit(LANDING, {"day": _interval_day()})
        return result

    @task
    def build_features(validation: dict) -> dict:
        from features.build import build_interval

        return build_interval(_settings(), _interval_day())

    @task(outlets=[FEATURES])
    def materialize(features: dict) -> dict:
        from features.store import materialize_day

        result = materialize_day(_settings(), _interval_day())
        _emit(FEATURES, {"day": _interval_day()})
        return result

    # Production: the GPU pod template under the KubernetesExecutor (ignored elsewhere).
    @task(executor_config=train_executor_config())
    def train(materialized: dict) -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from shoprec.params import training_decision

        day = _interval_day()
        reason = training_decision(day, *_run_policy_inputs())
        if reason:  # the run's policy: skipped, not failed (downstream skips too)
            raise AirflowSkipException(reason)
        from shoprec.pipeline import NotEnoughHistory, train_interval  # torch: only if training

        try:
            return train_interval(_settings(), day)
        except NotEnoughHistory as exc:  # early days of a shop: skip, don't fail
            raise AirflowSkipException(str(exc)) from exc

    @task
    def evaluate(trained: dict) -> dict:
        from shoprec.pipeline import evaluate_interval

        return evaluate_interval(_settings(), trained["mlflow_run_id"], _interval_day())

    @task(outlets=[MODEL])
    def register(evaluated: dict) -> dict:
        from training.registry import register_run

        result = register_run(_settings(), evaluated["mlflow_run_id"])
        _emit(MODEL, {"day": _interval_day(), "version": str(result.get("version"))})
        return result

    @task(outlets=[INDEX])
    def build_index(registered: dict) -> dict:
        from serving.publish import build_index_for_version

        result = build_index_for_version(_settings(), registered["version"])
        _emit(INDEX, {"day": _interval_day(), "version": str(registered["version"])})
        return result

    @task
    def promote(indexed: dict) -> dict:
        from serving.user_vectors import before_promotion
        from training.registry import promote_if_better, set_champion

        context = get_current_context()
        params = context["params"]
        settings = _settings()
        day = _interval_day()

        def prepare(version: str) -> None:  # the new champion's user vectors, then the alias
            before_promotion(settings, version, day)

        result = promote_if_better(settings, indexed["version"], before=prepare)
        if params.get("force_promotion") and not result["promoted"]:
            run_id = context["dag_run"].run_id
            forced = set_champion(settings, indexed["version"],
                                  reason=f"forced by {run_id}: {params['promotion_reason']}",
                                  actor=f"shoprec_daily {run_id}", before=prepare)
            result = {**result, "promoted": True, "champion": forced["version"],
                      "reason": f"forced: {params['promotion_reason']} "
                                f"(gate said: {result['reason']})"}
        return result

    @task
    def reload_serving(promoted: dict) -> dict:
        from serving.reload import notify_serving

        return notify_serving(_settings(), promoted)

    @task
    def user_vectors(materialized: dict) -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from shoprec.params import later_intervals

        day = _interval_day()
        later = later_intervals(day, *_run_policy_inputs())
        if later:  # the rows change again before anyone reads them
            raise AirflowSkipException(f"user vectors are written on a backfill's last "
                                       f"interval: {later}")
        from serving.user_vectors import refresh_interval

        return refresh_interval(_settings(), day)

    materialized = materialize(build_features(validate()))
    user_vectors(materialized)
    reload_serving(promote(build_index(register(evaluate(train(materialized))))))


shoprec_daily()


@dag(
    dag_id="shoprec_index_published",
    schedule=[INDEX],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    is_paused_upon_creation=True,
    tags=["shoprec", "example", "assets"],
    default_args={"owner": "shoprec", "retries": 2, "retry_delay": timedelta(minutes=1)},
    doc_md="""
### shoprec_index_published

An example of a data-aware consumer: runs whenever `shoprec_daily` publishes a FAISS index
(asset `shoprec://index/daily`) and logs the day and model version of each event. Put work
here that must follow a new index (cache warming, a canary query, a notification). Paused
when created.
""",
)
def shoprec_index_published():
    @task
    def announce() -> list[dict]:
        events = get_current_context()["triggering_asset_events"]
        seen = [dict(event.extra or {}) for evs in events.values() for event in evs]
        for extra in seen:
            print(f"new index for {extra.get('day')}: model v{extra.get('version')}")
        return seen

    announce()


shoprec_index_published()
