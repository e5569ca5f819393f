"""Keep one long-lived component running: restart it when it exits, as systemd's
``Restart=always`` or a Kubernetes pod's restart policy would.

``shoprec up`` starts every component of a profile through this keeper
(``python -m shoprec.keeper --name airflow-scheduler -- airflow scheduler``). Airflow's
scheduler, dag-processor and triggerer exit when their database connection dies (a PostgreSQL
restart, a failover); without a keeper the next DAG run would wait forever for a scheduler.

Rules:

- The first run of the command must live ``--startup-grace`` seconds (default 15). If it exits
  sooner, the keeper exits with its code: a component that cannot start (a bad setting, a
  port in use) fails ``shoprec up`` at once instead of being restarted in a loop.
- After that, whenever the command exits (whatever its code), it is started again after a
  back-off of 1, 2, 4 ... up to ``--max-backoff`` seconds (default 30); the back-off starts
  again from 1 s once a run has lived 60 s. Each restart is logged on stdout (the component's
  log): ``shoprec.keeper: <name> exited with code N after T s; restart #k in D s``.
- SIGTERM or SIGINT stops the keeper: the signal is passed to the command, which is never
  restarted after it, and the keeper exits with the command's code. The command runs in the
  keeper's process group, so ``shoprec down`` (which signals the whole group) stops both.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

STABLE_AFTER_S = 60.0


def backoff(restarts: int, max_backoff: float) -> float:
    """Seconds to wait before restart number ``restarts`` (1-based) of a series."""
    return float(min(max_backoff, 2 ** max(0, restarts - 1)))


def keep(cmd: Sequence[str], name: str, *, startup_grace: float = 15.0,
         max_backoff: float = 30.0, echo: Callable[[str], None] | None = None) -> int:
    """Run ``cmd`` until the keeper is told to stop; restart it whenever it exits.

    Args:
        cmd: the component's command.
        name: its name, for the log lines.
        startup_grace: a first run that exits sooner fails the keeper (no restart).
        max_backoff: the longest wait between two starts, seconds.
        echo: where the log lines go (stdout, flushed, by default).

    Returns:
        The exit code to leave with: the command's last code (0 when it stopped cleanly
        after SIGTERM, 1 when a signal killed it).
    """
    say = echo or (lambda line: print(line, flush=True))
    stopping: list[int] = []
    child: list[subprocess.Popen] = []

    def on_signal(signum: int, _frame: object) -> None:
        stopping.append(signum)
        if child and child[-1].poll() is None:
            child[-1].send_signal(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        restarts = 0  # in the current series (reset after a stable run)
        total = 0
        first = True
        while True:
            started = time.monotonic()
            child.append(subprocess.Popen(list(cmd)))
            if len(child) > 1:
                child.pop(0)
            code = child[-1].wait()
            lived = time.monotonic() - started
            if stopping:
                return code if code >= 0 else 0
            if first and lived < startup_grace:
                say(f"shoprec.keeper: {name} exited with code {code} after {lived:.1f} s, "
                    f"during start-up: not restarting")
                return code if code > 0 else 1
            first = False
            restarts = 1 if lived >= STABLE_AFTER_S else restarts + 1
            total += 1
            wait = backoff(restarts, max_backoff)
            say(f"shoprec.keeper: {name} exited with code {code} after {lived:.1f} s; "
                f"restart #{total} in {wait:.0f} s")
            deadline = time.monotonic() + wait
            while not stopping and time.monotonic() < deadline:
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            if stopping:
                return 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shoprec.keeper", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="the component's name, for the log")
    parser.add_argument("--startup-grace", type=float, default=15.0)
    parser.add_argument("--max-backoff", type=float, default=30.0)
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the command to keep")
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("no command after --")
    return keep(cmd, args.name, startup_grace=args.startup_grace,
                max_backoff=args.max_backoff)


if __name__ == "__main__":
    sys.exit(main())
