"""The protocol's result table (``ProtocolResult``: markdown, JSON) and the plots logged to
MLflow.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.data import SEGMENTS, SETTING_TITLES, SETTINGS
from training.evaluation.uncertainty import PairedDifference, paired_difference

COLUMNS = ("recall", "ndcg", "hit_rate", "coverage", "gini")
SHORT = {"recall": "R", "ndcg": "NDCG", "hit_rate": "HR", "coverage": "Cov", "gini": "Gini"}


@dataclass
class ProtocolResult:
    """Method × setting × segment × metric, with the split's facts.

    Attributes:
        cut: the test cut (ISO, UTC).
        end: end of the test window (ISO, UTC, inclusive).
        test_days: window length.
        ks: cut-offs.
        n_products: candidates (the catalogue as of the cut).
        n_train_events: events before the cut.
        n_users: setting -> test users.
        metrics: method -> setting -> segment ("all", "cold_users", "new_products") ->
            metric (``recall_at_10``, ..., ``n_users``) -> value.
        seconds: method -> wall time to fit and recommend.
        peak_rss_mb: method -> the process's peak resident memory (MB) once it was done.
        min_users: fewer test users than this in a setting make the figures noise: the
            report warns (``warning_lines``) and the promotion gate refuses
            (``SHOPREC_MIN_TEST_USERS``).
        params: method -> what it chose (e.g. blend weights); JSON-able.
        curves: method -> setting -> Recall@K for K = 1.. (when asked for).
        sampled_from: setting -> test users before sampling to the evaluation's budget
            (empty when every test user was measured).
        confidence: the level of ``intervals``.
        bootstrap: resamples behind ``intervals`` (0: none computed).
        intervals: method -> setting -> metric (Recall and NDCG at each K, overall) ->
            [low, high], the percentile bootstrap over test users.
        per_user: method -> setting -> metric -> (U,) values, the same users in the same
            order for every method (what paired comparisons resample); not serialized.
    """

    cut: str
    end: str
    test_days: int
    ks: tuple[int, ...]
    n_products: int
    n_train_events: int
    n_users: dict[str, int]
    metrics: dict[str, dict[str, dict[str, dict[str, float]]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    min_users: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    sampled_from: dict[str, int] = field(default_factory=dict)
    confidence: float = 0.95
    bootstrap: int = 0
    intervals: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    per_user: dict[str, dict[str, dict[str, np.ndarray]]] = field(
        default_factory=dict, repr=False, compare=False)

    def paired(self, method: str, other: str, metric: str,
               setting: str = "all") -> PairedDifference:
        """``method`` minus ``other`` on ``metric``, paired over the same test users, with
        the bootstrap interval at this result's confidence."""
        return paired_difference(self.per_user[method][setting][metric],
                                 self.per_user[other][setting][metric],
                                 self.confidence, self.bootstrap)

    @property
    def methods(self) -> list[str]:
        return list(self.metrics)

    def value(self, method: str, setting: str, metric: str, segment: str = "all") -> float:
        """One figure, e.g. ``value("als", "new", "recall_at_50")``."""
        return self.metrics[method][setting][segment][metric]

    def table(self, setting: str, segment: str = "all") -> pd.DataFrame:
        """Methods (rows) × metrics (columns) of a setting and segment."""
        return pd.DataFrame({m: self.metrics[m][setting][segment] for m in self.metrics}).T

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)
               if f.name != "per_user"}
        out["ks"] = list(self.ks)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProtocolResult:
        return cls(**{**data, "ks": tuple(data["ks"])})

    def warning_lines(self) -> list[str]:
        """One line per setting with fewer test users than ``min_users``."""
        return [f"WARNING: only {n:,} test users in {SETTING_TITLES[s]} (fewer than "
                f"{self.min_users:,}): these figures are noise, and the promotion gate "
                f"refuses a version evaluated on them" for s, n in self.n_users.items()
                if n < self.min_users]

    def summary_lines(self) -> list[str]:
        """Per method (each one a stage: fit, then recommend in both settings): wall time
        and the process's peak resident memory once it was done."""
        lines = ["| stage | s | peak RSS MB |", "|---|---:|---:|"]
        for name in self.methods:
            peak = self.peak_rss_mb.get(name)
            lines.append(f"| {name} | {self.seconds.get(name, float('nan')):.1f} | "
                         + (f"{peak:,.0f}" if peak is not None else "–") + " |")
        total = sum(self.seconds.values())
        peak = max(self.peak_rss_mb.values(), default=None)
        return [*lines, f"| total | {total:.1f} | "
                + (f"{peak:,.0f}" if peak is not None else "–") + " |"]

    def to_json(self, path: str | Path | None = None) -> str:
        """The result as JSON text, also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def to_markdown(self, reference: Mapping[str, Mapping[str, Mapping[str, float]]]
                    | None = None) -> str:
        """Markdown tables: per setting, all metrics; then the segments' R/NDCG/HR.

        Args:
            reference: optional figures to show beside ours, as
                ``{setting: {method: {metric: value}}}`` (e.g. an issue's measurements).

        Returns:
            The markdown text.
        """
        lines = [
            f"Temporal split at {self.cut} (test window {self.test_days} days, to "
            f"{self.end}); {self.n_train_events:,} training events, {self.n_products:,} "
            f"candidate products; test users: "
            + ", ".join(f"{SETTING_TITLES[s]} {n:,}" for s, n in self.n_users.items())
            + (f" (a uniform sample of {self.sampled_from.get('all', 0):,} test users)"
               if self.sampled_from else ""),
            "",
        ]
        if self.warning_lines():
            lines += [*self.warning_lines(), ""]
        overall = [f"{c}_at_{k}" for c in COLUMNS for k in self.ks]
        seg_cols = [f"{c}_at_{k}" for c in ("recall", "ndcg", "hit_rate") for k in self.ks]
        for setting in SETTINGS:
            lines += [f"### {SETTING_TITLES[setting]}", ""]
            rows = [(m, self.metrics[m][setting]["all"], self.seconds.get(m)) for m in self.methods]
            lines += _markdown_table(overall, rows, with_seconds=True)
            ref = (reference or {}).get(setting)
            if ref:
                lines += ["", "Reference figures:", ""]
                lines += _markdown_table(overall, [(m, v, None) for m, v in ref.items()])
            lines.append("")
            if self.intervals:
                lines += self.interval_lines(setting)
            for segment in SEGMENTS:
                n = {m: int(self.metrics[m][setting][segment]["n_users"]) for m in self.methods}
                count = next(iter(n.values()), 0)
                lines += [f"#### {SETTING_TITLES[setting]}, segment {segment} "
                          f"({count:,} users)", ""]
                rows = [(m, self.metrics[m][setting][segment], None) for m in self.methods]
                lines += _markdown_table(seg_cols, rows)
                lines.append("")
        lines += self.tuning_lines()
        return "\n".join(lines).rstrip() + "\n"

    def tuning_lines(self) -> list[str]:
        """The tuned baselines (``training.evaluation.tuning.Tuned``): per setting, the
        parameters chosen on validation and their validation figure; empty when none."""
        tuned = tuned_params(self.params)
        if not tuned:
            return []
        lines = ["### Tuned baselines", "",
                 "Each baseline's parameters, chosen per setting on the validation window "
                 "(objective: " + next(iter(tuned.values()))["objective"] + ").", "",
                 "| method | setting | chosen | validation | points | tuning s |",
                 "|---|---|---|---:|---:|---:|"]
        for method, p in tuned.items():
            for setting, chosen in p["chosen"].items():
                trial = next((t for t in p["trials"] if t["params"] == chosen), None)
                value = f"{trial[setting]:.3f}" if trial else "–"
                shown = ", ".join(f"{k}={v}" for k, v in chosen.items())
                lines.append(f"| {method} | {SETTING_TITLES[setting]} | {shown} | {value} | "
                             f"{len(p['trials'])} | {p['tuning_seconds']:.0f} |")
        return [*lines, ""]


    def interval_lines(self, setting: str) -> list[str]:
        """The setting's Recall and NDCG with their bootstrap intervals."""
        cols = [f"{c}_at_{k}" for c in ("recall", "ndcg") for k in self.ks]
        lines = [f"{self.confidence:.0%} bootstrap intervals over test users "
                 f"({self.bootstrap:,} resamples):", "",
                 "| method | " + " | ".join(_header(c) for c in cols) + " |",
                 "|---|" + "---:|" * len(cols)]
        for method in self.methods:
            bounds = self.intervals.get(method, {}).get(setting, {})
            cells = [f"{self.metrics[method][setting]['all'][c]:.3f} "
                     f"[{bounds[c][0]:.3f}, {bounds[c][1]:.3f}]" if c in bounds else "–"
                     for c in cols]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        return [*lines, ""]


def tuned_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The tuned baselines' ``params()`` among a result's methods (grids, trials, choices)."""
    return {m: p for m, p in params.items() if isinstance(p, Mapping) and p.get("tuned")}


def _header(metric: str) -> str:
    name, k = metric.rsplit("_at_", 1)
    return f"{SHORT[name]}@{k}"


def _markdown_table(
    metrics: Sequence[str],
    rows: Sequence[tuple[str, Mapping[str, float], float | None]],
    *,
    with_seconds: bool = False,
) -> list[str]:
    head = ["method", *(_header(m) for m in metrics)] + (["s"] if with_seconds else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for name, values, seconds in rows:
        empty = values.get("n_users") == 0  # a segment without users: nothing measured
        cells = [name] + [
            "n/a" if empty else
            f"{values[m]:.3f}" if m in values and not math.isnan(values[m]) else "–"
            for m in metrics
        ]
        if with_seconds:
            cells.append(f"{seconds:.0f}" if seconds is not None else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# Columns of the comparison table, in reading order.
TABLE_METRICS = ("recall_at_10", "recall_at_50", "ndcg_at_10", "ndcg_at_50",
                 "hit_rate_at_10", "hit_rate_at_50", "coverage_at_50")


def recall_at_k_plot(curves: Mapping[str, np.ndarray], path: Path, *, title: str) -> Path:
    """Recall@K for K = 1..len(curve), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ks = np.arange(1, len(curve) + 1)
        ax.plot(ks, curve, label=name, linewidth=2.2 if name == "model" else 1.4)
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_title(title)
    ax.set_xlim(1, max((len(c) for c in curves.values()), default=1))
    ax.set_ylim(0, None)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
