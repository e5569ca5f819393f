"""Rules on a run's parameters, called inside shoprec_daily's tasks.

``check_run_params`` checks what one JSON schema per param cannot (the validate task fails
the run on it); ``train_policy`` and ``training_decision`` decide whether an interval trains
(the train task skips when it does not): every interval, only a backfill's last one, or none.
Plain Python on the params and the run type: the DAG file stays declarative and these rules
are tested without Airflow.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

# The training policies a run or a backfill may ask for (auto resolves to one of them).
TRAIN_CHOICES = ("each", "last", "none")
BACKFILL_RUN_TYPE = "backfill"  # DagRunType.BACKFILL_JOB.value


def check_run_params(params: Mapping[str, Any]) -> str | None:
    """Rules across params that one JSON schema per param cannot express.

    Returns:
        What is wrong with the run's params, or None.
    """
    if params.get("force_promotion") and not str(params.get("promotion_reason") or "").strip():
        return "force_promotion needs a non-empty promotion_reason (it is recorded on the version)"
    end = params.get("backfill_end")
    if end:
        try:
            dt.date.fromisoformat(str(end))
        except ValueError:
            return f"backfill_end {end!r} is not a date (YYYY-MM-DD)"
    root = params.get("landing_root")
    if root and "://" not in str(root) and not Path(str(root)).is_dir():
        return f"landing_root {root!r} is not a folder"
    return None


def _run_type_value(run_type: Any) -> str:
    """A DagRunType or its string value, as the string."""
    return str(getattr(run_type, "value", run_type))


def train_policy(params: Mapping[str, Any], run_type: Any) -> str:
    """The run's effective training policy: each, last or none.

    ``auto`` (the default) means ``each`` for scheduled and manual runs and ``last`` for
    backfill runs; ``skip_training`` forces ``none``.
    """
    if params.get("skip_training"):
        return "none"
    policy = str(params.get("train") or "auto")
    if policy == "auto":
        return "last" if _run_type_value(run_type) == BACKFILL_RUN_TYPE else "each"
    if policy not in TRAIN_CHOICES:
        raise ValueError(f"train={policy!r}: expected auto, each, last or none")
    return policy


def training_decision(day: str, params: Mapping[str, Any], conf: Mapping[str, Any],
                      run_type: Any, queued_runs: Callable[[], int] | None = None) -> str | None:
    """Whether this interval trains; the skip reason when it does not.

    ``last`` trains on the backfill's last interval only. That interval is the run conf's
    ``backfill_end`` (``shoprec backfill`` always sets it); for a backfill created elsewhere
    without it (the UI's form), the last interval is the one that runs when no queued run of
    the DAG is left (backfill runs are created queued and run one at a time, in date order).
    A single run that is not part of a backfill is its own last interval.

    Args:
        day: the interval's day, YYYY-MM-DD.
        params: the run's params (DAG defaults merged with the run conf).
        conf: the run's conf as given.
        run_type: the DagRun's run type.
        queued_runs: counts this DAG's queued runs (only asked for when needed).

    Returns:
        None to train, or why training is skipped.
    """
    policy = train_policy(params, run_type)
    if policy == "none":
        why = "skip_training" if params.get("skip_training") else "train=none"
        return f"training is off for this run ({why}): data stages only"
    if policy == "each":
        return None
    later = later_intervals(day, params, conf, run_type, queued_runs)
    return None if later is None else f"train=last: {later}"


def later_intervals(day: str, params: Mapping[str, Any], conf: Mapping[str, Any],
                    run_type: Any, queued_runs: Callable[[], int] | None = None) -> str | None:
    """Why this interval is not the last of its backfill (``training_decision``'s rule:
    the conf's ``backfill_end``, else the backfill's queued runs), or None when it is the
    last, or no backfill's."""
    end = params.get("backfill_end") or conf.get("backfill_end")
    if end:
        if day < str(end):
            return f"later intervals follow, up to this backfill's last interval {end}"
        return None
    if _run_type_value(run_type) != BACKFILL_RUN_TYPE or queued_runs is None:
        return None
    waiting = queued_runs()
    if waiting > 0:
        return f"{waiting} later interval(s) of this backfill still queued"
    return None

