"""The pipeline's training and evaluation steps for one data interval.

``train_interval`` builds point-in-time training examples from Feast, trains the two-tower
model, and logs the run (params, per-epoch curves, a loss plot, the serving bundle as a pyfunc
model) to MLflow. ``evaluate_interval`` measures the run's model and the current champion on
the same temporal holdout and logs both, so the promotion gate compares like with like.

Both are idempotent per interval: a finished run with the same interval, configuration and
training data is reused rather than trained again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from features.contract import Interval, catalog_as_of, parse_day, read_upto
from shoprec.settings import Settings
from training.config import TrainConfig
from training.registry import (
    CHAMPION,
    TAG_FINGERPRINT,
    TAG_INTERVAL,
    alias_version,
    code_version,
    delete_unfinished_runs,
    experiment_id,
    find_run,
    mlflow_client,
)

log = logging.getLogger(__name__)

TARGET_EVENT_TYPES = ("purchase", "add_to_cart")


class NotEnoughHistory(RuntimeError):
    """The shop's history up to this interval is too short to train and evaluate on."""


@dataclass(frozen=True)
class HoldoutConfig:
    """The evaluation protocol of the daily run (logged with the run's params).

    Attributes:
        holdout_days: the last days of history, up to the interval's end, held out.
        min_train_days: days of history required before the holdout starts.
        popularity_days: window of the popularity feature and baseline.
        ks: cut-offs of the ranking metrics.
    """

    holdout_days: int = 3
    min_train_days: int = 3
    popularity_days: int = 30
    ks: tuple[int, ...] = (10, 50)


@dataclass
class IntervalData:
    """Everything one interval's training and evaluation read."""

    day: dt.date
    cut: dt.datetime
    catalog: pd.DataFrame
    events: pd.DataFrame

    @property
    def holdout(self) -> pd.DataFrame:
        return self.events[self.events["ts"] >= pd.Timestamp(self.cut)]

    @property
    def before_cut(self) -> pd.DataFrame:
        return self.events[self.events["ts"] < pd.Timestamp(self.cut)]


def train_config(settings: Settings) -> TrainConfig:
    """The default hyper-parameters, with the text encoder the settings name."""
    return TrainConfig(text_encoder=settings.text_encoder)


def load_interval(settings: Settings, day: dt.date, holdout: HoldoutConfig) -> IntervalData:
    """Read the catalogue and events up to the interval's end and place the holdout cut.

    Raises:
        NotEnoughHistory: fewer than ``min_train_days`` days of events before the cut.
    """
    interval = Interval.for_day(day)
    cut = interval.end - dt.timedelta(days=holdout.holdout_days)
    events = read_upto(settings.landing_root, "events", day)
    if events.empty:
        raise NotEnoughHistory(f"no events up to {day}")
    first_day = events["ts"].min().date()
    days_before_cut = (cut.date() - first_day).days
    if days_before_cut < holdout.min_train_days:
        raise NotEnoughHistory(
            f"{days_before_cut} day(s) of history before the holdout cut {cut:%Y-%m-%d}; "
            f"need {holdout.min_train_days} (holdout = last {holdout.holdout_days} days)")
    return IntervalData(day, cut, catalog_as_of(settings.landing_root, day), events)


def training_examples(settings: Settings, data: IntervalData) -> pd.DataFrame:
    """Purchases and add-to-carts before the cut, each with the user's history as Feast
    held it at that moment (point in time: the end-of-day snapshot before the event)."""
    from features.store import historical_user_history

    targets = data.before_cut
    targets = targets[targets["event_type"].isin(TARGET_EVENT_TYPES)]
    entity = pd.DataFrame({
        "user_id": targets["user_id"].to_numpy(),
        "event_timestamp": targets["ts"].to_numpy(),
        "product_id": targets["product_id"].to_numpy(),
        "event_id": targets["event_id"].to_numpy(),
    })
    if entity.empty:
        return entity
    examples = historical_user_history(settings, entity)
    has_history = examples["recent_product_ids"].map(len) > 0
    return examples[has_history].sort_values("event_id").reset_index(drop=True)


