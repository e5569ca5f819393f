"""Item and user embeddings of a trained two-tower model, from catalogue rows and histories.

``training.towers`` defines the model; this module turns data into its inputs and runs it
without gradients: ``ItemFeatures`` (a catalogue's item-tower inputs, texts included for a
model with its own fine-tuned text encoder), ``encode_items``, ``history_matrix`` (users'
recent products as padded index matrices) and ``encode_users``, which reads precomputed
item embeddings, so serving needs no text encoder for users. Training uses the same
helpers, so the served embeddings are the trained ones.

Shape letters: U users, L history length, N catalogue size, T tokens, H text-embedding size,
D shared embedding size, P numeric profile inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from features.contract import product_text
from training.towers import EVENT_TYPE_IDS, UNKNOWN, TwoTowerModel


@dataclass(frozen=True)
class ItemFeatures:
    """The item tower's inputs for a set of products, row-aligned with ``product_ids``.

    ``texts`` (and, when already tokenized, ``tokens``/``token_mask``) are what a model
    with a fine-tuned text encoder reads instead of the frozen ``text`` vectors.
    """

    product_ids: list[str]
    text: np.ndarray  # (N, H) float32
    category: np.ndarray  # (N,) object
    brand: np.ndarray  # (N,) object
    price: np.ndarray  # (N,) float64
    texts: list[str] | None = None  # (N,) product_text
    tokens: np.ndarray | None = None  # (N, T) int32 token ids
    token_mask: np.ndarray | None = None  # (N, T) int32 attention mask

    @classmethod
    def from_catalog(
        cls,
        catalog: pd.DataFrame,
        text_embeddings: np.ndarray,
        *,
        tokens: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> ItemFeatures:
        """Features of every catalogue row.

        Args:
            catalog: the products.
            text_embeddings: (N, H) row-aligned with ``catalog``.
            tokens: the rows' token ids and attention mask, (N, T) each, if already known.

        Returns:
            The features, product texts included.
        """
        if len(text_embeddings) != len(catalog):
            raise ValueError(f"{len(text_embeddings)} text embeddings for {len(catalog)} products")
        if tokens is not None and len(tokens[0]) != len(catalog):
            raise ValueError(f"{len(tokens[0])} token rows for {len(catalog)} products")

        def column(name: str) -> np.ndarray:
            if name not in catalog.columns:
                return np.full(len(catalog), None, dtype=object)
            return catalog[name].astype(object).where(catalog[name].notna(), None).to_numpy()

        return cls(
            product_ids=catalog["product_id"].astype(str).tolist(),
            text=np.asarray(text_embeddings, dtype=np.float32),
            category=column("category"),
            brand=column("brand"),
            price=pd.to_numeric(catalog["price"], errors="coerce").fillna(0.0)
            .to_numpy(dtype=np.float64),
            texts=product_text(catalog),
            tokens=tokens[0] if tokens is not None else None,
            token_mask=tokens[1] if tokens is not None else None,
        )

    def tensors(self, model: TwoTowerModel, device: torch.device) -> dict[str, torch.Tensor]:
        """text (N, H), category (N,), brand (N,), price (N,) on ``device``."""
        return {
            "text": torch.from_numpy(self.text).to(device),
            "category": torch.from_numpy(model.category_ids(self.category)).to(device),
            "brand": torch.from_numpy(model.brand_ids(self.brand)).to(device),
            "price": torch.from_numpy(self.price.astype(np.float32)).to(device),
        }


def encode_items(
    model: TwoTowerModel,
    item_features: ItemFeatures,
    *,
    batch_size: int = 8192,
    text: torch.Tensor | None = None,
) -> np.ndarray:
    """Item-tower embeddings of products.

    A model with a fine-tuned text encoder first re-encodes the products' texts with it
    (from ``item_features.tokens``, else by tokenizing ``item_features.texts``);
    ``item_features.text`` is then ignored.

    Args:
        model: a trained model (put in eval mode here).
        item_features: the products' features.
        batch_size: products per forward pass.
        text: (N, H) text vectors to use as they are (e.g. already computed with the
            model's own encoder), skipping the step above.

    Returns:
        (N, D) float32, unit rows, aligned with ``item_features.product_ids``.
    """
    model.eval()
    device = model.device
    feats = item_features.tensors(model, device)
    if text is None:
        text = (feats["text"] if model.text_encoder is None
                else model_text_vectors(model, item_features))  # (N, H)
    text = text.to(device)
    out = np.zeros((len(item_features.product_ids), model.spec()["embedding_dim"]), np.float32)
    with torch.inference_mode():
        for start in range(0, len(out), batch_size):
            part = slice(start, start + batch_size)
            emb = model.embed_items(
                text[part], feats["category"][part], feats["brand"][part], feats["price"][part],
            )  # (b, D)
            out[part] = emb.float().cpu().numpy()
    return out


def model_text_vectors(
    model: TwoTowerModel, item_features: ItemFeatures, *, batch_size: int = 256
) -> torch.Tensor:
    """Text vectors of products under the model's own (fine-tuned) text encoder.

    Returns:
        (N, H) float32 on the model's device.

    Raises:
        ValueError: the model has no text encoder, or the features carry no texts.
    """
    encoder = model.text_encoder
    if encoder is None:
        raise ValueError("the model has no text encoder of its own (a frozen-text model)")
    if item_features.tokens is not None and item_features.token_mask is not None:
        ids, mask = item_features.tokens, item_features.token_mask
    elif item_features.texts is not None:
        ids, mask = encoder.tokenize(item_features.texts)  # (N, T) each
    else:
        raise ValueError("this model fine-tuned its text encoder, so it needs the products' "
                         "texts: build ItemFeatures with from_catalog")
    return encoder.encode(torch.from_numpy(ids), torch.from_numpy(mask), batch_size=batch_size)


def history_matrix(
    histories: Sequence[Sequence[str] | None],
    event_types: Sequence[Sequence[str] | None] | None,
    item_index: dict[str, int],
    history_len: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Padded index matrices of users' recent products, most recent FIRST.

    Args:
        histories: per user, product ids with the most recent LAST (None = none).
        event_types: per user, the event type of each history entry, or None. A user's list
            of the wrong length is ignored (types become unknown).
        item_index: product id -> row; unknown products are skipped.
        history_len: keep at most this many most recent known products.

    Returns:
        (U, L) int64 item rows with -1 for padding, and (U, L) int64 EVENT_TYPE_IDS.
    """
    n = len(histories)
    items = np.full((n, history_len), -1, dtype=np.int64)
    events = np.zeros((n, history_len), dtype=np.int64)
    for u, history in enumerate(histories):
        if not _is_sequence(history) or len(history) == 0:
            continue
        types = event_types[u] if event_types is not None else None
        if not _is_sequence(types) or len(types) != len(history):
            types = [None] * len(history)
        filled = 0
        for product, event in zip(reversed(list(history)), reversed(list(types)), strict=True):
            row = item_index.get(product)
            if row is None:
                continue
            items[u, filled] = row
            events[u, filled] = EVENT_TYPE_IDS.get(event, UNKNOWN)
            filled += 1
            if filled == history_len:
                break
    return items, events


def _is_sequence(value: Any) -> bool:
    """A list-like of ids (a missing value from pandas/parquet, NaN or None, is not)."""
    return isinstance(value, Sequence | np.ndarray | pd.Series) and not isinstance(value, str)


def encode_users(
    model: TwoTowerModel,
    histories: Sequence[Sequence[str] | None],
    event_types: Sequence[Sequence[str] | None] | None,
    item_index: dict[str, int],
    item_embeddings: np.ndarray,
    *,
    user_features: pd.DataFrame | None = None,
    batch_size: int = 4096,
) -> np.ndarray:
    """User-tower embeddings from precomputed item embeddings.

    Args:
        model: a trained model (put in eval mode here).
        histories: per user, product ids with the most recent LAST (empty/None = cold user).
        event_types: per user, the event type of each entry, or None.
        item_index: product id -> row of ``item_embeddings``; unknown products are skipped.
        item_embeddings: (N, D) from ``encode_items``.
        user_features: ``user_profile`` columns (``features.user_state.PROFILE_COLUMNS``;
            other columns ignored), row-aligned with ``histories`` (by position, not index);
            absent columns and null values are unknown; None: every profile unknown. A model
            without user features ignores it.
        batch_size: users per forward pass.

    Returns:
        (U, D) float32, unit rows.

    Raises:
        ValueError: ``user_features`` has another number of rows than ``histories``.
    """
    if model.training:  # eval() walks every module: not on each request
        model.eval()
    device = model.device
    rows, events = history_matrix(histories, event_types, item_index, model.history_len)
    numeric, country = model.user_inputs(user_features, len(rows))  # (U, P), (U,)
    table = torch.from_numpy(np.asarray(item_embeddings, dtype=np.float32)).to(device)  # (N, D)
    if table.shape[0] == 0:  # no catalogue: every history is padding; keep indexing valid
        table = table.new_zeros(1, model.spec()["embedding_dim"])  # (1, D)
    out = np.zeros((len(rows), table.shape[1]), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            idx = torch.from_numpy(rows[start : start + batch_size]).to(device)  # (b, L)
            mask = idx >= 0  # (b, L)
            history = table[idx.clamp(min=0)]  # (b, L, D)
            ev = torch.from_numpy(events[start : start + batch_size]).to(device)  # (b, L)
            num = torch.from_numpy(numeric[start : start + batch_size]).to(device)  # (b, P)
            cty = torch.from_numpy(country[start : start + batch_size]).to(device)  # (b,)
            out[start : start + len(idx)] = model.user_tower(history, ev, mask, num,
                                                             cty).cpu().numpy()
    return out
