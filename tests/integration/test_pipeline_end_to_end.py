"""The real chain: synthetic shop -> shoprec_daily via dag.test() on a migrated SQLite
metadata DB -> MLflow registry -> FAISS -> the real HTTP app.

The run of the pipeline is the session's trained shop (tests/integration/conftest.py), built
once and shared: the tests here read it, and the two that run the DAG again (a rerun, a bad
partition) do so on a private copy.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pandas as pd
import pytest
from shops import START

pytestmark = pytest.mark.integration


def _client(settings):
    from training.registry import mlflow_client

    return mlflow_client(settings)


def _versions(settings) -> list:
    return _client(settings).search_model_versions(f"name = '{settings.model_name}'")


def test_every_day_succeeds_and_trains_once_history_allows(shop) -> None:
    _, built = shop
    results = built.results
    assert [r.state for r in results] == ["success"] * len(built.days)
    trained = [r for r in results if r.tasks.get("register") == "success"]
    skipped = [r for r in results if r.tasks.get("train") == "skipped"]
    # early days have too little history: training is skipped, not failed
    assert skipped and skipped[0].day == START
    assert len(trained) >= 2
    assert all(r.tasks["validate"] == "success" for r in results)


def test_registry_has_one_version_per_trained_day_and_a_champion(shop) -> None:
    from training.registry import CHALLENGER, CHAMPION, TAG_INTERVAL, alias_version

    settings, built = shop
    results = built.results
    trained_days = {r.day.isoformat() for r in results if r.tasks.get("register") == "success"}
    versions = _versions(settings)
    assert sorted(v.tags[TAG_INTERVAL] for v in versions) == sorted(trained_days)
    client = _client(settings)
    champion = alias_version(client, settings.model_name, CHAMPION)
    challenger = alias_version(client, settings.model_name, CHALLENGER)
    assert champion is not None and challenger is not None
    assert challenger.tags[TAG_INTERVAL] == max(trained_days)
    metrics = client.get_run(champion.run_id).data.metrics
    assert 0 < metrics["recall_at_50"] <= 1
    assert metrics["recall_at_50"] >= metrics["recall_at_10"]
    # the protocol's whole table: every baseline and the two-tower alone, both settings
    for name in ("popularity", "repeat", "item_knn", "als", "text_cosine"):
        for setting in ("", "new_"):
            assert f"baseline_{name}_{setting}recall_at_50" in metrics
    assert {"new_recall_at_50", "two_tower_recall_at_50", "cold_users_recall_at_10",
            "gini_at_50", "best_baseline_new_recall_at_50", "validation_all_recall_at_50",
            "holdout_users", "new_holdout_users"} <= set(metrics)
    artifacts = {a.path for folder in ("evaluation", "plots")
                 for a in client.list_artifacts(champion.run_id, folder)}
    assert {"evaluation/metrics.md", "evaluation/metrics.json", "plots/recall_at_k.png",
            "plots/recall_at_k_new.png", "plots/loss.png"} <= artifacts
    run = client.get_run(champion.run_id)
    assert {"scorer.neighbours", "holdout.test_days_used", "epochs"} <= set(run.data.params)
    assert run.data.tags["shoprec.validation_cut"] < run.data.tags["shoprec.test_cut"]


def test_rerunning_a_day_duplicates_nothing(shop_copy) -> None:
    from shoprec.runs import load_dag, run_day

    settings, built = shop_copy
    dag, results = load_dag(settings), built.results
    before = {(v.version, v.run_id) for v in _versions(settings)}
    last = results[-1].day
    run_metrics = _client(settings).get_run(
        next(v.run_id for v in _versions(settings)
             if v.tags["shoprec.interval"] == last.isoformat())).data.metrics
    again = run_day(dag, last, settings.home / "logs")
    assert again.state == "success"
    assert {(v.version, v.run_id) for v in _versions(settings)} == before
    rerun = _client(settings).get_run(
        next(v.run_id for v in _versions(settings)
             if v.tags["shoprec.interval"] == last.isoformat())).data.metrics
    assert rerun["recall_at_50"] == run_metrics["recall_at_50"]


def test_later_runs_warm_start_from_the_champion(shop) -> None:
    from training.registry import TAG_INTERVAL

    settings, _ = shop
    client = _client(settings)
    versions = sorted(_versions(settings), key=lambda v: v.tags[TAG_INTERVAL])
    warm = [client.get_run(v.run_id).data.tags["shoprec.warm_start"] for v in versions]
    assert warm[0] == "none"  # nothing to start from
    first = next(i for i, w in enumerate(warm) if w != "none")  # once there is a champion
    assert all(w.startswith("v") for w in warm[first:]), warm  # ... every run starts from it
    assert all(int(w[1:]) < int(v.version) for w, v in zip(warm, versions, strict=True)
               if w != "none")


def test_the_registered_pyfunc_ranks_like_the_server(shop) -> None:
    import mlflow

    from serving.publish import load_version_bundle
    from training.ranking.histories import Histories

    settings, _ = shop
    bundle = load_version_bundle(settings)
    model = mlflow.pyfunc.load_model(f"models:/{settings.model_name}@champion")
    history = list(bundle.products["product_id"][:3])
    stamps = [int(bundle.scorer.state.cut.timestamp()) - 60 * i for i in (3, 2, 1)]
    frame = pd.DataFrame({"recent_product_ids": [history, []],
                          "recent_event_types": [["purchase", "view", "view"], []],
                          "recent_timestamps": [stamps, []]})
    out = model.predict(frame, params={"k": 5})
    expected, _ = bundle.recommend(Histories.from_feast(frame.iloc[:1]), 5)
    assert out["product_ids"][0] == [r.product_id for r in expected]
    cold, _ = bundle.recommend(Histories.empty(1), 5)
    assert out["product_ids"][1] == [r.product_id for r in cold]
    fresh = model.predict(frame, params={"k": 5, "exclude_purchased": True})
    assert history[0] not in fresh["product_ids"][0]


def test_served_recommendations_come_from_the_champion(shop) -> None:
    from fastapi.testclient import TestClient

    from features.contract import read_partition
    from serving.app import create_app
    from training.registry import CHAMPION, alias_version

    settings, built = shop
    results = built.results
    champion = alias_version(_client(settings), settings.model_name, CHAMPION)
    events = read_partition(settings.landing_root, "events", results[-1].day)
    known_user = events[events["event_type"] != "search"]["user_id"].iloc[0]
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").status_code == 200
        assert client.get("/version").json()["model_version"] == str(champion.version)
        body = client.get(f"/recommend/{known_user}", params={"k": 7}).json()
        assert body["model_version"] == str(champion.version)
        assert body["cold_start"] is False
        assert len(body["items"]) == 7
        assert len({i["product_id"] for i in body["items"]}) == 7
        assert all(i["title"] and i["reason"] for i in body["items"])
        scores = [i["score"] for i in body["items"]]
        assert scores == sorted(scores, reverse=True)
        cold = client.get("/recommend/never-seen-user", params={"k": 3}).json()
        assert cold["cold_start"] is True and len(cold["items"]) == 3
        assert client.get(f"/recommend/{known_user}", params={"k": 0}).status_code == 422
        assert client.get(f"/recommend/{known_user}", params={"k": "ten"}).status_code == 422


def test_bad_partition_fails_validation_and_nothing_downstream_runs(shop_copy) -> None:
    from shoprec.runs import load_dag, run_day

    settings, built = shop_copy
    dag, results = load_dag(settings), built.results
    bad_day = results[-1].day + dt.timedelta(days=1)
    folder = Path(settings.landing_root) / "events" / f"date={bad_day}"
    folder.mkdir(parents=True)
    good = pd.read_parquet(Path(settings.landing_root) / "events" / f"date={results[-1].day}"
                           / "part-0.parquet")
    bad = good.assign(ts=good["ts"] + pd.Timedelta(days=1), quantity=-1)
    bad.to_parquet(folder / "part-0.parquet", index=False)
    versions_before = len(_versions(settings))

    result = run_day(dag, bad_day, settings.home / "logs")

    assert result.state == "failed"
    assert result.tasks["validate"] == "failed"
    downstream = {t: s for t, s in result.tasks.items() if t != "validate"}
    assert set(downstream.values()) <= {"upstream_failed", "None", "none"}, downstream
    assert len(_versions(settings)) == versions_before
    report = json.loads((settings.home / "validation" / f"date={bad_day}" / "events.json")
                        .read_text())
    failed = {(f["expectation"], f["column"]) for f in report["failures"]}
    assert ("expect_column_values_to_be_between", "quantity") in failed
    assert len(failed) == 1  # the shifted timestamps fit the bad day: only quantity is wrong
    assert not (settings.offline_root / "user_recent_products" / f"date={bad_day}").exists()
