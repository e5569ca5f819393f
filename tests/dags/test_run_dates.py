"""A run made like `shoprec run` and `make demo` make theirs (``dag.test`` through
shoprec.runs.run_day) records the real moments it ran as its start and end dates, and keeps
the scheduler's identity: logical date = the interval's day, data interval [day, day + 1),
run after day + 1.

``dag.test`` sets a run's start date to its logical date, so the Airflow UI showed a run of
a day months ago as lasting months. The run here goes through Airflow for real, on its
migrated SQLite metadata DB, and the DagRun is read back from it.
"""

from __future__ import annotations

import datetime as dt

import pytest
from shops import point_airflow_at, shop_environment

pytestmark = pytest.mark.integration

DAY = dt.date(2026, 1, 1)


def test_a_run_records_when_it_really_ran(tmp_path) -> None:
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from features.synth import generate_shop
    from shoprec.runs import DAG_ID, load_dag, migrate_metadata_db, run_day

    midnight = dt.datetime(DAY.year, DAY.month, DAY.day, tzinfo=dt.UTC)
    with shop_environment(tmp_path / "state") as settings:
        generate_shop(settings.landing_root, days=1, users=30, products=20, seed=3, start=DAY)
        migrate_metadata_db(settings)
        point_airflow_at(settings)
        dag = load_dag(settings)
        before = dt.datetime.now(dt.UTC)
        result = run_day(dag, DAY, settings.home / "logs", conf={"train": "none"})
        after = dt.datetime.now(dt.UTC)
        assert result.state == "success", result.line()
        with create_session() as session:
            runs = list(session.scalars(select(DagRun).where(DagRun.dag_id == DAG_ID)))
            assert len(runs) == 1
            run = runs[0]
            tasks = list(session.scalars(select(TaskInstance).where(
                TaskInstance.dag_id == DAG_ID, TaskInstance.run_id == run.run_id)))

    # the scheduler's identity, unchanged
    assert run.logical_date == midnight
    assert (run.data_interval_start, run.data_interval_end) == (
        midnight, midnight + dt.timedelta(days=1))
    assert run.run_after == midnight + dt.timedelta(days=1)
    # the real moments it ran: started now, not on its logical date; a duration of seconds
    assert before <= run.start_date <= run.end_date <= after
    assert dt.datetime.now(dt.UTC) - run.start_date < dt.timedelta(minutes=10)
    duration = (run.end_date - run.start_date).total_seconds()
    assert 0 <= duration <= result.seconds + 1
    # every task ran inside the run's span, as the UI's Gantt chart draws them
    ran = [ti for ti in tasks if ti.start_date is not None]
    assert {ti.task_id for ti in ran} >= {"validate", "build_features", "materialize"}
    for ti in ran:
        assert run.start_date <= ti.start_date <= ti.end_date <= run.end_date, ti.task_id
