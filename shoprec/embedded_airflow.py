"""An Airflow api-server and scheduler for one backfill, where no scheduler serves the
metadata DB (the embedded profile): child processes of ``shoprec backfill``, started and
stopped through shoprec.supervisor, logs in ``<log_dir>/api-server.log`` and
``scheduler.log``.

The LocalExecutor's task processes reach the metadata DB through the api-server's Execution
API, hence the api-server. The scheduler runs with ``use_job_schedule=False``: it only starts
queued runs (the backfill's), so unpausing the DAG does not make it schedule today's
interval. Each component leads its own process group and is stopped with everything it
started (SIGTERM, then SIGKILL: the scheduler has been seen to ignore SIGTERM), so no
orphaned task process survives.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

from shoprec import supervisor

log = logging.getLogger(__name__)

API_START_TIMEOUT_S = 120.0
STOP_GRACE_S = 15.0


class EmbeddedAirflow:
    """An api-server on a free port and a scheduler that only runs queued runs."""

    def __init__(self, env: dict[str, str], log_dir: Path):
        self.port = supervisor.free_port()
        self.log_dir = log_dir
        self.env = {
            **env,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{self.port}/execution/",
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{self.port}/",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            # The scheduler serves task logs on 8793 by default: clash-free with a running stack.
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(supervisor.free_port()),
        }
        # Tokens the scheduler issues must verify in the api-server: one shared secret.
        self.env.setdefault("AIRFLOW__API_AUTH__JWT_SECRET", secrets.token_urlsafe(32))
        self.records: dict[str, supervisor.Record] = {}

    def start(self) -> EmbeddedAirflow:
        """Start the api-server, wait until it answers, then start the scheduler.

        Raises:
            supervisor.ProcessFailed: the api-server exited or did not answer in time.
        """
        self._spawn("api-server", ["api-server", "--port", str(self.port),
                                   "--host", "127.0.0.1", "--workers", "1"])
        health = f"http://127.0.0.1:{self.port}/api/v2/monitor/health"
        supervisor.wait_healthy(
            {"api-server": self.records["api-server"]},
            lambda pending: pending if supervisor.http_ok(health, timeout=2) else [],
            timeout=API_START_TIMEOUT_S)
        self._spawn("scheduler", ["scheduler"])
        return self

    def _spawn(self, name: str, args: list[str]) -> None:
        record = supervisor.start([supervisor.executable("airflow"), *args], self.env,
                                  self.log_dir / f"{name}.log", by="shoprec backfill")
        self.records[name] = record
        log.debug("started airflow %s (pid %d), log %s", name, record["pid"], record["log"])

    def check_alive(self) -> None:
        """Raises supervisor.ProcessFailed when a component has exited."""
        for name, record in self.records.items():
            if not supervisor.alive(record):
                raise supervisor.ProcessFailed(f"airflow {name} exited; see {record['log']}")

    def stop(self) -> None:
        """Stop the scheduler and the api-server with every process they started."""
        supervisor.stop(dict(reversed(self.records.items())), grace=STOP_GRACE_S)
        self.records.clear()