def holdout_users(settings: Settings, data: IntervalData) -> tuple[dict, dict, dict]:
    """Test users and their truth: users with history before the cut and a purchase after.

    Returns:
        (histories at the cut, their event types, truth = distinct products purchased after
        the cut), keyed by user_id.
    """
    from features.store import historical_user_history

    holdout = data.holdout
    buyers = holdout[holdout["event_type"] == "purchase"]
    known_before = set(data.before_cut["user_id"])
    truth = {u: set(g["product_id"]) for u, g in buyers.groupby("user_id")
             if u in known_before}
    if not truth:
        return {}, {}, {}
    users = sorted(truth)
    entity = pd.DataFrame({"user_id": users,
                           "event_timestamp": [pd.Timestamp(data.cut)] * len(users)})
    hist = historical_user_history(settings, entity)
    histories = dict(zip(hist["user_id"], hist["recent_product_ids"], strict=True))
    types = dict(zip(hist["user_id"], hist["recent_event_types"], strict=True))
    keep = [u for u in users if histories.get(u)]
    return ({u: histories[u] for u in keep}, {u: types[u] for u in keep},
            {u: truth[u] for u in keep})


def popularity(events: pd.DataFrame, until: dt.datetime, days: int) -> pd.Series:
    """Purchased quantity per product in the ``days`` before ``until``."""
    start = pd.Timestamp(until) - pd.Timedelta(days=days)
    window = events[(events["ts"] >= start) & (events["ts"] < pd.Timestamp(until))
                    & (events["event_type"] == "purchase")]
    return window.groupby("product_id")["quantity"].sum().astype(float)


def dataset_fingerprint(catalog: pd.DataFrame, examples: pd.DataFrame) -> str:
    """Identity of the data a run learns from: the catalogue and the training examples."""
    digest = hashlib.sha256()
    digest.update(pd.util.hash_pandas_object(
        catalog[["product_id", "title", "category", "price"]].astype(str), index=False
    ).to_numpy().tobytes())
    digest.update("\n".join(examples["event_id"].astype(str)).encode())
    return digest.hexdigest()[:16]


def _fingerprint(config: TrainConfig, holdout: HoldoutConfig, data_fingerprint: str) -> str:
    """Identity of a training run: hyper-parameters + protocol + exactly its data."""
    blob = f"{config.fingerprint()}|{asdict(holdout)!r}|{data_fingerprint}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _loss_plot(history: list[dict[str, float]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(range(1, len(history) + 1), [h["loss"] for h in history], marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("in-batch softmax loss")
    ax.set_title("two-tower training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def train_interval(settings: Settings, day: str | dt.date,
                   holdout: HoldoutConfig = HoldoutConfig()) -> dict[str, Any]:
    """Train (or reuse) the interval's model and log it to MLflow.

    Returns:
        {"mlflow_run_id", "reused", "examples", "day"} for XCom.

    Raises:
        NotEnoughHistory: too little history to train and evaluate yet.
    """
    import mlflow

    from serving.bundle import write_bundle
    from serving.pyfunc import log_pyfunc
    from training.train import NotEnoughData, train

    day = parse_day(day)
    config = train_config(settings)
    data = load_interval(settings, day, holdout)
    examples = training_examples(settings, data)
    if len(examples) < config.min_examples:
        raise NotEnoughHistory(f"{len(examples)} training examples with a user history "
                               f"before {data.cut:%Y-%m-%d}; need {config.min_examples}")
    data_fingerprint = dataset_fingerprint(data.catalog, examples)
    fingerprint = _fingerprint(config, holdout, data_fingerprint)
    client = mlflow_client(settings)
    exp_id = experiment_id(settings, client)
    tags = {TAG_INTERVAL: day.isoformat(), TAG_FINGERPRINT: fingerprint}
    existing = find_run(client, exp_id, tags)
    if existing is not None:
        log.info("reusing run %s for %s (same data and config)", existing.info.run_id, day)
        return {"mlflow_run_id": existing.info.run_id, "reused": True,
                "examples": len(examples), "day": day.isoformat()}
    delete_unfinished_runs(client, exp_id, tags)

    run_tags = {**tags, "shoprec.cut": data.cut.isoformat(),
                "shoprec.dataset_fingerprint": data_fingerprint,
                "shoprec.config_hash": config.fingerprint(),
                "shoprec.git_commit": code_version(),
                "shoprec.validation_report": str(settings.home / "validation"
                                                 / f"date={day.isoformat()}")}
    with mlflow.start_run(experiment_id=exp_id, run_name=f"two-tower {day}",
                          tags=run_tags) as run:
        mlflow.log_params({**config.to_params(),
                           **{f"holdout.{k}": v for k, v in asdict(holdout).items()}})
        try:
            result = train(config, data.catalog, examples, cache_dir=settings.cache_dir / "text",
                           progress=False,
                           on_epoch=lambda epoch, m: mlflow.log_metrics(
                               {f"epoch_{k}": v for k, v in m.items()}, step=epoch))
        except NotEnoughData as exc:
            raise NotEnoughHistory(str(exc)) from exc
        pop = popularity(data.events, Interval.for_day(day).end, holdout.popularity_days)
        catalog = data.catalog.set_index("product_id").loc[result.product_ids].reset_index()
        products = pd.DataFrame({
            "product_id": catalog["product_id"], "title": catalog["title"],
            "category": catalog["category"], "brand": catalog["brand"],
            "price": catalog["price"],
            "popularity": catalog["product_id"].map(pop).fillna(0.0).to_numpy(),
        })
        mlflow.log_metrics({"train_examples": result.n_examples,
                            "train_seconds": result.seconds,
                            "catalog_products": len(products)})
        with tempfile.TemporaryDirectory() as tmp:
            bundle = write_bundle(Path(tmp) / "bundle", model=result.model, config=config,
                                  products=products, item_embeddings=result.item_embeddings,
                                  meta={"interval": day.isoformat(), "cut": data.cut.isoformat(),
                                        "fingerprint": fingerprint,
                                        "model_name": settings.model_name})
            log_pyfunc(bundle, sample_history=list(examples["recent_product_ids"].iloc[0]))
            if result.history:
                mlflow.log_artifact(str(_loss_plot(result.history, Path(tmp) / "loss.png")),
                                    artifact_path="plots")
        run_id = run.info.run_id
    log.info("trained run %s for %s on %d examples", run_id, day, result.n_examples)
    return {"mlflow_run_id": run_id, "reused": False, "examples": result.n_examples,
            "day": day.isoformat()}


