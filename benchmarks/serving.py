"""Serving latency and throughput: the real server on a synthetic shop, driven open-loop.

1. setup (reused when done before with the same arguments, under ``--home``): a synthetic
   shop (``features.synth.generate_shop``), features built and materialized into the Feast
   SQLite online store for every day, then the last day trained, evaluated, registered,
   indexed and made champion -- the DAG's functions, called in the DAG's order;
2. the real server (``uvicorn --factory serving.app:create_app``, ``--workers`` processes,
   default 2 as in the production profile) on a free
   loopback port;
3. from a separate process (``benchmarks/_load.py``), a fixed request rate per endpoint,
   latency measured from each request's scheduled send time: p50/p95/p99/max and errors of
   /recommend, /similar and /search, PASS/FAIL against the targets;
4. the highest rate each endpoint sustains (no errors, p99 <= ``--max-p99-ms``, >= 95 % of
   the offered rate answered);
5. where the time goes, the same kinds of requests measured in this process on the champion
   bundle and the online store (feature fetch, encoding, scoring, index search, filtering);
6. one summary table, and every figure as JSON beside the state.

    .venv/bin/python benchmarks/serving.py                       # 100k products, 50k users
    .venv/bin/python benchmarks/serving.py --products 2000 --users 1000 --seconds 3  # smoke

The server and the load driver share this machine's cores: on a 2-core machine the client's
CPU is taken from the server, so the figures are a floor for a server with its own cores.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LOAD_SCRIPT = Path(__file__).resolve().parent / "_load.py"
START = dt.date(2026, 1, 1)
ENDPOINTS = ("recommend", "similar", "search")
# p99 targets (ms) at --rate, from the tracker's serving issue (2-core machine).
P99_TARGET_MS = {"recommend": 25.0, "similar": 15.0, "search": 50.0}
UNKNOWN_USER_SHARE = 0.05  # /recommend for visitors the store does not know (cold start)
K = 10
# Bytes per (user, candidate, feature) float32 in Scorer.features, and how many copies of that
# tensor tuning holds at its peak (the features and the training copy).
FEATURE_BYTES, FEATURE_COPIES, FEATURE_COUNT = 4, 2, 17
TUNE_MEMORY_BUDGET = 3e9  # bytes for the pair-scorer tuning tensor, well under this box's RAM
MODEL_STEPS = ("train", "evaluate", "register", "build index", "champion")
MIN_RATE = 1.0  # req/s: the throughput search gives up below this

log = logging.getLogger("bench.serving")


# ---------------------------------------------------------------------------------------
# Setup: the synthetic shop through the pipeline's functions
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShopSpec:
    """What the setup builds. ``key`` (the shop and the encoder) names the state folder;
    the model steps are redone when ``tune_users`` changes."""

    products: int
    users: int
    days: int
    seed: int
    encoder: str
    tune_users: int
    evaluate: bool

    @property
    def data_signature(self) -> str:
        return f"p{self.products}-u{self.users}-d{self.days}-seed{self.seed}"

    @property
    def key(self) -> str:
        return f"{self.data_signature}-{self.encoder}"

    @property
    def model_signature(self) -> str:
        return f"{self.key}-tune{self.tune_users}"

    @property
    def last_day(self) -> dt.date:
        return START + dt.timedelta(days=self.days - 1)


def default_tune_users(products: int) -> int:
    """Validation users for tuning the pair scorers, capped so the (users, candidates, F)
    float32 feature tensor fits in memory (``ScorerConfig.max_users`` default otherwise)."""
    from training.scorer import ScorerConfig

    config = ScorerConfig()
    candidates = min(products, 3 * config.candidates + config.neighbour_candidates
                     + 2 * config.popular_candidates + config.history_len)  # at most
    per_user = candidates * FEATURE_COUNT * FEATURE_BYTES * FEATURE_COPIES
    return max(50, min(ScorerConfig().max_users, int(TUNE_MEMORY_BUDGET // per_user)))


class StepLog:
    """Timings and results of the setup steps, persisted so that a rerun skips a step done
    before with the same inputs (its signature)."""

    def __init__(self, path: Path):
        self.path = path
        self.steps: dict[str, dict[str, Any]] = (
            json.loads(path.read_text()) if path.exists() else {})

    def done(self, name: str, signature: str) -> bool:
        return self.steps.get(name, {}).get("signature") == signature

    def forget(self, name: str) -> None:
        self.steps.pop(name, None)

    def record(self, name: str, signature: str, seconds: float, result: Any = None) -> None:
        self.steps[name] = {"signature": signature, "seconds": round(seconds, 2),
                            "result": result}
        self.path.write_text(json.dumps(self.steps, indent=2, default=str))


@contextlib.contextmanager
def heartbeat(label: str, every: float = 60.0) -> Iterator[None]:
    """Print a 'still running' line every ``every`` seconds while a silent step runs."""
    stop = threading.Event()
    started = time.perf_counter()

    def beat() -> None:
        while not stop.wait(every):
            print(f"      ... {label} still running ({time.perf_counter() - started:.0f} s)",
                  file=sys.stderr, flush=True)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def stdout_to(path: Path) -> Iterator[None]:
    """Send this process's stdout (the file descriptor: Feast and MLflow print) to a file;
    progress bars and heartbeats stay on stderr."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    saved = os.dup(1)
    with path.open("ab") as fh:
        os.dup2(fh.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def warnings_to(path: Path) -> None:
    """Write Python warnings to a file: libraries reset the filters (ibis/duckdb deprecation
    warnings would fill the console during materialization)."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        with path.open("a") as fh:
            fh.write(warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = show


def run_step(steps: StepLog, name: str, signature: str, fn: Callable[[], Any],
             note: str = "", log_path: Path | None = None) -> Any:
    """Run one setup step unless done before with the same signature; print and persist
    its wall time."""
    if steps.done(name, signature):
        print(f"  {name:<22} reused ({steps.steps[name]['seconds']:.1f} s when built)",
              flush=True)
        return steps.steps[name]["result"]
    print(f"  {name:<22} running{f' ({note})' if note else ''}", flush=True)
    started = time.perf_counter()
    with heartbeat(name), (stdout_to(log_path) if log_path else contextlib.nullcontext()):
        result = fn()
    seconds = time.perf_counter() - started
    steps.record(name, signature, seconds, result)
    print(f"  {name:<22} {seconds:8.1f} s", flush=True)
    return result


def use_state(home: Path, encoder: str):
    """Point this process (and the children it starts) at the benchmark's own state."""
    for key in ("SHOPREC_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI"):
        os.environ[key] = f"sqlite:///{home / 'mlflow.db'}"
    os.environ.update({"SHOPREC_PROFILE": "local", "SHOPREC_HOME": str(home),
                       "SHOPREC_LANDING_ROOT": str(home / "landing"),
                       "SHOPREC_TEXT_ENCODER": encoder})
    from core.settings import Settings

    return Settings.from_env().prepare()


def minilm_probe(products: int, sample: int) -> dict[str, float]:
    """Time MiniLM (the production encoder) on ``sample`` synthetic product texts, and
    extrapolate to the whole catalogue. Nothing is cached."""
    from features.contract import product_text
    from features.synth import generate_shop
    from training.config import TrainConfig
    from training.text import TextEncoder

    with tempfile.TemporaryDirectory() as tmp:
        generate_shop(tmp, days=1, users=10, products=max(sample, 8), seed=1, start=START)
        from features.contract import read_partition

        texts = product_text(read_partition(tmp, "products", START))[:sample]
    config = TrainConfig(text_encoder="minilm")
    started = time.perf_counter()
    encoder = TextEncoder(config, progress=False)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    encoder.encode(texts, progress=False)
    seconds = time.perf_counter() - started
    rate = len(texts) / seconds
    out = {"load_s": load_s, "texts": len(texts), "texts_per_s": rate,
           "catalogue_estimate_s": products / rate}
    import torch

    threads = torch.get_num_threads()
    for n in sorted({threads, 1}, reverse=True):  # one query at a time, as /search does
        torch.set_num_threads(n)
        one = []
        for text in texts[:50]:
            t = time.perf_counter()
            encoder.encode([text], progress=False)
            one.append((time.perf_counter() - t) * 1e3)
        out[f"single_text_ms_p50_{n}_threads"] = sorted(one)[len(one) // 2]
    torch.set_num_threads(threads)
    return out


def setup(spec: ShopSpec, home: Path, minilm_sample: int, *, data_only: bool = False
          ) -> tuple[Any, dict[str, Any]]:
    """Build (or reuse) the shop and its champion (``data_only``: the shop and its features
    only). Returns (settings, step timings)."""
    from tqdm.auto import tqdm

    settings = use_state(home, spec.encoder)
    steps = StepLog(home / "bench-setup.json")
    data, model = spec.data_signature, spec.model_signature
    step_log = home / "logs" / "bench-setup.log"
    step_log.parent.mkdir(parents=True, exist_ok=True)
    warnings_to(step_log)
    days = [START + dt.timedelta(days=i) for i in range(spec.days)]
    print(f"setup: {spec.products:,} products, {spec.users:,} users, {spec.days} days, "
          f"encoder {spec.encoder} -> {home}", flush=True)

    def generate() -> str:
        from features.synth import generate_shop

        return str(generate_shop(settings.landing_root, days=spec.days, users=spec.users,
                                 products=spec.products, seed=spec.seed, start=START,
                                 progress=True))

    def build() -> dict[str, Any]:
        from features.build import build_interval

        rows = {}
        for day in tqdm(days, desc="build features", unit="day"):
            out = build_interval(settings, day)
            rows = {k: v for k, v in out.items() if isinstance(v, int)}
        return {"last_day_rows": rows}

    def materialize() -> dict[str, Any]:
        from features.store import apply_repo, materialize_interval

        started = time.perf_counter()
        apply_repo(settings)  # materialize_day applies per day; once is enough here
        apply_s = time.perf_counter() - started
        for day in tqdm(days, desc="materialize", unit="day"):
            materialize_interval(settings, day)
        return {"apply_s": round(apply_s, 2)}

    def train() -> dict[str, Any]:
        from training.pipeline import train_interval
        from training.scorer import ScorerConfig

        return train_interval(settings, spec.last_day,
                              scorer_config=ScorerConfig(max_users=spec.tune_users))

    def evaluate(run_id: str) -> dict[str, Any]:
        from training.pipeline import evaluate_interval

        out = evaluate_interval(settings, run_id, spec.last_day)
        keep = ("recall_at_10", "recall_at_50", "best_baseline_recall_at_50", "holdout_users")
        return {k: out["metrics"][k] for k in keep if k in out["metrics"]}

    def register(run_id: str) -> dict[str, Any]:
        from training.registry import register_run

        return register_run(settings, run_id)

    def build_index(version: str) -> dict[str, Any]:
        from serving.publish import build_index_for_version

        return build_index_for_version(settings, version)

    def champion(version: str) -> dict[str, Any]:
        from training.registry import promote_if_better, set_champion

        result = promote_if_better(settings, version)
        if not result["promoted"]:  # the benchmark serves its model whatever the gate says
            set_champion(settings, version, reason=f"benchmarks/serving.py (gate said: "
                                                   f"{result['reason']})", actor="bench")
            result = {**result, "champion": version, "forced": True}
        return result

    if spec.encoder == "tiny" and minilm_sample:
        probe = run_step(steps, "minilm probe", f"{data}-minilm{minilm_sample}-threads",
                         lambda: minilm_probe(spec.products, minilm_sample),
                         f"MiniLM on {minilm_sample} product texts, for the report")
        singles = ", ".join(f"{k.split('_')[4]} thread(s) {v:.1f} ms" for k, v in probe.items()
                            if k.startswith("single_text_ms_p50_"))
        print(f"      MiniLM: {probe['texts_per_s']:.0f} texts/s in batches -> "
              f"~{probe['catalogue_estimate_s'] / 60:.0f} min for {spec.products:,} product "
              f"texts; one query p50: {singles}", flush=True)
    run_step(steps, "generate shop", data, generate)
    run_step(steps, "build features", data, build, f"{spec.days} days")
    run_step(steps, "materialize", data, materialize,
             f"feast apply + {spec.days} days to SQLite", step_log)
    if data_only:
        return settings, steps.steps

    def model_steps() -> None:
        trained = run_step(steps, "train", model, train,
                           f"{spec.last_day}, pair scorers tuned on <= {spec.tune_users} users",
                           step_log)
        if spec.evaluate:
            run_step(steps, "evaluate", model, lambda: evaluate(trained["mlflow_run_id"]),
                     f"{spec.last_day}: the protocol's test window, every baseline", step_log)
        registered = run_step(steps, "register", model,
                              lambda: register(trained["mlflow_run_id"]), log_path=step_log)
        run_step(steps, "build index", model, lambda: build_index(registered["version"]),
                 log_path=step_log)
        run_step(steps, "champion", model, lambda: champion(registered["version"]),
                 log_path=step_log)

    # A model trained by an earlier version of the code (e.g. with another scorer feature
    # set) may not load with this code. train_interval would reuse its run (the run's
    # fingerprint covers config and data, not code), and evaluate_interval loads the
    # champion to compare with: delete what is stale before the model steps.
    if steps.done("train", model):
        problem = run_problem(settings, steps.steps["train"]["result"]["mlflow_run_id"])
        if problem:
            print(f"  the trained model does not load with this code: {problem[:300]}\n"
                  f"  -> deleting the {spec.last_day} training run(s) and training again",
                  flush=True)
            discard_runs(settings, spec.last_day)
            for name in MODEL_STEPS:
                steps.forget(name)
    champion_run = champion_run_id(settings)
    if champion_run is not None and run_problem(settings, champion_run):
        print("  the champion does not load with this code: removing its alias", flush=True)
        drop_aliases(settings)
        steps.forget("champion")
    model_steps()
    problem = champion_problem(settings)
    if problem:
        raise RuntimeError(f"the champion does not load: {problem}")
    print(f"  (Feast/MLflow output of these steps: {step_log})", flush=True)
    return settings, steps.steps


def run_problem(settings: Any, run_id: str) -> str | None:
    """Why this code cannot load a training run's model and scorer (None: it can)."""
    from training.pipeline import load_scorer

    try:
        load_scorer(settings, run_id)
    except Exception as exc:  # whatever loading the bundle would fail with
        return f"{type(exc).__name__}: {exc}"
    return None


def champion_run_id(settings: Any) -> str | None:
    from training.registry import CHAMPION, alias_version, mlflow_client

    version = alias_version(mlflow_client(settings), settings.model_name, CHAMPION)
    return None if version is None else version.run_id


def champion_problem(settings: Any) -> str | None:
    """Why the champion bundle cannot be loaded by this code (None: it loads)."""
    from serving.publish import load_version_bundle

    try:
        load_version_bundle(settings)
    except Exception as exc:  # whatever the server would fail with
        return f"{type(exc).__name__}: {exc}"
    return None


def drop_aliases(settings: Any) -> None:
    """Remove the model's champion and challenger aliases."""
    from mlflow.exceptions import MlflowException

    from training.registry import CHALLENGER, CHAMPION, mlflow_client

    client = mlflow_client(settings)
    for alias in (CHAMPION, CHALLENGER):
        with contextlib.suppress(MlflowException):
            client.delete_registered_model_alias(settings.model_name, alias)


def discard_runs(settings: Any, day: dt.date) -> int:
    """Delete the MLflow training runs of ``day`` (so that training starts afresh)."""
    from training.registry import TAG_INTERVAL, experiment_id, mlflow_client

    client = mlflow_client(settings)
    exp_id = experiment_id(settings, client)
    runs = client.search_runs([exp_id], f"tags.`{TAG_INTERVAL}` = '{day.isoformat()}'",
                              max_results=100)
    for run in runs:
        client.delete_run(run.info.run_id)
    return len(runs)


# ---------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------


@dataclass
class Targets:
    """Request paths per endpoint, and the ids they were drawn from."""

    paths: dict[str, list[str]]
    users: list[str]
    products: list[str]
    queries: list[str]


def request_targets(settings: Any, spec: ShopSpec, n: int, seed: int) -> Targets:
    """``n`` request paths per endpoint: random known users (and a few unknown visitors),
    random catalogue products, and queries of 2-3 consecutive words of random titles."""
    from features.contract import catalog_as_of, read_upto

    rng = random.Random(seed)
    users = sorted(read_upto(settings.landing_root, "users", spec.last_day)["user_id"].unique())
    catalog = catalog_as_of(settings.landing_root, spec.last_day)
    products = catalog["product_id"].astype(str).tolist()
    titles = catalog["title"].astype(str).tolist()
    picked_users = [f"U-bench-visitor-{i}" if rng.random() < UNKNOWN_USER_SHARE
                    else rng.choice(users) for i in range(n)]
    picked_products = [rng.choice(products) for _ in range(n)]
    queries = []
    for _ in range(n):
        words = rng.choice(titles).lower().split()
        size = min(len(words), rng.choice((2, 3)))
        first = rng.randrange(len(words) - size + 1)
        queries.append(" ".join(words[first:first + size]))
    paths = {
        "recommend": [f"/recommend/{quote(u, safe='')}?k={K}" for u in picked_users],
        "similar": [f"/similar/{quote(p, safe='')}?k={K}" for p in picked_products],
        "search": [f"/search?q={quote(q)}&k={K}" for q in queries],
    }
    return Targets(paths, picked_users, picked_products, queries)


# ---------------------------------------------------------------------------------------
# The server and the load driver
# ---------------------------------------------------------------------------------------


def free_port() -> int:
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
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self.restarts = 0
        self.start()

    def start(self) -> None:
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

    def wait_ready(self, timeout: float) -> float:
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
                if detail and detail != "no bundle loaded":  # a load failed: no point waiting
                    raise RuntimeError(f"server cannot load the champion: {detail}; "
                                       f"see {self.log_path}")
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout:.0f} s; see {self.log_path}")

    def _processes(self) -> list[Path]:
        """/proc entries of the server's session (the supervisor and its workers)."""
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == self.proc.pid:  # the session id: start_new_session=True
                out.append(entry)
        return out

    def cpu_seconds(self) -> float:
        """User + system CPU of the server's processes so far (Linux /proc; NaN elsewhere)."""
        try:
            total = 0.0
            for entry in self._processes():
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            return total if total else math.nan
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
    server.wait_ready(timeout=900)
    server.restarts += 1
    warm(server, targets, served)


def served_endpoints(server: Server) -> dict[str, bool]:
    """Which of the benchmarked endpoints the app declares (its OpenAPI paths)."""
    import httpx

    paths = httpx.get(f"{server.url}/openapi.json", timeout=30).json().get("paths", {})
    return {name: any(p == f"/{name}" or p.startswith(f"/{name}/") for p in paths)
            for name in ENDPOINTS}


def sustained(result: dict[str, Any], max_p99_ms: float) -> bool:
    return (result["errors"] == 0 and result["p99_ms"] <= max_p99_ms
            and result["achieved_rps"] >= 0.95 * result["rate"])


def max_throughput(server: Server, targets: Targets, served: dict[str, bool], name: str, *,
                   start: float, seconds: float, max_p99_ms: float, bisect: int,
                   ceiling: float, known_good: float = 0.0) -> dict[str, Any]:
    """Double the rate from ``start`` until a step is not sustained, then bisect.

    ``known_good``: a rate already sustained (the fixed-rate run): doubling starts above it.

    Returns:
        {"max_rps": highest sustained offered rate (0 if even ``start`` fails), "steps": [...]}
    """
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
    return {"max_rps": good, "first_failed_rps": bad if math.isfinite(bad) else None,
            "steps": steps}


# ---------------------------------------------------------------------------------------
# In-process breakdown
# ---------------------------------------------------------------------------------------


class Stopwatch:
    """Per-piece wall times over many requests (ms)."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}
        self.unavailable: dict[str, str] = {}

    def time(self, name: str, fn: Callable[[], Any]) -> Any:
        if name in self.unavailable:
            return None
        started = time.perf_counter()
        try:
            value = fn()
        except (AttributeError, TypeError, NotImplementedError) as exc:
            # the serving code is being extended: report a piece it lacks instead of failing
            self.unavailable[name] = f"{type(exc).__name__}: {exc}"
            return None
        self.times.setdefault(name, []).append((time.perf_counter() - started) * 1e3)
        return value

    def add(self, name: str, ms: float) -> None:
        self.times.setdefault(name, []).append(ms)

    def rows(self) -> list[dict[str, Any]]:
        from _load import percentile

        out = [{"piece": name, "n": len(v), "mean_ms": sum(v) / len(v),
                "p50_ms": percentile(v, 50), "p99_ms": percentile(v, 99)}
               for name, v in self.times.items()]
        out += [{"piece": name, "n": 0, "unavailable": why}
                for name, why in self.unavailable.items()]
        return out


def breakdown(settings: Any, targets: Targets, n: int,
              torch_threads: int | None = None) -> dict[str, Any]:
    """Time each piece of the three endpoints' work in this process (one request at a time,
    no HTTP), on the champion bundle and the online store the server uses."""
    import numpy as np
    import pandas as pd
    import torch

    from features.store import OnlineUserReader, feature_store, online_user_history
    from serving.publish import load_version_bundle
    from training.scorer import Histories

    if torch_threads:
        torch.set_num_threads(torch_threads)
    started = time.perf_counter()
    bundle = load_version_bundle(settings)
    load_s = time.perf_counter() - started
    store = feature_store(settings)
    reader = OnlineUserReader(store)
    scorer = bundle.scorer
    state = scorer.state
    out: dict[str, Any] = {"bundle_load_s": load_s, "catalogue": bundle.size,
                           "index": bundle.index_meta.get("kind"),
                           "retrieval": {name: r.kind for name, r in
                                         state.retrieval(scorer.config.exact_max).items()},
                           "torch_threads": torch.get_num_threads()}
    try:
        from serving.app import RecommendedItem
    except ImportError:
        RecommendedItem = None  # noqa: N806

    # /recommend ------------------------------------------------------------------------
    known_watch, cold_watch = Stopwatch(), Stopwatch()
    users = targets.users[: n]
    for user in users[:5]:  # warm caches (Feast registry, torch, faiss) before timing
        bundle.recommend(Histories.from_feast(pd.DataFrame([reader.read([user])[user]])), K)
    for user in users:
        fetch_w = Stopwatch()
        row = fetch_w.time("feature fetch (OnlineUserReader, as served)",
                           lambda u=user: reader.read([u])[u])
        fetch_w.time("  for comparison: Feast get_online_features",
                     lambda u=user: online_user_history(store, [u])[u])
        history = fetch_w.time("history frame (Histories.from_feast)",
                               lambda r=row: Histories.from_feast(pd.DataFrame([r])))
        known = any(p in bundle.item_row for p in history.products[0])
        watch = known_watch if known else cold_watch
        for name, values in fetch_w.times.items():
            watch.add(name, values[0])
        result = watch.time("bundle.recommend (total)", lambda h=history: bundle.recommend(h, K))
        if result is not None and RecommendedItem is not None:
            items = result[0]
            watch.time("response items (pydantic)",
                       lambda it=items: [RecommendedItem(**vars(i)) for i in it])
        if not known:
            continue
        # the pieces of Scorer.rank, re-run one by one on the same history
        stamps = history.timestamps[0]
        now = max(state.cut.timestamp(), float(stamps[np.isfinite(stamps)].max(initial=0.0)))
        views = watch.time("user view: user tower, text mean, ALS solve, co-occurrence",
                           lambda h=history: scorer._views(h))
        if views is None:
            continue
        candidates = watch.time("candidates (retrieval x3, neighbours, popular)",
                                lambda h=history, v=views: scorer.candidates(h, views=v))
        if candidates is None:
            continue
        watch.add("  candidates per request (count, not ms)", float(len(candidates[0])))
        built = watch.time("features of the candidates (Scorer.features)",
                           lambda h=history, t=now, c=candidates, v=views:
                           scorer.features(h, t, c, v))
        if built is None:
            continue
        features, columns = built
        scores = watch.time("pair scorer (MLP over the candidates)",
                            lambda f=features, c=columns: scorer._apply("all", f, c < 0))
        if scores is not None:
            picked = watch.time("top-k", lambda s=scores, c=columns:
                                c[0][np.lexsort((c[0], -s[0]))][:K])
            known_rows = [bundle.item_row[p] for p in history.products[0]
                          if p in bundle.item_row]
            if picked is not None:
                watch.time("reasons (Bundle._reasons)", lambda p=picked, kr=known_rows,
                           h=history: bundle._reasons([int(r) for r in p], kr,
                                                      h.event_types[0], h.products[0]))
    out["recommend_known"] = known_watch.rows()
    out["recommend_cold"] = cold_watch.rows()

    # /similar --------------------------------------------------------------------------
    watch = Stopwatch()
    for product in targets.products[: n]:
        row = bundle.item_row.get(product)
        if row is None:
            continue
        query = bundle.item_embeddings[row : row + 1].astype(np.float32)
        watch.time("index search (faiss, k+1)",
                   lambda q=query: bundle.index.search(q, min(K + 1, bundle.size)))
        watch.time("bundle.similar (total)", lambda p=product: bundle.similar(p, K))
    out["similar"] = watch.rows()

    # /search ---------------------------------------------------------------------------
    watch = Stopwatch()
    encoder = getattr(bundle, "query_encoder", None)
    index = getattr(bundle, "search_index", None)
    for query in targets.queries[: n]:
        vector = None
        if encoder is not None:
            vector = watch.time("query encoding (text encoder)", lambda q=query: encoder.encode(q))
        if index is not None:
            from serving.search import tokens

            watch.time("lexical (BM25 over the catalogue)",
                       lambda q=query: index.lexical(tokens(q)))
            if vector is not None and index.retrieval is not None:
                watch.time(f"semantic candidates ({index.retrieval.kind} retrieval)",
                           lambda v=vector: index.retrieval.top(v[None, :], 200))
            watch.time("search index total (lexical + semantic + top-k)",
                       lambda q=query, v=vector: index.search(q, K, query_vector=v))
        watch.time("bundle.search (total)", lambda q=query: bundle.search(q, K))
    out["search"] = watch.rows()
    return out


# ---------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------


def fmt(value: Any, spec: str = "8.1f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'-':>{spec.split('.')[0]}}"
    return f"{value:{spec}}"


def print_breakdown(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n  {title}")
    print(f"    {'piece':<52}{'n':>5}{'mean ms':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for row in rows:
        if row["n"]:
            print(f"    {row['piece']:<52}{row['n']:>5}{fmt(row['mean_ms'], '10.2f')}"
                  f"{fmt(row['p50_ms'], '10.2f')}{fmt(row['p99_ms'], '10.2f')}")
        else:
            print(f"    {row['piece']:<52}  n/a ({row['unavailable'][:60]})")


def machine_line() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return (f"{cores} CPU cores available, load average {load[0]:.2f} {load[1]:.2f} "
            f"{load[2]:.2f} (the server, the load driver and anything else share them)")


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument("--days", type=int, default=14,
                        help="days of shop history (training.pipeline.HoldoutConfig shrinks "
                             "the windows for short histories)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--encoder", choices=("tiny", "minilm"), default="tiny",
                        help="text encoder of the trained model (and of /search queries)")
    parser.add_argument("--tune-users", type=int, default=None,
                        help="validation users for tuning the pair scorers (default: "
                             "ScorerConfig's 2000, capped so (users x products x 16) float32 "
                             "fits in memory)")
    parser.add_argument("--skip-evaluate", action="store_true",
                        help="skip evaluate_interval (the champion is then set directly)")
    parser.add_argument("--rate", type=float, default=200.0, help="requests/s per endpoint")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per endpoint")
    parser.add_argument("--warmup", type=float, default=None,
                        help="unrecorded seconds at the rate first (default: min(5, seconds/4))")
    parser.add_argument("--step-seconds", type=float, default=None,
                        help="seconds per throughput step (default: min(10, seconds); 2 for "
                             "catalogues under 20,000 products)")
    parser.add_argument("--max-p99-ms", type=float, default=200.0,
                        help="a throughput step with a higher p99 is not sustained")
    parser.add_argument("--bisect", type=int, default=None,
                        help="bisection steps after the doubling finds a failing rate "
                             "(default 2, 1 for catalogues under 20,000 products)")
    parser.add_argument("--throughput-start", type=float, default=50.0)
    parser.add_argument("--throughput-ceiling", type=float, default=6400.0)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--setup-data-only", action="store_true",
                        help="build the shop and its features, then stop (no model, no server)")
    parser.add_argument("--setup-only", action="store_true",
                        help="build the shop and its champion, then stop (no server)")
    parser.add_argument("--breakdown-requests", type=int, default=None,
                        help="requests per endpoint timed in-process (default 300; 30 for "
                             "catalogues under 20,000 products)")
    parser.add_argument("--minilm-sample", type=int, default=None,
                        help="product texts for timing MiniLM when --encoder tiny (0: skip; "
                             "default 1024, 0 for catalogues under 20,000 products)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="OMP_NUM_THREADS for the server and torch.set_num_threads for the "
                             "in-process breakdown (default: torch's own choice, as shipped)")
    parser.add_argument("--workers", type=int, default=2,
                        help="uvicorn worker processes (the production profile runs 2)")
    parser.add_argument("--access-log", action="store_true",
                        help="keep uvicorn's per-request access log on (off by default)")
    parser.add_argument("--home", type=Path, default=PROJECT_ROOT / "state" / "bench-serving")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(PROJECT_ROOT))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s "
                                                       "%(message)s")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    small = args.products < 20_000
    warmup = args.warmup if args.warmup is not None else min(5.0, args.seconds / 4)
    step_seconds = args.step_seconds or min(2.0 if small else 10.0, args.seconds)
    bisect = args.bisect if args.bisect is not None else (1 if small else 2)
    n_breakdown = args.breakdown_requests or (30 if small else 300)
    spec = ShopSpec(products=args.products, users=args.users, days=args.days, seed=args.seed,
                    encoder=args.encoder,
                    tune_users=args.tune_users or default_tune_users(args.products),
                    evaluate=not args.skip_evaluate)
    home = (args.home.expanduser().resolve() / spec.key)
    print(machine_line(), flush=True)
    started = time.perf_counter()
    minilm_sample = args.minilm_sample if args.minilm_sample is not None else (0 if small else 1024)
    settings, setup_steps = setup(spec, home, minilm_sample, data_only=args.setup_data_only)
    if args.setup_data_only or args.setup_only:
        print(f"set up in {(time.perf_counter() - started) / 60:.1f} min: {home}")
        return 0
    results: dict[str, Any] = {"spec": asdict(spec), "command": sys.argv, "setup": setup_steps,
                               "machine": machine_line(), "rate": args.rate,
                               "seconds": args.seconds, "load": {}, "throughput": {}}

    n_paths = max(2000, int(args.rate * (args.seconds + warmup)))
    targets = request_targets(settings, spec, n_paths, args.seed)
    threads = (f"OMP_NUM_THREADS={args.torch_threads}" if args.torch_threads
               else "torch threads as shipped")
    print(f"\nserver: uvicorn serving.app:create_app, {args.workers} worker(s), "
          f"access log {'on' if args.access_log else 'off'}, {threads}", flush=True)
    server = Server(settings, home / "logs" / "bench-server.log", args.access_log,
                    args.torch_threads, args.workers)
    try:
        ready_s = server.wait_ready(timeout=900)
        import httpx

        version = httpx.get(f"{server.url}/version", timeout=30).json()
        served = served_endpoints(server)
        results.update(server_ready_s=ready_s, version=version, served=served,
                       server_rss_mib_ready=server.rss_mib())
        print(f"  ready in {ready_s:.1f} s on {server.url}: {version.get('model_name')} "
              f"v{version.get('model_version')}, {version.get('index_kind')} index over "
              f"{version.get('index_size')} products, RSS {server.rss_mib():.0f} MiB", flush=True)
        missing = [e for e, ok in served.items() if not ok]
        if missing:
            print(f"  not served by this app (skipped): {', '.join('/' + m for m in missing)}")
        warm(server, targets, served)

        print(f"\nopen-loop load: {args.rate:.0f} req/s for {args.seconds:.0f} s per endpoint "
              f"(after {warmup:.0f} s warm-up), latency from the scheduled send time", flush=True)
        for name in ENDPOINTS:
            if not served[name]:
                continue
            settle(server, targets, served)
            result = drive(server, targets.paths[name], args.rate, args.seconds, warmup,
                           timeout=10.0)
            target = P99_TARGET_MS[name]
            result["target_p99_ms"] = target
            result["pass"] = result["errors"] == 0 and result["p99_ms"] <= target
            results["load"][name] = result
            kinds = ", ".join(f"{k} x{v}" for k, v in result["error_kinds"].items())
            print(f"  /{name:<10} sent {result['sent']:6d}  errors {result['errors']:5d}  "
                  f"p50 {fmt(result['p50_ms'])}  p95 {fmt(result['p95_ms'])}  "
                  f"p99 {fmt(result['p99_ms'])}  max {fmt(result['max_ms'])} ms  "
                  f"(target p99 <= {target:.0f} ms: {'PASS' if result['pass'] else 'FAIL'})"
                  f"{'  [' + kinds + ']' if kinds else ''}", flush=True)
            print(f"  {'':<11} answered {result['achieved_rps']:.1f}/s, server "
                  f"{result['server_cpu_ms_per_req']:.2f} CPU ms/request "
                  f"({result['server_cores_busy']:.2f} cores busy), client send lag p99 "
                  f"{fmt(result['send_lag_p99_ms'], '.1f')} ms, "
                  f"{result['max_connections_used']} connections, load driver "
                  f"{result['client_cpu_s'] / result['driver_wall_s']:.2f} cores", flush=True)
        # the floor: the same rate on /healthz (uvicorn, FastAPI, middleware, thread pool)
        settle(server, targets, served)
        floor = drive(server, ["/healthz"], args.rate, args.seconds, warmup, timeout=10.0)
        results["load"]["healthz"] = floor
        print(f"  /healthz    sent {floor['sent']:6d}  errors {floor['errors']:5d}  "
              f"p50 {fmt(floor['p50_ms'])}  p95 {fmt(floor['p95_ms'])}  "
              f"p99 {fmt(floor['p99_ms'])}  max {fmt(floor['max_ms'])} ms  (the HTTP and "
              f"framework floor: {floor['server_cpu_ms_per_req']:.2f} CPU ms/request)",
              flush=True)
        results["server_rss_mib_after_load"] = server.rss_mib()

        if not args.skip_throughput:
            print(f"\nmaximum sustained throughput ({step_seconds:.0f} s steps; sustained = no "
                  f"errors, p99 <= {args.max_p99_ms:.0f} ms, >= 95 % answered)", flush=True)
            for name in ENDPOINTS:
                if not served[name]:
                    continue
                print(f"  /{name}", flush=True)
                fixed = results["load"][name]
                results["throughput"][name] = max_throughput(
                    server, targets, served, name, start=args.throughput_start,
                    seconds=step_seconds, max_p99_ms=args.max_p99_ms, bisect=bisect,
                    ceiling=args.throughput_ceiling,
                    known_good=args.rate if sustained(fixed, args.max_p99_ms) else 0.0)
                print(f"    -> {results['throughput'][name]['max_rps']:.0f} req/s sustained",
                      flush=True)
        results["server_restarts"] = server.restarts
    finally:
        server.stop()

    print(f"\nin-process breakdown ({n_breakdown} requests per endpoint, one at a time, "
          "server stopped)", flush=True)
    parts = breakdown(settings, targets, n_breakdown, args.torch_threads)
    results["breakdown"] = parts
    print(f"  bundle load {parts['bundle_load_s']:.1f} s, {parts['catalogue']:,} products, "
          f"{parts['index']} index, {parts['torch_threads']} torch threads")
    print_breakdown("/recommend, users with a known history", parts["recommend_known"])
    print_breakdown("/recommend, cold users (unknown or no catalogue product in the history)",
                    parts["recommend_cold"])
    print_breakdown("/similar", parts["similar"])
    print_breakdown("/search", parts["search"])

    total_min = (time.perf_counter() - started) / 60
    print(f"\nsummary: {spec.products:,} products, {spec.users:,} users, encoder "
          f"{spec.encoder}, {args.rate:.0f} req/s x {args.seconds:.0f} s per endpoint; "
          f"{machine_line()}")
    print(f"  {'endpoint':<12}{'sent':>7}{'errors':>8}{'p50':>8}{'p95':>8}{'p99':>8}{'max':>8}"
          f"{'target':>8}{'verdict':>9}{'max rps':>9}{'CPU ms/req':>11}{'in-proc ms':>11}")
    totals = {"recommend": "bundle.recommend (total)", "similar": "bundle.similar (total)",
              "search": "bundle.search (total)"}
    verdicts = []
    for name in ENDPOINTS:
        load = results["load"].get(name)
        thr = results["throughput"].get(name, {})
        rows = parts["recommend_known" if name == "recommend" else name]
        inproc = next((r.get("mean_ms") for r in rows if r["piece"] == totals[name]), None)
        if load is None:
            print(f"  /{name:<11}{'not served':>15}")
            verdicts.append(f"/{name} not served")
            continue
        verdict = "PASS" if load["pass"] else "FAIL"
        verdicts.append(f"/{name} {verdict}")
        print(f"  /{name:<11}{load['sent']:>7}{load['errors']:>8}{fmt(load['p50_ms'])}"
              f"{fmt(load['p95_ms'])}{fmt(load['p99_ms'])}{fmt(load['max_ms'])}"
              f"{load['target_p99_ms']:>8.0f}{verdict:>9}"
              f"{fmt(thr.get('max_rps'), '9.0f')}{fmt(load['server_cpu_ms_per_req'], '11.2f')}"
              f"{fmt(inproc, '11.2f')}")
    floor = results["load"].get("healthz")
    if floor is not None:
        print(f"  {'/healthz':<12}{floor['sent']:>7}{floor['errors']:>8}{fmt(floor['p50_ms'])}"
              f"{fmt(floor['p95_ms'])}{fmt(floor['p99_ms'])}{fmt(floor['max_ms'])}"
              f"{'-':>8}{'floor':>9}{'-':>9}{fmt(floor['server_cpu_ms_per_req'], '11.2f')}"
              f"{'-':>11}")
    print("  (latencies: ms over HTTP on loopback from each request's scheduled send time, "
          "every request counted, a failed one at the time it failed (timeouts: 10 s); "
          "max rps: highest rate sustained; CPU ms/req: the server process's CPU per request "
          "sent, overstated when requests were dropped; in-proc: the bundle call alone, no "
          "HTTP, no feature fetch)")
    out_path = home / f"bench-serving-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    out_path.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nDone in {total_min:.1f} min: {'; '.join(verdicts)}. Figures: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
