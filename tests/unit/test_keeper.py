"""shoprec.keeper: a component that exits after start-up is started again; one that cannot
start fails at once; a stop is never followed by a restart."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from shoprec import keeper, services, supervisor

pytestmark = pytest.mark.fast

SERVER = "print('up', flush=True); import time; time.sleep(300)"


def _kept(log: Path, code: str, grace: float = 0.5) -> dict:
    cmd = [sys.executable, "-m", "shoprec.keeper", "--name", "fake", "--startup-grace",
           str(grace), "--max-backoff", "1", "--", sys.executable, "-c", code]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return supervisor.start(cmd, env, log, by="test")


def _children(record: dict) -> list[int]:
    return [pid for pid, _ in supervisor.members(record) if pid != record["pid"]]


def _wait(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [keeper.backoff(n, 30) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_a_component_that_dies_is_started_again_and_a_stop_is_final(tmp_path: Path) -> None:
    log = tmp_path / "fake.log"
    record = _kept(log, SERVER)
    try:
        _wait(lambda: log.read_text().count("up\n") == 1 and len(_children(record)) == 1)
        time.sleep(1.0)  # past the start-up grace (0.5 s)
        first = _children(record)[0]
        os.kill(first, signal.SIGKILL)  # as a database restart kills Airflow's scheduler
        _wait(lambda: log.read_text().count("up\n") == 2)
        assert "shoprec.keeper: fake exited with code -9" in log.read_text()
        assert "restart #1 in 1 s" in log.read_text()
        assert services.restarts(log) == 1
        assert supervisor.alive(record)
        second = _children(record)
        assert len(second) == 1 and second[0] != first
        report = supervisor.stop({"fake": record}, grace=10)
        assert report == [{"component": "fake", "pid": record["pid"], "processes": 2,
                           "stopped": "SIGTERM"}]
        time.sleep(1.5)  # longer than the back-off: nothing comes back
        assert not supervisor.alive(record) and not supervisor.members(record)
        assert log.read_text().count("up\n") == 2
    finally:
        supervisor.stop({"fake": record}, grace=1)


def test_a_component_that_cannot_start_fails_at_once(tmp_path: Path) -> None:
    log = tmp_path / "broken.log"
    record = _kept(log, "import sys; sys.exit(3)", grace=30)
    _wait(lambda: not supervisor.alive(record), timeout=20)
    text = log.read_text()
    assert "exited with code 3" in text and "during start-up: not restarting" in text
    assert "restart #" not in text


def test_keep_returns_the_code_of_a_failed_start() -> None:
    lines: list[str] = []
    code = keeper.keep([sys.executable, "-c", "raise SystemExit(4)"], "inline",
                       startup_grace=30, echo=lines.append)
    assert code == 4 and "during start-up" in lines[0]
