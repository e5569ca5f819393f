"""Training examples as the index arrays the fit loop reads.

A feature store returns example rows (user, target product, time, the user's recent
products and event types, optionally the ``user_profile`` columns) in no fixed order, and a
catalogue may hold a product more than once. ``unique_products`` settles the catalogue (one
row per product, sorted), ``prepare_examples`` the examples: a canonical order, targets
outside the catalogue dropped, histories as padded row matrices. Both are deterministic, so
the same inputs train the same weights.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from features.user_state import PROFILE_COLUMNS
from training.embeddings import history_matrix
from training.user_features import has_profile


def unique_products(catalog: pd.DataFrame) -> pd.DataFrame:
    """One row per product_id (the latest ``updated_at`` when present, else the last row)."""
    if "updated_at" in catalog.columns:
        catalog = catalog.sort_values("updated_at", kind="stable")
    catalog = catalog.drop_duplicates("product_id", keep="last")
    return catalog.sort_values("product_id", kind="stable").reset_index(drop=True)


def prepare_examples(
    examples: pd.DataFrame, item_index: dict[str, int], history_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, pd.DataFrame | None]:
    """Turn example rows into index arrays, dropping targets outside the catalogue.

    Rows are put in a canonical order (timestamp, user, product) first, so the result does
    not depend on the order a feature store returned them in.

    Returns:
        targets (E,) int64 catalogue rows; history (E, L) int64 rows, -1 = padding, most
        recent first; events (E, L) int64 event type ids; the kept rows' ``user_profile``
        columns (E rows, in that order), or None when the examples carry none.
    """
    missing = {"product_id"} - set(examples.columns)
    if missing:
        raise ValueError(f"examples lack columns {sorted(missing)}")
    order = [c for c in ("event_timestamp", "user_id", "product_id") if c in examples.columns]
    examples = examples.sort_values(order, kind="stable") if order else examples
    rows = examples["product_id"].astype(str).map(item_index)
    keep = rows.notna().to_numpy()
    examples = examples[keep]
    targets = rows[keep].to_numpy(dtype=np.int64)
    n = len(examples)
    histories = (
        examples["recent_product_ids"].tolist()
        if "recent_product_ids" in examples.columns else [None] * n
    )
    types = (
        examples["recent_event_types"].tolist()
        if "recent_event_types" in examples.columns else None
    )
    history, events = history_matrix(histories, types, item_index, history_len)
    profiles = None
    if has_profile(examples):
        columns = [c for c in PROFILE_COLUMNS if c in examples.columns]
        profiles = examples[columns].reset_index(drop=True)
    return targets, history, events, profiles
