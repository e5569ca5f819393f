"""The pipeline at shop scale: a generated shop, its history loaded, one trained day measured.

1. generates the shop's landing partitions (``features.synth.generate_shop`` at a chosen
   daily volume, ``benchmarks/_scale_shop.py``; in a child process) and quotes its own time;
2. loads the history, either
   - ``--history dag`` (the small preset's default): a data-only backfill, the real DAG
     (``dag.test``), ``train: none``, once per history day, in date order; or
   - ``--history bulk`` (the full preset's default): ``shoprec.history.load_history``, the
     functions the DAG's data tasks call, in this process, with one materialization per
     stretch of days; it leaves the same partitions and online rows as one DAG run per day
     (tested in ``tests/integration/test_materialize_incremental.py``). Days 2-4 and the
     last three still run through the DAG, to be measured. The generated shop is valid by
     construction, so the bulk days skip validation unless ``--bulk-validate``.
   Day 2 is compared with the last day for validate, build_features and materialize (the
   target: the last day within 1.5x of day 2);
3. runs the next interval through the real DAG with training (``train: each``) and prints,
   for every task and for the whole run, the wall time, CPU time (user + system) and peak RSS.

    .venv/bin/python benchmarks/scale.py --preset small   # 2,000 products, 20,000 users, 30 days
    .venv/bin/python benchmarks/scale.py --preset full    # 100,000 / 1,000,000 / 180 days
    .venv/bin/python benchmarks/scale.py --preset small --days 10 --home /tmp/scale --out s.json

Every run prints a table and writes all figures as JSON (``--out``, default
``state/bench-scale-<preset>.json``). Runs other than the full preset also print what the full
preset's history load would take, extrapolated from the measured days. Not part of the test
suite.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PRESETS = {
    "small": {"products": 2_000, "users": 20_000, "days": 30, "events_per_day": 5_000,
              "encoder": "tiny"},
    "full": {"products": 100_000, "users": 1_000_000, "days": 180, "events_per_day": 200_000,
             "encoder": "minilm"},
}
FIRST_DAY = dt.date(2026, 1, 1)
DATA_TASKS = ("validate", "build_features", "materialize")
GROWTH_TARGET = 1.5  # the last history day's task time at most this times day 2's


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--products", type=int, help="products over the whole run")
    parser.add_argument("--users", type=int, help="users over the whole run")
    parser.add_argument("--days", type=int, help="history days (the trained day comes after)")
    parser.add_argument("--events-per-day", type=int, help="mean events a day")
    parser.add_argument("--encoder", choices=("tiny", "minilm"), help="text encoder")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--home", type=Path,
                        help="state folder to build in (must be empty; kept afterwards)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary state folder")
    parser.add_argument("--out", type=Path, help="JSON file of all figures")
    parser.add_argument("--history", choices=("bulk", "dag"),
                        help="load the history in bulk (shoprec.history; days 2-4 and the "
                             "last three through the DAG) or one DAG run per day "
                             "(default: bulk for the full preset, dag otherwise)")
    parser.add_argument("--train-max-minutes", type=float,
                        help="the training budget in minutes (SHOPREC_TRAIN_MAX_MINUTES; "
                             "default: the setting's default, no time limit)")
    parser.add_argument("--resume", action="store_true",
                        help="only the trained interval (the shop's last day), on the "
                             "--home an earlier run of this benchmark filled")
    parser.add_argument("--history-only", action="store_true",
                        help="stop after loading the history (run the trained day later "
                             "with --resume on the same --home)")
    parser.add_argument("--bulk-validate", action="store_true",
                        help="validate each bulk day too (the generated shop is valid by "
                             "construction; validation costs ~20 s a day at full size)")
    parser.add_argument("--bulk-offline-only", action="store_true",
                        help="do not materialize the bulk days online (saves ~40 min at full "
                             "size; the trained day reads only the offline store, but serving "
                             "from this home would miss those days' users)")
    parser.add_argument("--reuse-landing", type=Path, metavar="DIR",
                        help="copy the first --days + 1 days of an earlier run's landing zone "
                             "(its <home>/landing) instead of generating a shop: day 2 "
                             "measured again with new code, on the same data")
    parser.add_argument("--skip-text-cache", action="store_true",
                        help="with --history-only: do not fill the text cache (a history "
                             "that will not be resumed with --resume)")
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.resume and args.home is None:
        parser.error("--resume needs the --home of the earlier run")
    if args.history is None:
        args.history = "bulk" if args.preset == "full" else "dag"
    if args.days < 2:
        parser.error("--days must be at least 2 (day 2 is compared with the last day)")
    if args.history == "bulk" and args.days < 7:
        parser.error("--history bulk needs --days 7 or more (days 2-4 and the last three "
                     "are measured through the DAG)")
    return args


def prepare_environment(home: Path, encoder: str, settings_env: dict[str, str] | None = None):
    """Point this process (and Airflow, imported later) at the private state folder; any
    other shoprec setting is dropped unless given in ``settings_env``."""
    for key in [k for k in os.environ if k.startswith(("SHOPREC_", "MLFLOW_", "AIRFLOW"))]:
        del os.environ[key]
    os.environ.update({"SHOPREC_HOME": str(home), "SHOPREC_LANDING_ROOT": str(home / "landing"),
                       "SHOPREC_TEXT_ENCODER": encoder, "GX_ANALYTICS_ENABLED": "False",
                       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       **(settings_env or {})})
    from core.settings import Settings

    settings = Settings.from_env().prepare()
    os.environ.update(settings.airflow_env())
    return settings


def generate_landing(args: argparse.Namespace, root: str) -> dict:
    """The shop's partitions, history days + the trained day, from a child process."""
    import _scale_shop

    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(1) as pool:
        return pool.apply(_scale_shop.generate, (root,), {
            "products": args.products, "users": args.users, "days": args.days + 1,
            "events_per_day": args.events_per_day, "seed": args.seed, "start": FIRST_DAY})


