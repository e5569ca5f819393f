"""What the served ranking reads about users: their recent product events and profiles.

``Histories`` holds what Feast serves for a user (``user_recent_products`` and
``user_profile``), from the online store (``from_row``, ``from_feast``) or recomputed from
events at a moment by the same rule the feature build uses (``from_events``); ``UserView``
is one history in catalogue columns.
"""

from __future__ import annotations

import hashlib
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
    VECTORS,
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
    # per user, the vectors the online store holds for the row (``StoredVectors``, None:
    # none), written when the row changed (``serving.user_vectors``); ``vectors_for`` keeps
    # those of one bundle computed from this very row
    stored: list[StoredVectors | None] | None = field(default=None, repr=False)
    # one user's stored vectors read only when asked (``vectors_for``): a request whose view
    # is kept, or a cold user's, does not read them (a server sets it, ``serving.app``)
    load_stored: Any = field(default=None, repr=False)

    def vectors_for(self, bundle: str) -> list[StoredVectors | None] | None:
        """Per user, the stored vectors computed by ``bundle`` from the row as it is now
        (None where there are none, or they are another bundle's or an older row's); None
        when no user has usable ones."""
        if self.stored is None and self.load_stored is not None:
            self.stored = [self.load_stored()]
            self.load_stored = None
        if not self.stored:
            return None
        usable = [v if v is not None and v.bundle == bundle and v.row == v.row_now else None
                  for v in self.stored]
        return usable if any(v is not None for v in usable) else None

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

    @classmethod
    def concat(cls, parts: Sequence[Histories]) -> Histories:
        """One-user histories (``from_row``'s) as one batch, profiles and stored vectors
        included."""
        rows = [p.profile_row for p in parts]
        profiles = None
        if any(r is not None for r in rows):
            columns = next(r for r in rows if r is not None)
            profiles = pd.DataFrame([r if r is not None else dict.fromkeys(columns)
                                     for r in rows])
        return cls([p.products[0] for p in parts], [p.event_types[0] for p in parts],
                   [p.timestamps[0] for p in parts], profiles,
                   [None if p.purchased is None else p.purchased[0] for p in parts],
                   [None if p.digests is None else p.digests[0] for p in parts],
                   stored=[None if p.stored is None else p.stored[0] for p in parts])

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
        stored = StoredVectors.from_values(row.get(VECTORS))
        if stored is not None:
            stored.row_now = row_digest(row)
        return cls([products], [types], [stamps], None,
                   [None if bought is None else [str(p) for p in bought]], [digest],
                   profile_row=profile, stored=None if stored is None else [stored])

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


# UserView attribute -> ``user_vectors`` feature, and retrieval space -> feature.
VECTOR_FEATURES = {"user_vector": "two_tower_vector", "text_vector": "text_vector",
                   "als_vector": "als_vector", "sequence_vector": "sequence_vector"}
# retrieval space -> the UserView attribute searched with
SPACE_VECTORS = {"two_tower": "user_vector", "text": "text_vector", "als": "als_vector",
                 "sequence": "sequence_vector"}
RETRIEVED_FEATURES = {space: f"retrieved_{space}" for space in SPACE_VECTORS}


def row_digest(row: Mapping[str, Any]) -> str:
    """A digest of what a user's view is computed from in an online row (the history's
    lists and the profile), the same in every process (``hash`` is salted per process):
    stored vectors carry the digest of the row they came from, so a row changed since is
    computed again."""
    columns = next((c for c in (STORED_PROFILE_COLUMNS, PROFILE_COLUMNS)
                    if all(k in row for k in c)), ())
    content = repr((list(row.get("recent_product_ids") or []),
                    list(row.get("recent_event_types") or []),
                    [int(t) for t in row.get("recent_timestamps") or []],
                    [_hashable(row[c]) for c in columns]))
    return hashlib.blake2b(content.encode(), digest_size=16).hexdigest()


@dataclass
class StoredVectors:
    """A user's vectors and retrieval answers as ``user_vectors`` holds them online: what
    ``Scorer.views`` would compute for the row ``row`` with the bundle ``bundle``.

    Attributes:
        bundle: the bundle that computed them (``serving.user_vectors.bundle_identity``).
        row: ``row_digest`` of the online row they were computed from.
        vectors: UserView attribute (``VECTOR_FEATURES``) -> vector, absent where the view
            had none.
        retrieved: retrieval space -> catalogue rows the bundle's index returned.
        row_now: ``row_digest`` of the row read with them (set by the reader).
    """

    bundle: str
    row: str
    vectors: dict[str, np.ndarray]
    retrieved: dict[str, np.ndarray]
    row_now: str | None = None

    @classmethod
    def from_values(cls, values: Mapping[str, Any] | None) -> StoredVectors | None:
        """From the ``user_vectors`` features of one user (None: none stored)."""
        if not values or not values.get("vectors_bundle") or not values.get("vectors_row"):
            return None
        vectors = {attr: np.asarray(values[name], np.float32)
                   for attr, name in VECTOR_FEATURES.items() if _filled(values.get(name))}
        retrieved = {space: np.asarray(values[name], np.int64)
                     for space, name in RETRIEVED_FEATURES.items()
                     if values.get(name) is not None and space in _spaces(values)}
        return cls(str(values["vectors_bundle"]), str(values["vectors_row"]), vectors,
                   retrieved)

    @classmethod
    def of_view(cls, view: UserView, bundle: str, row: str) -> StoredVectors:
        """What to store of a computed (and retrieved) view."""
        vectors = {attr: np.asarray(getattr(view, attr), np.float32)
                   for attr in VECTOR_FEATURES if getattr(view, attr) is not None}
        return cls(bundle, row, vectors, dict(view.retrieved or {}))

    def values(self) -> dict[str, Any]:
        """The ``user_vectors`` features (empty lists where absent)."""
        out: dict[str, Any] = {"vectors_bundle": self.bundle, "vectors_row": self.row}
        for attr, name in VECTOR_FEATURES.items():
            vector = self.vectors.get(attr)
            out[name] = [] if vector is None else vector.astype(np.float32)
        for space, name in RETRIEVED_FEATURES.items():
            found = self.retrieved.get(space)
            out[name] = [] if found is None else found.astype(np.int64)
        return out


def _spaces(values: Mapping[str, Any]) -> set[str]:
    """The spaces whose retrieval was stored: an empty list is an answer only where the
    space's vector was stored (an index may return nothing), else "not retrieved"."""
    return {space for space, attr in SPACE_VECTORS.items()
            if _filled(values.get(VECTOR_FEATURES[attr]))}


def _filled(value: Any) -> bool:
    """A stored list feature with entries (lists from the store, arrays when built here)."""
    return value is not None and len(value) > 0


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
        sequence_vector: (E + 1,) the sequence encoder's vector of the history (bias entry
            last).
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
    sequence_vector: np.ndarray | None = None
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
