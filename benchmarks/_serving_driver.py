"""The serving benchmark's driver: the real server, the requests it is sent, the load runs.

The server is ``uvicorn --factory serving.app:create_app`` (``--workers`` processes) on a free
loopback port, in its own session so that its CPU and memory can be summed. Each load run is
a separate process (``_serving_load.py``): a fixed request rate, latency measured from each
request's scheduled send time. ``max_throughput`` searches the highest rate an endpoint
sustains; ``settle`` keeps one run's backlog out of the next.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from _serving_setup import PROJECT_ROOT, ShopSpec

LOAD_SCRIPT = Path(__file__).resolve().parent / "_serving_load.py"
ENDPOINTS = ("recommend", "similar", "search")
# p99 targets (ms) at --rate, from the tracker's serving issue (2-core machine).
P99_TARGET_MS = {"recommend": 25.0, "similar": 15.0, "search": 50.0}
SWAP_POLL_SECONDS = 2.0  # how often the benchmark's server checks the champion alias
SWAP_WINDOW_S = 40.0  # /recommend measured from just before the alias moves
COLD_WINDOW_S = 20.0  # /recommend measured from the moment /readyz says ready
LOAD_TIMEOUT_S = 10.0  # a fixed-rate request that takes longer fails (counted at this time)
UNKNOWN_USER_SHARE = 0.10  # /recommend for visitors the store does not know (cold start)
# Known users are drawn with Zipf weights 1 / rank^USER_ZIPF (rank: a random order of the
# shop's users): a few users come back often, most rarely, as on a shop's site.
USER_ZIPF = 1.0
# /search: this share of queries comes from a head of HEAD_QUERIES popular queries (Zipf
# over the head: these repeat, as real query logs do); the rest are new combinations of
# words from two random titles, almost never seen twice (the query cache does not help).
HEAD_QUERY_SHARE = 0.2
HEAD_QUERIES = 200
K = 10
MIN_RATE = 1.0  # req/s: the throughput search gives up below this


@dataclass
class Targets:
    """Request paths per endpoint (and ``healthz``, the floor), and the ids they were drawn
    from (for the in-process breakdown)."""

    paths: dict[str, list[str]]
    users: list[str]
    products: list[str]
    queries: list[str]


def request_targets(settings: Any, spec: ShopSpec, n: int, seed: int) -> Targets:
    """``n`` request paths per endpoint: known users drawn Zipf-like (``USER_ZIPF``) and
    ``UNKNOWN_USER_SHARE`` unknown visitors, random catalogue products, and queries: a
    ``HEAD_QUERY_SHARE`` from a Zipf head of repeated queries, the rest new word mixes."""
    from features.contract import catalog_as_of, read_upto

    rng = random.Random(seed)
    users = sorted(read_upto(settings.landing_root, "users", spec.last_day)["user_id"].unique())
    catalog = catalog_as_of(settings.landing_root, spec.last_day)
    products = catalog["product_id"].astype(str).tolist()
    titles = catalog["title"].astype(str).tolist()
    rng.shuffle(users)
    weights = [1.0 / (rank + 1) ** USER_ZIPF for rank in range(len(users))]
    known = rng.choices(users, weights=weights, k=n)
    picked_users = [f"U-bench-visitor-{i}" if rng.random() < UNKNOWN_USER_SHARE else known[i]
                    for i in range(n)]
    picked_products = [rng.choice(products) for _ in range(n)]

    def phrase() -> str:  # 2-3 consecutive words of a title
        words = rng.choice(titles).lower().split()
        size = min(len(words), rng.choice((2, 3)))
        first = rng.randrange(len(words) - size + 1)
        return " ".join(words[first:first + size])

    def mix() -> str:  # words of two titles together: a query nobody typed before
        words = rng.choice(titles).lower().split() + rng.choice(titles).lower().split()
        return " ".join(rng.sample(words, min(len(words), rng.choice((2, 3, 4)))))

    head = [phrase() for _ in range(HEAD_QUERIES)]
    head_weights = [1.0 / (rank + 1) for rank in range(HEAD_QUERIES)]
    queries = [rng.choices(head, weights=head_weights)[0] if rng.random() < HEAD_QUERY_SHARE
               else mix() for _ in range(n)]
    paths = {
        "recommend": [f"/recommend/{quote(u, safe='')}?k={K}" for u in picked_users],
        "similar": [f"/similar/{quote(p, safe='')}?k={K}" for p in picked_products],
        "search": [f"/search?q={quote(q)}&k={K}" for q in queries],
        "healthz": ["/healthz"],
    }
    return Targets(paths, picked_users, picked_products, queries)


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """``uvicorn --factory serving.app:create_app`` in its own session (``workers``
    processes; CPU and memory are summed over the session's processes)."""

    def __init__(self, settings: Any, log_path: Path, access_log: bool,
                 torch_threads: int | None = None, workers: int = 1):
        self.settings, self.access_log, self.workers = settings, access_log, workers
        # OMP/MKL thread counts are read when torch loads: the only way to set them for
        # the server without touching its code
        self.env = ({} if torch_threads is None else
                    {"OMP_NUM_THREADS": str(torch_threads), "MKL_NUM_THREADS": str(torch_threads)})
        # follow the champion alias every SWAP_POLL_SECONDS: ``swap_under_load`` moves it
        self.env["SHOPREC_SERVING_POLL_SECONDS"] = str(SWAP_POLL_SECONDS)
        self.env["SHOPREC_SERVING_WORKERS"] = str(workers)  # /readyz waits for all of them
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self.restarts = 0
        self.start()

    def start(self) -> None:
        """Start the server on a fresh port (it is not ready yet: ``wait_ready``)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        settings, access_log, log_path = self.settings, self.access_log, self.log_path
        command = [sys.executable, "-m", "uvicorn", "--factory", "serving.app:create_app",
                   "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
                   "--workers", str(self.workers)]
        if not access_log:
            command.append("--no-access-log")
        with log_path.open("ab") as fh:
            self.proc = subprocess.Popen(command, cwd=PROJECT_ROOT,
                                         env={**os.environ, **settings.service_env(),
                                              **self.env},
                                         stdout=fh, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait_ready(self, timeout: float = 900.0) -> float:
        """Wait until /readyz answers 200; returns the seconds waited. Fails early when the
        server exits or reports that loading the champion failed."""
        import httpx

        started = time.perf_counter()
        while time.perf_counter() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; "
                                   f"see {self.log_path}")
            with contextlib.suppress(httpx.HTTPError, ValueError):
                response = httpx.get(f"{self.url}/readyz", timeout=5)
                if response.status_code == 200:
                    return time.perf_counter() - started
                detail = response.json().get("detail", "")
                if detail and detail != "no bundle loaded" \
                        and not detail.startswith("waiting for workers"):  # a load failed: no point waiting
                    raise RuntimeError(f"server cannot load the champion: {detail}; "
                                       f"see {self.log_path}")
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout:.0f} s; see {self.log_path}")

    def _processes(self) -> dict[Path, list[str]]:
        """/proc entries of the server's session (the supervisor and its workers), each with
        its stat fields after the command name (which may hold spaces)."""
        out = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == self.proc.pid:  # the session id: start_new_session=True
                out[entry] = fields
        return out

    def cpu_seconds(self) -> float:
        """User + system CPU of the server's processes so far (Linux /proc; NaN elsewhere)."""
        try:
            ticks = sum(int(f[11]) + int(f[12]) for f in self._processes().values())
            return ticks / os.sysconf("SC_CLK_TCK") if ticks else math.nan
        except (OSError, IndexError, ValueError):
            return math.nan

    def rss_mib(self) -> float:
        """Resident memory of the server's processes together (MiB)."""
        total = 0.0
        try:
            for entry in self._processes():
                for line in (entry / "status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) / 1024
        except OSError:
            pass
        return total or math.nan

    def stop(self) -> None:
        """SIGTERM the server's process group; SIGKILL it after 15 s."""
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def drive(server: Server, paths: list[str], rate: float, seconds: float, warmup: float,
          timeout: float) -> dict[str, Any]:
    """One open-loop run from a separate process; adds the server's CPU per request."""
    spec = {"url": server.url, "paths": paths, "rate": rate, "seconds": seconds,
            "warmup_seconds": warmup, "timeout": timeout, "max_connections": 512}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(spec, fh)
    try:
        cpu, started = server.cpu_seconds(), time.perf_counter()
        out = subprocess.run([sys.executable, str(LOAD_SCRIPT), fh.name], check=True,
                             capture_output=True, text=True)
        cpu, wall = server.cpu_seconds() - cpu, time.perf_counter() - started
    finally:
        os.unlink(fh.name)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    requests = result["sent"] + int(round(rate * warmup))
    # CPU per request counts requests still queued when the driver gave up as well
    result["server_cpu_ms_per_req"] = cpu / max(requests, 1) * 1e3
    result["server_cores_busy"] = cpu / wall
    result["driver_wall_s"] = wall
    return result


def fixed_rate(server: Server, targets: Targets, served: dict[str, bool], name: str,
               rate: float, seconds: float, warmup: float) -> dict[str, Any]:
    """One endpoint at ``rate`` for ``seconds`` after ``warmup``, after any earlier backlog is
    worked off; an endpoint with a p99 target gets its verdict ("pass": no errors, p99 within
    the target)."""
    settle(server, targets, served)
    result = drive(server, targets.paths[name], rate, seconds, warmup, timeout=LOAD_TIMEOUT_S)
    return verdict(name, result)


def warm(server: Server, targets: Targets, served: dict[str, bool], n: int = 20) -> None:
    """A few requests per endpoint: the first ones open the store, load the encoder, ..."""
    import httpx

    with httpx.Client(base_url=server.url, timeout=120) as client:
        for name in ENDPOINTS:
            if served.get(name):
                for path in targets.paths[name][:n]:
                    client.get(path)


def settle(server: Server, targets: Targets, served: dict[str, bool],
           limit: float = 15.0) -> None:
    """Make sure no backlog of an earlier run is still being worked off.

    The server keeps computing requests whose client gave up (a timed-out request stays
    queued in its thread pool), which would slow the next run down. Wait until the server
    process is idle (under 0.2 cores over a second) and /healthz answers quickly; if that
    does not happen within ``limit`` seconds, restart the server.
    """
    import httpx

    deadline = time.perf_counter() + limit
    with httpx.Client(timeout=limit) as client:
        while time.perf_counter() < deadline:
            cpu = server.cpu_seconds()
            time.sleep(1.0)
            idle = not server.cpu_seconds() - cpu >= 0.2  # NaN (no /proc): rely on /healthz
            started = time.perf_counter()
            with contextlib.suppress(httpx.HTTPError):
                client.get(f"{server.url}/healthz")
            if idle and time.perf_counter() - started < 0.02:
                return
    print(f"    (server still busy with an earlier backlog after {limit:.0f} s: restarting it)",
          flush=True)
    server.stop()
    server.start()
    server.wait_ready()
    server.restarts += 1
    warm(server, targets, served)


def served_endpoints(server: Server) -> dict[str, bool]:
    """Which of the benchmarked endpoints the app declares (its OpenAPI paths)."""
    import httpx

    paths = httpx.get(f"{server.url}/openapi.json", timeout=30).json().get("paths", {})
    return {name: any(p == f"/{name}" or p.startswith(f"/{name}/") for p in paths)
            for name in ENDPOINTS}


def sustained(result: dict[str, Any], max_p99_ms: float) -> bool:
    """Whether a run held its rate: no errors, p99 within the bound, >= 95 % answered."""
    return (result["errors"] == 0 and result["p99_ms"] <= max_p99_ms
            and result["achieved_rps"] >= 0.95 * result["rate"])


def max_throughput(server: Server, targets: Targets, served: dict[str, bool], name: str, *,
                   start: float, seconds: float, max_p99_ms: float, bisect: int,
                   ceiling: float, known_good: float = 0.0) -> dict[str, Any]:
    """Double the rate from ``start`` until a step is not sustained, then bisect; prints
    each step and the result.

    ``known_good``: a rate already sustained (the fixed-rate run): doubling starts above it.

    Returns:
        {"max_rps": highest sustained offered rate (0 if even ``start`` fails), "steps": [...]}
    """
    print(f"  /{name}", flush=True)
    steps: list[dict[str, Any]] = []

    # a request 10x over the p99 bound fails the step anyway: do not wait longer for it
    timeout = max(1.0, 10 * max_p99_ms / 1e3)

    def step(rate: float) -> bool:
        settle(server, targets, served)
        result = drive(server, targets.paths[name], rate, seconds, warmup=1.0, timeout=timeout)
        ok = sustained(result, max_p99_ms)
        steps.append({**result, "sustained": ok})
        print(f"    {rate:7.0f} req/s  p99 {result['p99_ms']:8.1f} ms  errors "
              f"{result['errors']:5d}  answered {result['achieved_rps']:7.1f}/s  "
              f"server {result['server_cores_busy']:.2f} cores  "
              f"{'ok' if ok else 'NOT sustained'}", flush=True)
        return ok

    # bracket: double while sustained; halve while nothing has been sustained yet
    good, bad, rate = known_good, math.inf, known_good * 2 if known_good else start
    while MIN_RATE <= rate <= ceiling:
        if step(rate):
            good = rate
            if math.isfinite(bad):
                break
            rate *= 2
        else:
            bad = rate
            if good:
                break
            rate = round(rate / 2)
    for _ in range(bisect if math.isfinite(bad) else 0):
        mid = round((good + bad) / 2) if good else round(bad / 2)
        if mid in (good, bad) or mid < 1:
            break
        if step(mid):
            good = mid
        else:
            bad = mid
    print(f"    -> {good:.0f} req/s sustained", flush=True)
    return {"max_rps": good, "first_failed_rps": bad if math.isfinite(bad) else None,
            "steps": steps}



def verdict(name: str, result: dict[str, Any]) -> dict[str, Any]:
    """``result`` with the endpoint's p99 target and whether it passed (no errors, p99
    within the target)."""
    target = P99_TARGET_MS.get(name)
    if target is not None:
        result["target_p99_ms"] = target
        result["pass"] = result["errors"] == 0 and result["p99_ms"] <= target
    return result


def cold_start(server: Server, targets: Targets, rate: float) -> dict[str, Any]:
    """/recommend at ``rate`` for ``COLD_WINDOW_S`` from the moment the server says ready
    (call it right after ``wait_ready``: no request has warmed anything yet)."""
    return verdict("recommend", drive(server, targets.paths["recommend"], rate, COLD_WINDOW_S,
                                      0.0, timeout=LOAD_TIMEOUT_S))


def swap_under_load(server: Server, targets: Targets, settings: Any,
                    rate: float) -> dict[str, Any]:
    """/recommend at ``rate`` while the champion moves to a new version: the champion's run
    registered again (a new version, the same files: what a promotion looks like to the
    server), the alias moved 3 s into the window; every worker follows it within
    ``SWAP_POLL_SECONDS``, loading and warming the new bundle beside the traffic.

    Returns:
        The window's figures, with ``from_version``/``to_version`` and the versions the
        server answered with afterwards (each worker should be on the new one).
    """
    import threading

    import httpx

    from training.registry import CHAMPION, alias_version, mlflow_client

    client = mlflow_client(settings)
    champion = alias_version(client, settings.model_name, CHAMPION)
    others = [int(v.version) for v in
              client.search_model_versions(f"name = '{settings.model_name}'")
              if str(v.version) != str(champion.version)]
    other = (str(max(others)) if others
             else mlflow_register_again(settings, champion.run_id))
    # what a promotion does before the alias moves (serving.user_vectors.before_promotion):
    # the new version's vectors for the users of the last SHOPREC_USER_VECTORS_DAYS days
    from serving.user_vectors import before_promotion

    started = time.perf_counter()
    prepared = before_promotion(settings, other, last_interval(settings))
    prepared["wall_s"] = round(time.perf_counter() - started, 1)

    def move() -> None:
        time.sleep(3.0)
        client.set_registered_model_alias(settings.model_name, CHAMPION, other)

    mover = threading.Thread(target=move)
    mover.start()
    result = drive(server, targets.paths["recommend"], rate, SWAP_WINDOW_S, 0.0,
                   timeout=LOAD_TIMEOUT_S)
    mover.join()
    time.sleep(2 * SWAP_POLL_SECONDS)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        seen = sorted({str(http.get("/version").json()["model_version"]) for _ in range(20)})
    result.update({"from_version": str(champion.version), "to_version": other,
                   "versions_after": seen, "prepared": prepared})
    return verdict("recommend", result)


def last_interval(settings: Any) -> Any:
    """The last interval the shop's feature build wrote."""
    import datetime as dt

    from features.partitions import partitions

    return max(p.day for p in partitions(str(settings.offline_root / "user_recent_products"),
                                         dt.date.max))


def mlflow_register_again(settings: Any, run_id: str) -> str:
    """A new model version of an already registered run (MLflow allows several)."""
    import mlflow

    from training.registry import _model_uri_of_run, mlflow_client

    version = mlflow.register_model(_model_uri_of_run(mlflow_client(settings), run_id),
                                    settings.model_name)
    return str(version.version)