def copy_landing(source: Path, root: str, days: int) -> dict:
    """The first ``days`` days of every table of an earlier run's landing zone, copied
    under ``root`` (``--reuse-landing``), described as ``generate_landing`` does."""
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    wanted = {f"date={(FIRST_DAY + dt.timedelta(days=i)).isoformat()}" for i in range(days)}
    events = 0
    for table in sorted(p for p in source.iterdir() if p.is_dir()):
        for part in sorted(p for p in table.iterdir() if p.name in wanted):
            shutil.copytree(part, Path(root) / table.name / part.name)
            if table.name == "events":
                events += sum(pq.ParquetFile(f).metadata.num_rows
                              for f in part.glob("*.parquet"))
    return {"root": root, "days": days, "events": events, "events_per_day": events / days,
            "wall_s": time.perf_counter() - t0, "copied_from": str(source)}


def _embed_catalog(day: dt.date) -> dict:
    import resource as res

    from core.settings import Settings
    from shoprec.history import embed_catalog

    t0, c0 = time.perf_counter(), time.process_time()
    out = embed_catalog(Settings.from_env(), day, progress=True)
    return {**out, "wall_s": round(time.perf_counter() - t0, 1),
            "cpu_s": round(time.process_time() - c0, 1),
            "peak_rss_mb": round(res.getrusage(res.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def warm_text_cache(day: dt.date) -> dict:
    """Encode the catalogue as of ``day`` into the text cache (``shoprec model
    embed-catalog``), in a child process: what a shop trained daily finds there from
    yesterday's training, so the trained day encodes only its own new products."""
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(1) as pool:
        figures = pool.apply(_embed_catalog, (day,))
    print(f"text cache warmed with the catalogue of {day}: {figures['encoded']:,} of "
          f"{figures['products']:,} texts encoded in {figures['wall_s']:.1f} s "
          f"(CPU {figures['cpu_s']:.1f} s, peak RSS {figures['peak_rss_mb']:,.0f} MB)",
          flush=True)
    return figures


def sync_indexes(settings, day: dt.date) -> dict:
    """Bring the user indexes (``features.latest_rows``) up to the day before ``day``, as the
    day before's run leaves them: on a --home an older release loaded, its first build would
    otherwise build them from every partition (once) inside the measured run."""
    from features.build import USER_PROFILE_SCHEMA, previous_state
    from features.profiles import previous_profiles
    from features.running import running_users

    t0 = time.perf_counter()
    running = settings.home / "running"
    previous_state(settings.offline_root, day, running, users=[])
    previous_profiles(settings.offline_root, day, running, USER_PROFILE_SCHEMA, [])
    running_users(settings.landing_root, day - dt.timedelta(days=1), running, user_ids=[])
    figures = {"wall_s": round(time.perf_counter() - t0, 1)}
    print(f"user indexes up to {day - dt.timedelta(days=1)} in {figures['wall_s']} s",
          flush=True)
    return figures


def measured_run(dag, day: dt.date, conf: dict, log_dir: Path, sampler) -> dict:
    """One real DagRun for ``day`` with its per-task and whole-run figures."""
    from _scale_probe import task_figures, task_spans

    from shoprec.runs import DAG_ID, run_day

    sampler.reset()
    t0, cpu0, _ = sampler.sample()
    result = run_day(dag, day, log_dir, conf=conf)
    t1, cpu1, _ = sampler.sample()
    whole = sampler.window(t0, t1)
    whole["cpu_s"] = round(cpu1 - cpu0, 2)
    return {"day": day.isoformat(), "state": result.state, "log": result.log_path,
            "tasks": task_figures(sampler, task_spans(DAG_ID, day)), "run": whole,
            "promoted": result.promoted}


def load_history(dag, args: argparse.Namespace, log_dir: Path, sampler) -> list[dict]:
    """The data-only backfill: one ``train: none`` run per history day, in order."""
    runs = []
    days = [FIRST_DAY + dt.timedelta(days=i) for i in range(args.days)]
    for day in tqdm(days, desc="history (data-only runs)", unit="day"):
        run = measured_run(dag, day, {"train": "none"}, log_dir, sampler)
        runs.append(run)
        if run["state"] != "success":
            raise SystemExit(f"history run of {day} ended {run['state']}; log: {run['log']}")
    return runs


def load_history_bulk(dag, args: argparse.Namespace, settings, log_dir: Path,
                      sampler) -> tuple[list[dict], dict]:
    """The history loaded by ``shoprec.history.load_history`` (the DAG's data-task functions
    in-process, one materialization per stretch; the same partitions and online rows as
    daily runs, tested in tests/integration/test_materialize_incremental.py), except days
    2-4 and the last three, which run through the DAG (``train: none``) to be measured.

    Returns:
        The measured DAG runs, in date order, and the bulk stretches' figures.
    """
    from shoprec.history import load_history as bulk

    days = [FIRST_DAY + dt.timedelta(days=i) for i in range(args.days)]
    measured = set(days[1:4]) | set(days[-3:])
    runs, stretches, pending = [], [], []

    def flush() -> None:
        if pending:
            t0, (_, cpu0, _) = time.perf_counter(), sampler.sample()
            out = bulk(settings, pending[0], pending[-1], validate=args.bulk_validate,
                       online=not args.bulk_offline_only)
            stretches.append({"first": pending[0].isoformat(), "last": pending[-1].isoformat(),
                              "days": len(pending), "wall_s": round(time.perf_counter() - t0, 1),
                              "cpu_s": round(sampler.sample()[1] - cpu0, 1),
                              "steps_s": {k: round(v, 1) for k, v in out["seconds"].items()}})
            pending.clear()

    for day in days:
        if day not in measured:
            pending.append(day)
            continue
        flush()
        run = measured_run(dag, day, {"train": "none"}, log_dir, sampler)
        runs.append(run)
        if run["state"] != "success":
            raise SystemExit(f"history run of {day} ended {run['state']}; log: {run['log']}")
        print(f"  {day} through the DAG: " + ", ".join(
            f"{t} {run['tasks'][t]['wall_s']:.1f} s" for t in DATA_TASKS))
    flush()
    return runs, {"stretches": stretches,
                  "days": sum(s["days"] for s in stretches),
                  "wall_s": round(sum(s["wall_s"] for s in stretches), 1),
                  "validated": args.bulk_validate, "online": not args.bulk_offline_only}


def growth(runs: list[dict]) -> dict[str, dict]:
    """Day 2 against the last history day, per data task (day 1 has no history to read);
    also the medians of days 2-4 and of the last three days, less swayed by one slow day.

    Args:
        runs: measured runs from day 2 on, in date order (day 2 first, the last day last).
    """
    out = {}
    for task in DATA_TASKS:
        walls = [r["tasks"][task]["wall_s"] for r in runs]
        a, b = walls[0], walls[-1]
        early = statistics.median(walls[:3])
        late = statistics.median(walls[-3:])
        out[task] = {"day2_s": a, "last_s": b, "ratio": round(b / a, 2) if a else None,
                     "within_target": bool(a) and b <= GROWTH_TARGET * a,
                     "median_ratio": round(late / early, 2) if early else None}
    return out


def outside_tasks(run: dict) -> float:
    """Seconds of a run spent outside its tasks' spans (dag.test's loop, the metadata DB)."""
    return run["run"]["wall_s"] - sum(t["wall_s"] for t in run["tasks"].values())


def extrapolate(history: list[dict], events_per_day: float) -> dict:
    """What the full preset's history load would take, from the days after the first (which
    also sets up the stores): as measured here, and with the tasks' time grown in proportion
    to the day's events while the time outside the tasks stays as it is."""
    full = PRESETS["full"]
    later = history[1:]
    per_day = statistics.fmean(r["run"]["wall_s"] for r in later)
    outside = statistics.fmean(outside_tasks(r) for r in later)
    ratio = full["events_per_day"] / events_per_day
    return {"measured_day_s": round(per_day, 2), "outside_tasks_s": round(outside, 2),
            "events_ratio": round(ratio, 1), "full_days": full["days"],
            "as_measured_h": round(per_day * full["days"] / 3600, 2),
            "proportional_h": round((outside + (per_day - outside) * ratio)
                                    * full["days"] / 3600, 1)}


def print_report(report: dict) -> None:
    shop, hist, trained = report["shop"], report["history"], report["trained_run"]
    if "copied_from" in shop:
        print(f"\nshop: {shop['days']} days, {shop['events']:,} events copied from "
              f"{shop['copied_from']} in {shop['wall_s']:.1f} s; encoder "
              f"{report['config']['encoder']}")
    else:
        print(f"\nshop: {shop['products']:,} products ({shop['new_products_after_day0']:,} "
              f"arriving after day 1), {shop['users']:,} users, {shop['days']} days, "
              f"{shop['events']:,} events (~{shop['events_per_day']:,}/day; "
              f"{shop['purchases']:,} purchases, {shop['searches']:,} searches); encoder "
              f"{report['config']['encoder']}")
        print(f"generator: {shop['wall_s']:.1f} s wall, {shop['cpu_s']:.1f} s CPU, "
              f"peak RSS {shop['peak_rss_mb']:,.0f} MB (its own process)")
    if hist["bulk"] is None:
        print(f"history load (data-only DAG runs): {hist['days']} days in "
              f"{hist['wall_s']:.1f} s ({hist['mean_day_s']:.1f} s/day, CPU "
              f"{hist['cpu_s']:.1f} s; outside the tasks {hist['mean_outside_tasks_s']:.1f} "
              "s/day)")
    else:
        bulk = hist["bulk"]
        print(f"history load: {hist['days']} days in {hist['wall_s']:.1f} s "
              f"({hist['mean_day_s']:.1f} s/day, CPU {hist['cpu_s']:.1f} s): "
              f"{len(hist['runs'])} through the DAG, {bulk['days']} in bulk "
              f"({'validated' if bulk['validated'] else 'not validated'}, "
              f"{bulk['wall_s']:.1f} s)")
        for stretch in bulk["stretches"]:
            steps = ", ".join(f"{k} {v:.1f} s" for k, v in stretch["steps_s"].items())
            print(f"  bulk {stretch['first']} .. {stretch['last']} ({stretch['days']} days): "
                  f"{stretch['wall_s']:.1f} s wall, {stretch['cpu_s']:.1f} s CPU ({steps})")
    print("\nday 2 vs last history day (target: last <= 1.5 x day 2; 'medians': days "
          f"{max(2, hist['days'] - 2)}..{hist['days']} over days 2..{min(4, hist['days'])})")
    print(f"| task | day 2 | day {hist['days']} | ratio | target | medians' ratio |")
    print("| --- | ---: | ---: | ---: | --- | ---: |")
    for task, g in report["growth"].items():
        print(f"| {task} | {g['day2_s']:.2f} s | {g['last_s']:.2f} s | {g['ratio']} | "
              f"{'met' if g['within_target'] else 'NOT met'} | {g['median_ratio']} |")
    verdict = trained.get("promoted") or {}
    outcome = (f"; model v{verdict['version']} "
               f"{'promoted' if verdict.get('promoted') else 'kept as challenger'}"
               if verdict.get("version") else "")
    print(f"\ntrained interval {trained['day']} (train: each), {trained['state']}{outcome}")
    if "train" not in trained["tasks"]:
        print("  train and later tasks skipped: the history is too short to train on (more --days)")
    print_trained(trained)
    print(f"process peak RSS (getrusage, whole benchmark less the generator): "
          f"{report['process_peak_rss_mb']:,.0f} MB")
    if "full_extrapolation" in report:
        x = report["full_extrapolation"]
        print(f"\nfull preset's history load ({x['full_days']} days), extrapolated from days "
              f"2..{hist['days']} here ({x['measured_day_s']:.1f} s/day, "
              f"{x['outside_tasks_s']:.1f} s of it outside the tasks): {x['as_measured_h']} h "
              f"if a day took as long as here; {x['proportional_h']} h if the tasks' time grew "
              f"in proportion to the day's events ({x['events_ratio']}x). Measure it with "
              f"--preset full")


def print_trained(trained: dict) -> None:
    """The trained run's table: every task, the time outside them, the whole run."""
    print("| task | wall | CPU | CPU/wall | peak RSS |")
    print("| --- | ---: | ---: | ---: | ---: |")
    tasks = trained["tasks"].values()
    outside = {"wall_s": outside_tasks(trained),
               "cpu_s": trained["run"]["cpu_s"] - sum(t["cpu_s"] for t in tasks)}
    rows = [*trained["tasks"].items(), ("outside the tasks (dag.test, metadata DB)", outside),
            ("**whole run**", trained["run"])]
    for task, f in rows:
        share = f["cpu_s"] / f["wall_s"] if f["wall_s"] else 0.0
        peak = f"{f['peak_rss_mb']:,.0f} MB" if "peak_rss_mb" in f else "—"
        print(f"| {task} | {f['wall_s']:.2f} s | {f['cpu_s']:.2f} s | {share:.2f} | {peak} |")


def trained_day_only(args: argparse.Namespace) -> None:
    """``--resume``: the trained interval alone (the shop's last day), on a state folder
    whose history an earlier run of this benchmark loaded."""
    from _scale_probe import ResourceSampler

    from features.contract import list_days
    from shoprec.runs import _output_to, load_dag

    home = args.home.resolve()
    settings = prepare_environment(home, args.encoder, settings_env(args))
    log_dir = home / "logs" / "dag_test"
    days = list_days(settings.landing_root, "events")
    if not days or not any(log_dir.glob("20*.log")):
        raise SystemExit(f"{home} has no runs of this benchmark to resume from")
    day = days[-1]  # the generator writes the history days and the trained one
    warm_text_cache(day - dt.timedelta(days=1))
    indexes = sync_indexes(settings, day)
    with _output_to(log_dir / "parse.log"):
        dag = load_dag(settings)
    with ResourceSampler() as sampler:
        trained = measured_run(dag, day, {"train": "each"}, log_dir, sampler)
    print(f"trained interval {trained['day']} (train: each), {trained['state']}; "
          f"settings {settings_env(args)}")
    print_trained(trained)
    out = args.out or Path("state") / f"bench-scale-{args.preset}-trained.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"trained_run": trained, "settings": settings_env(args),
                               "index_sync_before": indexes},
                              indent=1, default=str))
    print(f"figures -> {out}")


