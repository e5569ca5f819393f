"""What the served ranking reads about users: their recent product events and profiles.

``Histories`` holds what Feast serves for a user (``user_recent_products`` and
``user_profile``), from the online store (``from_row``, ``from_feast``) or recomputed from
events at a moment by the same rule the feature build uses (``from_events``); ``UserView``
is one history in catalogue columns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from features.user_state import (
    HISTORY_EVENT_TYPES,
    HISTORY_LEN,
    PROFILE_COLUMNS,
    PURCHASED,
    STORED_PROFILE_COLUMNS,
    is_stored,
    profile_arrays,
    profiles_as_of,
    read_profiles,
    recent_histories,
)
from training.ranking.items import DAY_SECONDS

_KINDS = frozenset(HISTORY_EVENT_TYPES)  # what a history entry can be


class MalformedHistory(ValueError):
    """A history row whose lists disagree (event types or times not one per product, or an
    event type that is not one): a writer's bug or a damaged row, never reinterpreted."""


def checked(products: list[str], types: list[str], stamps: np.ndarray) -> np.ndarray:
    """The row's times, after checking that the lists agree (``MalformedHistory`` if not).
    A row without any times (written before they were kept) has them unknown (NaN)."""
    if len(types) != len(products):
        raise MalformedHistory(f"recent_event_types has {len(types)} entries for "
                               f"{len(products)} products")
    odd = set(types) - _KINDS
    if odd:
        raise MalformedHistory(f"recent_event_types holds {sorted(odd)[:3]}, not one of "
                               f"{sorted(_KINDS)}")
    if not len(stamps):
        return np.full(len(products), np.nan)  # unknown: "now"
    if len(stamps) != len(products):
        raise MalformedHistory(f"recent_timestamps has {len(stamps)} entries for "
                               f"{len(products)} products")
    return stamps


