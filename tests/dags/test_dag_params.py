"""shoprec_daily's run parameters, assets, training policy and failure callback.

The DAG is parsed for real (DagBag); the callback posts to a real local HTTP server.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from core.settings import DAGS_FOLDER, GPU_POD_TEMPLATE
from shoprec.alerts import report_task_failure
from shoprec.params import check_run_params, train_policy, training_decision

pytestmark = pytest.mark.fast

DATA_TASKS = ("validate", "build_features", "materialize")


@pytest.fixture(scope="module")
def bag():
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    from airflow.dag_processing.dagbag import DagBag

    parsed = DagBag(dag_folder=str(DAGS_FOLDER))
    assert parsed.import_errors == {}
    return parsed


@pytest.fixture(scope="module")
def daily(bag):
    return bag.dags["shoprec_daily"]


@pytest.fixture(scope="module")
def served_params(daily):
    """The params as the api-server and the backfill code see them (the serialized DAG):
    ``POST /api/v2/backfills`` and ``airflow backfill create`` validate
    ``params.deep_merge(conf)`` before they create any run."""
    from airflow.serialization.serialized_objects import DagSerialization

    return DagSerialization.deserialize_dag(DagSerialization.serialize_dag(daily)).params


def test_params_have_a_json_schema_and_valid_defaults(daily) -> None:
    params = daily.params
    assert set(params.keys()) == {"train", "skip_training", "force_promotion",
                                  "promotion_reason", "landing_root", "backfill_end"}
    schemas = {key: params.get_param(key).schema for key in params.keys()}
    assert schemas["train"]["enum"] == ["auto", "each", "last", "none"]
    assert schemas["skip_training"]["type"] == "boolean"
    assert schemas["force_promotion"]["type"] == "boolean"
    assert schemas["promotion_reason"]["type"] == ["null", "string"]
    assert schemas["landing_root"]["type"] == ["null", "string"]
    # every param has a title and a description: the trigger form shows them
    for key in params.keys():
        assert params.get_param(key).description, key
        assert schemas[key].get("title"), key
    assert params.validate() == {"train": "auto", "skip_training": False,
                                 "force_promotion": False, "promotion_reason": None,
                                 "landing_root": None, "backfill_end": None}
    # every param is documented in the DAG's doc_md
    for key in params.keys():
        assert f"`{key}`" in daily.doc_md, key


@pytest.mark.parametrize("conf", [
    {"train": "sometimes"},
    {"train": None},
    {"force_promotion": "yes"},
    {"skip_training": 1},
    {"landing_root": 5},
    {"promotion_reason": "x" * 501},
])
def test_a_bad_param_value_is_rejected(served_params, conf: dict) -> None:
    with pytest.raises(ValueError, match="Invalid input for param"):
        served_params.deep_merge(conf).validate()


def test_good_confs_validate(served_params) -> None:
    for conf in ({"train": "last", "backfill_end": "2026-01-14"}, {"train": "none"},
                 {"force_promotion": True, "promotion_reason": "beats v6 on the holdout"},
                 {"landing_root": "/data/landing"}):
        assert served_params.deep_merge(conf).validate()


def test_rules_across_params(tmp_path: Path) -> None:
    assert check_run_params({"force_promotion": False}) is None
    assert "promotion_reason" in check_run_params({"force_promotion": True})
    assert "promotion_reason" in check_run_params({"force_promotion": True,
                                                   "promotion_reason": "   "})
    assert check_run_params({"force_promotion": True, "promotion_reason": "ok"}) is None
    assert "not a date" in check_run_params({"backfill_end": "14/01/2026"})
    assert "not a folder" in check_run_params({"landing_root": str(tmp_path / "missing")})
    assert check_run_params({"landing_root": str(tmp_path)}) is None
    assert check_run_params({"landing_root": "s3://bucket/landing"}) is None


@pytest.mark.parametrize(("params", "run_type", "policy"), [
    ({"train": "auto"}, "scheduled", "each"),
    ({"train": "auto"}, "manual", "each"),
    ({"train": "auto"}, "backfill", "last"),
    ({"train": "each"}, "backfill", "each"),
    ({"train": "none"}, "scheduled", "none"),
    ({"train": "each", "skip_training": True}, "manual", "none"),
    ({}, "backfill", "last"),
])
def test_train_policy(params: dict, run_type: str, policy: str) -> None:
    assert train_policy(params, run_type) == policy


def test_train_policy_accepts_airflow_run_types() -> None:
    from airflow.utils.types import DagRunType

    assert train_policy({"train": "auto"}, DagRunType.BACKFILL_JOB) == "last"
    assert train_policy({"train": "auto"}, DagRunType.SCHEDULED) == "each"


def test_training_decision_last_trains_only_on_the_backfill_end() -> None:
    params = {"train": "last", "backfill_end": "2026-01-03"}
    assert "last interval 2026-01-03" in training_decision("2026-01-01", params, params,
                                                           "backfill")
    assert training_decision("2026-01-03", params, params, "backfill") is None
    assert "train=none" in training_decision("2026-01-03", {"train": "none"}, {}, "backfill")
    assert training_decision("2026-01-01", {"train": "each"}, {}, "backfill") is None


def test_training_decision_without_backfill_end_looks_at_queued_runs() -> None:
    # a backfill created in the UI without backfill_end: last = nothing left queued
    assert "still queued" in training_decision("2026-01-01", {"train": "last"}, {}, "backfill",
                                               queued_runs=lambda: 2)
    assert training_decision("2026-01-03", {"train": "last"}, {}, "backfill",
                             queued_runs=lambda: 0) is None
    # a single manual run is its own last interval; the counter is not even asked
    assert training_decision("2026-01-03", {"train": "last"}, {}, "manual",
                             queued_runs=lambda: 1 / 0) is None


def test_assets_connect_landing_features_model_index(bag, daily) -> None:
    outlets = {t.task_id: [a.uri for a in t.outlets] for t in daily.tasks}
    assert outlets["validate"] == ["shoprec://landing/daily"]
    assert outlets["materialize"] == ["shoprec://features/daily"]
    assert outlets["register"] == ["shoprec://model/daily"]
    assert outlets["build_index"] == ["shoprec://index/daily"]
    consumer = bag.dags["shoprec_index_published"]
    assert "uri='shoprec://index/daily'" in repr(consumer.timetable.asset_condition)


def test_every_task_retries_with_backoff_and_reports_failures(daily) -> None:
    for task in daily.tasks:
        assert task.retries == 2
        assert task.retry_exponential_backoff
        callbacks = task.on_failure_callback
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        assert [c.__name__ for c in callbacks] == ["_on_failure"], task.task_id
    assert daily.max_active_runs == 1


# --- the failure callback against a real HTTP server ---------------------------------------

class _Hook(BaseHTTPRequestHandler):
    received: list[dict] = []
    delay = 0.0

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(self.delay)
        type(self).received.append({"json": json.loads(body),
                                    "content_type": self.headers["Content-Type"]})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def webhook():
    _Hook.received = []
    _Hook.delay = 0.0
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/alerts", _Hook
    server.shutdown()
    server.server_close()


def _context(day: dt.date, error: Exception) -> dict:
    start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
    ti = SimpleNamespace(dag_id="shoprec_daily", run_id=f"backfill__{start.isoformat()}",
                         task_id="validate", try_number=1,
                         log_url="http://127.0.0.1:8080/dags/shoprec_daily/runs/x/tasks/validate")
    return {"ti": ti, "data_interval_start": start,
            "data_interval_end": start + dt.timedelta(days=1), "exception": error}


def test_failure_callback_posts_the_summary(webhook, shop_home: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    url, hook = webhook
    monkeypatch.setenv("SHOPREC_ALERT_WEBHOOK", url)
    report = shop_home / "validation" / "date=2026-01-05"
    report.mkdir(parents=True)
    payload = report_task_failure(_context(dt.date(2026, 1, 5),
                                           RuntimeError("events: quantity out of range\nmore")))
    assert payload["posted"] is True
    assert len(hook.received) == 1
    sent = hook.received[0]
    assert sent["content_type"] == "application/json"
    body = sent["json"]
    assert {k: body[k] for k in ("dag_id", "interval", "task_id", "try_number")} == {
        "dag_id": "shoprec_daily", "interval": "2026-01-05", "task_id": "validate",
        "try_number": 1}
    assert body["run_id"].startswith("backfill__2026-01-05")
    assert body["log_url"].endswith("/tasks/validate")
    assert body["report"] == str(report)
    assert body["error"].startswith("RuntimeError: events: quantity out of range")


def test_failure_callback_survives_an_unreachable_or_slow_webhook(
        webhook, shop_home: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/alerts"
    monkeypatch.setenv("SHOPREC_ALERT_WEBHOOK", dead)
    payload = report_task_failure(_context(dt.date(2026, 1, 5), ValueError("boom")))
    assert payload["posted"] is False
    assert "shoprec task failed: shoprec_daily 2026-01-05 validate try 1: ValueError: boom" \
        in caplog.text

    url, hook = webhook
    hook.delay = 3.0
    monkeypatch.setenv("SHOPREC_ALERT_WEBHOOK", url)
    monkeypatch.setenv("SHOPREC_ALERT_TIMEOUT_SECONDS", "0.5")
    started = time.monotonic()
    payload = report_task_failure(_context(dt.date(2026, 1, 5), ValueError("boom")))
    assert payload["posted"] is False
    assert time.monotonic() - started < 2.5

    # even a context without a task instance does not raise
    monkeypatch.delenv("SHOPREC_ALERT_WEBHOOK")
    assert report_task_failure({})["task_id"] is None


@pytest.mark.parametrize(("env", "expected"), [
    ({"SHOPREC_PROFILE": "prod"}, {"pod_template_file": GPU_POD_TEMPLATE}),
    ({"SHOPREC_PROFILE": "prod", "SHOPREC_TRAIN_POD_TEMPLATE": ""}, {}),
    ({}, {}),
    ({"SHOPREC_TRAIN_POD_TEMPLATE": "/etc/pods/a100.yaml"},
     {"pod_template_file": "/etc/pods/a100.yaml"}),
])
def test_train_asks_for_the_gpu_pod_in_production(env: dict, expected: dict,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.dag_processing.dagbag import DagBag

    for key in ("SHOPREC_PROFILE", "SHOPREC_TRAIN_POD_TEMPLATE", "SHOPREC_CONFIG"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    dag = DagBag(dag_folder=str(DAGS_FOLDER)).dags["shoprec_daily"]
    assert dag.get_task("train").executor_config == expected
    assert all(dag.get_task(t).executor_config == {} for t in ("validate", "evaluate"))
