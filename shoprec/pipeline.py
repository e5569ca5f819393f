"""The pipeline's training and evaluation steps for one data interval.

The windows, counted back from the interval's end (``HoldoutConfig``)::

    |---- train the two-tower ----|--- validation ---|------ test ------|
                           validation cut         test cut        interval end

``train_interval`` trains the two-tower model on Feast's point-in-time examples before the
validation cut (early stopping on the validation window, warm start from the champion),
tunes the served ranking (``training.ranking``: two-tower, co-occurrence, ALS and purchase
facts blended by a small network) on the validation window, refits its item side on
everything up to the interval's end, and logs the bundle as a pyfunc model.

``evaluate_interval`` measures, on the test window with the evaluation protocol
(``training.evaluation.protocol``, both settings), the run's served ranking and its two-tower model
alone, the champion's ranking (its learned parts, item side refitted at the same cut) and
every baseline; logs the whole table, a Recall@K plot and the headline metrics the
promotion gate reads.

Both are idempotent per interval: a finished run with the same interval, configuration and
training data is reused rather than trained again, and an evaluated run keeps its metrics.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.settings import Settings
from features.contract import Interval, newest_days, parse_day, read_range, read_upto
from features.running import running_catalog, running_users
from features.user_state import TARGET_EVENT_TYPES
from training.config import TrainConfig
from training.ranking.config import ScorerConfig
from training.registry import (
    CHAMPION,
    TAG_FINGERPRINT,
    TAG_INTERVAL,
    PromotionPolicy,
    alias_version,
    code_version,
    delete_unfinished_runs,
    experiment_id,
    find_run,
    mlflow_client,
)

log = logging.getLogger(__name__)

CURVE_MAX_K = 100
BASELINES = ("popularity", "repeat", "item_knn", "als", "text_cosine")
MODEL = "model"
TWO_TOWER = "two_tower"


class NotEnoughHistory(RuntimeError):
    """The shop's history up to this interval is too short to train and evaluate on."""



