"""Publishing a model version for serving: its retrieval indexes, and fetching bundles back.

``build_index_for_version`` is the pipeline's index step; ``load_version_bundle`` is what the
server calls to load the champion (or any version).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from core.settings import Settings
from serving.bundle import MANIFEST, PRODUCTS, SCORER_DIR, Bundle, BundleError
from serving.search import save_lexical
from training.index import INDEX_META
from training.ranking.scorer import Scorer
from training.registry import alias_version, mlflow_client

log = logging.getLogger(__name__)


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


def index_cache(settings: Settings, run_id: str) -> Path:
    """Where this machine keeps its copy of a run's ``index/`` artifacts."""
    return settings.cache_dir / "bundles" / run_id / "index"


def build_index_for_version(settings: Settings, version: str) -> dict[str, Any]:
    """Build the retrieval index of every vector space of a model version (two-tower, text,
    ALS: ``training.index``), check each against exact search and store them with the
    version (run artifacts ``index/``).

    Exact below ``settings.index_exact_max`` products, HNSW above; an index whose
    recall@50 (a seeded sample of catalogue vectors as queries) is under
    ``settings.index_min_recall`` is refused, and nothing is stored.

    Returns:
        {"version", "index_kind", "size", "recall_at_50", "indexes"} for XCom: the two-tower
        index's kind, size and recall (what ``/similar`` reads), and every index's info.
    """
    import mlflow

    from training.index import RECALL_K, build_indexes, save_indexes

    client = mlflow_client(settings)
    mv = client.get_model_version(settings.model_name, version)
    folder = download_model_bundle(settings, run_id=mv.run_id)
    scorer = Scorer.load(folder / SCORER_DIR)
    indexes = build_indexes(scorer.state.matrices(), settings.index_exact_max)
    for name, index in indexes.items():
        recall = index.measure_recall()
        log.info("index %s: %s over %d products for v%s, recall@%d %.3f", name, index.kind,
                 index.size, version, RECALL_K, recall)
        if recall < settings.index_min_recall:
            raise RuntimeError(f"{name} {index.kind} index recall@{RECALL_K} {recall:.3f} < "
                               f"{settings.index_min_recall} (SHOPREC_INDEX_MIN_RECALL); "
                               "not stored, the version cannot serve")
    with tempfile.TemporaryDirectory() as tmp:
        meta = save_indexes(indexes, Path(tmp))
        # the lexical side of /search, so that a server's load does not tokenize the catalogue
        lexical = save_lexical(pd.read_parquet(folder / PRODUCTS), Path(tmp))
        client.log_artifacts(mv.run_id, tmp, artifact_path="index")
    # A rebuilt version must not be served from this machine's copy of its old indexes.
    shutil.rmtree(index_cache(settings, mv.run_id), ignore_errors=True)
    main = indexes.get("two_tower") or next(iter(indexes.values()))
    with mlflow.start_run(run_id=mv.run_id):
        mlflow.log_metrics({f"index_recall_at_{RECALL_K}_{name}": index.recall
                            for name, index in indexes.items()} | {"index_size": main.size})
    for key, value in (("shoprec.index_kind", main.kind), ("shoprec.index_size", main.size),
                       ("shoprec.indexes", ", ".join(f"{n}={i.kind}" for n, i in
                                                     indexes.items()))):
        client.set_model_version_tag(settings.model_name, version, key, str(value))
    return {"version": str(version), "index_kind": main.kind, "size": main.size,
            f"recall_at_{RECALL_K}": main.recall,
            "indexes": {name: {k: v for k, v in info.items() if k != "sha256"}
                        for name, info in meta.items()},
            "lexical": {k: v for k, v in lexical.items() if k != "sha256"}}


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
    index_dir = index_cache(settings, mv.run_id)
    if not (index_dir / INDEX_META).exists():
        try:
            mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="index",
                                                dst_path=str(index_dir.parent))
        except Exception as exc:  # MLflow raises several types for a missing artifact
            raise BundleError(f"version {mv.version} has no index artifact: {exc}") from exc
    return load_bundle(model_dir, index_dir, name=name, version=str(mv.version),
                       run_id=mv.run_id)
