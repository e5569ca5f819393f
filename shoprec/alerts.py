"""shoprec_daily's failure callback: a log line and, when configured, a webhook POST.

``report_task_failure`` is every task's ``on_failure_callback``. Its JSON payload
(``failure_summary``) names the DAG, run, interval, task and try, the task log's URL, the
interval's validation or quarantine report and the error; it is POSTed to
``SHOPREC_ALERT_WEBHOOK`` when set. An alert never fails the task's teardown: nothing here
raises.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import urllib.request
from collections.abc import Mapping
from typing import Any

from core.settings import Settings

log = logging.getLogger(__name__)

ALERT_TIMEOUT_SECONDS = 5.0


def _report_link(day: dt.date | None) -> str | None:
    """The validation/quarantine report of the interval, when there is one."""
    if day is None:
        return None
    try:
        from features.quarantine import quarantine_status

        settings = Settings.from_env()
        record = quarantine_status(settings.home, day)
        if record is not None and record.active:
            return str(record.report_html)
        folder = settings.home / "validation" / f"date={day.isoformat()}"
        return str(folder) if folder.exists() else None
    except Exception:  # noqa: BLE001 - a missing report must not break the alert
        return None


def failure_summary(context: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON an alert carries, from a task's Airflow context."""
    ti = context.get("ti") or context.get("task_instance")
    dag_run = context.get("dag_run")
    start = context.get("data_interval_start")
    end = context.get("data_interval_end")
    day = start.date() if start is not None else None
    error = context.get("exception")
    try:
        log_url = ti.log_url if ti is not None else None
    except Exception:  # noqa: BLE001 - no api base url configured
        log_url = None
    return {
        "dag_id": getattr(ti, "dag_id", None) or getattr(dag_run, "dag_id", None),
        "run_id": getattr(ti, "run_id", None) or getattr(dag_run, "run_id", None),
        "interval": day.isoformat() if day else None,
        "interval_start": start.isoformat() if start is not None else None,
        "interval_end": end.isoformat() if end is not None else None,
        "task_id": getattr(ti, "task_id", None),
        "try_number": getattr(ti, "try_number", None),
        "log_url": log_url,
        "report": _report_link(day),
        "error": (f"{type(error).__name__}: {error}" if error is not None else None),
    }


def post_alert(url: str, payload: dict[str, Any], timeout: float = ALERT_TIMEOUT_SECONDS) -> bool:
    """POST the payload as JSON; True when the webhook answered 2xx. Never raises."""
    body = json.dumps(payload, default=str).encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return 200 <= response.status < 300
    except Exception as exc:  # noqa: BLE001 - an alert must never fail the task's teardown
        log.warning("alert webhook failed (%s): %s", type(exc).__name__, exc)
        return False


def report_task_failure(context: Mapping[str, Any]) -> dict[str, Any]:
    """``on_failure_callback`` of shoprec_daily's tasks: a log line and an optional webhook.

    The webhook is ``SHOPREC_ALERT_WEBHOOK`` (unset: log only); the POST times out after
    ``SHOPREC_ALERT_TIMEOUT_SECONDS`` (default 5). Never raises.

    Returns:
        The payload (also what was posted).
    """
    try:
        payload = failure_summary(context)
    except Exception as exc:  # noqa: BLE001
        payload = {"error": f"could not summarise the failure: {exc}"}
    error = (payload.get("error") or "").splitlines()
    log.error("shoprec task failed: %s %s %s try %s: %s%s", payload.get("dag_id"),
              payload.get("interval"), payload.get("task_id"), payload.get("try_number"),
              error[0][:300] if error else "?",
              f" (report: {payload['report']})" if payload.get("report") else "")
    url = os.environ.get("SHOPREC_ALERT_WEBHOOK", "").strip()
    if url:
        try:
            timeout = float(os.environ.get("SHOPREC_ALERT_TIMEOUT_SECONDS", ALERT_TIMEOUT_SECONDS))
        except ValueError:
            timeout = ALERT_TIMEOUT_SECONDS
        payload["posted"] = post_alert(url, payload, timeout)
    return payload

