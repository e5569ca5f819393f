"""The serving benchmark's report: the printed figures, the summary table, the JSON file.

Each load run prints its line as it finishes (a full run takes minutes); the summary puts
every endpoint's fixed-rate figures, verdict, highest sustained rate, server CPU per request
and in-process time in one table; every figure is also written as JSON beside the state.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from pathlib import Path
from typing import Any

from _serving_breakdown import TOTALS
from _serving_driver import ENDPOINTS
from _serving_setup import ShopSpec

BREAKDOWN_SECTIONS = {
    "recommend_known": "/recommend, users with a known history",
    "recommend_cold": "/recommend, cold users (unknown or no catalogue product in the history)",
    "similar": "/similar",
    "search": "/search",
}


def fmt(value: Any, spec: str = "8.1f") -> str:
    """``value`` in ``spec``; a dash of the same width for a missing figure (None, NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'-':>{spec.split('.')[0]}}"
    return f"{value:{spec}}"


def machine_line() -> str:
    """The cores and the load average: the figures depend on what else runs beside them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return (f"{cores} CPU cores available, load average {load[0]:.2f} {load[1]:.2f} "
            f"{load[2]:.2f} (the server, the load driver and anything else share them)")


def print_ready(ready_s: float, url: str, version: dict[str, Any], rss_mib: float,
                served: dict[str, bool]) -> None:
    """The server's start: how long it took, the model and index it serves, its memory, and
    the benchmarked endpoints this app does not serve."""
    print(f"  ready in {ready_s:.1f} s on {url}: {version.get('model_name')} "
          f"v{version.get('model_version')}, {version.get('index_kind')} index over "
          f"{version.get('index_size')} products, RSS {rss_mib:.0f} MiB", flush=True)
    missing = [e for e, ok in served.items() if not ok]
    if missing:
        print(f"  not served by this app (skipped): {', '.join('/' + m for m in missing)}")


def _latencies(name: str, result: dict[str, Any]) -> str:
    """A load run's request count, errors and latency percentiles, on one line."""
    return (f"  /{name:<10} sent {result['sent']:6d}  errors {result['errors']:5d}  "
            f"p50 {fmt(result['p50_ms'])}  p95 {fmt(result['p95_ms'])}  "
            f"p99 {fmt(result['p99_ms'])}  max {fmt(result['max_ms'])} ms  ")


def print_load(name: str, result: dict[str, Any]) -> None:
    """One fixed-rate run: its latencies and verdict, then what the server and the client
    spent on it; /healthz (no target) is the HTTP and framework floor."""
    if "target_p99_ms" not in result:
        print(f"{_latencies(name, result)}(the HTTP and framework floor: "
              f"{result['server_cpu_ms_per_req']:.2f} CPU ms/request)", flush=True)
        return
    kinds = ", ".join(f"{k} x{v}" for k, v in result["error_kinds"].items())
    print(f"{_latencies(name, result)}(target p99 <= {result['target_p99_ms']:.0f} ms: "
          f"{'PASS' if result['pass'] else 'FAIL'}){'  [' + kinds + ']' if kinds else ''}",
          flush=True)
    print(f"  {'':<11} answered {result['achieved_rps']:.1f}/s, server "
          f"{result['server_cpu_ms_per_req']:.2f} CPU ms/request "
          f"({result['server_cores_busy']:.2f} cores busy), client send lag p99 "
          f"{fmt(result['send_lag_p99_ms'], '.1f')} ms, "
          f"{result['max_connections_used']} connections, load driver "
          f"{result['client_cpu_s'] / result['driver_wall_s']:.2f} cores", flush=True)
    slowest = sorted(result.get("timeline", []), key=lambda t: -t["p99_ms"])[:3]
    if slowest:
        print(f"  {'':<11} slowest seconds of the window: " + ", ".join(
            f"s{t['second']} p99 {t['p99_ms']:.0f} ms (max {t['max_ms']:.0f})"
            for t in slowest), flush=True)


