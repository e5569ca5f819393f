"""What a model is fitted on: the data known before a cut, and the temporal splits.

``TrainData`` holds only what was known before its cut: the events before it, the catalogue
as of it (the candidates) and the users seen so far. ``temporal_split`` makes the test split
of the evaluation protocol (``training.evaluation.protocol``); ``validation_split`` the split
the served ranking's pair scorers and the research blends are tuned on: the same rules, cut
``VALIDATION_DAYS`` before, built from the training data alone, so the test period cannot
leak into tuning.

Split rules. ``cut`` defaults to the last event minus ``test_days``; the test window is
``[cut, cut + test_days]``. Test users had at least one event before the cut and at least
one purchase in the window; a user's truth is the distinct products purchased in it. In the
``new`` setting the user's pre-cut purchases leave both the candidates and the truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from features.user_state import TARGET_EVENT_TYPES

TEST_DAYS = 30
VALIDATION_DAYS = 30
COLD_USER_EVENTS = 3
NEW_PRODUCT_DAYS = 30
SETTINGS = ("all", "new")
SETTING_TITLES = {"all": "(a) all products", "new": "(b) new products only"}
SEGMENTS = ("cold_users", "new_products")


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
        event_types: Sequence[str] = TARGET_EVENT_TYPES,
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
            (U, N) float32 CSR, rows ``users``, columns ``product_ids``: a copy of the matrix
            built once per argument set (kept in ``memo``: every method fitted on this
            data asks for one of a few matrices, each a pass over all the events).
        """
        key = ("interactions", tuple(event_types), weight, since, half_life_days)
        if key not in self.memo:
            self.memo[key] = self._interactions(event_types, weight, since, half_life_days)
        return self.memo[key].copy()

    def _interactions(self, event_types: Sequence[str], weight: str,
                      since: pd.Timestamp | None, half_life_days: float | None
                      ) -> sparse.csr_matrix:
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
        key = ("histories", None if event_types is None else tuple(event_types))
        if key not in self.memo:  # grouped once per event-type set, not once per call
            ev = self.events
            keep = ev["product_id"].isin(self.item_index)
            if event_types is not None:
                keep &= ev["event_type"].isin(list(event_types))
            groups = ev[keep].groupby("user_id", sort=False)
            self.memo[key] = (groups["product_id"].agg(list).to_dict(),
                              groups["event_type"].agg(list).to_dict())
        products, types = self.memo[key]
        return ([list(products.get(u, [])) for u in user_ids],
                [list(types.get(u, [])) for u in user_ids])


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

    def sample(self, max_users: int | None, seed: int = 0) -> Split:
        """This split with at most ``max_users`` test users, drawn uniformly (seeded) from
        the users of setting "all"; both settings keep only the drawn users, so every method
        and both settings are measured on one sample. ``self`` when it is small enough.

        Args:
            max_users: the budget (None or 0: no sampling).
            seed: the draw's seed (a rerun draws the same users).
        """
        users = self.users("all")
        if not max_users or len(users) <= max_users:
            return self
        rng = np.random.default_rng(seed)
        keep = {users[i] for i in rng.choice(len(users), size=max_users, replace=False)}
        truth = {s: {u: t for u, t in by_user.items() if u in keep}
                 for s, by_user in self.truth.items()}
        return replace(self, truth=truth,
                       exclude={u: v for u, v in self.exclude.items() if u in keep},
                       past_events={u: v for u, v in self.past_events.items() if u in keep})

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


POPULARITY_DAYS = 30


def popularity_scores(
    data: TrainData, days: int | None = POPULARITY_DAYS, weight: str = "count"
) -> np.ndarray:
    """Purchases per candidate in the ``days`` before the cut (None: all history).

    Returns:
        (N,) float64, columns ``data.product_ids``.
    """
    since = None if days is None else data.cut - pd.Timedelta(days=days)
    matrix = data.interactions(event_types=("purchase",), weight=weight, since=since)  # (U, N)
    return np.asarray(matrix.sum(axis=0), dtype=np.float64).ravel()  # (N,)
