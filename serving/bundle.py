"""The serving bundle: everything one model version needs to answer requests.

Written by the training step into the MLflow model's artifacts::

    manifest.json          name/interval/metrics and the sha256 of every file below
    model/                 two-tower weights, config, vocabularies (training.checkpoint)
    item_embeddings.npy    (N, D) float32, unit rows, in ``products.parquet`` order
    products.parquet       product_id, title, category, brand, price, popularity

and completed by the index step (run artifacts ``index/``)::

    index.faiss, index.json

A ``Bundle`` is immutable once loaded; the server swaps whole bundles, never edits one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PRODUCTS = "products.parquet"
EMBEDDINGS = "item_embeddings.npy"
MODEL_DIR = "model"
INDEX_FILE = "index.faiss"
INDEX_META = "index.json"


class BundleError(RuntimeError):
    """A bundle that is incomplete or whose files do not match their checksums."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): _sha256(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def write_bundle(folder: Path, *, model: Any, config: Any, products: pd.DataFrame,
                 item_embeddings: np.ndarray, meta: dict[str, Any]) -> Path:
    """Write a bundle folder and its manifest.

    Args:
        folder: target folder (created).
        model: the trained ``TwoTowerModel``; config: its ``TrainConfig``.
        products: one row per embedding, in embedding order, with product_id, title,
            category, brand, price and popularity.
        item_embeddings: (N, D) float32.
        meta: JSON-able facts recorded in the manifest (interval, metrics, ...).

    Returns:
        The folder.
    """
    from training.checkpoint import save_model

    if len(products) != len(item_embeddings):
        raise ValueError(f"{len(products)} products for {len(item_embeddings)} embeddings")
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, config, folder / MODEL_DIR)
    np.save(folder / EMBEDDINGS, np.ascontiguousarray(item_embeddings, dtype=np.float32))
    products.reset_index(drop=True).to_parquet(folder / PRODUCTS, index=False)
    manifest = {**meta, "products": len(products), "dim": int(item_embeddings.shape[1]),
                "files": _checksums(folder)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    return folder


def verify(folder: Path) -> dict[str, Any]:
    """Check every file against the manifest.

    Raises:
        BundleError: missing manifest, missing file or checksum mismatch (named).
    """
    path = folder / MANIFEST
    if not path.exists():
        raise BundleError(f"no {MANIFEST} in {folder}: not a shoprec bundle")
    manifest = json.loads(path.read_text())
    for name, expected in manifest.get("files", {}).items():
        file = folder / name
        if not file.exists():
            raise BundleError(f"bundle {folder}: {name} is missing")
        actual = _sha256(file)
        if actual != expected:
            raise BundleError(f"bundle {folder}: checksum mismatch for {name} "
                              f"(manifest {expected[:12]}, file {actual[:12]}); refusing to load")
    return manifest


@dataclass(frozen=True)
class Recommendation:
    product_id: str
    title: str
    score: float
    reason: str


@dataclass(frozen=True)
class Bundle:
    """One model version, loaded: immutable; requests read it, reloads replace it."""

    name: str
    version: str
    run_id: str
    manifest: dict[str, Any]
    model: Any
    products: pd.DataFrame  # indexed by row, aligned with item_embeddings
    item_embeddings: np.ndarray  # (N, D)
    index: Any
    index_meta: dict[str, Any]
    item_row: dict[str, int] = field(repr=False)

    @property
    def size(self) -> int:
        return len(self.products)

    def popular(self, k: int, exclude: set[str] = frozenset()) -> list[Recommendation]:
        """Most popular products (purchases in the trailing window), for cold users."""
        order = self.products.sort_values(["popularity", "product_id"],
                                          ascending=[False, True], kind="stable")
        out = []
        for row in order.itertuples():
            if row.product_id in exclude:
                continue
            out.append(Recommendation(row.product_id, row.title, float(row.popularity),
                                      "popular with shoppers this month"))
            if len(out) == k:
                break
        return out

    def recommend(self, history: list[str], event_types: list[str] | None, k: int,
                  exclude: set[str] = frozenset()) -> list[Recommendation]:
        """Top-k products for a user with this history (most recent last).

        Users with no known product in their history get the popular products.
        """
        from training.towers import encode_users

        known = [p for p in history if p in self.item_row]
        if not known:
            return self.popular(k, exclude)
        user = encode_users(self.model, [history], [event_types] if event_types else None,
                            self.item_row, self.item_embeddings)  # (1, D)
        fetch = min(self.size, k + len(exclude))
        scores, rows = self.index.search(user.astype(np.float32), fetch)  # (1, fetch)
        recent = [self.item_row[p] for p in known[-20:]]
        recent_emb = self.item_embeddings[recent]  # (R, D)
        out = []
        for score, row in zip(scores[0], rows[0], strict=True):
            if row < 0:
                continue
            product = self.products.iloc[int(row)]
            if product.product_id in exclude:
                continue
            # Explain by the recent product the result is closest to.
            anchor = recent[int(np.argmax(recent_emb @ self.item_embeddings[int(row)]))]
            anchor_title = self.products.iloc[anchor].title
            reason = ("you viewed it recently" if anchor == row
                      else f"similar to {anchor_title!s}")
            out.append(Recommendation(product.product_id, product.title, float(score), reason))
            if len(out) == k:
                break
        return out


def load_bundle(model_dir: Path, index_dir: Path, *, name: str, version: str,
                run_id: str) -> Bundle:
    """Verify and load a bundle from its two artifact folders.

    Raises:
        BundleError: checksum mismatch, missing index, or index/embeddings disagreement.
    """
    from serving.index import load_index, to_device
    from training.checkpoint import load_model

    manifest = verify(model_dir)
    index_path = index_dir / INDEX_FILE
    meta_path = index_dir / INDEX_META
    if not index_path.exists() or not meta_path.exists():
        raise BundleError(f"version {version} has no FAISS index in {index_dir}")
    index_meta = json.loads(meta_path.read_text())
    if index_meta.get("sha256") != _sha256(index_path):
        raise BundleError(f"version {version}: index checksum mismatch; refusing to load")
    model, _config = load_model(model_dir / MODEL_DIR)
    model.eval()
    products = pd.read_parquet(model_dir / PRODUCTS)
    embeddings = np.load(model_dir / EMBEDDINGS)
    index = load_index(index_path)
    if index.ntotal != len(products):
        raise BundleError(f"version {version}: index holds {index.ntotal} vectors for "
                          f"{len(products)} products")
    return Bundle(
        name=name, version=version, run_id=run_id, manifest=manifest, model=model,
        products=products, item_embeddings=embeddings, index=to_device(index),
        index_meta=index_meta,
        item_row={p: i for i, p in enumerate(products["product_id"])},
    )