def print_breakdown(parts: dict[str, Any]) -> None:
    """The in-process breakdown: the bundle's figures, then one table per endpoint."""
    print(f"  bundle load {parts['bundle_load_s']:.1f} s, {parts['catalogue']:,} products, "
          "indexes " + ", ".join(f"{name} {info['kind']}" for name, info in
                                 parts["indexes"].items())
          + f", {parts['torch_threads']} torch threads")
    for key, title in BREAKDOWN_SECTIONS.items():
        print(f"\n  {title}")
        print(f"    {'piece':<52}{'n':>5}{'mean ms':>10}{'p50 ms':>10}{'p99 ms':>10}")
        for row in parts[key]:
            if row["n"]:
                print(f"    {row['piece']:<52}{row['n']:>5}{fmt(row['mean_ms'], '10.2f')}"
                      f"{fmt(row['p50_ms'], '10.2f')}{fmt(row['p99_ms'], '10.2f')}")
            else:
                print(f"    {row['piece']:<52}  n/a ({row['unavailable'][:60]})")


def _summary_row(label: str, load: dict[str, Any], verdict: str, max_rps: float | None,
                 inproc_ms: float | None) -> str:
    return (f"  {label:<12}{load['sent']:>7}{load['errors']:>8}{fmt(load['p50_ms'])}"
            f"{fmt(load['p95_ms'])}{fmt(load['p99_ms'])}{fmt(load['max_ms'])}"
            f"{fmt(load.get('target_p99_ms'), '8.0f')}{verdict:>9}{fmt(max_rps, '9.0f')}"
            f"{fmt(load['server_cpu_ms_per_req'], '11.2f')}{fmt(inproc_ms, '11.2f')}")


def print_summary(spec: ShopSpec, results: dict[str, Any], timeout_s: float) -> list[str]:
    """One table of every endpoint's figures (``results``: the run's collected figures;
    ``timeout_s``: the fixed-rate runs' request timeout); returns the verdicts."""
    print(f"\nsummary: {spec.products:,} products, {spec.users:,} users, encoder "
          f"{spec.encoder}, {results['rate']:.0f} req/s x {results['seconds']:.0f} s per "
          f"endpoint; {machine_line()}")
    print(f"  {'endpoint':<12}{'sent':>7}{'errors':>8}{'p50':>8}{'p95':>8}{'p99':>8}{'max':>8}"
          f"{'target':>8}{'verdict':>9}{'max rps':>9}{'CPU ms/req':>11}{'in-proc ms':>11}")
    parts = results["breakdown"]
    verdicts = []
    for name in ENDPOINTS:
        load = results["load"].get(name)
        if load is None:
            print(f"  /{name:<11}{'not served':>15}")
            verdicts.append(f"/{name} not served")
            continue
        verdict = "PASS" if load["pass"] else "FAIL"
        verdicts.append(f"/{name} {verdict}")
        rows = parts["recommend_known" if name == "recommend" else name]
        inproc = next((r.get("mean_ms") for r in rows if r["piece"] == TOTALS[name]), None)
        print(_summary_row(f"/{name}", load, verdict,
                           results["throughput"].get(name, {}).get("max_rps"), inproc))
    for key, label in (("cold_start", "cold start"), ("swap", "swap")):
        load = results.get(key)
        if load is not None:  # /recommend's first seconds after a start, across a swap
            verdict = "PASS" if load["pass"] else "FAIL"
            verdicts.append(f"/recommend {label} {verdict}")
            print(_summary_row(f"  {label}", load, verdict, None, None))
    floor = results["load"].get("healthz")
    if floor is not None:
        print(_summary_row("/healthz", floor, "floor", None, None))
    print("  (latencies: ms over HTTP on loopback from each request's scheduled send time, "
          f"every request counted, a failed one at the time it failed (timeouts: "
          f"{timeout_s:.0f} s); max rps: highest rate sustained; CPU ms/req: the server "
          "process's CPU per request sent, overstated when requests were dropped; in-proc: "
          "the bundle call alone, no HTTP, no feature fetch)")
    return verdicts


def write_figures(home: Path, results: dict[str, Any]) -> Path:
    """Every figure of the run as JSON under ``home``, named by the time it finished."""
    path = home / f"bench-serving-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    return path