def catalog_embeddings(model: Any, config: TrainConfig, catalog: pd.DataFrame,
                       cache_dir: Path) -> tuple[np.ndarray, list[str]]:
    """Item embeddings of a catalogue under a (possibly older) model.

    New products are encoded from their text and attributes, so a champion trained before
    they arrived is still compared on the whole current catalogue.
    """
    from training.text import embed_texts, product_text
    from training.towers import ItemFeatures, encode_items
    from training.train import unique_products

    catalog = unique_products(catalog)
    text = embed_texts(product_text(catalog), config, cache_dir, progress=False)
    features = ItemFeatures.from_catalog(catalog, text)
    return encode_items(model, features), features.product_ids


CURVE_MAX_K = 100


def _rank(model: Any, config: TrainConfig, data: IntervalData, users: list[str],
          histories: dict, types: dict, cache_dir: Path) -> tuple[list[list[str]], int]:
    """Top-100 products per holdout user under a model, over the current catalogue."""
    from training.evaluate import rank_with_model

    embeddings, product_ids = catalog_embeddings(model, config, data.catalog, cache_dir)
    return rank_with_model(model, data.catalog, embeddings, product_ids, histories, types,
                           users, CURVE_MAX_K)


def repeat_rankings(before_cut: pd.DataFrame, users: list[str], popular: list[str],
                    top: int) -> list[list[str]]:
    """The "repeat" baseline: each user's own most-bought products (by purchase count, then
    most recent), filled up with the popular products."""
    bought = before_cut[before_cut["event_type"] == "purchase"]
    stats = (bought.groupby(["user_id", "product_id"])
             .agg(n=("event_id", "size"), last=("ts", "max")).reset_index()
             .sort_values(["user_id", "n", "last", "product_id"],
                          ascending=[True, False, False, True], kind="stable"))
    own = stats.groupby("user_id")["product_id"].agg(list).to_dict()
    out = []
    for user in users:
        mine = own.get(user, [])[:top]
        seen = set(mine)
        out.append(mine + [p for p in popular if p not in seen][: top - len(mine)])
    return out