@dataclass
class Histories:
    """Users' recent product events, most recent LAST, one entry per user.

    Attributes:
        products: product ids.
        event_types: event type of each entry.
        timestamps: epoch seconds of each entry, (L,) float64 arrays (NaN: unknown, taken
            as the moment of scoring).
        purchased: per user, every product they bought however long ago
            (``purchased_product_ids``), or None where unknown (a row from before the list
            existed: only the history's purchases are known); None: unknown for everybody.
        profiles: the users' ``user_profile`` features (``features.user_state``), one row
            per user in the same order, or None (unknown): as readers see them
            (``PROFILE_COLUMNS``) or as the online store holds them
            (``STORED_PROFILE_COLUMNS``, the days of activity); ``profiles_at`` gives the
            former at a moment.
    """

    products: list[list[str]]
    event_types: list[list[str]]
    timestamps: list[np.ndarray]
    profiles: pd.DataFrame | None = None
    purchased: list[list[str] | None] | None = None
    # per user, a hashable digest of everything ``Scorer._views`` reads of the row (None:
    # not known): equal digests, equal views on the same day (``from_row`` sets it)
    digests: list[int | None] | None = None
    # one user's profile columns as an online row holds them (``from_row``): ``profiles``
    # is built from them only when something reads the frame (a request whose view is
    # kept reads only the country, if anything: a one-row frame costs ~0.5 ms)
    profile_row: dict[str, Any] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.products)

    def profile_frame(self) -> pd.DataFrame | None:
        """``profiles``, built from ``profile_row`` on first use."""
        if self.profiles is None and self.profile_row is not None:
            self.profiles = pd.DataFrame({c: [v] for c, v in self.profile_row.items()})
        return self.profiles

    def profile_value(self, column: str, row: int = 0) -> Any:
        """One user's profile value (None: no profile, or no such column)."""
        if self.profile_row is not None and self.profiles is None:
            return self.profile_row.get(column) if row == 0 else None
        frame = self.profile_frame()
        if frame is None or column not in frame or row >= len(frame):
            return None
        return frame[column].iat[row]

    def profiles_at(self, now: float) -> pd.DataFrame | None:
        """``profiles`` in ``PROFILE_COLUMNS`` as of ``now`` (epoch seconds): stored rows
        read by ``features.user_state.read_profiles``, readers' rows as they are."""
        profiles = self.profile_frame()
        if profiles is None or not is_stored(profiles):
            return profiles
        return read_profiles(profiles, pd.Timestamp(now, unit="s", tz="UTC"))

    def profile_values_at(self, now: float) -> pd.DataFrame | dict[str, np.ndarray] | None:
        """``profiles_at`` without building a frame where the rows are stored ones
        (``features.user_state.profile_arrays``: column -> array, NaN where unknown): what
        the user tower reads on a request's path."""
        row = self.profile_row
        if self.profiles is None and row is not None and all(
                c in row for c in STORED_PROFILE_COLUMNS):
            return profile_arrays({c: [row[c]] for c in STORED_PROFILE_COLUMNS},
                                  pd.Timestamp(now, unit="s", tz="UTC"))
        profiles = self.profile_frame()
        if profiles is None or not is_stored(profiles):
            return profiles
        return profile_arrays({c: profiles[c].to_numpy(dtype=object)
                               for c in STORED_PROFILE_COLUMNS},
                              pd.Timestamp(now, unit="s", tz="UTC"))

    def take(self, rows: Sequence[int]) -> Histories:
        """These rows' histories (and profiles), in that order."""
        rows = list(rows)
        profiles = self.profile_frame()
        profiles = (profiles.iloc[rows].reset_index(drop=True)
                    if profiles is not None else None)
        return Histories([self.products[r] for r in rows],
                         [self.event_types[r] for r in rows],
                         [self.timestamps[r] for r in rows], profiles,
                         None if self.purchased is None else [self.purchased[r] for r in rows],
                         None if self.digests is None else [self.digests[r] for r in rows])

    def bought(self, row: int) -> set[str]:
        """Everything user ``row`` is known to have bought: ``purchased`` where known, and
        the purchases in their history."""
        out = {p for p, t in zip(self.products[row], self.event_types[row], strict=True)
               if t == "purchase"}
        if self.purchased is not None and self.purchased[row] is not None:
            out.update(self.purchased[row])
        return out

    @classmethod
    def empty(cls, n: int) -> Histories:
        return cls([[] for _ in range(n)], [[] for _ in range(n)],
                   [np.zeros(0) for _ in range(n)])

    @classmethod
    def from_events(cls, events: pd.DataFrame, users: Sequence[str],
                    limit: int = HISTORY_LEN, *, catalog: pd.DataFrame | None = None,
                    user_table: pd.DataFrame | None = None,
                    at: pd.Timestamp | None = None) -> Histories:
        """The histories (and profiles) Feast would hold for ``users`` after ``events``, by
        the one rule of ``features.user_state``: ``recent_histories`` (what the offline build
        writes to ``user_recent_products``) and, with ``catalog`` and ``at``,
        ``profiles_as_of`` (the daily ``user_profile`` snapshots).

        Args:
            events: contract events before the moment of interest.
            users: users, in output order (unknown users get empty histories).
            limit: entries kept per user.
            catalog: product rows, for the profiles (None: profiles unknown).
            user_table: user rows (country), for the profiles.
            at: the moment of interest, for the profiles.
        """
        frame = recent_histories(events, list(users), limit)
        if catalog is not None and at is not None:
            profiles = profiles_as_of(events, catalog, user_table, list(users),
                                      [at] * len(users)).reset_index(drop=True)
            frame = pd.concat([frame.reset_index(drop=True), profiles], axis=1)
        return cls.from_feast(frame)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Histories:
        """One user's history from an online-store row (``features.store.OnlineUserReader``
        / ``online_user_history``): ``from_feast`` of a one-row frame, without building it
        (a request's hot path).

        Raises:
            MalformedHistory: the row's lists disagree (``checked``).
        """
        products = [str(p) for p in row.get("recent_product_ids") or []]
        types = [str(t) for t in row.get("recent_event_types") or []]
        stamps = checked(products, types,
                         np.asarray(row.get("recent_timestamps") or [], dtype=np.float64))
        profile, profile_values = None, ()
        for columns in (STORED_PROFILE_COLUMNS, PROFILE_COLUMNS):
            if all(c in row for c in columns):
                profile = {c: row[c] for c in columns}
                profile_values = tuple(_hashable(row[c]) for c in columns)
                break
        bought = row.get(PURCHASED)
        digest = hash((tuple(products), tuple(types), stamps.tobytes(), profile_values))
        return cls([products], [types], [stamps], None,
                   [None if bought is None else [str(p) for p in bought]], [digest],
                   profile_row=profile)

    @classmethod
    def from_feast(cls, frame: pd.DataFrame) -> Histories:
        """Histories from rows of ``user_recent_products`` (missing rows: empty), with the
        ``user_profile`` columns when the frame has them (stored or as read)."""
        def listed(value: Any) -> list:
            return [] if value is None or (isinstance(value, float) and np.isnan(value)) \
                else list(value)

        products = [listed(v) for v in frame["recent_product_ids"]]
        types = [listed(v) for v in frame["recent_event_types"]]
        stamps = [np.asarray(listed(v), dtype=np.float64)
                  for v in frame.get("recent_timestamps", [None] * len(frame))]
        try:
            stamps = [checked(p, t, s) for p, t, s in zip(products, types, stamps, strict=True)]
        except MalformedHistory as exc:
            raise MalformedHistory(f"a row of {len(frame)}: {exc}") from exc
        profiles = next((frame[list(columns)].reset_index(drop=True)
                         for columns in (STORED_PROFILE_COLUMNS, PROFILE_COLUMNS)
                         if set(columns) <= set(frame.columns)), None)
        purchased = None
        if PURCHASED in frame.columns:
            purchased = [None if v is None or (isinstance(v, float) and np.isnan(v))
                         else [str(p) for p in v] for v in frame[PURCHASED]]
        return cls(products, types, stamps, profiles, purchased)


