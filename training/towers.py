"""The two-tower retrieval model: an item tower and a user tower into one space.

Item tower: the product's text embedding, a category embedding, a brand embedding and its
log-price, through an MLP (plus a linear path from the text, so the pretrained semantics
survive for products never seen in training), L2-normalised. The text embedding comes from
a frozen sentence encoder (precomputed, the default), or from a ``TrainableTextEncoder``
attached to the model whose top layers are fine-tuned with the towers; then the model
carries that encoder (and its tokenizer), and ``training.embeddings.encode_items`` runs it
on the products' texts.

User tower: attention pooling over the item-tower embeddings of the user's recent products,
aware of each event's type and recency, plus a learned "empty history" token that is always
attended (so a cold user gets a finite, learned embedding); plus, with user features, a
vector projected from the user's profile (``training.user_features``: log1p counters, days
since the last purchase, a "profile missing" flag, and a country embedding); then an MLP,
L2-normalised. The profile's projection starts at zero, so a new model (or one warm-started
from a checkpoint without user features) begins as the history-only tower. Because the user
tower reads item embeddings, serving encodes users from the precomputed catalogue embeddings
(``training.embeddings.encode_users``) and needs no text encoder for them.

This module holds the ``nn.Module`` definitions only; turning catalogues and histories into
their inputs, and encoding without gradients, is ``training.embeddings``'.

Shape letters: B batch, L history length, M distinct items of a batch, N catalogue size,
H text-embedding size, D shared embedding size, P numeric profile inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NotRequired, TypedDict

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from features.contract import EVENT_TYPES
from training.config import TrainConfig
from training.text import TrainableTextEncoder
from training.user_features import N_NUMERIC, country_values, numeric_features, unknown_numeric

# 0 = unknown event type (and padding); the contract's event types follow.
EVENT_TYPE_IDS: dict[str, int] = {name: i + 1 for i, name in enumerate(EVENT_TYPES)}
UNKNOWN = 0  # vocabulary index of an unknown category / brand / country


class TwoTowerBatch(TypedDict):
    """One training batch. Items are stored once per batch and referenced by index.

    With a fine-tuned text encoder, the ``fresh`` items (targets and hard negatives) get
    their text vectors recomputed with gradients, from token ids or from precomputed
    frozen-layer states; the others keep ``item_text``. With hard negatives, ``hard``
    holds K extra candidate items per example.
    """

    item_text: torch.Tensor  # (M, H) float
    item_category: torch.Tensor  # (M,) long
    item_brand: torch.Tensor  # (M,) long
    item_price: torch.Tensor  # (M,) float, raw price
    target: torch.Tensor  # (B,) long, index into the M items
    history: torch.Tensor  # (B, L) long, index into the M items; anything where masked
    history_mask: torch.Tensor  # (B, L) bool, True = a real product; most recent first
    history_event: torch.Tensor  # (B, L) long, EVENT_TYPE_IDS
    user_numeric: NotRequired[torch.Tensor]  # (B, P) float, numeric_features; absent = unknown
    user_country: NotRequired[torch.Tensor]  # (B,) long, country vocabulary index
    hard: NotRequired[torch.Tensor]  # (B, K) long, index into the M items
    fresh: NotRequired[torch.Tensor]  # (F,) long, items whose text is re-encoded
    fresh_mask: NotRequired[torch.Tensor]  # (F, T) attention mask
    fresh_ids: NotRequired[torch.Tensor]  # (F, T) token ids, or
    fresh_states: NotRequired[torch.Tensor]  # (F, T, H) frozen-layer hidden states


class ItemTower(nn.Module):
    """Product features -> unit vector (B, D)."""

    def __init__(
        self,
        text_dim: int,
        n_categories: int,
        n_brands: int,
        embedding_dim: int,
        category_dim: int,
        brand_dim: int,
        hidden_dim: int,
        dropout: float,
    ):
        super().__init__()
        self.category = nn.Embedding(n_categories, category_dim)
        self.brand = nn.Embedding(n_brands, brand_dim)
        in_dim = text_dim + category_dim + brand_dim + 1
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, embedding_dim),
        )
        # Keeps the pretrained text geometry reachable for cold products.
        self.text_skip = nn.Linear(text_dim, embedding_dim, bias=False)

    def forward(
        self,
        text: torch.Tensor,
        category: torch.Tensor,
        brand: torch.Tensor,
        log_price: torch.Tensor,
    ) -> torch.Tensor:
        """Args: text (B, H), category (B,), brand (B,), standardised log-price (B,)."""
        x = torch.cat(
            [text, self.category(category), self.brand(brand), log_price.unsqueeze(-1)], dim=-1
        )  # (B, H + C + R + 1)
        out = self.mlp(x) + self.text_skip(text)  # (B, D)
        return F.normalize(out, dim=-1)  # (B, D)


class UserProfileEncoder(nn.Module):
    """A user's profile -> a vector (B, D) added to the pooled history; zero at first."""

    def __init__(self, n_countries: int, country_dim: int, embedding_dim: int, hidden_dim: int,
                 dropout: float):
        super().__init__()
        self.country = nn.Embedding(n_countries, country_dim)
        self.mlp = nn.Sequential(
            nn.Linear(N_NUMERIC + country_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, embedding_dim),
        )
        # Zero output at init: the tower starts as (or, warm-started, stays) history-only.
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        # The inputs of a user without a profile (not saved: it follows the code's transform).
        self.register_buffer("unknown", torch.from_numpy(unknown_numeric()), persistent=False)

    def forward(self, numeric: torch.Tensor | None, country: torch.Tensor | None,
                batch: int) -> torch.Tensor:
        """Project profiles.

        Args:
            numeric: (B, P) ``training.user_features.numeric_features``, or None (unknown).
            country: (B,) country vocabulary ids, or None (unknown).
            batch: B, for when both are None.

        Returns:
            (B, D), to add to the pooled history.
        """
        if numeric is None:
            numeric = self.unknown.expand(batch, -1)  # (B, P)
        if country is None:
            country = torch.full((batch,), UNKNOWN, dtype=torch.long,
                                 device=self.unknown.device)  # (B,)
        x = torch.cat([numeric.float(), self.country(country)], dim=-1)  # (B, P + C)
        return self.mlp(x)  # (B, D)