def evaluate_interval(settings: Settings, mlflow_run_id: str, day: str | dt.date,
                      holdout: HoldoutConfig = HoldoutConfig()) -> dict[str, Any]:
    """Measure the run's model, the champion and the baselines on the same holdout.

    Logs, to the training run: the model's metrics (``recall_at_10`` ...), the champion's
    (``champion_*``), each baseline's (``baseline_<name>_*``) and the best baseline's
    (``best_baseline_*``); a markdown/JSON comparison table and a Recall@K plot (K = 1..100)
    as artifacts. Already-evaluated runs (a rerun) return their logged metrics unchanged.

    Returns:
        {"mlflow_run_id", "metrics": {...}} for XCom.
    """
    import mlflow

    from serving.publish import download_model_bundle
    from training.checkpoint import load_model
    from training.evaluate import popular_ranking, ranking_metrics, recall_curve
    from training.report import metrics_markdown, recall_at_k_plot, write_table_json

    day = parse_day(day)
    client = mlflow_client(settings)
    logged = client.get_run(mlflow_run_id).data.metrics
    if "recall_at_50" in logged:
        return {"mlflow_run_id": mlflow_run_id,
                "metrics": {k: v for k, v in logged.items() if not k.startswith("epoch_")}}
    data = load_interval(settings, day, holdout)
    histories, types, truth = holdout_users(settings, data)
    if not truth:
        raise NotEnoughHistory(f"no holdout users after {data.cut:%Y-%m-%d}")
    users = sorted(truth)
    truth_list = [truth[u] for u in users]
    cache = settings.cache_dir / "text"
    model, config = load_model(download_model_bundle(settings, run_id=mlflow_run_id) / "model")
    model_ranked, n_products = _rank(model, config, data, users, histories, types, cache)
    popular = popular_ranking(popularity(data.events, data.cut, holdout.popularity_days),
                              CURVE_MAX_K)
    rankings = {"model": model_ranked}
    champion = alias_version(client, settings.model_name, CHAMPION)
    if champion is not None and champion.run_id != mlflow_run_id:
        champ_model, champ_config = load_model(
            download_model_bundle(settings, run_id=champion.run_id) / "model")
        rankings[f"champion v{champion.version}"] = _rank(
            champ_model, champ_config, data, users, histories, types, cache)[0]
    baselines = {"popularity": [popular] * len(users),
                 "repeat": repeat_rankings(data.before_cut, users, popular, CURVE_MAX_K)}
    rankings.update(baselines)

    table = {name: ranking_metrics(ranked, truth_list, holdout.ks, n_products)
             for name, ranked in rankings.items()}
    metrics = dict(table["model"])
    for name, values in table.items():
        if name.startswith("champion"):
            metrics.update({f"champion_{k}": v for k, v in values.items()})
            metrics["champion_version"] = float(champion.version)
        elif name in baselines:
            metrics.update({f"baseline_{name}_{k}": v for k, v in values.items()})
    for key in ("recall_at_50", "recall_at_10", "ndcg_at_10"):
        metrics[f"best_baseline_{key}"] = max(table[b][key] for b in baselines)
    metrics["holdout_users"] = float(len(users))

    title = f"Holdout {data.cut:%Y-%m-%d} .. {day} ({len(users)} users, all products)"
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=mlflow_run_id):
        mlflow.log_metrics(metrics)
        folder = Path(tmp)
        (folder / "metrics.md").write_text(metrics_markdown(
            table, title=title, note="Users with history before the cut and a purchase "
            "after it; truth = the distinct products they bought after the cut."))
        write_table_json(table, folder / "metrics.json")
        mlflow.log_artifact(str(folder / "metrics.md"), artifact_path="evaluation")
        mlflow.log_artifact(str(folder / "metrics.json"), artifact_path="evaluation")
        curves = {name: recall_curve(ranked, truth_list, CURVE_MAX_K)
                  for name, ranked in rankings.items()}
        mlflow.log_artifact(str(recall_at_k_plot(curves, folder / "recall_at_k.png",
                                                 title=title)), artifact_path="plots")
    log.info("evaluated %s on %d holdout users: %s", mlflow_run_id, len(users),
             {name: round(v["recall_at_50"], 4) for name, v in table.items()})
    return {"mlflow_run_id": mlflow_run_id, "metrics": metrics}
