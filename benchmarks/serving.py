"""Serving latency and throughput: the real server on a synthetic shop, driven open-loop.

1. setup (reused when done before with the same arguments, under ``--home``): a synthetic
   shop (``features.synth.generate_shop``), features built and materialized into the Feast
   SQLite online store for every day, then the last day trained, evaluated, registered,
   indexed and made champion -- the DAG's functions, called in the DAG's order
   (``_serving_setup.py``);
2. the real server (``uvicorn --factory serving.app:create_app``, ``--workers`` processes,
   default 2 as in the production profile) on a free loopback port (``_serving_driver.py``);
3. from a separate process (``_serving_load.py``), a fixed request rate per endpoint,
   latency measured from each request's scheduled send time: p50/p95/p99/max and errors of
   /recommend, /similar and /search, PASS/FAIL against the targets;
4. the highest rate each endpoint sustains (no errors, p99 <= ``--max-p99-ms``, >= 95 % of
   the offered rate answered);
5. where the time goes, the same kinds of requests measured in this process on the champion
   bundle and the online store (feature fetch, encoding, scoring, index search, filtering;
   ``_serving_breakdown.py``);
6. one summary table, and every figure as JSON beside the state (``_serving_report.py``).

    .venv/bin/python benchmarks/serving.py                       # 100k products, 50k users
    .venv/bin/python benchmarks/serving.py --products 2000 --users 1000 --seconds 3  # smoke

The server and the load driver share this machine's cores: on a 2-core machine the client's
CPU is taken from the server, so the figures are a floor for a server with its own cores.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

from _serving_breakdown import breakdown
from _serving_driver import (
    COLD_WINDOW_S,
    ENDPOINTS,
    LOAD_TIMEOUT_S,
    SWAP_WINDOW_S,
    Server,
    Targets,
    cold_start,
    fixed_rate,
    max_throughput,
    request_targets,
    served_endpoints,
    settle,
    sustained,
    swap_under_load,
    warm,
)
from _serving_report import (
    machine_line,
    print_breakdown,
    print_load,
    print_ready,
    print_summary,
    write_figures,
)
from _serving_setup import PROJECT_ROOT, ShopSpec, default_tune_users, setup
from _serving_wrk import available as wrk_available
from _serving_wrk import run as run_wrk


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument("--days", type=int, default=14,
                        help="days of shop history (shoprec.pipeline.HoldoutConfig shrinks "
                             "the windows for short histories)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--encoder", choices=("tiny", "minilm"), default="tiny",
                        help="text encoder of the trained model (and of /search queries)")
    parser.add_argument("--tune-users", type=int, default=None,
                        help="validation users for tuning the pair scorers (default: "
                             "ScorerConfig's 2000, capped so the (users x candidates x "
                             "features) float32 tuning tensor fits in memory)")
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
    parser.add_argument("--skip-wrk", action="store_true",
                        help="skip the closed-loop check with wrk (Debian package)")
    parser.add_argument("--skip-cold", action="store_true",
                        help="skip /recommend's first 20 s after the server says ready")
    parser.add_argument("--skip-swap", action="store_true",
                        help="skip the champion swap under /recommend load")
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



def measure_server(server: Server, targets: Targets, args: argparse.Namespace, warmup: float,
                   step_seconds: float, bisect: int) -> dict[str, Any]:
    """Everything measured over HTTP on the running server: its start, each endpoint (and
    /healthz, the floor) at the fixed rate, then each endpoint's highest sustained rate."""
    import httpx

    ready_s = server.wait_ready()
    version = httpx.get(f"{server.url}/version", timeout=30).json()
    served = served_endpoints(server)
    out: dict[str, Any] = {"server_ready_s": ready_s, "version": version, "served": served,
                           "server_rss_mib_ready": server.rss_mib(), "load": {},
                           "throughput": {}}
    print_ready(ready_s, server.url, version, server.rss_mib(), served)
    if served["recommend"] and not args.skip_cold:
        out["cold_start"] = cold_start(server, targets, args.rate)
        print(f"cold start: /recommend at {args.rate:.0f} req/s for the first "
              f"{COLD_WINDOW_S:.0f} s after /readyz", flush=True)
        print_load("recommend", out["cold_start"])
    warm(server, targets, served)

    print(f"\nopen-loop load: {args.rate:.0f} req/s for {args.seconds:.0f} s per endpoint "
          f"(after {warmup:.0f} s warm-up), latency from the scheduled send time", flush=True)
    for name in [e for e in ENDPOINTS if served[e]] + ["healthz"]:
        out["load"][name] = fixed_rate(server, targets, served, name, args.rate, args.seconds,
                                       warmup)
        print_load(name, out["load"][name])
    out["server_rss_mib_after_load"] = server.rss_mib()
    if served["recommend"] and not args.skip_swap:
        settle(server, targets, served)
        out["swap"] = swap_under_load(server, targets, server.settings, args.rate)
        print(f"champion swap v{out['swap']['from_version']} -> v{out['swap']['to_version']} "
              f"under /recommend at {args.rate:.0f} req/s ({SWAP_WINDOW_S:.0f} s window; "
              f"versions answering after: {', '.join(out['swap']['versions_after'])})",
              flush=True)
        prepared = out["swap"]["prepared"]
        if "written" in prepared:
            print(f"  before the alias moved: the new version's user vectors for "
                  f"{prepared['written']:,} of {prepared['users']:,} users of "
                  f"{prepared['first']} .. {prepared['last']} in {prepared['wall_s']} s "
                  f"(serving.user_vectors.before_promotion)", flush=True)
        print_load("recommend", out["swap"])

    if not args.skip_throughput:
        print(f"\nmaximum sustained throughput ({step_seconds:.0f} s steps; sustained = no "
              f"errors, p99 <= {args.max_p99_ms:.0f} ms, >= 95 % answered)", flush=True)
        for name in ENDPOINTS:
            if served[name]:
                out["throughput"][name] = max_throughput(
                    server, targets, served, name, start=args.throughput_start,
                    seconds=step_seconds, max_p99_ms=args.max_p99_ms, bisect=bisect,
                    ceiling=args.throughput_ceiling,
                    known_good=(args.rate if sustained(out["load"][name], args.max_p99_ms)
                                else 0.0))
    if not args.skip_wrk:
        if wrk_available():
            print("\nwrk (closed loop, 8 connections, 10 s per endpoint; the same paths)",
                  flush=True)
            for name in [e for e in ENDPOINTS if served[e]]:
                settle(server, targets, served)
                result = out.setdefault("wrk", {})[name] = run_wrk(server, targets.paths[name])
                print(f"  /{name:<11} {result['rps']:8.1f} req/s, p50 {result['p50_ms']:.1f} "
                      f"ms, p99 {result['p99_ms']:.1f} ms, {result['errors']} errors, server "
                      f"{result['server_cpu_ms_per_req']:.2f} CPU ms/request, wrk "
                      f"{result['wrk_cores']:.2f} cores", flush=True)
        else:
            print("\nwrk not installed (apt-get install wrk): closed-loop check skipped",
                  flush=True)
    out["server_restarts"] = server.restarts
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(PROJECT_ROOT))  # ahead of this folder: ``serving`` is the package
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s "
                                                       "%(message)s")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    small = args.products < 20_000
    warmup = args.warmup if args.warmup is not None else min(5.0, args.seconds / 4)
    step_seconds = args.step_seconds or min(2.0 if small else 10.0, args.seconds)
    bisect = args.bisect if args.bisect is not None else (1 if small else 2)
    n_breakdown = args.breakdown_requests or (30 if small else 300)
    minilm_sample = args.minilm_sample if args.minilm_sample is not None else (0 if small else 1024)
    spec = ShopSpec(products=args.products, users=args.users, days=args.days, seed=args.seed,
                    encoder=args.encoder,
                    tune_users=args.tune_users or default_tune_users(args.products),
                    evaluate=not args.skip_evaluate)
    home = (args.home.expanduser().resolve() / spec.key)
    print(machine_line(), flush=True)
    started = time.perf_counter()
    settings, setup_steps = setup(spec, home, minilm_sample, data_only=args.setup_data_only)
    if args.setup_data_only or args.setup_only:
        print(f"set up in {(time.perf_counter() - started) / 60:.1f} min: {home}")
        return 0
    results: dict[str, Any] = {"spec": asdict(spec), "command": sys.argv, "setup": setup_steps,
                               "machine": machine_line(), "rate": args.rate,
                               "seconds": args.seconds}

    n_paths = max(2000, int(args.rate * (args.seconds + warmup)))
    targets = request_targets(settings, spec, n_paths, args.seed)
    threads = (f"OMP_NUM_THREADS={args.torch_threads}" if args.torch_threads
               else "torch threads as shipped")
    print(f"\nserver: uvicorn serving.app:create_app, {args.workers} worker(s), "
          f"access log {'on' if args.access_log else 'off'}, {threads}", flush=True)
    server = Server(settings, home / "logs" / "bench-server.log", args.access_log,
                    args.torch_threads, args.workers)
    try:
        results.update(measure_server(server, targets, args, warmup, step_seconds, bisect))
    finally:
        server.stop()

    print(f"\nin-process breakdown ({n_breakdown} requests per endpoint, one at a time, "
          "server stopped)", flush=True)
    results["breakdown"] = breakdown(settings, targets, n_breakdown, args.torch_threads)
    print_breakdown(results["breakdown"])

    total_min = (time.perf_counter() - started) / 60
    verdicts = print_summary(spec, results, LOAD_TIMEOUT_S)
    out_path = write_figures(home, results)
    print(f"\nDone in {total_min:.1f} min: {'; '.join(verdicts)}. Figures: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