def settings_env(args: argparse.Namespace) -> dict[str, str]:
    """The shoprec settings this run sets beyond the state folder and the encoder."""
    return ({"SHOPREC_TRAIN_MAX_MINUTES": str(args.train_max_minutes)}
            if args.train_max_minutes is not None else {})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.resume:
        trained_day_only(args)
        return
    keep = args.keep or args.home is not None
    home = (args.home or Path(tempfile.mkdtemp(prefix="shoprec-scale-"))).resolve()
    if home.exists() and any(home.iterdir()):
        raise SystemExit(f"{home} is not empty: give an empty or new --home")
    home.mkdir(parents=True, exist_ok=True)
    settings = prepare_environment(home, args.encoder, settings_env(args))
    log_dir = home / "logs" / "dag_test"
    started = time.perf_counter()

    shop = (copy_landing(args.reuse_landing, settings.landing_root, args.days + 1)
            if args.reuse_landing else generate_landing(args, settings.landing_root))
    print(f"{'copied' if args.reuse_landing else 'generated'} {shop['events']:,} events over "
          f"{shop['days']} days in {shop['wall_s']:.1f} s -> {shop['root']}")

    from _scale_probe import ResourceSampler

    from shoprec.runs import _output_to, load_dag, migrate_metadata_db

    migrate_metadata_db(settings)
    with _output_to(log_dir / "parse.log"):
        dag = load_dag(settings)
    with ResourceSampler() as sampler:
        t0 = time.perf_counter()
        if args.history == "bulk":
            measured, bulk_figures = load_history_bulk(dag, args, settings, log_dir, sampler)
        else:
            history = load_history(dag, args, log_dir, sampler)
            measured, bulk_figures = history[1:], None
        history_s = time.perf_counter() - t0
        print("day 2 vs the last history day, per data task (wall s): " + json.dumps(
            {task: [g["day2_s"], g["last_s"], g["ratio"]]
             for task, g in growth(measured).items()}), flush=True)
        trained_day = FIRST_DAY + dt.timedelta(days=args.days)
        text_cache = (None if args.history_only and args.skip_text_cache
                      else warm_text_cache(trained_day - dt.timedelta(days=1)))
        if args.history_only:
            print(f"history loaded in {history_s:.1f} s; the trained day {trained_day}: "
                  f"--resume --home {home}")
            return
        print(f"history loaded in {history_s:.1f} s; running {trained_day} with training")
        trained = measured_run(dag, trained_day, {"train": "each"}, log_dir, sampler)

    report = {
        "config": {k: getattr(args, k) for k in
                   ("preset", "products", "users", "days", "events_per_day", "encoder", "seed")},
        "shop": shop,
        "history": {"method": ("data-only DAG runs (train: none), one per day"
                               if bulk_figures is None else
                               "bulk (shoprec.history.load_history), days 2-4 and the last "
                               "three through the DAG (train: none)"),
                    "days": args.days, "wall_s": round(history_s, 1),
                    "mean_day_s": round(history_s / args.days, 2),
                    "cpu_s": round(sum(r["run"]["cpu_s"] for r in measured)
                                   + sum(s["cpu_s"] for s in (bulk_figures or {}).get(
                                       "stretches", [])), 1),
                    "mean_outside_tasks_s": round(statistics.fmean(
                        outside_tasks(r) for r in measured), 2),
                    "runs": measured, "bulk": bulk_figures, "text_cache": text_cache},
        "growth": growth(measured),
        "trained_run": trained,
        "process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "total_s": round(time.perf_counter() - started, 1),
    }
    if bulk_figures is None and (args.preset != "full" or args.days != PRESETS["full"]["days"]):
        report["full_extrapolation"] = extrapolate(history, shop["events_per_day"])
    out = args.out or Path("state") / f"bench-scale-{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    print_report(report)
    if trained["state"] != "success":
        keep = True
        print(f"the trained run ended {trained['state']}; log: {trained['log']}")
    if not keep:
        shutil.rmtree(home, ignore_errors=True)
    print(f"\nscale benchmark: {report['total_s']:.0f} s in all; figures -> {out}"
          + (f"; state kept in {home}" if keep else ""))


if __name__ == "__main__":
    main()