def _hashable(value: Any) -> Any:
    """A profile value as something hashable: lists and arrays as tuples, a NaN as None.

    A list of scalars (every stored profile column: ~30 days of counts) becomes one tuple
    in C instead of a Python call per entry (~0.5 ms a request); a NaN inside it hashes by
    identity, so such a row only misses the view cache (another digest), never hits another
    row's view.
    """
    if isinstance(value, list | tuple | np.ndarray):
        flat = tuple(value)
        try:
            hash(flat)
        except TypeError:  # nested lists or arrays
            return tuple(_hashable(v) for v in value)
        return flat
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


@dataclass
class UserView:
    """One user's history as the scorer reads it, in catalogue columns.

    Attributes:
        known: columns of the history's catalogue products, oldest first.
        interactions: columns of its purchase/add-to-cart entries.
        buy_cols, buy_times: columns and epoch seconds (NaN: unknown) of its purchases.
        together_cols, together_vals: the co-occurrence source, sparse (sorted columns).
        user_vector: (D,) two-tower user embedding (None: no model or no known product).
        text_vector: (H,) unit mean text vector of the history's products.
        als_vector: (F,) ALS user factors solved from the history.
    """

    known: np.ndarray
    interactions: np.ndarray
    buy_cols: np.ndarray
    buy_times: np.ndarray
    together_cols: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    together_vals: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    user_vector: np.ndarray | None = None
    text_vector: np.ndarray | None = None
    als_vector: np.ndarray | None = None
    # the retrieval indexes' answers for these vectors (space -> columns), kept by
    # ``Scorer.candidates`` so that a cached view is not searched for again
    retrieved: dict[str, np.ndarray] | None = None

    def buy_times_or(self, now: float) -> np.ndarray:
        """Purchase times, unknown ones taken as ``now``."""
        return np.where(np.isnan(self.buy_times), now, self.buy_times)

    def purchase_facts(self, cols: np.ndarray, now: float
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For ``cols`` (sorted): purchases in the history, purchases in the 30 days before
        ``now``, and days since the last purchase (inf: never), each (C,) float32."""
        count = np.zeros(len(cols), np.float32)
        recent = np.zeros(len(cols), np.float32)
        age = np.full(len(cols), np.inf, np.float32)
        if len(self.buy_cols):
            days = ((now - self.buy_times_or(now)) / DAY_SECONDS).clip(min=1e-3)  # (P,)
            at = np.searchsorted(cols, self.buy_cols).clip(max=len(cols) - 1)  # cols sorted
            hit = cols[at] == self.buy_cols  # (P,) purchases among the candidates
            at, days = at[hit], days[hit].astype(np.float32)
            np.add.at(count, at, 1.0)
            np.add.at(recent, at, (days <= 30.0).astype(np.float32))
            np.minimum.at(age, at, days)
        return count, recent, age