@dataclass(frozen=True)
class HoldoutConfig:
    """The evaluation windows of the daily run (logged with the run's params).

    Attributes:
        test_days: the last days up to the interval's end: the test window of the protocol.
        validation_days: the days before the test window: early stopping and the tuning of
            the served ranking.
        min_train_days: days of history required before the validation window.
        ks: cut-offs of the ranking metrics.
    """

    test_days: int = 30
    validation_days: int = 30
    min_train_days: int = 3
    ks: tuple[int, ...] = (10, 50)

    def windows(self, history_days: int) -> tuple[int, int]:
        """(test, validation) days for a shop with ``history_days`` days of history.

        A young shop gets shorter windows, each a third of what exceeds ``min_train_days``
        (at least one day), until its history is long enough for the configured ones.

        Raises:
            NotEnoughHistory: fewer than ``min_train_days`` + 2 days.
        """
        spare = history_days - self.min_train_days
        if spare < 2:
            raise NotEnoughHistory(
                f"{history_days} day(s) of history; need {self.min_train_days + 2} "
                f"({self.min_train_days} to train on, 1 to validate, 1 to test)")
        if spare >= self.test_days + self.validation_days + self.min_train_days:
            return self.test_days, self.validation_days
        each = max(1, spare // 3)
        return min(each, self.test_days), min(each, self.validation_days)


@dataclass
class IntervalData:
    """Everything one interval's training and evaluation read."""

    day: dt.date
    end: pd.Timestamp
    test_days: int
    validation_days: int
    events: pd.DataFrame  # the newest days' events, ``Settings.train_max_events`` at most
    products: pd.DataFrame  # every product row up to the interval's end
    catalog: pd.DataFrame  # the catalogue as of the interval's end
    users: pd.DataFrame  # one row per user seen up to the interval's end (last country)

    @property
    def test_cut(self) -> pd.Timestamp:
        return self.end - pd.Timedelta(days=self.test_days)

    @property
    def validation_cut(self) -> pd.Timestamp:
        return self.test_cut - pd.Timedelta(days=self.validation_days)

    def windows(self) -> dict[str, str]:
        return {"start": self.events["ts"].min().isoformat(),
                "validation_cut": self.validation_cut.isoformat(),
                "test_cut": self.test_cut.isoformat(), "end": self.end.isoformat()}


FINE_TUNED_LAYERS_ON_CUDA = 2


def text_trainable_layers(setting: str, cuda: bool | None = None) -> int:
    """How many top layers of the text encoder the daily training fine-tunes.

    Args:
        setting: ``SHOPREC_TEXT_TRAINABLE_LAYERS``: "auto" (``FINE_TUNED_LAYERS_ON_CUDA``
            when CUDA is present, else 0: frozen text, cached vectors), or a number.
        cuda: whether CUDA is present (None: ask torch).
    """
    if setting in ("", "auto"):
        if cuda is None:
            import torch

            cuda = torch.cuda.is_available()
        return FINE_TUNED_LAYERS_ON_CUDA if cuda else 0
    try:
        layers = int(setting)
    except ValueError:
        raise ValueError(f"SHOPREC_TEXT_TRAINABLE_LAYERS={setting!r}: expected auto or a "
                         f"number of layers (0: frozen)") from None
    if layers < 0:
        raise ValueError(f"SHOPREC_TEXT_TRAINABLE_LAYERS={layers}: must be >= 0")
    return layers


def train_config(settings: Settings) -> TrainConfig:
    """The default hyper-parameters with what the settings choose: the text encoder, how
    many of its layers are fine-tuned, and the training budget."""
    return TrainConfig(text_encoder=settings.text_encoder,
                       text_trainable_layers=text_trainable_layers(
                           settings.text_trainable_layers),
                       max_examples=settings.train_max_examples,
                       max_minutes=settings.train_max_minutes)


def load_interval(settings: Settings, day: dt.date, holdout: HoldoutConfig) -> IntervalData:
    """Read events, product rows and the catalogue up to the interval's end; place the cuts.

    The events are those of the newest whole days that hold at most
    ``Settings.train_max_events`` together (0: all; ``features.contract.newest_days``): the
    window every model is fitted and evaluated in, so that the run's time and memory do not
    grow with the shop's age (at 200,000 events a day, 180 days of events in pandas would
    not fit in this machine's memory; a shop of a few thousand events a day keeps years).
    Users' longer histories still reach the models through Feast (``user_recent_products``).

    Raises:
        NotEnoughHistory: the history is too short for the windows (``HoldoutConfig``).
    """
    end = pd.Timestamp(Interval.for_day(day).end)
    events = read_range(settings.landing_root, "events", newest_days(
        settings.landing_root, "events", day, settings.train_max_events))
    if events.empty:
        raise NotEnoughHistory(f"no events up to {day}")
    history_days = (end.date() - events["ts"].min().date()).days
    test_days, validation_days = holdout.windows(history_days)
    # The catalogue and the users from the feature build's running snapshots: one row per
    # product (its latest) and per user (its last known country), not every row ever sent.
    snapshots = settings.home / "running"
    catalog = running_catalog(settings.landing_root, day, snapshots).drop(
        columns="first_seen", errors="ignore")
    return IntervalData(day, end, test_days, validation_days, events,
                        read_upto(settings.landing_root, "products", day), catalog,
                        running_users(settings.landing_root, day, snapshots))


def training_examples(settings: Settings, events: pd.DataFrame,
                      max_examples: int = 0) -> pd.DataFrame:
    """Purchases and add-to-carts of ``events``, each with the user's history (and profile)
    as Feast held it at that moment (point in time: the end-of-day snapshot before it).

    Args:
        max_examples: the training budget (``TrainConfig.max_examples``): only the most
            recent this many targets are joined with Feast (0: all), so the join's cost
            does not grow with the shop's age either.
    """
    from features.store import historical_user_history
    from training.train import within_budget

    targets = within_budget(events[events["event_type"].isin(TARGET_EVENT_TYPES)],
                            max_examples, column="ts")
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


def validation_set(settings: Settings, data: IntervalData, max_users: int = 0,
                   seed: int = 0) -> Any:
    """Early-stopping users: users known before the validation cut who purchased in the
    validation window (at most ``max_users`` of them, ``training.train.sample_users``; 0:
    all), with their Feast history at the cut."""
    from features.store import historical_user_history
    from training.train import ValidationSet, sample_users

    events = data.events
    before = events[events["ts"] < data.validation_cut]
    window = events[(events["ts"] >= data.validation_cut) & (events["ts"] < data.test_cut)
                    & (events["event_type"] == "purchase")]
    known = set(before["user_id"])
    truth = {u: set(g) for u, g in window.groupby("user_id")["product_id"] if u in known}
    if not truth:
        return None
    users = sample_users(truth, max_users, seed)
    truth = {u: truth[u] for u in users}
    hist = historical_user_history(settings, pd.DataFrame({
        "user_id": users, "event_timestamp": [data.validation_cut] * len(users)}))
    return ValidationSet(
        histories=dict(zip(hist["user_id"], hist["recent_product_ids"], strict=True)),
        truth=truth,
        event_types=dict(zip(hist["user_id"], hist["recent_event_types"], strict=True)),
        user_features=hist)


def dataset_fingerprint(products: pd.DataFrame, events: pd.DataFrame) -> str:
    """Identity of the data a run learns from: the product rows and the events."""
    digest = hashlib.sha256()
    digest.update(pd.util.hash_pandas_object(
        products[["product_id", "title", "category", "price"]].astype(str), index=False
    ).to_numpy().tobytes())
    digest.update("\n".join(sorted(events["event_id"].astype(str))).encode())
    return digest.hexdigest()[:16]


def _fingerprint(config: TrainConfig, scorer: ScorerConfig, holdout: HoldoutConfig,
                 data_fingerprint: str) -> str:
    """Identity of a training run: hyper-parameters + the ranking's features + protocol +
    exactly its data (a code change that adds a feature trains again instead of reusing)."""
    from training.ranking.config import FEATURE_NAMES

    blob = (f"{config.fingerprint()}|{asdict(scorer)!r}|{FEATURE_NAMES!r}|{asdict(holdout)!r}"
            f"|{data_fingerprint}")
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


def _champion_checkpoint(settings: Settings, client: Any) -> tuple[Path | None, str | None]:
    """The champion's two-tower checkpoint folder to warm-start from, and its version."""
    from serving.bundle import MODEL_DIR
    from serving.publish import download_model_bundle

    champion = alias_version(client, settings.model_name, CHAMPION)
    if champion is None:
        return None, None
    try:
        return download_model_bundle(settings, run_id=champion.run_id) / MODEL_DIR, \
            str(champion.version)
    except Exception as exc:  # a broken champion must not stop training from scratch
        log.warning("no warm start: cannot fetch champion v%s (%s)", champion.version, exc)
        return None, None


def train_interval(settings: Settings, day: str | dt.date,
                   holdout: HoldoutConfig = HoldoutConfig(),
                   scorer_config: ScorerConfig | None = None) -> dict[str, Any]:
    """Train (or reuse) the interval's model and served ranking and log them to MLflow.

    Returns:
        {"mlflow_run_id", "reused", "examples", "day"} for XCom.

    Raises:
        NotEnoughHistory: too little history to train and evaluate yet.
    """
    import mlflow

    from serving.bundle import write_bundle
    from serving.pyfunc import log_pyfunc
    from training.data import temporal_split, train_data, validation_split
    from training.ranking.scorer import Scorer
    from training.train import NotEnoughData, train

    day = parse_day(day)
    config = train_config(settings)
    scorer_config = scorer_config or ScorerConfig(stage=settings.ranking_stage)
    data = load_interval(settings, day, holdout)
    examples = training_examples(settings, data.events[data.events["ts"] < data.validation_cut],
                                 config.max_examples)
    if len(examples) < config.min_examples:
        raise NotEnoughHistory(f"{len(examples)} training examples with a user history "
                               f"before {data.validation_cut:%Y-%m-%d}; "
                               f"need {config.min_examples}")
    data_fingerprint = dataset_fingerprint(data.products, data.events)
    fingerprint = _fingerprint(config, scorer_config, holdout, data_fingerprint)
    client = mlflow_client(settings)
    exp_id = experiment_id(settings, client)
    tags = {TAG_INTERVAL: day.isoformat(), TAG_FINGERPRINT: fingerprint}
    existing = find_run(client, exp_id, tags)
    if existing is not None:
        log.info("reusing run %s for %s (same data and config)", existing.info.run_id, day)
        return {"mlflow_run_id": existing.info.run_id, "reused": True,
                "examples": len(examples), "day": day.isoformat()}
    delete_unfinished_runs(client, exp_id, tags)
    warm, warm_version = _champion_checkpoint(settings, client)
    cache = settings.cache_dir / "text"

    run_tags = {**tags, **{f"shoprec.{k}": v for k, v in data.windows().items()},
                "shoprec.cut": data.test_cut.isoformat(),
                "shoprec.dataset_fingerprint": data_fingerprint,
                "shoprec.config_hash": config.fingerprint(),
                "shoprec.git_commit": code_version(),
                "shoprec.warm_start": f"v{warm_version}" if warm_version else "none",
                "shoprec.validation_report": str(settings.home / "validation"
                                                 / f"date={day.isoformat()}")}
    with mlflow.start_run(experiment_id=exp_id, run_name=f"two-tower {day}",
                          tags=run_tags) as run:
        mlflow.log_params({**config.to_params(), **scorer_config.to_params(),
                           **{f"holdout.{k}": v for k, v in asdict(holdout).items()},
                           "holdout.test_days_used": data.test_days,
                           "holdout.validation_days_used": data.validation_days})
        try:
            result = train(config, data.catalog, examples, cache_dir=cache, progress=False,
                           validation=validation_set(settings, data,
                                                     config.validation_max_users, config.seed),
                           warm_start=warm,
                           on_epoch=lambda epoch, m: mlflow.log_metrics(
                               {f"epoch_{k}": v for k, v in m.items()}, step=epoch))
        except NotEnoughData as exc:
            raise NotEnoughHistory(str(exc)) from exc
        # The served ranking: tuned on the validation window, item side at the interval end.
        split = temporal_split(data.events, data.products, data.test_cut, data.test_days)
        tuning = validation_split(split.train, data.validation_days)
        scorer = Scorer(scorer_config, result.model, config,
                        index_exact_max=settings.index_exact_max)
        validation = scorer.fit_items(tuning.train, cache).tune(tuning, data.users)
        scorer.fit_items(train_data(data.events, data.products, data.end), cache, data.users)
        state = scorer.state
        products = (data.products.sort_values("updated_at", kind="stable")
                    .drop_duplicates("product_id", keep="last").set_index("product_id")
                    .loc[state.product_ids].reset_index())
        products = pd.DataFrame({
            "product_id": products["product_id"], "title": products["title"],
            "category": products["category"], "brand": products["brand"],
            "price": products["price"], "popularity": state.facts["popularity"],
        })
        mlflow.log_metrics({
            "train_examples": result.n_examples, "train_seconds": result.seconds,
            "catalog_products": len(products),
            **({"best_epoch": result.best_epoch} if result.best_epoch is not None else {}),
            **{f"validation_{s}_{k}": v for s, m in validation.items() for k, v in m.items()},
            # the ranking stages' held-out figures, from which each setting's was chosen
            **{f"stage_{s}_{stage}_{k}": v for s, table in scorer.stage_choice.items()
               for stage, m in table.items() for k, v in m.items()},
            **(state.sequence.metrics() if state.sequence is not None else {}),
        })
        mlflow.set_tags({f"ranking_stage.{s}": stage for s, stage in scorer.stages.items()})
        with tempfile.TemporaryDirectory() as tmp:
            bundle = write_bundle(Path(tmp) / "bundle", model=result.model, config=config,
                                  scorer=scorer, products=products,
                                  item_embeddings=state.embeddings,
                                  meta={"interval": day.isoformat(), **data.windows(),
                                        "fingerprint": fingerprint,
                                        "model_name": settings.model_name})
            sample = examples.iloc[0]
            stamps = sample.get("recent_timestamps")
            log_pyfunc(bundle, sample_history=list(sample["recent_product_ids"]),
                       sample_types=list(sample["recent_event_types"]),
                       sample_timestamps=None if stamps is None else list(stamps))
            if result.history:
                mlflow.log_artifact(str(_loss_plot(result.history, Path(tmp) / "loss.png")),
                                    artifact_path="plots")
        run_id = run.info.run_id
    log.info("trained run %s for %s on %d examples", run_id, day, result.n_examples)
    return {"mlflow_run_id": run_id, "reused": False, "examples": result.n_examples,
            "day": day.isoformat()}


def load_scorer(settings: Settings, run_id: str) -> Any:
    """The served ranking a run logged (two-tower model + pair scorers + item side)."""
    from serving.bundle import MODEL_DIR, SCORER_DIR
    from serving.publish import download_model_bundle
    from training.checkpoint import load_model
    from training.ranking.scorer import Scorer

    folder = download_model_bundle(settings, run_id=run_id)
    model, config = load_model(folder / MODEL_DIR)
    return Scorer.load(folder / SCORER_DIR, model, config,
                       index_exact_max=settings.index_exact_max)


def metric_name(method: str, setting: str, segment: str, metric: str) -> str:
    """The MLflow name of one figure: the served ranking's setting (a) overall is the bare
    metric (``recall_at_50``); otherwise prefixed by method, ``new_`` for setting (b) and
    the segment, e.g. ``baseline_als_new_recall_at_50``, ``two_tower_cold_users_ndcg_at_10``."""
    parts = [] if method == MODEL else [
        method if method in (TWO_TOWER, "champion") else f"baseline_{method}"]
    parts += ["new"] if setting == "new" else []
    parts += [] if segment == "all" else [segment]
    return "_".join([*parts, metric])


def interval_metrics(result: Any, against: float, gate_metric: str,
                     baselines: tuple[str, ...] = BASELINES) -> dict[str, float]:
    """What an evaluation logs to the training run and the promotion gate reads.

    Args:
        result: the protocol's result, with methods ``model``, ``two_tower`` (optional),
            ``champion`` (when there is one) and the baselines.
        against: the champion's version (0.0: none).
        gate_metric: the gate's metric.
        baselines: the baselines' method names (those present are used).

    Returns:
        Every figure (``metric_name``), ``best_baseline_*``, the test-user counts, the
        bootstrap figures (``uncertainty_metrics``) and ``champion_version``.
    """
    from training.data import SETTINGS

    present = tuple(b for b in baselines if b in result.metrics)
    metrics: dict[str, float] = {}
    for method, settings_ in result.metrics.items():
        for setting, segments in settings_.items():
            for segment, values in segments.items():
                metrics.update({metric_name(method, setting, segment, k): v
                                for k, v in values.items() if k != "n_users"})
    for setting in SETTINGS:
        prefix = "" if setting == "all" else "new_"
        for key in result.metrics[MODEL][setting]["all"]:
            if key != "n_users":
                metrics[f"best_baseline_{prefix}{key}"] = max(
                    result.value(b, setting, key) for b in present)
        metrics[f"{prefix}holdout_users"] = float(result.n_users[setting])
        metrics[f"{prefix}holdout_users_total"] = float(
            result.sampled_from.get(setting, result.n_users[setting]))
    metrics.update(uncertainty_metrics(result, gate_metric,
                                       "champion" if "champion" in result.metrics else None,
                                       present))
    metrics["champion_version"] = against
    return metrics


def uncertainty_metrics(result: Any, gate_metric: str, champion: str | None,
                        baselines: tuple[str, ...] = BASELINES) -> dict[str, float]:
    """The evaluation's bootstrap figures, as MLflow metrics.

    ``<figure>_ci_low`` / ``_ci_high`` beside every overall Recall and NDCG figure, and what
    the promotion gate reads: ``gate_vs_baseline_{diff,low,high}`` (the served ranking minus
    the best baseline on the gate metric, paired over the same test users) and, when there is
    a champion, ``gate_vs_champion_{diff,low,high}``; ``gate_confidence`` their level. Empty
    without bootstrap resamples.
    """
    if not result.bootstrap:
        return {}
    out: dict[str, float] = {}
    for method, by_setting in result.intervals.items():
        for setting, by_metric in by_setting.items():
            for metric, (low, high) in by_metric.items():
                name = metric_name(method, setting, "all", metric)
                out[f"{name}_ci_low"], out[f"{name}_ci_high"] = low, high
    if gate_metric not in result.per_user[MODEL]["all"]:
        return out
    best = max(baselines, key=lambda b: result.value(b, "all", gate_metric))
    pairs = {"baseline": best, "champion": champion}
    for key, other in pairs.items():
        if other is not None:
            paired = result.paired(MODEL, other, gate_metric)
            out.update({f"gate_vs_{key}_diff": paired.diff, f"gate_vs_{key}_low": paired.low,
                        f"gate_vs_{key}_high": paired.high})
    out["gate_confidence"] = result.confidence
    return out


def evaluate_interval(settings: Settings, mlflow_run_id: str, day: str | dt.date,
                      holdout: HoldoutConfig = HoldoutConfig()) -> dict[str, Any]:
    """Measure the run's ranking, its two-tower model, the champion and every baseline on
    the test window with the evaluation protocol (both settings).

    Logs to the training run: every figure (``metric_name``), ``best_baseline_*`` (per
    metric, the best baseline's value) and ``champion_version`` (0: none); the protocol's
    markdown and JSON tables (``evaluation/``) and Recall@K plots for K = 1..100 (``plots/``). A run
    already evaluated against the current champion (a rerun) returns its logged metrics
    unchanged; one evaluated against another champion (or none) is evaluated again, so the
    gate compares with the champion it would replace.

    Returns:
        {"mlflow_run_id", "metrics": {...}} for XCom.
    """
    import mlflow

    from training.data import SETTING_TITLES, SETTINGS, temporal_split
    from training.evaluation.models import ServedRecommender, TwoTowerRanker
    from training.evaluation.protocol import evaluate_split
    from training.evaluation.report import recall_at_k_plot, tuned_params
    from training.evaluation.tuning import tuned_baselines, tuning_tags

    day = parse_day(day)
    client = mlflow_client(settings)
    champion = alias_version(client, settings.model_name, CHAMPION)
    if champion is not None and champion.run_id == mlflow_run_id:
        champion = None  # the run is the champion: nothing to compare with
    logged = client.get_run(mlflow_run_id).data.metrics
    against = 0.0 if champion is None else float(champion.version)  # 0: no champion
    if "recall_at_50" in logged and logged.get("champion_version") == against:
        return {"mlflow_run_id": mlflow_run_id,
                "metrics": {k: v for k, v in logged.items() if not k.startswith("epoch_")}}
    data = load_interval(settings, day, holdout)
    split = temporal_split(data.events, data.products, data.test_cut, data.test_days)
    if not split.truth["all"]:
        raise NotEnoughHistory(f"no test users after {data.test_cut:%Y-%m-%d}")
    cache = settings.cache_dir / "text"
    scorer = load_scorer(settings, mlflow_run_id)
    methods: list[Any] = [
        ServedRecommender(scorer=scorer, cache_dir=cache, users=data.users, name=MODEL),
        TwoTowerRanker(scorer.model, scorer.model_config, cache, users=data.users,
                       name=TWO_TOWER),
    ]
    if champion is not None:
        methods.append(ServedRecommender(scorer=load_scorer(settings, champion.run_id),
                                         cache_dir=cache, users=data.users, name="champion"))
    # the bar: each baseline tuned on the validation window just before the test cut
    methods += tuned_baselines(scorer.model_config, cache, validation_days=data.test_days)
    policy = PromotionPolicy.from_env()
    result = evaluate_split(split, methods, holdout.ks, test_days=data.test_days,
                            curve_k=CURVE_MAX_K, max_users=settings.eval_max_users,
                            bootstrap=settings.eval_bootstrap,
                            confidence=policy.confidence or 0.95)

    metrics = interval_metrics(result, against, policy.metric)

    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=mlflow_run_id):
        mlflow.log_metrics(metrics)
        folder = Path(tmp)
        (folder / "metrics.md").write_text(
            f"# Evaluation of {day}\n\n`model` is the served ranking; `two_tower` the "
            "two-tower model alone; `champion` the current champion's ranking, refitted at "
            "the same cut.\n\n" + result.to_markdown())
        result.to_json(folder / "metrics.json")
        (folder / "tuning.json").write_text(json.dumps(tuned_params(result.params), indent=1,
                                                       default=str))
        for name in ("metrics.md", "metrics.json", "tuning.json"):
            mlflow.log_artifact(str(folder / name), artifact_path="evaluation")
        mlflow.set_tags(tuning_tags(result.params))
        for setting in SETTINGS:
            curves = {m: np.asarray(c[setting]) for m, c in result.curves.items()}
            title = (f"{SETTING_TITLES[setting]}: test {data.test_cut:%Y-%m-%d} .. {day} "
                     f"({result.n_users[setting]} users)")
            name = "recall_at_k.png" if setting == "all" else "recall_at_k_new.png"
            mlflow.log_artifact(str(recall_at_k_plot(curves, folder / name, title=title)),
                                artifact_path="plots")
    log.info("evaluated %s on %s test users: %s", mlflow_run_id, result.n_users,
             {m: round(result.value(m, "all", "recall_at_50"), 4) for m in result.methods})
    return {"mlflow_run_id": mlflow_run_id, "metrics": metrics}
