"""The serving bundle: checksummed files, refusal of tampered ones, and what it recommends."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from serving.bundle import (
    EMBEDDINGS,
    MANIFEST,
    PRODUCTS,
    Bundle,
    BundleError,
    load_bundle,
    verify,
    write_bundle,
)
from training.config import TrainConfig
from training.data import train_data
from training.index import build_indexes, save_indexes
from training.ranking.config import ScorerConfig
from training.ranking.histories import Histories
from training.ranking.scorer import Scorer
from training.train import TrainResult, train

pytestmark = pytest.mark.fast

CATEGORIES = ["candles", "mugs", "toys"]
PER_CATEGORY = 4
CONFIG = TrainConfig(
    text_encoder="tiny", device="cpu", epochs=1, batch_size=16, embedding_dim=8,
    hidden_dim=16, category_dim=4, brand_dim=4, history_len=5, min_examples=2,
)
SCORER = ScorerConfig(neighbours=4, als_factors=4, als_iterations=2)
CUT = pd.Timestamp("2026-01-03", tz="UTC")


def _catalog() -> pd.DataFrame:
    return pd.DataFrame([
        {"product_id": f"{c}-{j}", "title": f"{c.title()} product {j}", "description": None,
         "category": c, "brand": f"brand-{j % 2}", "price": float(2 + j), "image_url": None,
         "updated_at": pd.Timestamp("2026-01-01", tz="UTC")}
        for c in CATEGORIES for j in range(PER_CATEGORY)
    ])


def _examples() -> pd.DataFrame:
    rows = []
    for u in range(24):
        c = CATEGORIES[u % len(CATEGORIES)]
        rows.append({
            "user_id": f"u{u}", "product_id": f"{c}-{(u + 1) % PER_CATEGORY}",
            "event_timestamp": pd.Timestamp("2026-01-02", tz="UTC") + pd.Timedelta(minutes=u),
            "recent_product_ids": [f"{c}-{u % PER_CATEGORY}"], "recent_event_types": ["view"],
        })
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def trained() -> TrainResult:
    return train(CONFIG, _catalog(), _examples(), progress=False)


def _events() -> pd.DataFrame:
    """The examples as events: a view of the history product, then the purchase."""
    rows = []
    for ex in _examples().itertuples():
        for kind, product, ts in (("view", ex.recent_product_ids[0],
                                   ex.event_timestamp - pd.Timedelta(minutes=30)),
                                  ("purchase", ex.product_id, ex.event_timestamp)):
            rows.append({"event_id": f"{ex.user_id}-{kind}", "user_id": ex.user_id,
                         "product_id": product, "event_type": kind, "query": None,
                         "quantity": 1, "price": 1.0, "ts": ts})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def scorer(trained: TrainResult) -> Scorer:
    return Scorer(SCORER, trained.model, CONFIG).fit_items(
        train_data(_events(), _catalog(), CUT))


def _products(scorer: Scorer) -> pd.DataFrame:
    catalog = _catalog().set_index("product_id").loc[scorer.state.product_ids].reset_index()
    return pd.DataFrame({
        "product_id": catalog["product_id"], "title": catalog["title"],
        "category": catalog["category"], "brand": catalog["brand"], "price": catalog["price"],
        "popularity": scorer.state.facts["popularity"],
    })


@pytest.fixture(scope="module")
def bundle_dir(trained: TrainResult, scorer: Scorer,
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bundle") / "bundle"
    return write_bundle(folder, model=trained.model, config=CONFIG, scorer=scorer,
                        products=_products(scorer), item_embeddings=scorer.state.embeddings,
                        meta={"interval": "2026-01-02", "model_name": "test"})


def _write_index(folder: Path, scorer: Scorer, exact_max: int = 50_000) -> Path:
    """An index folder as serving.publish.build_index_for_version writes it."""
    indexes = build_indexes(scorer.state.matrices(), exact_max)
    for index in indexes.values():
        index.measure_recall()
    save_indexes(indexes, folder)
    return folder


@pytest.fixture(scope="module")
def index_dir(scorer: Scorer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_index(tmp_path_factory.mktemp("index"), scorer)


@pytest.fixture(scope="module")
def bundle(bundle_dir: Path, index_dir: Path) -> Bundle:
    return load_bundle(bundle_dir, index_dir, name="test", version="3", run_id="r1")


def _copy(bundle_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle_dir, tmp_path / "copy"))


# --- writing and verifying -------------------------------------------------------------


def test_manifest_lists_every_file_with_its_checksum(bundle_dir: Path,
                                                     trained: TrainResult) -> None:
    manifest = verify(bundle_dir)
    assert manifest["interval"] == "2026-01-02" and manifest["model_name"] == "test"
    assert manifest["products"] == len(CATEGORIES) * PER_CATEGORY
    assert manifest["dim"] == CONFIG.embedding_dim
    files = {str(p.relative_to(bundle_dir)) for p in bundle_dir.rglob("*")
             if p.is_file() and p.name != MANIFEST}
    assert set(manifest["files"]) == files
    assert {EMBEDDINGS, PRODUCTS, "model/model.safetensors", "scorer/scorer.pkl",
            "scorer/pair_scorers.pt"} <= files
    assert manifest["files"][EMBEDDINGS] == hashlib.sha256(
        (bundle_dir / EMBEDDINGS).read_bytes()).hexdigest()
    # the catalogue under the trained model: the same vectors training produced
    np.testing.assert_allclose(np.load(bundle_dir / EMBEDDINGS), trained.item_embeddings,
                               atol=1e-5)


def test_flipped_byte_is_refused_naming_the_file(bundle_dir: Path, tmp_path: Path) -> None:
    folder = _copy(bundle_dir, tmp_path)
    path = folder / EMBEDDINGS
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one bit of the last float: np.load would happily read it
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"checksum mismatch for item_embeddings\.npy"):
        verify(folder)


def test_missing_file_is_refused_naming_the_file(bundle_dir: Path, tmp_path: Path) -> None:
    folder = _copy(bundle_dir, tmp_path)
    (folder / PRODUCTS).unlink()
    with pytest.raises(BundleError, match=r"products\.parquet is missing"):
        verify(folder)


def test_folder_without_manifest_is_not_a_bundle(bundle_dir: Path, tmp_path: Path) -> None:
    folder = _copy(bundle_dir, tmp_path)
    (folder / MANIFEST).unlink()
    with pytest.raises(BundleError, match="not a shoprec bundle"):
        verify(folder)


def test_products_and_embeddings_must_align(trained: TrainResult, scorer: Scorer,
                                            tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="11 products for 12 embeddings"):
        write_bundle(tmp_path / "b", model=trained.model, config=CONFIG, scorer=scorer,
                     products=_products(scorer).iloc[:11],
                     item_embeddings=scorer.state.embeddings, meta={})
    with pytest.raises(ValueError, match="item side and the product table disagree"):
        write_bundle(tmp_path / "c", model=trained.model, config=CONFIG, scorer=scorer,
                     products=_products(scorer).iloc[::-1],
                     item_embeddings=scorer.state.embeddings, meta={})


# --- loading ---------------------------------------------------------------------------


def test_load_bundle_reads_what_was_written(bundle: Bundle, trained: TrainResult) -> None:
    assert (bundle.name, bundle.version, bundle.run_id) == ("test", "3", "r1")
    assert bundle.size == 12
    assert {n: (i.kind, i.size, i.recall) for n, i in bundle.indexes.items()} == {
        n: ("exact", 12, 1.0) for n in ("two_tower", "text", "als", "sequence")}
    assert bundle.scorer.state.indexes() is not None
    assert all(bundle.scorer.state.indexes()[n] is i for n, i in bundle.indexes.items())
    assert list(bundle.products["product_id"]) == trained.product_ids
    assert bundle.item_row == trained.item_index
    assert bundle.item_row is bundle.scorer.state.item_index  # the same order: one map, shared
    assert bundle.scorer.state.product_ids == trained.product_ids
    np.testing.assert_allclose(bundle.item_embeddings, trained.item_embeddings, atol=1e-5)


def test_item_rows_follow_the_product_table_when_its_order_differs(bundle: Bundle) -> None:
    from serving.bundle import _item_rows

    state = bundle.scorer.state
    reordered = bundle.products.iloc[::-1].reset_index(drop=True)
    rows = _item_rows(reordered, state)
    assert rows is not state.item_index
    assert rows == {p: i for i, p in enumerate(reordered["product_id"])}


def test_load_bundle_refuses_a_tampered_model_folder(bundle_dir: Path, index_dir: Path,
                                                     tmp_path: Path) -> None:
    folder = _copy(bundle_dir, tmp_path)
    weights = folder / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model/model\.safetensors"):
        load_bundle(folder, index_dir, name="test", version="3", run_id="r1")


def test_index_not_matching_its_checksum_is_refused(bundle_dir: Path, index_dir: Path,
                                                    scorer: Scorer, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(index_dir, tmp_path / "index"))
    # Swap in another index over the same number of vectors; indexes.json has the old hash.
    other = tmp_path / "other"
    save_indexes(build_indexes({"text": np.eye(12, 8, dtype=np.float32)}), other)
    shutil.copy(other / "text.faiss", folder / "text.faiss")
    with pytest.raises(BundleError, match="text.faiss is missing or its checksum differs"):
        load_bundle(bundle_dir, folder, name="test", version="3", run_id="r1")


def test_index_of_the_wrong_size_is_refused(bundle_dir: Path, scorer: Scorer,
                                            tmp_path: Path) -> None:
    matrices = scorer.state.matrices()
    indexes = build_indexes({**matrices, "als": matrices["als"][:10]})
    save_indexes(indexes, tmp_path / "index")  # checksums fine, size not
    with pytest.raises(BundleError, match="the als index holds 10 vectors for 12 products"):
        load_bundle(bundle_dir, tmp_path / "index", name="test", version="3", run_id="r1")


def test_missing_index_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no indexes.json"):
        load_bundle(bundle_dir, tmp_path, name="test", version="3", run_id="r1")


def test_hnsw_indexes_serve_similar_and_recommend(bundle_dir: Path, bundle: Bundle,
                                                  scorer: Scorer, tmp_path: Path) -> None:
    ann = load_bundle(bundle_dir, _write_index(tmp_path / "ann", scorer, exact_max=4),
                      name="test", version="3", run_id="r1")
    assert {i.kind for i in ann.indexes.values()} == {"hnsw"}
    searches = {n: i.searches for n, i in ann.indexes.items()}
    assert [r.product_id for r in ann.similar("mugs-1", 5)] == \
        [r.product_id for r in bundle.similar("mugs-1", 5)]
    ann.recommend(_history(["mugs-1", "mugs-2"], ["purchase", "add_to_cart"]), 5)
    assert all(ann.indexes[n].searches > searches[n] for n in ann.indexes)


# --- recommending ----------------------------------------------------------------------


def _history(products: list[str], types: list[str] | None = None) -> Histories:
    types = types or ["view"] * len(products)
    stamps = [CUT.timestamp() - 3600.0 * (len(products) - i) for i in range(len(products))]
    return Histories([products], [types], [np.asarray(stamps)])


def _exact_ranking(bundle: Bundle, history: Histories, **kwargs) -> list[str]:
    scores = bundle.scorer.scores(history, CUT.timestamp(), **kwargs)[0]  # (N,)
    order = np.lexsort((np.arange(len(scores)), -scores))
    return [bundle.products["product_id"].iloc[i] for i in order if np.isfinite(scores[i])]


def test_recommend_returns_k_distinct_scored_explained_products(bundle: Bundle) -> None:
    history = _history(["mugs-0", "mugs-1"], ["view", "purchase"])
    recs, cold = bundle.recommend(history, k=5)
    ids = [r.product_id for r in recs]
    assert not cold
    assert len(ids) == 5 and len(set(ids)) == 5
    assert ids == _exact_ranking(bundle, history)[:5]
    scores = [r.score for r in recs]
    assert all(np.isfinite(scores)) and scores == sorted(scores, reverse=True)
    titles = dict(zip(bundle.products["product_id"], bundle.products["title"], strict=True))
    allowed = {"you bought it before", "trending this week", "popular with shoppers this month",
               *(f"{how} Mugs product {j}" for how in ("often bought with", "similar to")
                 for j in (0, 1))}
    for r in recs:
        assert r.title == titles[r.product_id]
        assert r.reason in allowed
    reasons = {r.product_id: r.reason for r in bundle.recommend(history, k=12)[0]}
    assert reasons["mugs-1"] == "you bought it before"
    assert reasons["mugs-0"] != "you bought it before"  # viewed, not bought


def test_recommend_excludes_products_and_purchases(bundle: Bundle) -> None:
    history = _history(["toys-1", "candles-2"], ["view", "purchase"])
    top = [r.product_id for r in bundle.recommend(history, k=4)[0]]
    exclude = set(top[:2]) | {"mugs-3"}
    recs, _ = bundle.recommend(history, k=4, exclude=exclude)
    ids = [r.product_id for r in recs]
    assert len(ids) == 4 and len(set(ids)) == 4
    assert not exclude & set(ids)
    fresh = [r.product_id for r in bundle.recommend(history, k=11, exclude_purchased=True)[0]]
    assert "candles-2" not in fresh and len(fresh) == 11
    assert fresh == _exact_ranking(bundle, history, exclude_purchased=True)[:11]


@pytest.mark.parametrize("products", [[], ["not-in-catalogue", "nor-this"]])
def test_user_without_known_history_is_cold(bundle: Bundle, products: list[str]) -> None:
    recs, cold = bundle.recommend(_history(products), k=4)
    assert cold
    assert [r.product_id for r in recs] == _exact_ranking(bundle, Histories.empty(1))[:4]
    assert all(r.reason in {"trending this week", "popular with shoppers this month"}
               for r in recs)
    skipped, _ = bundle.recommend(_history(products), k=3, exclude={recs[0].product_id})
    assert [r.product_id for r in skipped] == [r.product_id for r in recs[1:4]]


def test_query_vectors_are_cached_per_normalised_query_and_read_only() -> None:
    from serving.query_encoder import QueryEncoder

    encoder = QueryEncoder(CONFIG, cache_size=8)
    first = encoder.encode("heart  candle")
    again = encoder.encode(" heart candle ")
    assert again is first and not first.flags.writeable
    info = encoder.cache_info()
    assert (info.hits, info.misses) == (1, 1)
    uncached = QueryEncoder(CONFIG, cache_size=0)
    np.testing.assert_allclose(uncached.encode("heart candle"), first, rtol=1e-5)
    assert uncached.cache_info() is None


def test_warm_runs_every_request_path_and_keeps_no_warm_up_query(bundle: Bundle) -> None:
    from serving.runtime import WARM_QUERIES, warm

    spent = warm(bundle, rounds=1)
    assert {"pages", "recommend", "similar", "complementary", "search"} <= set(spent)
    assert all(seconds >= 0 for seconds in spent.values())
    encoder = bundle.query_encoder
    if encoder is not None:  # the shop's queries, not the warm-up's, are kept
        encoder.forget(list(WARM_QUERIES))
        bundle.search("a shopper's query", 3)  # kept: a real one
        warm(bundle, rounds=1)
        assert all(encoder.cached(q) is None for q in WARM_QUERIES)
        assert encoder.cached("a shopper's query") is not None  # the shared cache survives
        bundle.search(WARM_QUERIES[0], 3)
        assert encoder.cached(WARM_QUERIES[0]) is not None


def test_thread_limits_hold_while_serving_and_are_restored() -> None:
    import faiss
    import torch
    from threadpoolctl import threadpool_info

    from serving.runtime import ThreadLimits

    torch_before, faiss_before = torch.get_num_threads(), faiss.omp_get_max_threads()
    pools_before = [p["num_threads"] for p in threadpool_info()]
    limits = ThreadLimits(1)
    try:
        assert torch.get_num_threads() == 1
        assert faiss.omp_get_max_threads() == 1
        assert all(p["num_threads"] == 1 for p in threadpool_info())
    finally:
        limits.restore()
    assert torch.get_num_threads() == torch_before
    assert faiss.omp_get_max_threads() == faiss_before
    assert [p["num_threads"] for p in threadpool_info()] == pools_before
    ThreadLimits(0).restore()  # 0: the libraries' own choice, nothing to undo
    assert torch.get_num_threads() == torch_before


def _row(products: list[str], types: list[str]) -> dict:
    stamps = [int(CUT.timestamp()) - 3600 * (len(products) - i) for i in range(len(products))]
    return {"recent_product_ids": products, "recent_event_types": types,
            "recent_timestamps": stamps, "purchased_product_ids": None}


def test_a_users_views_are_kept_per_row_and_a_changed_row_is_computed_again(
        bundle: Bundle) -> None:
    bundle._views(Histories.from_row(_row(["mugs-0"], ["view"])), CUT.timestamp())
    cache = bundle.__dict__["_view_cache"]  # made by the first call
    cache.clear()
    row = _row(["mugs-0", "toys-1"], ["view", "purchase"])
    first = bundle.recommend(Histories.from_row(row), k=6)
    assert (cache.hits, cache.misses) == (0, 1)
    again = bundle.recommend(Histories.from_row(dict(row)), k=6)  # the same row, read again
    assert again == first and (cache.hits, cache.misses) == (1, 1)
    history = Histories.from_row(row)
    uncached = Histories(history.products, history.event_types, history.timestamps)
    assert bundle.recommend(history, k=6, category="candles")[0] == \
        bundle.recommend(uncached, k=6, category="candles")[0]  # cached views filter alike
    assert [r.product_id for r in bundle.recommend(history, k=6, exclude_purchased=True)[0]] \
        == _exact_ranking(bundle, history, exclude_purchased=True)[:6]
    hits = cache.hits
    changed = Histories.from_row(_row(["mugs-0", "toys-1", "candles-3"],
                                      ["view", "purchase", "view"]))  # an event arrived
    assert changed.digests != history.digests
    bundle.recommend(changed, k=6)
    assert cache.hits == hits and cache.misses == 2


def test_loads_pause_the_collector_and_swaps_shorten_gil_slices() -> None:
    import gc
    import sys

    from serving.runtime import no_gc_pauses, short_gil_slices

    frozen = gc.get_freeze_count()
    with no_gc_pauses():
        assert not gc.isenabled()
        kept = [[i] for i in range(1000)]  # what a load allocates and keeps
    assert gc.isenabled() and gc.get_freeze_count() >= frozen + len(kept)
    before = sys.getswitchinterval()
    with short_gil_slices(0.0005):
        assert sys.getswitchinterval() == pytest.approx(0.0005)
    assert sys.getswitchinterval() == before


def test_readiness_waits_for_every_worker_of_the_server(tmp_path: Path) -> None:
    from serving.runtime import WorkerReadiness

    assert WorkerReadiness(2).ready() == (1, 1)  # not a worker of a multi-process server
    readiness = WorkerReadiness(2, folder=tmp_path / "workers")
    readiness.workers = 2  # as in a uvicorn worker
    assert readiness.ready() == (0, 2)
    readiness.mark_ready()
    assert readiness.ready() == (1, 2)
    (tmp_path / "workers" / "999999999").touch()  # a worker that died: not counted, removed
    assert readiness.ready() == (1, 2)
    assert not (tmp_path / "workers" / "999999999").exists()
    (tmp_path / "workers" / "1").touch()  # pid 1 is alive: another worker, ready
    assert readiness.ready() == (2, 2)
    readiness.unmark()
    assert readiness.ready() == (1, 2)


def test_concurrent_queries_are_encoded_together_with_the_same_vectors() -> None:
    import asyncio

    from serving.query_encoder import QueryEncoder
    from serving.runtime import QueryBatcher

    encoder = QueryEncoder(CONFIG, cache_size=0)
    texts = ["heart candle", "red mug for tea", "toy", "heart candle", "a much longer query "
             "about a blue enamel mug"]
    alone = [encoder.encode(t) for t in texts]
    batcher = QueryBatcher(max_batch=3)

    async def together() -> list[np.ndarray]:
        return await asyncio.gather(*(batcher.encode(encoder, t) for t in texts))

    vectors = asyncio.run(together())
    for got, want in zip(vectors, alone, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)  # padding is masked out
    assert batcher.queries == len(texts) and batcher.batches == 2  # 3 + 2, not 5 passes
    kept = QueryEncoder(CONFIG, cache_size=8)
    first = asyncio.run(QueryBatcher().encode(kept, "heart  candle"))
    assert kept.cached("heart candle") is first  # kept: the next request skips the encoder


def test_workers_load_bundles_one_at_a_time(tmp_path: Path) -> None:
    import threading
    import time

    from serving.runtime import WorkerReadiness

    first, second = (WorkerReadiness(2, folder=tmp_path / "w") for _ in range(2))
    first.workers = second.workers = 2  # as in two uvicorn workers
    order: list[str] = []

    def load(worker: WorkerReadiness, name: str) -> None:
        with worker.one_loader():
            order.append(f"{name} in")
            time.sleep(0.2)
            order.append(f"{name} out")

    with first.one_loader():
        other = threading.Thread(target=load, args=(second, "second"))
        other.start()
        time.sleep(0.1)
        assert order == []  # the second worker waits for the first one's load
    other.join()
    assert order == ["second in", "second out"]
