"""Recommendation quality on UCI Online Retail: the evaluation protocol, every method.

Imports the Online Retail file into a temporary landing root, runs
``training.evaluation.protocol.run_protocol`` (test = the last 30 days; settings (a) all products and
(b) new products only) over every baseline, the two-tower model alone, the sequence encoder
alone, the blends and the served ranking (``training.ranking``: what the daily pipeline trains and the API serves), and
prints one table beside the figures measured in the issue, then whether the served ranking
(and, for reference, the blends) reach the target: +10% Recall@50 over the best baseline in
both settings, NDCG@10 not worse. The baselines are tuned per setting on the validation window
(``training.evaluation.tuning``; their choices are printed); ``--untuned`` measures them with
their defaults instead.

    .venv/bin/python benchmarks/quality.py                    # minilm encoder, 2 epochs
    .venv/bin/python benchmarks/quality.py --no-two-tower     # baselines and blends only
    .venv/bin/python benchmarks/quality.py --out quality.json  # also quality.json / .md
    .venv/bin/python benchmarks/quality.py --ablation          # + the served ranking without
                                                               #   its parts (validation/test)

Skips (exit 0, with a message) when the data file is absent.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_DATA = REPO.parent / "shared" / "data" / "online-retail" / "online_retail.parquet"
BASELINES = ("popularity", "repeat", "item_knn", "als", "text_cosine")
# Measured in the issue with this protocol (1,379 test users in (a), 1,277 in (b)).
ISSUE = {
    "all": {"repeat": {"recall_at_10": 0.179, "recall_at_50": 0.377, "ndcg_at_10": 0.353},
            "als": {"recall_at_50": 0.329}, "item_knn": {"recall_at_50": 0.228},
            "popularity": {"recall_at_50": 0.166}, "text_cosine": {"recall_at_50": 0.133}},
    "new": {"als": {"recall_at_10": 0.060, "recall_at_50": 0.164, "ndcg_at_10": 0.094},
            "popularity": {"recall_at_50": 0.144}, "item_knn": {"recall_at_50": 0.134},
            "text_cosine": {"recall_at_50": 0.069}},
}
ISSUE_USERS = {"all": 1379, "new": 1277}
TARGET_GAIN = 1.10
COLUMNS = ("recall_at_10", "recall_at_50", "ndcg_at_10", "ndcg_at_50", "hit_rate_at_10",
           "hit_rate_at_50", "coverage_at_10", "coverage_at_50")
ISSUE_COLUMNS = ("recall_at_10", "recall_at_50", "ndcg_at_10")


def _header(metric: str) -> str:
    name, k = metric.rsplit("_at_", 1)
    return {"recall": "R", "ndcg": "NDCG", "hit_rate": "HR", "coverage": "Cov"}[name] + f"@{k}"


def quality_table(result) -> str:
    """One markdown table: setting × method rows, ours then the issue's figures."""
    from training.data import SETTING_TITLES, SETTINGS

    head = ["setting", "method", *map(_header, COLUMNS),
            *(f"issue {_header(m)}" for m in ISSUE_COLUMNS), "s"]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|"]
    for setting in SETTINGS:
        for method in result.methods:
            ours = result.metrics[method][setting]["all"]
            issue = ISSUE[setting].get(method, {})
            cells = [SETTING_TITLES[setting], method, *(f"{ours[m]:.3f}" for m in COLUMNS),
                     *(f"{issue[m]:.3f}" if m in issue else "" for m in ISSUE_COLUMNS),
                     f"{result.seconds[method]:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_report(result, model: str = "blend") -> list[str]:
    """Whether ``model`` beats the best baseline by 10% in R@50 and matches its NDCG@10."""
    from training.data import SETTING_TITLES, SETTINGS

    lines = []
    for setting in SETTINGS:
        def value(method: str, metric: str, setting: str = setting) -> float:
            return result.value(method, setting, metric)

        best = max(BASELINES, key=lambda m: value(m, "recall_at_50"))
        best_ndcg = max(BASELINES, key=lambda m: value(m, "ndcg_at_10"))
        need = TARGET_GAIN * value(best, "recall_at_50")
        got, ndcg = value(model, "recall_at_50"), value(model, "ndcg_at_10")
        lines.append(
            f"{SETTING_TITLES[setting]}: {model} R@50 {got:.3f} vs best baseline {best} "
            f"{value(best, 'recall_at_50'):.3f} ({got / value(best, 'recall_at_50') - 1:+.1%}; "
            f"target >= {need:.3f}: {'met' if got >= need else 'NOT met'}); NDCG@10 {ndcg:.3f} "
            f"vs best baseline {best_ndcg} {value(best_ndcg, 'ndcg_at_10'):.3f} "
            f"({'not worse' if ndcg >= value(best_ndcg, 'ndcg_at_10') else 'WORSE'})")
    return lines


def ablations(config, cache, users, *, two_tower: bool) -> list:
    """The served ranking without each of its parts (same validation window, same code)."""
    from dataclasses import replace

    from training.evaluation.models import ServedRecommender
    from training.ranking.config import ScorerConfig

    base = ScorerConfig()
    tower = config if two_tower else None
    out = [ServedRecommender(replace(base, context=False), tower, cache, users=users,
                             name="served_without_context_features"),
           ServedRecommender(replace(base, stage="mlp"), tower, cache, users=users,
                             name="served_pair_scorer_only"),
           ServedRecommender(replace(base, sequence=False), tower, cache, users=users,
                             name="served_without_sequence")]
    if two_tower:
        out.append(ServedRecommender(base, None, cache, users=users,
                                     name="served_without_two_tower"))
    return out


def ablation_table(result) -> list[str]:
    """Validation (the stage's held-out users, else in-sample) and test figures of the served
    ranking and its ablations."""
    names = [m for m in result.methods if m.startswith("served")]
    lines = ["", "Ablation (validation: the ranking stage's own figures on validation users; "
             "test: the protocol's):", "",
             "| method | stages | val (a) R@50 | val (b) R@50 | test (a) R@50 | test (a) NDCG@10 "
             "| test (b) R@50 | test (b) NDCG@10 |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        params = result.params.get(name, {})
        stages = params.get("scorer.stages", {})
        choice = params.get("scorer.stage_choice", {})
        valid = params.get("scorer.validation", {})

        def val(setting, stages=stages, choice=choice, valid=valid):
            held = choice.get(setting, {}).get(stages.get(setting, "mlp"), {})
            figure = held.get("recall_at_50", valid.get(setting, {}).get("recall_at_50"))
            return "–" if figure is None else f"{figure:.3f}" + ("" if held else "*")

        cells = [name, "/".join(stages.get(s, "mlp") for s in ("all", "new")), val("all"),
                 val("new")]
        for setting in ("all", "new"):
            cells += [f"{result.value(name, setting, m):.3f}"
                      for m in ("recall_at_50", "ndcg_at_10")]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, "", "* in-sample (the stage was not chosen on held-out users)"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="online_retail.parquet")
    parser.add_argument("--epochs", type=int, default=2, help="two-tower epochs")
    parser.add_argument("--encoder", default="minilm", help="text encoder: minilm, tiny, path")
    parser.add_argument("--cache", type=Path, default=None,
                        help="text-embedding cache (default: $SHOPREC_HOME/cache/text)")
    parser.add_argument("--no-two-tower", action="store_true", help="skip the two-tower model")
    parser.add_argument("--no-blends", action="store_true",
                        help="skip the two blends (reference methods; most of the memory)")
    parser.add_argument("--no-sequence", action="store_true",
                        help="skip the sequence encoder alone (it is still in the served "
                             "ranking)")
    parser.add_argument("--ablation", action="store_true",
                        help="also the served ranking without the richer features, with the "
                             "pair scorer as its only stage, without the sequence encoder and "
                             "without the two-tower")
    parser.add_argument("--untuned", action="store_true",
                        help="baselines with their default parameters (no validation grid)")
    parser.add_argument("--out", type=Path, default=None, help="also write FILE.json, FILE.md")
    parser.add_argument("--max-users", type=int, default=20_000,
                        help="test-user budget: a seeded uniform sample (0: every test user)")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="bootstrap resamples for the 95%% intervals (0: none)")
    args = parser.parse_args(argv)

    if not args.data.is_file():
        print(f"SKIPPED: the Online Retail file is not at {args.data} "
              f"(pass --data PATH to online_retail.parquet)")
        return 0

    from core.settings import Settings
    from features.contract import list_days, read_upto
    from features.importers.online_retail import import_online_retail
    from training.config import TrainConfig
    from training.evaluation.blends import standard_recommenders
    from training.evaluation.protocol import run_protocol

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    cache = args.cache or Settings.from_env().cache_dir / "text"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        report = import_online_retail(str(args.data), root, progress=True)
        events = read_upto(root, "events", list_days(root, "events")[-1])
        catalog = read_upto(root, "products", list_days(root, "products")[-1])
        user_days = list_days(root, "users")
        users = read_upto(root, "users", user_days[-1]) if user_days else None
    print(report)
    config = TrainConfig(text_encoder=args.encoder, epochs=args.epochs, device="cpu")
    methods = standard_recommenders(config, cache_dir=cache, progress=True,
                                    two_tower=not args.no_two_tower, users=users,
                                    tuned=not args.untuned, blends=not args.no_blends)
    if not args.no_sequence:  # the sequence encoder alone, before the served ranking
        from training.evaluation.models import SequenceRanker

        methods.insert(-1, SequenceRanker(text=config, cache_dir=cache))
    if args.ablation:
        methods += ablations(config, cache, users, two_tower=not args.no_two_tower)
    result = run_protocol(events, catalog, methods, progress=True,
                          max_users=args.max_users or None, bootstrap=args.bootstrap)
    seconds = time.perf_counter() - started

    print()
    print(f"Online Retail, cut {result.cut} (test: the last {result.test_days} days); "
          f"{result.n_train_events:,} training events, {result.n_products:,} candidates; "
          f"test users (a) {result.n_users['all']:,} (issue {ISSUE_USERS['all']:,}), "
          f"(b) {result.n_users['new']:,} (issue {ISSUE_USERS['new']:,})")
    print()
    print(quality_table(result))
    print()
    if result.intervals:
        for setting in ("all", "new"):
            print(f"setting ({'a' if setting == 'all' else 'b'}):", *result.interval_lines(setting),
                  sep="\n")
    print(*result.tuning_lines(), sep="\n")
    for model in ("served", "blend", "blend_weights"):
        if model in result.methods:
            print(*target_report(result, model), sep="\n")
    for alone in ("two_tower", "sequence"):
        if alone in result.methods:
            print(*target_report(result, alone), sep="\n")
    if args.ablation:
        print(*ablation_table(result), sep="\n")
    if "blend_weights" in result.params:
        print(f"blend_weights weights: {result.params['blend_weights']['weights']}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result.to_json(args.out.with_suffix(".json"))
        args.out.with_suffix(".md").write_text(result.to_markdown(reference=ISSUE))
    print(f"quality benchmark: {len(result.methods)} methods in {seconds:.0f}s "
          f"(text encoder {args.encoder}, two-tower epochs {args.epochs})"
          + (f"; wrote {args.out.with_suffix('.json')}" if args.out else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
