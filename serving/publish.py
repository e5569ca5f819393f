"""Publishing a model version for serving: its FAISS index, and fetching bundles back.

``build_index_for_version`` is the pipeline's index step; ``load_version_bundle`` is what the
server calls to load the champion (or any version).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from serving.bundle import EMBEDDINGS, INDEX_FILE, INDEX_META, MANIFEST, Bundle, BundleError
from core.settings import Settings
from training.registry import alias_version, mlflow_client

log = logging.getLogger(__name__)

RECALL_SAMPLE = 500
RECALL_K = 50


def _find_bundle(folder: Path) -> Path:
    manifests = sorted(folder.rglob(MANIFEST))
    if not manifests:
        raise BundleError(f"no bundle manifest under {folder}")
    return manifests[0].parent


def download_model_bundle(settings: Settings, *, run_id: str) -> Path:
    """Download (once) the bundle logged by a training run and return its folder."""
    import mlflow

    client = mlflow_client(settings)
    target = settings.cache_dir / "bundles" / run_id
    if not (target / ".complete").exists():
        target.mkdir(parents=True, exist_ok=True)
        run = client.get_run(run_id)
        outputs = getattr(getattr(run, "outputs", None), "model_outputs", None) or []
        uri = f"models:/{outputs[0].model_id}" if outputs else f"runs:/{run_id}/model"
        mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target))
        (target / ".complete").touch()
    return _find_bundle(target)


def build_index_for_version(settings: Settings, version: str) -> dict[str, Any]:
    """Build the catalogue's FAISS index for a model version and store it with the version.

    The index is checked against exact search (recall@50 on a sample of catalogue vectors)
    and refused below ``settings.index_min_recall``.

    Returns:
        {"version", "index_kind", "size", "recall_at_50"} for XCom.
    """
    import mlflow

    from serving.index import build_index, measure_recall, save_index

    client = mlflow_client(settings)
    mv = client.get_model_version(settings.model_name, version)
    folder = download_model_bundle(settings, run_id=mv.run_id)
    embeddings = np.load(folder / EMBEDDINGS)  # (N, D)
    index, kind = build_index(embeddings, ann_threshold=settings.index_exact_max)
    rng = np.random.default_rng(0)
    sample = embeddings[rng.choice(len(embeddings), min(RECALL_SAMPLE, len(embeddings)),
                                   replace=False)]
    recall = measure_recall(index, embeddings, sample, k=RECALL_K)
    if recall < settings.index_min_recall:
        raise RuntimeError(f"{kind} index recall@{RECALL_K} {recall:.3f} < "
                           f"{settings.index_min_recall} (SHOPREC_INDEX_MIN_RECALL); "
                           "not stored, the version cannot serve")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / INDEX_FILE
        save_index(index, path)
        meta = {"kind": kind, "size": int(index.ntotal), "dim": int(embeddings.shape[1]),
                f"recall_at_{RECALL_K}": recall, "version": str(version),
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        (Path(tmp) / INDEX_META).write_text(json.dumps(meta, indent=2))
        client.log_artifacts(mv.run_id, tmp, artifact_path="index")
    with mlflow.start_run(run_id=mv.run_id):
        mlflow.log_metrics({f"index_recall_at_{RECALL_K}": recall, "index_size": index.ntotal})
    for key, value in (("shoprec.index_kind", kind), ("shoprec.index_size", index.ntotal)):
        client.set_model_version_tag(settings.model_name, version, key, str(value))
    log.info("index %s over %d products for v%s, recall@%d %.3f", kind, index.ntotal, version,
             RECALL_K, recall)
    return {"version": str(version), "index_kind": kind, "size": int(index.ntotal),
            f"recall_at_{RECALL_K}": recall}


def champion_version(settings: Settings, alias: str = "champion") -> str | None:
    """The version the alias points at now (None: no such alias)."""
    mv = alias_version(mlflow_client(settings), settings.model_name, alias)
    return None if mv is None else str(mv.version)


def load_version_bundle(settings: Settings, version: str | None = None,
                        alias: str = "champion") -> Bundle:
    """Fetch, verify and load a model version's bundle (by number, or by alias).

    Raises:
        BundleError: no such version/alias, no index yet, or a checksum mismatch.
    """
    import mlflow

    from serving.bundle import load_bundle

    client = mlflow_client(settings)
    name = settings.model_name
    mv = (client.get_model_version(name, version) if version is not None
          else alias_version(client, name, alias))
    if mv is None:
        raise BundleError(f"model {name} has no version with alias {alias!r} yet")
    model_dir = download_model_bundle(settings, run_id=mv.run_id)
    index_dir = settings.cache_dir / "bundles" / mv.run_id / "index"
    if not (index_dir / INDEX_META).exists():
        try:
            mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="index",
                                                dst_path=str(index_dir.parent))
        except Exception as exc:  # MLflow raises several types for a missing artifact
            raise BundleError(f"version {mv.version} has no index artifact: {exc}") from exc
    return load_bundle(model_dir, index_dir, name=name, version=str(mv.version),
                       run_id=mv.run_id)
