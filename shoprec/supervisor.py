"""The one process supervisor: start a component in its own process group, wait until it is
healthy, stop it (SIGTERM, then SIGKILL after a grace period).

Its users: ``shoprec up`` / ``down`` (shoprec.services: the profile's long-lived components,
recorded in a PID file), the Airflow a backfill starts for its duration
(shoprec.embedded_airflow) and the demo's server (shoprec.demo).

A started component is described by its *record*, a JSON-able dict: ``pid``, ``pgid`` (the
same: every component leads its own session and process group), ``start`` (the process's
start time in clock ticks since boot), ``boot_id``, ``cmd``, ``log`` and ``started_at``;
callers may add keys (``url``, ``health``). The start time and the boot id make a record safe
to act on later, from another process or after a reboot: a PID that the kernel has handed to
another process is never signalled. Linux only (``/proc``).
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

Record = dict[str, Any]


class ProcessFailed(RuntimeError):
    """A supervised process exited during start-up or did not become healthy in time."""


def executable(name: str) -> str:
    """The ``name`` executable of this interpreter's environment (``airflow``, ``mlflow``,
    ``uvicorn``), else ``name`` as found on PATH."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def boot_id() -> str:
    """This boot's id: records from an earlier boot name no live process."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def proc_stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, pgid, start time in clock ticks since boot) of a live process, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    if fields[0] == "Z":  # a zombie has exited; only its parent's wait is missing
        return None
    return int(fields[1]), int(fields[2]), int(fields[19])


def same_process(pid: int, start: int) -> bool:
    """Whether ``pid`` is still the process that started at ``start`` (and not a zombie)."""
    info = proc_stat(pid)
    return info is not None and info[2] == start


def alive(record: Record) -> bool:
    """Whether the recorded leader process still runs."""
    return same_process(record["pid"], record["start"])


def members(record: Record) -> list[tuple[int, int]]:
    """The live processes of one recorded component, as (pid, start time) pairs.

    A process counts when it is the recorded leader (same PID *and* start time), or lives in
    the recorded process group or descends from the leader and started no earlier than it.
    Nothing else is ever returned, so stopping a record cannot hit a process it did not start.
    """
    if record.get("boot_id") != boot_id():
        return []  # the machine rebooted: every recorded process is gone
    pid, pgid, start = record["pid"], record["pgid"], record["start"]
    leader = proc_stat(pid)
    if leader is not None and leader[2] != start:
        # The PID was reused: the recorded group ended (Linux never hands out a PID that is
        # still some group's id), so nothing of ours is left under these numbers.
        return []
    table = {p: info for p in _all_pids() if (info := proc_stat(p)) is not None}
    ours = {pid} if leader is not None else set()
    ours |= {p for p, (_, group, began) in table.items() if group == pgid and began >= start}
    changed = True
    while changed:  # children that left the group (setsid) but descend from one of ours
        grown = {p for p, (ppid, _, began) in table.items()
                 if ppid in ours and began >= start} - ours
        ours |= grown
        changed = bool(grown)
    ours.discard(os.getpid())
    return sorted((p, table[p][2]) for p in ours if p in table)


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _signal(processes: Iterable[tuple[int, int]], sig: int) -> None:
    for pid, start in processes:
        if same_process(pid, start):  # re-check right before signalling
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def port_free(host: str, port: int) -> bool:
    """Whether a server could bind ``host:port`` now."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on at this moment."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_ok(url: str, timeout: float = 5.0) -> bool:
    """Whether ``url`` answers 200 (a health endpoint)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            return response.status == 200
    except Exception:  # noqa: BLE001 - not up (yet), whatever the reason
        return False


def start(cmd: list[str], env: Mapping[str, str], log_path: Path, *, by: str,
          cwd: Path | None = None) -> Record:
    """Start ``cmd`` in its own session and process group, output appended to ``log_path``.

    Args:
        cmd: the command; no secret on it (``ps`` shows it, the log and the record keep it).
        env: its whole environment.
        log_path: stdout and stderr go here, after a line naming the command and ``by``.
        by: who starts it, for that line (``shoprec up``).
        cwd: its working directory.

    Returns:
        Its record.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {by}: "
                  f"{shlex.join(cmd)}\n".encode())
        log.flush()
        process = subprocess.Popen(cmd, env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    info = proc_stat(process.pid)
    return {"pid": process.pid, "pgid": process.pid, "start": info[2] if info else 0,
            "boot_id": boot_id(), "cmd": list(cmd), "log": str(log_path),
            "started_at": time.time()}


def wait_healthy(records: Mapping[str, Record], healthy: Callable[[list[str]], Iterable[str]],
                 timeout: float, echo: Callable[[str], None] | None = None) -> None:
    """Wait until every component in ``records`` is healthy.

    Args:
        records: the components to wait for, by name.
        healthy: given the names still pending, returns those healthy now (one call per
            round, so a check shared by several components runs once).
        timeout: seconds to wait in all.
        echo: told ``<name> healthy (pid N)`` for each, as it becomes healthy.

    Raises:
        ProcessFailed: one exited, or some are not healthy within ``timeout`` (names the logs).
    """
    pending = list(records)
    deadline = time.monotonic() + timeout
    while pending:
        for name in pending:
            if not alive(records[name]):
                raise ProcessFailed(f"{name} exited during start-up; "
                                    f"see {records[name]['log']}")
        for name in [n for n in healthy(list(pending)) if n in pending]:
            if echo is not None:
                echo(f"  {name:<22} healthy  (pid {records[name]['pid']})")
            pending.remove(name)
        if pending and time.monotonic() > deadline:
            logs = ", ".join(records[n]["log"] for n in pending)
            raise ProcessFailed(f"not healthy after {timeout:.0f} s: {', '.join(pending)}; "
                                f"see {logs}")
        if pending:
            time.sleep(1.0)


def stop(records: Mapping[str, Record], grace: float) -> list[dict[str, Any]]:
    """Stop every recorded component with everything it started: SIGTERM to all their
    processes at once (in ``records``' order), SIGKILL to what is left after ``grace``
    seconds (Airflow's scheduler has been seen to ignore SIGTERM).

    Returns:
        One dict per component: component, pid, processes (how many were live), stopped
        ("SIGTERM", "SIGKILL after N s" or "not running").
    """
    found = {name: members(record) for name, record in records.items()}
    for processes in found.values():
        _signal(processes, signal.SIGTERM)

    def any_left() -> bool:
        return any(same_process(p, s) for processes in found.values() for p, s in processes)

    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any_left():
        time.sleep(0.2)
    report = []
    for name, processes in found.items():
        left = [(p, s) for p, s in processes if same_process(p, s)]
        _signal(left, signal.SIGKILL)
        how = ("not running" if not processes
               else f"SIGKILL after {grace:.0f} s" if left else "SIGTERM")
        report.append({"component": name, "pid": records[name]["pid"],
                       "processes": len(processes), "stopped": how})
    end = time.monotonic() + 5
    while time.monotonic() < end and any_left():
        time.sleep(0.1)
    return report