class UserTower(nn.Module):
    """Attention pooling over a user's recent item embeddings (plus, optionally, their
    profile) -> unit vector (B, D).

    Args:
        n_countries: rows of the country embedding (vocabulary + unknown); None: no user
            features (the history-only tower).
        country_dim: size of the country embedding.
    """

    def __init__(self, embedding_dim: int, history_len: int, hidden_dim: int, dropout: float,
                 *, n_countries: int | None = None, country_dim: int = 8):
        super().__init__()
        n_events = len(EVENT_TYPE_IDS) + 1
        self.history_len = history_len
        self.event = nn.Embedding(n_events, embedding_dim)
        self.position = nn.Embedding(history_len, embedding_dim)  # 0 = most recent
        # A learned prior per event type: a purchase may weigh more than a view.
        self.event_bias = nn.Embedding(n_events, 1)
        # Small additive embeddings: at N(0, 1) they would drown the unit-norm item vectors.
        # Unknown types (row 0) start neutral and only move if training sees them.
        nn.init.normal_(self.event.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.02)
        nn.init.zeros_(self.event_bias.weight)
        with torch.no_grad():
            self.event.weight[UNKNOWN].zero_()
        self.key = nn.Linear(embedding_dim, embedding_dim)
        self.value = nn.Linear(embedding_dim, embedding_dim)
        self.query = nn.Parameter(torch.randn(embedding_dim) / math.sqrt(embedding_dim))
        # Always attended: the whole embedding of a user without history, a prior otherwise.
        self.empty = nn.Parameter(torch.randn(embedding_dim) / math.sqrt(embedding_dim))
        self.mlp = nn.Sequential(
            nn.Linear(embedding_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, embedding_dim),
        )
        # Built last, so the history part draws the same initial weights as without it.
        self.profile = (UserProfileEncoder(n_countries, country_dim, embedding_dim, hidden_dim,
                                           dropout) if n_countries is not None else None)

    def forward(
        self,
        items: torch.Tensor,
        event_types: torch.Tensor,
        mask: torch.Tensor,
        numeric: torch.Tensor | None = None,
        country: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pool a padded history, and add the profile.

        Args:
            items: (B, L, D) item embeddings, most recent first.
            event_types: (B, L) EVENT_TYPE_IDS.
            mask: (B, L) bool, False on padding (whose content is ignored).
            numeric: (B, P) ``training.user_features.numeric_features``, or None (unknown).
            country: (B,) country vocabulary ids, or None (unknown). Both are ignored by a
                tower without user features.

        Returns:
            (B, D) unit vectors; finite for an all-padding row.
        """
        batch, length, dim = items.shape
        if length > self.history_len:
            items, event_types, mask = (
                items[:, : self.history_len],
                event_types[:, : self.history_len],
                mask[:, : self.history_len],
            )
            length = self.history_len
        positions = torch.arange(length, device=items.device)  # (L,)
        tokens = items + self.event(event_types) + self.position(positions)  # (B, L, D)
        tokens = tokens.masked_fill(~mask.unsqueeze(-1), 0.0)  # (B, L, D)
        empty = self.empty.to(tokens.dtype).expand(batch, 1, dim)  # (B, 1, D)
        tokens = torch.cat([empty, tokens], dim=1)  # (B, L+1, D)
        valid = torch.cat([mask.new_ones(batch, 1), mask], dim=1)  # (B, L+1)
        bias = self.event_bias(event_types).squeeze(-1)  # (B, L)
        bias = torch.cat([bias.new_zeros(batch, 1), bias], dim=1)  # (B, L+1)
        scores = self.key(tokens) @ self.query.to(tokens.dtype) / math.sqrt(dim)  # (B, L+1)
        scores = (scores + bias).masked_fill(~valid, float("-inf"))  # (B, L+1)
        weights = torch.softmax(scores.float(), dim=-1).to(tokens.dtype)  # (B, L+1)
        pooled = (weights.unsqueeze(-1) * self.value(tokens)).sum(dim=1)  # (B, D)
        if self.profile is not None:
            pooled = pooled + self.profile(numeric, country, batch).to(pooled.dtype)  # (B, D)
        out = pooled + self.mlp(pooled)  # (B, D)
        return F.normalize(out, dim=-1)  # (B, D)


class TwoTowerModel(nn.Module):
    """Both towers, the category/brand/country vocabularies and the price scaling.

    Category and brand vocabularies come from the training catalogue, the country vocabulary
    from the training examples; index 0 is "unknown", so products of a new category or brand,
    and users of a new country, still get an embedding. ``user_features=False`` builds the
    history-only user tower (what checkpoints written before user features hold).
    ``spec()`` returns the constructor's keyword arguments (JSON-able), which
    ``training.checkpoint`` stores beside the weights.
    """

    def __init__(
        self,
        *,
        text_dim: int,
        categories: Sequence[str],
        brands: Sequence[str],
        embedding_dim: int = 64,
        category_dim: int = 16,
        brand_dim: int = 16,
        hidden_dim: int = 256,
        history_len: int = 50,
        dropout: float = 0.1,
        price_center: float = 0.0,
        price_scale: float = 1.0,
        user_features: bool = True,
        countries: Sequence[str] = (),
        country_dim: int = 8,
    ):
        super().__init__()
        self.categories = list(categories)
        self.brands = list(brands)
        self.countries = list(countries) if user_features else []
        self._category_ids = {c: i + 1 for i, c in enumerate(self.categories)}
        self._brand_ids = {b: i + 1 for i, b in enumerate(self.brands)}
        self._country_ids = {c: i + 1 for i, c in enumerate(self.countries)}
        self._spec: dict[str, Any] = {
            "text_dim": text_dim, "embedding_dim": embedding_dim, "category_dim": category_dim,
            "brand_dim": brand_dim, "hidden_dim": hidden_dim, "history_len": history_len,
            "dropout": dropout, "price_center": price_center, "price_scale": price_scale,
            "user_features": user_features, "country_dim": country_dim,
        }
        self.history_len = history_len
        self.price_center = price_center
        self.price_scale = price_scale
        self.item_tower = ItemTower(
            text_dim, len(self.categories) + 1, len(self.brands) + 1, embedding_dim,
            category_dim, brand_dim, hidden_dim, dropout,
        )
        self.user_tower = UserTower(
            embedding_dim, history_len, hidden_dim, dropout,
            n_countries=len(self.countries) + 1 if user_features else None,
            country_dim=country_dim,
        )
        self.text_encoder: TrainableTextEncoder | None = None

    def attach_text_encoder(self, encoder: TrainableTextEncoder) -> TwoTowerModel:
        """Make ``encoder`` part of the item tower (its trainable layers train with it)."""
        if encoder.dim != self._spec["text_dim"]:
            raise ValueError(f"text encoder gives {encoder.dim}-d vectors; the item tower "
                             f"reads {self._spec['text_dim']}-d ones")
        self.text_encoder = encoder
        return self

    @classmethod
    def from_catalog(
        cls, config: TrainConfig, catalog: pd.DataFrame, text_dim: int,
        *, countries: Sequence[str] = (),
    ) -> TwoTowerModel:
        """A fresh model whose vocabularies and price scaling come from ``catalog``.

        Args:
            config: sizes, and whether the user tower reads user features.
            catalog: the products.
            text_dim: size H of the text vectors.
            countries: the country vocabulary (``user_features.country_vocabulary`` of the
                training examples).

        Returns:
            The model, freshly initialised.
        """
        log_price = np.log1p(pd.to_numeric(catalog["price"], errors="coerce").fillna(0.0)
                             .clip(lower=0.0).to_numpy(dtype=np.float64))
        scale = float(log_price.std()) if len(log_price) > 1 else 1.0
        return cls(
            text_dim=text_dim,
            categories=_vocabulary(catalog, "category"),
            brands=_vocabulary(catalog, "brand"),
            embedding_dim=config.embedding_dim,
            category_dim=config.category_dim,
            brand_dim=config.brand_dim,
            hidden_dim=config.hidden_dim,
            history_len=config.history_len,
            dropout=config.dropout,
            price_center=float(log_price.mean()) if len(log_price) else 0.0,
            price_scale=scale if scale > 1e-6 else 1.0,
            user_features=config.user_features,
            countries=countries,
            country_dim=config.country_dim,
        )

    def spec(self) -> dict[str, Any]:
        """Constructor keyword arguments (vocabularies included), JSON-able."""
        return {**self._spec, "categories": self.categories, "brands": self.brands,
                "countries": self.countries}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def category_ids(self, values: Sequence[Any]) -> np.ndarray:
        """Vocabulary indices (0 = unknown) of category values."""
        return np.array([self._category_ids.get(v, UNKNOWN) for v in values], dtype=np.int64)

    def brand_ids(self, values: Sequence[Any]) -> np.ndarray:
        """Vocabulary indices (0 = unknown) of brand values."""
        return np.array([self._brand_ids.get(v, UNKNOWN) for v in values], dtype=np.int64)

    @property
    def user_features(self) -> bool:
        """Whether the user tower reads user features."""
        return self.user_tower.profile is not None

    def user_inputs(
        self, user_features: pd.DataFrame | None, n: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The user tower's profile inputs of ``n`` users.

        Args:
            user_features: ``user_profile`` columns row-aligned with the users (absent
                columns and null values are unknown), or None (every user unknown).
            n: the number of users.

        Returns:
            (n, P) float32 ``numeric_features`` and (n,) int64 country ids (0 = unknown).

        Raises:
            ValueError: ``user_features`` has another number of rows.
        """
        frame = user_features if user_features is not None else pd.DataFrame(index=range(n))
        rows = len(frame) if isinstance(frame, pd.DataFrame) else \
            len(next(iter(frame.values()), []))  # column -> array (``profile_arrays``)
        if rows != n:
            raise ValueError(f"{rows} rows of user features for {n} users")
        countries = country_values(frame)
        ids = np.array([self._country_ids.get(c, UNKNOWN) for c in countries], dtype=np.int64)
        return numeric_features(frame), ids

    def embed_items(
        self, text: torch.Tensor, category: torch.Tensor, brand: torch.Tensor, price: torch.Tensor
    ) -> torch.Tensor:
        """Item tower on raw features: text (M, H), ids (M,), price (M,) -> (M, D)."""
        log_price = (torch.log1p(price.float().clamp(min=0.0)) - self.price_center) / self.price_scale
        return self.item_tower(text, category, brand, log_price.to(text.dtype))  # (M, D)

    def forward(self, batch: TwoTowerBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """User and item embeddings of a batch.

        Returns:
            (user embeddings (B, D), target embeddings (B, D)); when the batch has ``hard``
            negatives, the item side is (B, 1 + K, D): the target first, then its K.
        """
        text = batch["item_text"]  # (M, H)
        fresh = batch.get("fresh")
        if fresh is not None and self.text_encoder is not None:
            vectors = self.text_encoder(
                batch["fresh_mask"], ids=batch.get("fresh_ids"), states=batch.get("fresh_states")
            )  # (F, H)
            text = text.float().index_copy(0, fresh, vectors.float())  # (M, H)
        items = self.embed_items(
            text, batch["item_category"], batch["item_brand"], batch["item_price"]
        )  # (M, D)
        mask = batch["history_mask"]  # (B, L)
        history = items[batch["history"].clamp(min=0)]  # (B, L, D)
        users = self.user_tower(history, batch["history_event"], mask,
                                batch.get("user_numeric"), batch.get("user_country"))  # (B, D)
        if "hard" in batch:
            candidates = torch.cat([batch["target"].unsqueeze(1), batch["hard"]], dim=1)
            return users, items[candidates]  # (B, D), (B, 1 + K, D)
        return users, items[batch["target"]]  # (B, D), (B, D)


def _vocabulary(catalog: pd.DataFrame, column: str) -> list[str]:
    if column not in catalog.columns:
        return []
    values = catalog[column].dropna().astype(str)
    return sorted(set(values[values.str.len() > 0]))
