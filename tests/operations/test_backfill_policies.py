"""`shoprec backfill`: real Airflow backfills (run type backfill) on the embedded profile:
ordering, the training policies none and last, reprocessing and idempotency.

Each backfill here is the command an operator runs, in a subprocess: it creates the backfill
with `airflow backfill create`, starts an api-server and a scheduler for the duration (no
scheduler serves the test's metadata DB) and waits. What is checked reads the Airflow and
MLflow SQLite databases and the feature partitions directly (tests/state_readers.py).
"""

from __future__ import annotations

import json

import pytest
from shops import shoprec, synth
from state_readers import (
    DATA_TASKS,
    MODEL_TASKS,
    airflow_rows,
    assert_same_partitions,
    backfill_runs,
    day,
    last_backfill_id,
    model_versions,
    partitions,
    task_states,
)

# The module's shop is built by real Airflow backfills with training (its fixture's setup
# counts in its first test's time): ~8 min on a 2-core EPYC with AVX-512, over the suite's
# 15-minute per-test limit on an AVX2-only one of the same size sharing its cores with the
# tier's other workers. A hang still fails, after 30 minutes.
pytestmark = [pytest.mark.operations, pytest.mark.timeout(1800)]

# A 7-day shop; backfills of its last 2 days.

@pytest.fixture(scope="module")
def policy_shop(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Days 1-5 through `shoprec run --train none`, then three backfills of days 6-7 (both
    have history enough to train: what `last` skips on day 6, it skips by policy):

    A: --start day 5 (already run) --reprocess none --train none
    B: --reprocess completed --train last
    C: the same again (idempotency)
    """
    home = tmp_path_factory.mktemp("backfill") / "state"
    synth(home, days=7)
    prefix = shoprec(home, "run", "--start", day(1).isoformat(), "--end", day(5).isoformat(),
                     "--train", "none")
    assert prefix.returncode == 0, prefix.stdout + prefix.stderr[-3000:]
    out: dict = {"home": home, "steps": {}}
    steps = {
        "none": ("--start", day(5).isoformat(), "--end", day(7).isoformat(),
                 "--reprocess", "none", "--train", "none"),
        "last": ("--start", day(6).isoformat(), "--end", day(7).isoformat(),
                 "--reprocess", "completed", "--train", "last"),
        "again": ("--start", day(6).isoformat(), "--end", day(7).isoformat(),
                  "--reprocess", "completed", "--train", "last"),
    }
    for name, args in steps.items():
        done = shoprec(home, "backfill", *args)
        print(f"backfill {name}: {done.seconds:.0f}s, exit {done.returncode}\n{done.stdout}")
        assert done.returncode == 0, done.stdout + done.stderr[-3000:]
        backfill_id = last_backfill_id(home)
        out["steps"][name] = {
            "rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr,
            "seconds": done.seconds, "backfill_id": backfill_id,
            "runs": backfill_runs(home, backfill_id),
            "states": {r["run_id"]: task_states(home, r["run_id"])
                       for r in backfill_runs(home, backfill_id)},
            "partitions": partitions(home, [day(6), day(7)]),
            "versions": model_versions(home),
        }
    return out


def test_backfill_runs_are_real_backfill_runs_in_date_order(policy_shop: dict) -> None:
    home = policy_shop["home"]
    step = policy_shop["steps"]["none"]
    assert step["rc"] == 0, step["stdout"] + step["stderr"][-3000:]
    runs = step["runs"]
    # day 5 already had a finished run (shoprec run): reprocess none leaves it alone
    assert [r["logical_date"][:10] for r in runs] == [day(i).isoformat() for i in (6, 7)]
    assert {r["run_type"] for r in runs} == {"backfill"}
    assert all(r["logical_date"] == r["interval_start"] for r in runs)
    assert all(json.loads(r["conf"]) == {"train": "none", "backfill_end": day(7).isoformat()}
               for r in runs)
    assert all(r["state"] == "success" for r in runs)
    # one interval at a time, in date order
    for earlier, later in zip(runs, runs[1:], strict=False):
        assert earlier["end"] <= later["start"], (earlier, later)
    lines = step["stdout"].splitlines()
    assert any(line.startswith(f"{day(5)}  not run (already exists)") for line in lines)
    assert sum(1 for line in lines if line[:10] in {day(i).isoformat() for i in (6, 7)}
               and "success" in line) == 2
    summary = next(line for line in lines if line.startswith("backfill ") and " done, " in line)
    assert "2 done, 0 failed, 0 quarantined, 1 not run" in summary
    # the embedded scheduler and api-server are gone, and the backfill is marked complete
    assert airflow_rows(home, "select completed_at is not null from backfill where id = ?",
                        step["backfill_id"]) == [(1,)]


def test_train_none_runs_the_data_stages_only(policy_shop: dict) -> None:
    step = policy_shop["steps"]["none"]
    for run in step["runs"]:
        states = step["states"][run["run_id"]]  # as that backfill left them
        assert all(states[t] == "success" for t in DATA_TASKS), states
        assert all(states[t] == "skipped" for t in MODEL_TASKS), states
    assert step["versions"] == []


def test_train_last_trains_exactly_one_model_on_the_last_interval(policy_shop: dict) -> None:
    home = policy_shop["home"]
    step = policy_shop["steps"]["last"]
    assert step["rc"] == 0, step["stdout"] + step["stderr"][-3000:]
    runs = step["runs"]
    # reprocess completed: the same two runs, cleared and run again as backfill runs
    assert [r["run_id"] for r in runs] == [r["run_id"] for r in policy_shop["steps"]["none"]
                                           ["runs"]]
    trained = {r["logical_date"][:10]: task_states(home, r["run_id"])["train"] for r in runs}
    assert trained == {day(6).isoformat(): "skipped", day(7).isoformat(): "success"}
    assert [v["interval"] for v in step["versions"]] == [day(7).isoformat()]
    assert all(json.loads(r["conf"])["train"] == "last" for r in runs)
    summary = step["stdout"].splitlines()[-2]
    assert "2 done, 0 failed" in summary and "champion now" in summary


def test_rerunning_a_completed_range_is_idempotent(policy_shop: dict) -> None:
    steps = policy_shop["steps"]
    assert steps["again"]["rc"] == 0, steps["again"]["stdout"] + steps["again"]["stderr"]
    # same feature partitions every time the range is processed
    assert_same_partitions(steps["none"]["partitions"], steps["last"]["partitions"])
    assert_same_partitions(steps["last"]["partitions"], steps["again"]["partitions"])
    # no new model version: the interval's MLflow run and version are reused
    assert steps["again"]["versions"] == steps["last"]["versions"]
    assert len(steps["again"]["versions"]) == 1
