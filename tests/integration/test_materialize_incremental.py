"""Incremental materialization (only the partitions that can hold the window's rows) puts
exactly what Feast's own materialize (every partition read) puts online, day after day and
across a rerun of an earlier day."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pytest
from shops import shop_environment

from features.build import build_interval
from features.store import (
    MATERIALIZED_VIEWS,
    _materialized_until,
    apply_repo,
    feature_store,
    materialize_day,
    materialize_interval,
)
from features.synth import generate_shop

pytestmark = pytest.mark.integration

START = dt.date(2026, 3, 1)
DAYS = 6


def _online(settings) -> dict[str, dict]:
    """Every online feature of every user and product."""
    from features.contract import read_upto

    store = feature_store(settings)
    last = START + dt.timedelta(days=DAYS - 1)
    users = sorted(set(read_upto(settings.landing_root, "events", last)["user_id"]))
    products = sorted(set(read_upto(settings.landing_root, "products", last)["product_id"]))
    out = {}
    for name in MATERIALIZED_VIEWS:
        view = store.get_feature_view(name)
        key = view.entity_columns[0].name
        rows = [{key: k} for k in (users if key == "user_id" else products)]
        features = [f"{name}:{f.name}" for f in view.features]
        out[name] = store.get_online_features(features=features, entity_rows=rows).to_dict()
    return out


def test_incremental_materialization_equals_feasts(tmp_path: Path) -> None:
    days = [START + dt.timedelta(days=i) for i in range(DAYS)]
    full, incremental = tmp_path / "full", tmp_path / "incremental"
    with shop_environment(full) as settings:
        generate_shop(settings.landing_root, days=DAYS, users=150, products=50, seed=8,
                      start=START)
        for day in days:
            build_interval(settings, day)
    shutil.copytree(full, incremental)

    results = {}
    for home, how in ((full, False), (incremental, True)):
        with shop_environment(home) as settings:
            for day in days:
                if how:
                    materialize_day(settings, day)  # the DAG's step: incremental
                else:
                    apply_repo(settings)
                    materialize_interval(settings, day, incremental=False)
            # a rerun of an earlier day extends to the latest window either way
            rerun = materialize_interval(settings, days[2], incremental=how)
            assert rerun["end"] == dt.datetime.combine(
                days[-1] + dt.timedelta(days=1), dt.time(), dt.UTC).isoformat()
            store = feature_store(settings)
            assert {_materialized_until(store, v) for v in MATERIALIZED_VIEWS} == {
                dt.datetime.combine(days[-1] + dt.timedelta(days=1), dt.time(), dt.UTC)}
            results[how] = _online(settings)
            if how:
                assert sum(rerun["rows"].values()) > 0
    assert results[True] == results[False]
    assert any(v is not None for v in results[True]["user_recent_products"]["recent_product_ids"])


def test_a_history_loaded_in_bulk_is_what_daily_runs_leave(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``shoprec.history.load_history`` (every day validated and built, then materialized in
    chunks of days, here 4 and 2) leaves the partitions and the online rows of the DAG's data tasks run day
    by day (check_partition, build_interval, materialize_day)."""
    from state_readers import assert_same_partitions, partitions

    from features.validation import check_partition
    from shoprec import history
    from shoprec.history import load_history

    monkeypatch.setattr(history, "MATERIALIZE_CHUNK_DAYS", 4)
    days = [START + dt.timedelta(days=i) for i in range(DAYS)]
    daily, bulk = tmp_path / "daily", tmp_path / "bulk"
    for home in (daily, bulk):
        with shop_environment(home) as settings:
            generate_shop(settings.landing_root, days=DAYS, users=150, products=50, seed=9,
                          start=START)
    results, seen = {}, []
    with shop_environment(daily) as settings:
        for day in days:
            check_partition(settings, day)
            build_interval(settings, day)
            materialize_day(settings, day)
        results["daily"] = _online(settings)
    with shop_environment(bulk) as settings:
        out = load_history(settings, days[0], days[-1],
                           on_day=lambda day, seconds: seen.append((day, sorted(seconds))))
        results["bulk"] = _online(settings)
        store = feature_store(settings)
        assert {_materialized_until(store, v) for v in MATERIALIZED_VIEWS} == {
            dt.datetime.combine(days[-1] + dt.timedelta(days=1), dt.time(), dt.UTC)}
    assert seen == [(day, ["build_features", "validate"]) for day in days]
    assert out["days"] == DAYS and sum(out["materialized"]["rows"].values()) > 0
    assert out["materialized"]["chunks"] == 2
    assert_same_partitions(partitions(daily, days), partitions(bulk, days))
    assert results["bulk"] == results["daily"]
    assert any(v is not None for v in results["bulk"]["user_profile"]["view_by_day"])
    # the validation ran and wrote the same reports
    reports = sorted(str(p.relative_to(bulk)) for p in (bulk / "validation").rglob("*.json"))
    assert len(reports) >= DAYS
    assert reports == sorted(str(p.relative_to(daily))
                             for p in (daily / "validation").rglob("*.json"))


def test_cli_load_history_stops_at_a_bad_day_then_loads_once_released(tmp_path: Path) -> None:
    import pandas as pd
    from typer.testing import CliRunner

    from features.quarantine import is_quarantined, quarantine_dir
    from shoprec.cli import app

    days = [START + dt.timedelta(days=i) for i in range(3)]
    runner = CliRunner()
    with shop_environment(tmp_path / "shop") as settings:
        root = settings.landing_root
        generate_shop(root, days=3, users=60, products=30, seed=3, start=START)
        bad = Path(root) / "events" / f"date={days[2]}" / "part-0.parquet"
        pd.read_parquet(bad).assign(quantity=0).to_parquet(bad, index=False)
        args = ["data", "load-history", "--from", str(days[0]), "--to", str(days[2])]

        failed = runner.invoke(app, args)
        assert failed.exit_code == 1, failed.output
        assert "expect_column_values_to_be_between column=quantity" in failed.output
        assert is_quarantined(settings.home, days[2])
        built = settings.offline_root / "user_recent_products"
        assert sorted(p.name for p in built.iterdir()) == [f"date={d}" for d in days[:2]]
        online = settings.feast_data / "online.db"
        assert not online.exists(), "nothing is materialized"

        fixed = quarantine_dir(settings.home, "events", days[2]) / "part-0.parquet"
        pd.read_parquet(fixed).assign(quantity=1).to_parquet(fixed, index=False)
        assert runner.invoke(app, ["data", "release", str(days[2]),
                                   "--reason", "fixed"]).exit_code == 0
        loaded = runner.invoke(app, args)
        assert loaded.exit_code == 0, loaded.output
        assert "loaded 3 days" in loaded.output and "rows online" in loaded.output
        assert online.stat().st_size > 0 and len(list(built.iterdir())) == 3

        # After a bulk load the text cache is warmed once; a second call encodes nothing.
        warm = ["model", "embed-catalog", "--day", str(days[2])]
        first, again = runner.invoke(app, warm), runner.invoke(app, warm)
        assert first.exit_code == 0 and again.exit_code == 0, first.output + again.output
        assert "text cache: 30 of 30 catalogue texts" in first.output, first.output
        assert "text cache: 0 of 30 catalogue texts" in again.output, again.output

        backwards = runner.invoke(app, ["data", "load-history", "--from", str(days[2]),
                                        "--to", str(days[0])])
        assert backwards.exit_code == 2 and "before the first" in backwards.output
