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
4. **train** the two-tower model on point-in-time features (skipped, not failed, while the
   history is too short to train on);
5. **evaluate** Recall@10/50 on the temporal holdout, for the challenger and the champion;
6. **register** the model version in MLflow with alias `challenger`;
7. **build_index**: FAISS over the whole catalogue, checked against exact search;
8. **promote** to `champion` when the gate passes;
9. **reload_serving**: tell a running server to load the new champion.

Every task is idempotent for its interval: a rerun replaces its own outputs and reuses the
MLflow run and model version it registered before. This file only orchestrates: the work is
in `features/`, `training/` and `serving/`, imported inside the tasks.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import dag, get_current_context, task
from airflow.timetables.interval import CronDataIntervalTimetable


def _interval_day() -> str:
    """The day (YYYY-MM-DD) of the running data interval: tasks never look at now()."""
    start = get_current_context()["data_interval_start"]
    return start.date().isoformat()


@dag(
    dag_id="shoprec_daily",
    # Data intervals, not trigger points: the run for day D covers [D, D+1) and runs after it.
    schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["shoprec", "recsys", "daily"],
    default_args={
        "owner": "shoprec",
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
    },
    doc_md=__doc__,
)
def shoprec_daily():
    @task
    def validate() -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from features.validation import PartitionInvalid, check_partition
        from shoprec.settings import Settings

        try:
            # A failing partition is moved to quarantine with its report before this raises.
            return check_partition(Settings.from_env(), _interval_day())
        except PartitionInvalid as exc:  # bad data does not get better on retry: no retries
            raise AirflowFailException(str(exc)) from exc

    @task
    def build_features(validation: dict) -> dict:
        from features.build import build_interval
        from shoprec.settings import Settings

        return build_interval(Settings.from_env(), _interval_day())

    @task
    def materialize(features: dict) -> dict:
        from features.store import materialize_day
        from shoprec.settings import Settings

        return materialize_day(Settings.from_env(), _interval_day())

    @task
    def train(materialized: dict) -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from shoprec.settings import Settings
        from training.pipeline import NotEnoughHistory, train_interval

        try:
            return train_interval(Settings.from_env(), _interval_day())
        except NotEnoughHistory as exc:  # early days of a shop: skip, don't fail
            raise AirflowSkipException(str(exc)) from exc

    @task
    def evaluate(trained: dict) -> dict:
        from shoprec.settings import Settings
        from training.pipeline import evaluate_interval

        return evaluate_interval(Settings.from_env(), trained["mlflow_run_id"], _interval_day())

    @task
    def register(evaluated: dict) -> dict:
        from shoprec.settings import Settings
        from training.registry import register_run

        return register_run(Settings.from_env(), evaluated["mlflow_run_id"])

    @task
    def build_index(registered: dict) -> dict:
        from serving.publish import build_index_for_version
        from shoprec.settings import Settings

        return build_index_for_version(Settings.from_env(), registered["version"])

    @task
    def promote(indexed: dict) -> dict:
        from shoprec.settings import Settings
        from training.registry import promote_if_better

        return promote_if_better(Settings.from_env(), indexed["version"])

    @task
    def reload_serving(promoted: dict) -> dict:
        from serving.reload import notify_serving
        from shoprec.settings import Settings

        return notify_serving(Settings.from_env(), promoted)

    reload_serving(promote(build_index(register(evaluate(train(materialize(
        build_features(validate()))))))))


shoprec_daily()
