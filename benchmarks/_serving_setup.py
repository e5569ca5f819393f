"""The serving benchmark's setup: a synthetic shop through the pipeline's functions.

A synthetic shop (``features.synth.generate_shop``), its history loaded as a backfill leaves it
(``shoprec.history.load_history``: every day's features built, then one materialization into
the Feast SQLite online store), then the last day trained, evaluated, registered,
indexed and made champion -- the DAG's functions, called in the DAG's order. Each step is
recorded with its inputs' signature under the benchmark's home, so a rerun with the same
arguments reuses it (the full-size setup takes minutes; the load runs are what is repeated).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
START = dt.date(2026, 1, 1)
# Bytes per (user, candidate, feature) float32 in Scorer.features, and how many copies of that
# tensor tuning holds at its peak (the features and the training copy).
FEATURE_BYTES, FEATURE_COPIES = 4, 2
TUNE_MEMORY_BUDGET = 3e9  # bytes for the pair-scorer tuning tensor, well under this box's RAM
MODEL_STEPS = ("train", "evaluate", "register", "build index", "champion")


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
        """The model's inputs: the shop, the tuning users, and the ranking's features and
        settings (so a code change to either trains again)."""
        import hashlib
        from dataclasses import asdict

        from training.ranking.config import FEATURE_NAMES, ScorerConfig

        ranking = hashlib.blake2b(repr((FEATURE_NAMES, asdict(ScorerConfig()))).encode(),
                                  digest_size=4).hexdigest()
        return f"{self.key}-tune{self.tune_users}-rank{ranking}"

    @property
    def last_day(self) -> dt.date:
        return START + dt.timedelta(days=self.days - 1)


def default_tune_users(products: int) -> int:
    """Validation users for tuning the pair scorers, capped so the (users, candidates, F)
    float32 feature tensor fits in memory (``ScorerConfig.max_users`` default otherwise)."""
    from training.ranking.config import FEATURE_NAMES, ScorerConfig

    config = ScorerConfig()
    candidates = min(products, 3 * config.candidates + config.neighbour_candidates
                     + 2 * config.popular_candidates + config.history_len)  # at most
    per_user = candidates * len(FEATURE_NAMES) * FEATURE_BYTES * FEATURE_COPIES
    return max(50, min(config.max_users, int(TUNE_MEMORY_BUDGET // per_user)))


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


def use_state(home: Path, encoder: str) -> Any:
    """Point this process (and the children it starts) at the benchmark's own state;
    returns its prepared ``Settings``."""
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
    from features.contract import product_text, read_partition
    from features.synth import generate_shop
    from training.config import TrainConfig
    from training.text import TextEncoder

    with tempfile.TemporaryDirectory() as tmp:
        generate_shop(tmp, days=1, users=10, products=max(sample, 8), seed=1, start=START)
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

    def load() -> dict[str, Any]:
        from shoprec.history import load_history

        out = load_history(settings, days[0], days[-1], validate=False)
        return {"seconds": {k: round(v, 1) for k, v in out["seconds"].items()},
                "rows": out["materialized"]["rows"]}

    def train() -> dict[str, Any]:
        from shoprec.pipeline import train_interval
        from training.ranking.config import ScorerConfig

        return train_interval(settings, spec.last_day,
                              scorer_config=ScorerConfig(max_users=spec.tune_users))

    def evaluate(run_id: str) -> dict[str, Any]:
        from shoprec.pipeline import evaluate_interval

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

    def user_vectors(spec: ShopSpec) -> dict[str, Any]:
        from features.store import OnlineUserReader, feature_store
        from serving.publish import load_version_bundle
        from serving.user_vectors import changed_users, write_user_vectors

        store = feature_store(settings)
        users = changed_users(settings, dt.date.min, spec.last_day)
        result = write_user_vectors(store, OnlineUserReader(store), load_version_bundle(settings),
                                    users, progress=True)
        return {**result, "ms_per_user": 1e3 * result["seconds"] / max(result["users"], 1)}

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
    run_step(steps, "load history", data, load,
             f"{spec.days} days built, one materialization to SQLite "
             f"(shoprec.history, as a backfill leaves them)", step_log)
    if data_only:
        return settings, steps.steps

    forget_stale_model(settings, steps, spec)
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
    run_step(steps, "user vectors", f"{model}-vectors", lambda: user_vectors(spec),
             "the champion's user vectors for every user with a history (serving.user_vectors, "
             "what the DAG's user_vectors step and a promotion write)", step_log)

    from serving.publish import load_version_bundle

    problem = load_problem(lambda: load_version_bundle(settings))
    if problem:
        raise RuntimeError(f"the champion does not load: {problem}")
    print(f"  (Feast/MLflow output of these steps: {step_log})", flush=True)
    return settings, steps.steps


def forget_stale_model(settings: Any, steps: StepLog, spec: ShopSpec) -> None:
    """Delete what an earlier version of the code trained and this code cannot load.

    A model trained with, e.g., another scorer feature set may not load any more.
    train_interval would reuse its run (the run's fingerprint covers config and data, not
    code), and evaluate_interval loads the champion to compare with: so a stale training run
    is deleted and the model steps forgotten, and a stale champion loses its alias.
    """
    from shoprec.pipeline import load_scorer
    from training.registry import CHAMPION, alias_version, mlflow_client

    if steps.done("train", spec.model_signature):
        run_id = steps.steps["train"]["result"]["mlflow_run_id"]
        problem = load_problem(lambda: load_scorer(settings, run_id))
        if problem:
            print(f"  the trained model does not load with this code: {problem[:300]}\n"
                  f"  -> deleting the {spec.last_day} training run(s) and training again",
                  flush=True)
            discard_runs(settings, spec.last_day)
            for name in MODEL_STEPS:
                steps.forget(name)
    champion = alias_version(mlflow_client(settings), settings.model_name, CHAMPION)
    if champion is not None and load_problem(lambda: load_scorer(settings, champion.run_id)):
        print("  the champion does not load with this code: removing its alias", flush=True)
        drop_aliases(settings)
        steps.forget("champion")


def load_problem(load: Callable[[], Any]) -> str | None:
    """Why ``load`` (a model, a scorer, a bundle) fails with this code (None: it loads)."""
    try:
        load()
    except Exception as exc:  # whatever loading it in the server would fail with
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


def discard_runs(settings: Any, day: dt.date) -> None:
    """Delete the MLflow training runs of ``day`` (so that training starts afresh)."""
    from training.registry import TAG_INTERVAL, experiment_id, mlflow_client

    client = mlflow_client(settings)
    runs = client.search_runs([experiment_id(settings, client)],
                              f"tags.`{TAG_INTERVAL}` = '{day.isoformat()}'", max_results=100)
    for run in runs:
        client.delete_run(run.info.run_id)
