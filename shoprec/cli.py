"""`shoprec`: the operator's command line.

Thin: every command parses options, builds ``Settings`` and calls one function that does
the work (and that the DAG calls too).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shlex
from pathlib import Path
from typing import Annotated

import typer

from core.settings import Settings
from shoprec import services

app = typer.Typer(help="shoprec: keeps a shop's recommendation models fresh.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Landing-zone data: generate, import, validate.",
                       no_args_is_help=True)
import_app = typer.Typer(help="Import a real data set into the landing-zone contract.",
                         no_args_is_help=True)
model_app = typer.Typer(help="Models: evaluate, promote, roll back.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")
data_app.add_typer(import_app, name="import")
# The profile's services (shoprec.services: light imports, safe at CLI start).
app.command("up")(services.up_command)
app.command("down")(services.down_command)
app.command("status")(services.status_command)


def _settings(root: str | None = None) -> Settings:
    if root:
        os.environ["SHOPREC_LANDING_ROOT"] = str(Path(root).resolve()) if "://" not in root else root
    return Settings.from_env()


def _day(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError as exc:
        raise typer.BadParameter(f"{value!r} is not a date (YYYY-MM-DD)") from exc


@data_app.command("synth")
def data_synth(
    root: Annotated[str | None, typer.Option(help="landing root (default: $SHOPREC_LANDING_ROOT)")] = None,
    days: Annotated[int, typer.Option(min=1)] = 21,
    users: Annotated[int, typer.Option(min=1)] = 400,
    products: Annotated[int, typer.Option(min=2)] = 300,
    seed: int = 7,
    start: Annotated[str, typer.Option(help="first day, YYYY-MM-DD")] = "2026-01-01",
) -> None:
    """Generate a seeded synthetic shop (same seed, same bytes)."""
    from features.synth import generate_shop

    settings = _settings(root)
    summary = generate_shop(settings.landing_root, days=days, users=users, products=products,
                            seed=seed, start=_day(start), progress=True)
    typer.echo(str(summary))


@import_app.command("online-retail")
def import_online_retail(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False,
                                         help="online_retail.parquet (UCI Online Retail)")],
    root: Annotated[str | None, typer.Option(help="landing root")] = None,
) -> None:
    """Import the UCI Online Retail file; prints what was kept and dropped."""
    from features.importers.online_retail import import_online_retail as run_import

    settings = _settings(root)
    report = run_import(str(path), settings.landing_root, progress=True)
    typer.echo(str(report))


@import_app.command("generic")
def import_generic(
    mapping: Annotated[Path, typer.Option(exists=True, dir_okay=False,
                                          help="YAML mapping (see docs/importing.md)")],
    inputs: Annotated[list[str] | None, typer.Argument(
        metavar="INPUT", show_default=False,
        help="events export file(s), replacing the mapping's path; products=FILE and "
             "users=FILE for the other sources")] = None,
    root: Annotated[str | None, typer.Option(help="landing root")] = None,
    max_drop_share: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="refuse (exit 1, nothing written) when any source would lose "
                               "more than this share of its rows")] = 0.01,
    allow_drops: Annotated[bool, typer.Option(
        "--allow-drops", help="write whatever the import keeps, however much it drops")] = False,
) -> None:
    """Import any shop's CSV/parquet export through a YAML mapping; prints kept and dropped.

    Exits 2 on a bad mapping or input, 1 when a source would lose more than --max-drop-share
    of its rows (the report and the reasons are printed; nothing is written).
    """
    from features.importers.generic import TooManyDrops
    from features.importers.generic import import_generic as run_import
    from features.importers.generic_mapping import MappingError

    settings = _settings(root)
    try:
        report = run_import(mapping, settings.landing_root, inputs=inputs or (), progress=True,
                            max_drop_share=None if allow_drops else max_drop_share)
    except MappingError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except TooManyDrops as exc:
        typer.echo(str(exc.report))
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(str(report))


@data_app.command("validate")
def data_validate(
    date: Annotated[str, typer.Option("--date", help="the partition's day, YYYY-MM-DD")],
    root: Annotated[str | None, typer.Option(help="landing root")] = None,
    quarantine: Annotated[bool, typer.Option(
        "--quarantine", help="move a failing partition to quarantine, as the pipeline does")] = False,
) -> None:
    """Validate one day's partition with the pipeline's expectation suites.

    Exits 1 when the partition fails (or is quarantined). Nothing is moved unless
    --quarantine is given.
    """
    from features.validation import PartitionInvalid, check_partition

    settings = _settings(root)
    settings.prepare()
    try:
        result = check_partition(settings, _day(date), quarantine=quarantine)
    except PartitionInvalid as exc:
        typer.echo(str(exc))
        raise typer.Exit(1) from exc
    typer.echo(result["summary"])


@data_app.command("load-history")
def data_load_history(
    start: Annotated[str, typer.Option("--from", help="first day, YYYY-MM-DD")],
    end: Annotated[str, typer.Option("--to", help="last day (inclusive), YYYY-MM-DD")],
    root: Annotated[str | None, typer.Option(help="landing root")] = None,
    validate: Annotated[bool, typer.Option(
        "--validate/--no-validate",
        help="validate each day first, as the DAG does (skip only for data known valid)")] = True,
) -> None:
    """Load a long history fast: validate and build each day, then materialize once.

    The same partitions and online features as one data-only DAG run per day, without
    Airflow (no DagRuns are recorded). A day that fails validation is quarantined and stops
    the load (exit 1); the days before it are built, and nothing is materialized.
    """
    from features.validation import PartitionInvalid
    from shoprec.history import load_history

    settings = _settings(root)
    settings.prepare()
    try:
        out = load_history(settings, _day(start), _day(end), validate=validate)
    except PartitionInvalid as exc:
        typer.echo(str(exc))
        raise typer.Exit(1) from exc
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in out["seconds"].items())
    rows = sum(out["materialized"]["rows"].values())
    typer.echo(f"loaded {out['days']} days ({steps}); {rows:,} rows online")


@data_app.command("release")
def data_release(
    date: Annotated[str, typer.Argument(help="the quarantined day, YYYY-MM-DD")],
    reason: Annotated[str, typer.Option(help="why it may be processed now (recorded)")],
    root: Annotated[str | None, typer.Option(help="landing root")] = None,
) -> None:
    """Re-admit a fixed, quarantined partition: its files go back to the landing zone."""
    from features.quarantine import QuarantineError, release_day

    settings = _settings(root)
    try:
        note = release_day(settings.home, settings.landing_root, _day(date), reason=reason)
    except QuarantineError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from exc
    typer.echo(note.summary())


@model_app.command("embed-catalog")
def model_embed_catalog(
    day: Annotated[str, typer.Option(help="the catalogue as of this day's end, YYYY-MM-DD")],
) -> None:
    """Encode the catalogue's product texts into the text-embedding cache (only those not
    there yet), e.g. after a bulk history load, so the next trained day encodes only its
    new products."""
    from shoprec.history import embed_catalog

    settings = _settings()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    result = embed_catalog(settings, _day(day), progress=True)
    typer.echo(f"text cache: {result['encoded']:,} of {result['products']:,} catalogue texts "
               f"as of {result['day']} encoded (the rest were cached)")


@model_app.command("evaluate")
def model_evaluate(
    root: Annotated[str | None, typer.Option(help="landing root (default: $SHOPREC_LANDING_ROOT)")] = None,
    cut: Annotated[str | None, typer.Option(
        help="test cut, YYYY-MM-DD (default: the last event minus --test-days)")] = None,
    out: Annotated[Path | None, typer.Option(
        help="write the table to FILE.json and FILE.md")] = None,
    test_days: Annotated[int, typer.Option(min=1, help="test (and validation) window")] = 30,
    epochs: Annotated[int | None, typer.Option(min=0, help="two-tower epochs")] = None,
    two_tower: Annotated[bool, typer.Option(help="train the two-tower model")] = True,
    blends: Annotated[bool, typer.Option(
        "--blends", help="also the two blends (reference methods; most of the time and memory)")]
    = False,
    min_test_users: Annotated[int | None, typer.Option(
        min=0, help="warn below this many test users in a setting (default: "
                    "$SHOPREC_MIN_TEST_USERS, 20; the promotion gate refuses below it)")] = None,
) -> None:
    """Temporal-split evaluation in both settings: the tuned baselines, the two-tower model
    alone, [the blends,] and the served ranking; ends with each stage's time and peak
    memory."""
    from training.evaluation.protocol import evaluate_root

    settings = _settings(root)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    try:
        result = evaluate_root(settings.landing_root, _day(cut) if cut else None,
                               test_days=test_days, text_encoder=settings.text_encoder,
                               cache_dir=settings.cache_dir / "text", epochs=epochs,
                               two_tower=two_tower, progress=True, blends=blends,
                               min_users=min_test_users)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    markdown = result.to_markdown()
    typer.echo(markdown)
    written = ""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        result.to_json(out.with_suffix(".json"))
        out.with_suffix(".md").write_text(markdown)
        written = f"; wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}"
    typer.echo("\n".join(["Stages (fit, then recommend in both settings):", "",
                          *result.summary_lines(), ""]))
    for line in result.warning_lines():
        typer.echo(line, err=True)
    typer.echo(f"evaluated {len(result.methods)} methods at cut {result.cut} on "
               f"{result.n_users['all']:,} test users (new products: "
               f"{result.n_users['new']:,}){written}")


@app.command("run")
def run(
    start: Annotated[str, typer.Option(help="first day, YYYY-MM-DD")],
    end: Annotated[str | None, typer.Option(help="last day (default: start)")] = None,
    train: Annotated[str, typer.Option(
        help="auto/each: train every day; last: only on --end; none: data stages only")]
    = "auto",
) -> None:
    """Run shoprec_daily through Airflow (dag.test) for each day, in date order."""
    from shoprec.runs import run_days

    if train not in ("auto", "each", "last", "none"):
        raise typer.BadParameter("--train must be one of auto, each, last, none")
    settings = Settings.from_env().prepare()
    results = run_days(settings, _day(start), _day(end or start), echo=typer.echo, train=train)
    failed = [r for r in results if r.state != "success"]
    typer.echo(f"{len(results) - len(failed)} day(s) succeeded, {len(failed)} failed; "
               f"Airflow metadata in {settings.airflow_home}")
    raise typer.Exit(1 if failed else 0)


@app.command("backfill")
def backfill(
    start: Annotated[str, typer.Option(help="first interval's day, YYYY-MM-DD")],
    end: Annotated[str, typer.Option(help="last interval's day, YYYY-MM-DD (inclusive)")],
    reprocess: Annotated[str, typer.Option(
        help="intervals that already have a finished run: none (skip them), failed (rerun "
             "failed ones), completed (rerun all)")] = "none",
    train: Annotated[str, typer.Option(
        help="last: train once, on the last interval; each: every interval; none: never")]
    = "last",
    timeout: Annotated[float | None, typer.Option(help="give up waiting after SECONDS")] = None,
) -> None:
    """Backfill shoprec_daily over a date range as a real Airflow backfill.

    One DagRun (run type backfill) per day, one at a time in date order; prints a line per
    interval and a summary. Uses the running scheduler, or starts one for the duration.
    Exits 1 when an interval failed or was quarantined.
    """
    from shoprec.backfill import REPROCESS_CHOICES, BackfillError, run_backfill
    from shoprec.params import TRAIN_CHOICES

    if reprocess not in REPROCESS_CHOICES:
        raise typer.BadParameter(f"--reprocess must be one of {', '.join(REPROCESS_CHOICES)}")
    if train not in TRAIN_CHOICES:
        raise typer.BadParameter(f"--train must be one of {', '.join(TRAIN_CHOICES)}")
    first, last = _day(start), _day(end)
    if first > last:
        raise typer.BadParameter(f"--start {first} is after --end {last}")
    settings = Settings.from_env().prepare()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    try:
        result = run_backfill(settings, first, last, reprocess=reprocess, train=train,
                              echo=typer.echo, timeout=timeout)
    except BackfillError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(result.summary())
    typer.echo(f"runs, task logs and the Backfill in the Airflow UI; metadata in "
               f"{settings.airflow_home}")
    raise typer.Exit(0 if result.ok else 1)


@app.command("serve")
def serve(
    host: Annotated[str | None, typer.Option(help="bind address")] = None,
    port: Annotated[int | None, typer.Option(help="port")] = None,
) -> None:
    """Serve the champion model over HTTP (OpenAPI docs at /docs)."""
    import uvicorn

    settings = Settings.from_env().prepare()
    from serving.runtime import LOG_FORMAT

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    uvicorn.run("serving.app:create_app", factory=True, host=host or settings.serving_host,
                port=port or settings.serving_port, log_level="info",
                workers=settings.serving_workers)  # /readyz waits for as many (runtime)


@app.command("env")
def env() -> None:
    """Print the environment of this state folder, for `eval "$(shoprec env)"`.

    Then `airflow dags list`, `mlflow ui` and `feast` see the same state as the pipeline.
    """
    settings = Settings.from_env()
    for key, value in sorted(settings.service_env().items()):
        typer.echo(f"export {key}={shlex.quote(value)}")


@app.command("demo")
def demo(
    days: Annotated[int, typer.Option(min=8, help="days of synthetic shop history")] = 14,
    users: Annotated[int, typer.Option(min=20)] = 300,
    products: Annotated[int, typer.Option(min=20)] = 200,
    port: Annotated[int | None, typer.Option(help="serving port")] = None,
    keep_serving: Annotated[bool, typer.Option(help="leave the server running")] = True,
) -> None:
    """Synthetic shop -> Airflow DAG per day -> MLflow champion -> served recommendations."""
    from shoprec.demo import run_demo

    settings = Settings.from_env().prepare()
    outcome = run_demo(settings, days=days, users=users, products=products,
                       port=port or settings.serving_port, keep_serving=keep_serving,
                       echo=typer.echo)
    raise typer.Exit(0 if outcome else 1)


@model_app.command("promote")
def model_promote(
    version: Annotated[str, typer.Argument(help="the model version to make champion")],
    reason: Annotated[str, typer.Option(help="why (recorded on the version)")],
) -> None:
    """Make VERSION the champion (manual promotion), recording who and why."""
    from training.registry import set_champion

    result = set_champion(Settings.from_env(), version, reason=reason)
    typer.echo(f"champion: v{result['version']} (was v{result['previous']}): {reason}")


@model_app.command("rollback")
def model_rollback(
    reason: Annotated[str, typer.Option(help="why (recorded on the version)")],
    to: Annotated[str | None, typer.Option(help="version to go back to "
                                                "(default: the one the champion replaced)")] = None,
) -> None:
    """Move the champion back to the version it replaced (servers follow on reload)."""
    from training.registry import rollback

    try:
        result = rollback(Settings.from_env(), to=to, reason=reason)
    except RuntimeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"champion: v{result['version']} (was v{result['previous']})")


@app.command("champion")
def champion() -> None:
    """Show the registered model's champion and challenger versions."""
    from training.registry import CHALLENGER, CHAMPION, alias_version, mlflow_client

    settings = Settings.from_env()
    client = mlflow_client(settings)
    out = {}
    for alias in (CHAMPION, CHALLENGER):
        mv = alias_version(client, settings.model_name, alias)
        out[alias] = None if mv is None else {"version": mv.version, "run_id": mv.run_id,
                                              "tags": mv.tags}
    typer.echo(json.dumps(out, indent=2))


if __name__ == "__main__":
    app()
