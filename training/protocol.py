"""The offline evaluation protocol: one temporal split, two settings, every method alike.

The DAG, ``shoprec model evaluate`` and ``benchmarks/quality.py`` all measure through
``run_protocol``, so their figures compare like with like.

Split. ``cut`` defaults to the last event minus ``test_days``; the test window is
``[cut, cut + test_days]`` (closed, so with the
default cut the last event is in it). Test users had at least one event (any type) before the cut and
at least one purchase in the window; a user's truth is the distinct products purchased in
it. Methods are fitted on ``TrainData``, which holds only what was known before the cut:
the events before it, the catalogue as of it (the candidates) and the users seen so far.

Settings.

- ``all`` (a): every catalogue product is a candidate; repeat purchases count.
- ``new`` (b): the user's pre-cut purchases are removed from both the candidates (passed to
  ``recommend`` as ``exclude``) and the truth; users whose truth becomes empty are dropped.

Metrics at each K (default 10 and 50): Recall, binary NDCG, HitRate (``training.evaluate``),
catalogue coverage and the Gini coefficient of exposure (how often each candidate product is
recommended; 0 = even, ~1 = everything goes to one product). Segments: ``cold_users`` (at most
``COLD_USER_EVENTS`` events before the cut) and ``new_products`` (truth restricted to products
first seen in the ``NEW_PRODUCT_DAYS`` before the cut; users left without truth dropped).

Hyper-parameters and blend weights are chosen on ``validation_split(train)``: the same rules,
cut ``VALIDATION_DAYS`` before the test cut and built from ``TrainData`` alone, so the test
period cannot leak into tuning.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol, Self, runtime_checkable

import numpy as np
import pandas as pd
from scipy import sparse
from tqdm.auto import tqdm

from training.evaluate import coverage_at_k, hit_rate_at_k, ndcg_at_k, recall_at_k

log = logging.getLogger(__name__)

DEFAULT_KS = (10, 50)
TEST_DAYS = 30
VALIDATION_DAYS = 30
COLD_USER_EVENTS = 3
NEW_PRODUCT_DAYS = 30
SETTINGS = ("all", "new")
SETTING_TITLES = {"all": "(a) all products", "new": "(b) new products only"}
SEGMENTS = ("cold_users", "new_products")
# Events that say "this user wants this product", for interaction matrices.
INTERACTION_EVENTS = ("purchase", "add_to_cart")


# ---------------------------------------------------------------------------------------
# What a method sees
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TrainData:
    """Everything known before a cut; what a ``Recommender`` is fitted on.

    Attributes:
        events: contract event rows with ``ts < cut``, in (ts, event_id) order.
        catalog: the catalogue as of the cut, one row per product, by product_id. These are
            the candidates; score columns follow ``product_ids``.
        users: ids of users with an event before the cut, sorted.
        cut: the cut (UTC).
        memo: things derived from this data that several methods share (e.g. the
            validation split and sources fitted on it, so two blends tune on one fit).
    """

    events: pd.DataFrame
    catalog: pd.DataFrame
    users: list[str]
    cut: pd.Timestamp
    memo: dict[str, Any] = field(default_factory=dict, repr=False)

    @cached_property
    def product_ids(self) -> list[str]:
        """Candidate product ids, aligned with the columns of every score matrix."""
        return self.catalog["product_id"].astype(str).tolist()

    @cached_property
    def item_index(self) -> dict[str, int]:
        """product id -> column."""
        return {p: i for i, p in enumerate(self.product_ids)}

    @cached_property
    def user_index(self) -> dict[str, int]:
        """user id -> row of ``interactions``."""
        return {u: i for i, u in enumerate(self.users)}

    @cached_property
    def purchases(self) -> pd.DataFrame:
        """Purchase events of catalogue products (in time order)."""
        ev = self.events
        keep = (ev["event_type"] == "purchase") & ev["product_id"].isin(self.item_index)
        return ev[keep]

    def interactions(
        self,
        *,
        event_types: Sequence[str] = INTERACTION_EVENTS,
        weight: str = "count",
        since: pd.Timestamp | None = None,
        half_life_days: float | None = None,
    ) -> sparse.csr_matrix:
        """The user × product matrix of interactions before the cut.

        Args:
            event_types: event types that count.
            weight: "count" (events), "quantity" (units) or "binary".
            since: only events at or after this time.
            half_life_days: weight each event by 0.5 ** (age at the cut / half life).

        Returns:
            (U, N) float32 CSR, rows ``users``, columns ``product_ids``.
        """
        ev = self.events
        keep = ev["event_type"].isin(list(event_types)) & ev["product_id"].isin(self.item_index)
        if since is not None:
            keep &= ev["ts"] >= since
        ev = ev[keep]
        rows = ev["user_id"].map(self.user_index).to_numpy(dtype=np.int64)  # (E,)
        cols = ev["product_id"].map(self.item_index).to_numpy(dtype=np.int64)  # (E,)
        if weight == "quantity":
            values = ev["quantity"].clip(lower=1).to_numpy(dtype=np.float64)  # (E,)
        elif weight in ("count", "binary"):
            values = np.ones(len(ev), dtype=np.float64)  # (E,)
        else:
            raise ValueError(f"weight {weight!r} not in count/quantity/binary")
        if half_life_days is not None:
            age = (self.cut - ev["ts"]).dt.total_seconds().to_numpy() / 86_400.0  # (E,)
            values = values * np.power(0.5, age / half_life_days)
        shape = (len(self.users), len(self.product_ids))
        matrix = sparse.csr_matrix((values, (rows, cols)), shape=shape)  # duplicates summed
        if weight == "binary":
            matrix.data[:] = 1.0
        return matrix.astype(np.float32)

    def histories(
        self, user_ids: Sequence[str], event_types: Sequence[str] | None = None
    ) -> tuple[list[list[str]], list[list[str]]]:
        """Each user's catalogue products before the cut, most recent LAST, with event types.

        Args:
            user_ids: users (unknown users get empty lists).
            event_types: event types to keep (None: every event with a product).

        Returns:
            (products, event types) per user.
        """
        ev = self.events
        keep = ev["product_id"].isin(self.item_index)
        if event_types is not None:
            keep &= ev["event_type"].isin(list(event_types))
        ev = ev[keep]
        groups = ev.groupby("user_id", sort=False)
        products = groups["product_id"].agg(list).to_dict()
        types = groups["event_type"].agg(list).to_dict()
        return ([products.get(u, []) for u in user_ids], [types.get(u, []) for u in user_ids])


# ---------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------


@runtime_checkable
class Recommender(Protocol):
    """A recommendation method the protocol can fit and ask.

    ``scores`` is optional: methods that have it (``ScoredRecommender``) can be blended.
    """

    name: str

    def fit(self, data: TrainData) -> Recommender:
        """Learn from what was known before the cut; returns self."""
        ...

    def recommend(
        self, user_ids: Sequence[str], k: int, *, exclude: Mapping[str, set[str]] | None = None
    ) -> list[list[str]]:
        """Per user, up to ``k`` product ids best first, none of ``exclude[user]``."""
        ...


class ScoredRecommender:
    """Base of methods that score every candidate: ``recommend`` is top-k of ``scores``.

    Subclasses set ``name`` and implement ``_fit`` and ``scores``. Ties are broken by the
    candidate's column (product id order), so rankings are deterministic.
    """

    name: str = "scored"
    data: TrainData | None = None

    def fit(self, data: TrainData) -> Self:
        """Fit on ``data``; returns self."""
        self.data = data
        self._fit(data)
        return self

    def _fit(self, data: TrainData) -> None:
        raise NotImplementedError

    def scores(self, user_ids: Sequence[str]) -> np.ndarray:
        """(U, N) float32 scores, columns ``data.product_ids``; higher is better."""
        raise NotImplementedError

    @property
    def fitted(self) -> TrainData:
        if self.data is None:
            raise RuntimeError(f"{self.name}: fit() first")
        return self.data

    def recommend(
        self,
        user_ids: Sequence[str],
        k: int,
        *,
        exclude: Mapping[str, set[str]] | None = None,
        batch_size: int = 2048,
    ) -> list[list[str]]:
        """Top ``k`` of ``scores`` per user, excluded products removed.

        Args:
            user_ids: users to recommend for.
            k: list length.
            exclude: user -> products never to recommend to them.
            batch_size: users scored at once.

        Returns:
            Per user, up to ``k`` product ids, best first.
        """
        data = self.fitted
        ids = np.asarray(data.product_ids, dtype=object)
        out: list[list[str]] = []
        for start in range(0, len(user_ids), batch_size):
            batch = list(user_ids[start : start + batch_size])
            scores = np.asarray(self.scores(batch), dtype=np.float64)  # (b, N)
            mask_excluded(scores, batch, exclude, data.item_index)
            out.extend(ranked_ids(scores, ids, k))
        return out


def mask_excluded(
    scores: np.ndarray,
    user_ids: Sequence[str],
    exclude: Mapping[str, set[str]] | None,
    item_index: Mapping[str, int],
) -> None:
    """Set excluded products' scores to -inf, in place. ``scores`` is (U, N)."""
    if not exclude:
        return
    for row, user in enumerate(user_ids):
        cols = [item_index[p] for p in exclude.get(user, ()) if p in item_index]
        scores[row, cols] = -np.inf


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's ``k`` highest scores, best first (ties by column).

    Args:
        scores: (U, N).
        k: how many (capped at N).

    Returns:
        (U, min(k, N)) int64.
    """
    k = min(k, scores.shape[1])
    if k <= 0:
        return np.zeros((scores.shape[0], 0), dtype=np.int64)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (U, k) unordered
    part_scores = np.take_along_axis(scores, part, axis=1)  # (U, k)
    order = np.lexsort((part, -part_scores), axis=1)  # score desc, then column
    return np.take_along_axis(part, order, axis=1)  # (U, k)


def ranked_ids(scores: np.ndarray, ids: np.ndarray, k: int) -> list[list[str]]:
    """Top-k product ids per row of ``scores`` (U, N), dropping -inf (excluded) entries."""
    cols = top_k(scores, k)  # (U, k)
    finite = np.isfinite(np.take_along_axis(scores, cols, axis=1))  # (U, k)
    return [ids[c[f]].tolist() for c, f in zip(cols, finite, strict=True)]


# ---------------------------------------------------------------------------------------
# The split
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Split:
    """A temporal split and the truth of both settings.

    Attributes:
        train: what methods are fitted on.
        end: end of the test window (inclusive).
        truth: setting -> user -> products purchased in the window (setting "new": minus
            the user's pre-cut purchases; only users with a non-empty truth).
        exclude: user -> products the user purchased before the cut (test users only).
        past_events: user -> number of events before the cut (test users only).
        first_seen: product -> the first time it appeared (catalogue row or event).
    """

    train: TrainData
    end: pd.Timestamp
    truth: dict[str, dict[str, set[str]]]
    exclude: dict[str, set[str]]
    past_events: dict[str, int]
    first_seen: dict[str, pd.Timestamp]

    @property
    def cut(self) -> pd.Timestamp:
        return self.train.cut

    def users(self, setting: str) -> list[str]:
        """Test users of a setting, sorted."""
        return sorted(self.truth[setting])

    def exclusions(self, setting: str) -> dict[str, set[str]] | None:
        """What ``recommend`` must leave out in a setting (None for "all")."""
        return self.exclude if setting == "new" else None

    def segment_truth(self, setting: str, segment: str) -> dict[str, set[str]]:
        """The truth of a segment's users (restricted to new products for that segment)."""
        truth = self.truth[setting]
        if segment == "cold_users":
            return {u: t for u, t in truth.items() if self.past_events[u] <= COLD_USER_EVENTS}
        if segment == "new_products":
            since = self.cut - pd.Timedelta(days=NEW_PRODUCT_DAYS)
            new = {p for p, ts in self.first_seen.items() if since <= ts < self.cut}
            restricted = {u: t & new for u, t in truth.items()}
            return {u: t for u, t in restricted.items() if t}
        raise ValueError(f"unknown segment {segment!r}; expected one of {SEGMENTS}")


def _utc(value: Any) -> pd.Timestamp:
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def default_cut(events: pd.DataFrame, test_days: int = TEST_DAYS) -> pd.Timestamp:
    """The last event's time minus ``test_days`` days."""
    if events.empty:
        raise ValueError("no events to place a cut in")
    return _utc(events["ts"].max()) - pd.Timedelta(days=test_days)


def catalog_at(
    catalog: pd.DataFrame, cut: pd.Timestamp, events: pd.DataFrame | None = None
) -> pd.DataFrame:
    """The catalogue as it stood at ``cut``: one row per product, by product_id.

    Each product's latest row with ``updated_at < cut``. ``catalog`` may be the whole history
    of product rows or a snapshot; a product sold before the cut whose only row is later (a
    snapshot updated since) keeps its earliest row, since it evidently existed.

    Args:
        catalog: product rows (contract columns).
        cut: the cut.
        events: events before the cut, to keep products they prove existed.

    Returns:
        The candidate catalogue.
    """
    rows = catalog.sort_values(["product_id", "updated_at"], kind="stable")
    before = rows[rows["updated_at"] < cut].drop_duplicates("product_id", keep="last")
    if events is not None and len(events):
        sold = set(events["product_id"].dropna()) - set(before["product_id"])
        if sold:
            late = rows[rows["product_id"].isin(sold)].drop_duplicates("product_id", keep="first")
            before = pd.concat([before, late], ignore_index=True)
    return before.sort_values("product_id", kind="stable").reset_index(drop=True)


def train_data(events: pd.DataFrame, catalog: pd.DataFrame, cut: Any) -> TrainData:
    """What was known before ``cut``: its events (in (ts, event_id) order), the catalogue as
    of the cut (``catalog_at``) and its users.

    Args:
        events: contract events (any time range, any order).
        catalog: product rows (history or snapshot).
        cut: the cut (a date means its midnight UTC).
    """
    cut = _utc(cut)
    events = events.sort_values(["ts", "event_id"], kind="stable")
    before = events[events["ts"] < cut].reset_index(drop=True)
    users = sorted(before["user_id"].astype(str).unique())
    return TrainData(events=before, catalog=catalog_at(catalog, cut, before), users=users,
                     cut=cut)


def temporal_split(
    events: pd.DataFrame,
    catalog: pd.DataFrame,
    cut: Any = None,
    test_days: int = TEST_DAYS,
) -> Split:
    """Split events at ``cut`` into training data and the test truth of both settings.

    Args:
        events: contract events (any time range).
        catalog: product rows (history or snapshot; see ``catalog_at``).
        cut: the cut; None: ``default_cut(events, test_days)``. A date means its midnight UTC.
        test_days: length of the test window after the cut.

    Returns:
        The split.
    """
    cut = default_cut(events, test_days) if cut is None else _utc(cut)
    end = cut + pd.Timedelta(days=test_days)
    train = train_data(events, catalog, cut)
    before = train.events
    ts = events["ts"]
    window = events[(ts >= cut) & (ts <= end)]  # closed: the last event is in the window
    users = train.users

    known = set(users)
    bought = window[(window["event_type"] == "purchase") & window["product_id"].notna()]
    truth_all = {u: set(g) for u, g in bought.groupby("user_id")["product_id"] if u in known}
    past = before[before["user_id"].isin(truth_all)]
    past_buys = past[(past["event_type"] == "purchase") & past["product_id"].notna()]
    exclude = {u: set(g) for u, g in past_buys.groupby("user_id")["product_id"]}
    exclude = {u: exclude.get(u, set()) for u in truth_all}
    truth_new = {u: t - exclude[u] for u, t in truth_all.items()}
    truth_new = {u: t for u, t in truth_new.items() if t}
    past_events = past.groupby("user_id").size().to_dict()

    first_seen = catalog.groupby("product_id")["updated_at"].min().to_dict()
    for product, ts_first in before.groupby("product_id")["ts"].min().items():
        if product not in first_seen or ts_first < first_seen[product]:
            first_seen[product] = ts_first
    return Split(train=train, end=end, truth={"all": truth_all, "new": truth_new},
                 exclude=exclude, past_events={u: int(past_events[u]) for u in truth_all},
                 first_seen=first_seen)


def validation_split(train: TrainData, days: int = VALIDATION_DAYS) -> Split:
    """The split for tuning: the last ``days`` before the test cut, from ``train`` alone.

    Args:
        train: the test split's training data (nothing at or after its cut is in it).
        days: validation window; its cut is ``train.cut - days``.

    Returns:
        A split whose window ends at the test cut.
    """
    return temporal_split(train.events, train.catalog, train.cut - pd.Timedelta(days=days),
                          test_days=days)


# ---------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------


def gini(counts: Sequence[float] | np.ndarray) -> float:
    """Gini coefficient of non-negative counts: 0 when even, (n-1)/n when one takes all.

    Args:
        counts: (n,) e.g. how often each candidate product was recommended (zeros included).

    Returns:
        G = sum_i (2i - n - 1) x_(i) / (n sum x), x sorted ascending, i from 1; 0.0 when
        every count is zero.
    """
    x = np.sort(np.asarray(counts, dtype=np.float64))  # (n,)
    n, total = len(x), x.sum()
    if n == 0 or total <= 0:
        return 0.0
    i = np.arange(1, n + 1)  # (n,)
    return float(((2 * i - n - 1) * x).sum() / (n * total))


def exposure_gini_at_k(
    ranked: Sequence[Sequence[str]], product_ids: Sequence[str], ks: Iterable[int] = DEFAULT_KS
) -> dict[str, float]:
    """Gini of how often each candidate appears in users' top K (``gini_at_<k>``)."""
    index = {p: i for i, p in enumerate(product_ids)}
    out = {}
    for k in ks:
        counts = np.zeros(len(product_ids), dtype=np.float64)  # (N,)
        for r in ranked:
            for p in r[:k]:
                if p in index:
                    counts[index[p]] += 1
        out[f"gini_at_{k}"] = gini(counts)
    return out


def accuracy_metrics(
    ranked: Sequence[Sequence[str]], truth: Sequence[set[str]], ks: Iterable[int]
) -> dict[str, float]:
    """Recall, NDCG and HitRate at each K, and ``n_users``."""
    ks = tuple(ks)
    return {**recall_at_k(ranked, truth, ks), **ndcg_at_k(ranked, truth, ks),
            **hit_rate_at_k(ranked, truth, ks), "n_users": float(sum(1 for t in truth if t))}


def setting_metrics(
    split: Split, setting: str, ranked: Mapping[str, list[str]], ks: Iterable[int] = DEFAULT_KS
) -> dict[str, dict[str, float]]:
    """Every metric of one method in one setting, overall and per segment.

    Args:
        split: the split.
        setting: "all" or "new".
        ranked: user -> ranking (every test user of the setting).
        ks: cut-offs.

    Returns:
        segment ("all", then ``SEGMENTS``) -> metric -> value.
    """
    ks = tuple(ks)
    users = split.users(setting)
    lists = [ranked[u] for u in users]
    truth = [split.truth[setting][u] for u in users]
    product_ids = split.train.product_ids
    out = {"all": {**accuracy_metrics(lists, truth, ks),
                   **coverage_at_k(lists, len(product_ids), ks),
                   **exposure_gini_at_k(lists, product_ids, ks)}}
    for segment in SEGMENTS:
        seg = split.segment_truth(setting, segment)
        seg_users = sorted(seg)
        out[segment] = accuracy_metrics([ranked[u] for u in seg_users],
                                        [seg[u] for u in seg_users], ks)
    return out


# ---------------------------------------------------------------------------------------
# The result table
# ---------------------------------------------------------------------------------------

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
        params: method -> what it chose (e.g. blend weights); JSON-able.
        curves: method -> setting -> Recall@K for K = 1.. (when asked for).
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
    params: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)

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
        out = asdict(self)
        out["ks"] = list(self.ks)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProtocolResult:
        return cls(**{**data, "ks": tuple(data["ks"])})

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
            + ", ".join(f"{SETTING_TITLES[s]} {n:,}" for s, n in self.n_users.items()),
            "",
        ]
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
            for segment in SEGMENTS:
                n = {m: int(self.metrics[m][setting][segment]["n_users"]) for m in self.methods}
                count = next(iter(n.values()), 0)
                lines += [f"#### {SETTING_TITLES[setting]}, segment {segment} "
                          f"({count:,} users)", ""]
                rows = [(m, self.metrics[m][setting][segment], None) for m in self.methods]
                lines += _markdown_table(seg_cols, rows)
                lines.append("")
        return "\n".join(lines).rstrip() + "\n"


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
        cells = [name] + [
            f"{values[m]:.3f}" if m in values and not math.isnan(values[m]) else "–"
            for m in metrics
        ]
        if with_seconds:
            cells.append(f"{seconds:.0f}" if seconds is not None else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# ---------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------


def evaluate_recommender(
    recommender: Recommender, split: Split, ks: Iterable[int] = DEFAULT_KS,
    curves: dict[str, list[float]] | None = None, curve_k: int = 100,
) -> dict[str, dict[str, dict[str, float]]]:
    """Ask a fitted recommender for both settings' users and measure it.

    Args:
        recommender: a fitted method.
        split: the split it was fitted on.
        ks: cut-offs.
        curves: when given, filled with setting -> Recall@K for K = 1..``curve_k``.
        curve_k: the longest list asked for when ``curves`` is given.

    Returns:
        setting -> segment -> metric -> value.
    """
    from training.evaluate import recall_curve

    ks = tuple(ks)
    top = max(max(ks), curve_k) if curves is not None else max(ks)
    out = {}
    for setting in SETTINGS:
        users = split.users(setting)
        lists = recommender.recommend(users, top, exclude=split.exclusions(setting))
        ranked = dict(zip(users, lists, strict=True))
        out[setting] = setting_metrics(split, setting, ranked, ks)
        if curves is not None:
            truth = [split.truth[setting][u] for u in users]
            curves[setting] = [float(v) for v in recall_curve(lists, truth, curve_k)]
    return out


def run_protocol(
    events: pd.DataFrame,
    catalog: pd.DataFrame,
    recommenders: Sequence[Recommender],
    cut: Any = None,
    ks: Iterable[int] = DEFAULT_KS,
    test_days: int = TEST_DAYS,
    *,
    progress: bool = False,
) -> ProtocolResult:
    """Fit every method on the data before the cut and measure it in both settings.

    Methods are fitted in order (a blend may reuse sources fitted before it).

    Args:
        events: contract events.
        catalog: product rows (history or snapshot).
        recommenders: the methods; names must be unique.
        cut: the test cut (None: last event - ``test_days``).
        ks: cut-offs.
        test_days: test window.
        progress: a progress bar over methods.

    Returns:
        The table. Raises ValueError when there is no test user.
    """
    split = temporal_split(events, catalog, cut, test_days)
    if not split.truth["all"]:
        raise ValueError(f"no test users: nobody with an event before {split.cut} purchased "
                         f"in the {test_days} days after it")
    return evaluate_split(split, recommenders, ks, test_days=test_days, progress=progress)


def evaluate_split(
    split: Split,
    recommenders: Sequence[Recommender],
    ks: Iterable[int] = DEFAULT_KS,
    *,
    test_days: int = TEST_DAYS,
    fit: bool = True,
    curve_k: int = 0,
    progress: bool = False,
) -> ProtocolResult:
    """Fit (unless ``fit`` is False: already fitted on ``split.train``) and measure methods.

    Args:
        split: the temporal split.
        recommenders: the methods, fitted in order; names must be unique.
        ks: cut-offs.
        test_days: the split's test window (recorded).
        fit: fit each method on ``split.train`` first.
        curve_k: also record Recall@K for K = 1..curve_k per method and setting (0: no).
        progress: a progress bar over methods.

    Returns:
        The table.
    """
    ks = tuple(sorted(set(ks)))
    names = [r.name for r in recommenders]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique: {names}")
    result = ProtocolResult(
        cut=split.cut.isoformat(), end=split.end.isoformat(), test_days=test_days, ks=ks,
        n_products=len(split.train.product_ids), n_train_events=len(split.train.events),
        n_users={s: len(split.truth[s]) for s in SETTINGS},
    )
    bar = tqdm(recommenders, desc="methods", unit="method", disable=not progress)
    for rec in bar:
        bar.set_postfix_str(rec.name)
        started = time.perf_counter()
        if fit:
            rec.fit(split.train)
        curves: dict[str, list[float]] | None = {} if curve_k else None
        result.metrics[rec.name] = evaluate_recommender(rec, split, ks, curves, curve_k)
        if curves is not None:
            result.curves[rec.name] = curves
        result.seconds[rec.name] = time.perf_counter() - started
        params = getattr(rec, "params", None)
        if callable(params):
            result.params[rec.name] = params()
        log.info("%s: R@%d all %.3f, new %.3f (%.1fs)", rec.name, max(ks),
                 result.value(rec.name, "all", f"recall_at_{max(ks)}"),
                 result.value(rec.name, "new", f"recall_at_{max(ks)}"),
                 result.seconds[rec.name])
    return result


def evaluate_root(
    root: str,
    cut: Any = None,
    *,
    test_days: int = TEST_DAYS,
    ks: Iterable[int] = DEFAULT_KS,
    text_encoder: str | None = None,
    cache_dir: str | Path | None = None,
    epochs: int | None = None,
    two_tower: bool = True,
    progress: bool = True,
) -> ProtocolResult:
    """The protocol on a landing root: every baseline, the two-tower model and the blends.

    The blends tune on a validation window as long as the test window, just before the cut.

    Args:
        root: landing-zone root (what the importers and the synthetic shop write).
        cut: test cut (None: the last event - ``test_days``).
        test_days: test window.
        ks: cut-offs.
        text_encoder: overrides ``TrainConfig().text_encoder`` ("minilm", "tiny", a path).
        cache_dir: text-embedding cache.
        epochs: overrides the two-tower's epochs.
        two_tower: include the two-tower model (alone and as a blend source).
        progress: progress bars.

    Returns:
        The table.
    """
    from features.contract import list_days, read_upto
    from training.blend import standard_recommenders
    from training.config import TrainConfig

    days = list_days(root, "events")
    if not days:
        raise ValueError(f"{root}: no event partitions")
    events = read_upto(root, "events", days[-1])
    product_days = list_days(root, "products")
    catalog = read_upto(root, "products", product_days[-1]) if product_days else None
    if catalog is None or catalog.empty:
        raise ValueError(f"{root}: no product partitions")
    config = TrainConfig()
    if text_encoder:
        config = config.replace(text_encoder=text_encoder)
    if epochs is not None:
        config = config.replace(epochs=epochs)
    user_days = list_days(root, "users")
    users = read_upto(root, "users", user_days[-1]) if user_days else None
    recommenders = standard_recommenders(config, cache_dir=cache_dir, progress=progress,
                                         two_tower=two_tower, validation_days=test_days,
                                         users=users)
    return run_protocol(events, catalog, recommenders, cut, ks, test_days, progress=progress)
