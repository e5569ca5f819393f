"""What reviewers look at in MLflow: a comparison table and a Recall@K plot per run."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

# Columns of the comparison table, in reading order.
TABLE_METRICS = ("recall_at_10", "recall_at_50", "ndcg_at_10", "ndcg_at_50",
                 "hit_rate_at_10", "hit_rate_at_50", "coverage_at_50")


def metrics_markdown(table: Mapping[str, Mapping[str, float]], *, title: str,
                     note: str = "") -> str:
    """A markdown table: one row per method, the best value of each column in bold.

    Args:
        table: method -> metric -> value.
        title: heading line.
        note: a paragraph under the table (e.g. the holdout's size).
    """
    methods = list(table)
    best = {m: max((table[name].get(m, float("-inf")) for name in methods), default=0.0)
            for m in TABLE_METRICS}
    lines = [f"### {title}", "", "| method | " + " | ".join(TABLE_METRICS) + " |",
             "| --- |" + " ---: |" * len(TABLE_METRICS)]
    for name in methods:
        cells = []
        for m in TABLE_METRICS:
            value = table[name].get(m)
            if value is None:
                cells.append("")
            else:
                text = f"{value:.4f}"
                cells.append(f"**{text}**" if value == best[m] else text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


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


def write_table_json(table: Mapping[str, Mapping[str, float]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=2, sort_keys=True))
    return path
