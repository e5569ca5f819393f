"""Where the serving time goes: the endpoints' work timed piece by piece, in this process.

The same kinds of requests as the load runs, one at a time and without HTTP, on the champion
bundle and the online store the server uses: feature fetch, history frame, the pieces of
``Scorer.rank`` re-run one by one (user view, candidates, their features, the pair scorer,
top-k, reasons), /similar's index search, /search's encoding, lexical and semantic parts.
A piece the serving code lacks (it is being extended) is reported as unavailable instead of
failing the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from _serving_driver import K, Targets
from _serving_load import percentile

# The row of each endpoint's whole bundle call: the summary's in-process column.
TOTALS = {"recommend": "bundle.recommend (total)", "similar": "bundle.similar (total)",
          "search": "bundle.search (total)"}


class Stopwatch:
    """Per-piece wall times over many requests (ms)."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}
        self.unavailable: dict[str, str] = {}

    def time(self, name: str, fn: Callable[[], Any]) -> Any:
        """Call ``fn`` and record its wall time under ``name``; returns its value (None when
        the piece is unavailable)."""
        if name in self.unavailable:
            return None
        started = time.perf_counter()
        try:
            value = fn()
        except (AttributeError, TypeError, NotImplementedError) as exc:
            # the serving code is being extended: report a piece it lacks instead of failing
            self.unavailable[name] = f"{type(exc).__name__}: {exc}"
            return None
        self.times.setdefault(name, []).append((time.perf_counter() - started) * 1e3)
        return value

    def add(self, name: str, ms: float) -> None:
        """Record a figure measured elsewhere under ``name``."""
        self.times.setdefault(name, []).append(ms)

    def rows(self) -> list[dict[str, Any]]:
        """One row per piece: count, mean, p50 and p99 (ms), or why it is unavailable."""
        out = [{"piece": name, "n": len(v), "mean_ms": sum(v) / len(v),
                "p50_ms": percentile(v, 50), "p99_ms": percentile(v, 99)}
               for name, v in self.times.items()]
        out += [{"piece": name, "n": 0, "unavailable": why}
                for name, why in self.unavailable.items()]
        return out


def breakdown(settings: Any, targets: Targets, n: int,
              torch_threads: int | None = None) -> dict[str, Any]:
    """Time each piece of the three endpoints' work in this process (the first ``n`` targets
    of each, one request at a time, no HTTP), on the champion bundle and the online store the
    server uses. Returns the bundle's figures and one list of ``Stopwatch.rows`` per
    endpoint (/recommend split into users with a known history and cold ones)."""
    import torch

    from features.store import feature_store
    from serving.publish import load_version_bundle

    if torch_threads:
        torch.set_num_threads(torch_threads)
    else:  # as the server runs: SHOPREC_SERVING_THREADS per process
        from serving.runtime import ThreadLimits

        ThreadLimits(settings.serving_threads)
    started = time.perf_counter()
    bundle = load_version_bundle(settings)
    load_s = time.perf_counter() - started
    store = feature_store(settings)
    out: dict[str, Any] = {"bundle_load_s": load_s, "catalogue": bundle.size,
                           "indexes": {name: index.info() for name, index in
                                       bundle.indexes.items()},
                           "torch_threads": torch.get_num_threads()}
    out["recommend_known"], out["recommend_cold"] = recommend_pieces(bundle, store,
                                                                     targets.users[:n])
    out["similar"] = similar_pieces(bundle, targets.products[:n])
    out["search"] = search_pieces(bundle, targets.queries[:n])
    return out


def recommend_pieces(bundle: Any, store: Any, users: list[str]
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """/recommend's pieces for ``users``: rows for users with a catalogue product in their
    history (whose ranking is also re-run piece by piece), and rows for cold users."""

    from features.store import OnlineUserReader, online_user_history
    from training.ranking.histories import Histories

    try:
        from serving.schemas import RecommendedItem
    except ImportError:
        RecommendedItem = None  # noqa: N806
    reader = OnlineUserReader(store)
    known_watch, cold_watch = Stopwatch(), Stopwatch()
    for user in users[:5]:  # warm caches (Feast registry, torch, faiss) before timing
        bundle.recommend(Histories.from_row(reader.read([user])[user]), K)
    for user in users:
        fetch_w = Stopwatch()
        row = fetch_w.time("feature fetch (OnlineUserReader, as served)",
                           lambda u=user: reader.read([u], vectors=False)[u])
        fetch_w.time("  for comparison: Feast get_online_features",
                     lambda u=user: online_user_history(store, [u])[u])
        served = fetch_w.time("history (Histories.from_row, as served)",
                              lambda r=row: Histories.from_row(r))
        # without its row digest: the bundle computes the user's view (a first request)
        history = Histories(served.products, served.event_types, served.timestamps,
                            served.profiles, served.purchased, profile_row=served.profile_row)
        known = any(p in bundle.item_row for p in history.products[0])
        watch = known_watch if known else cold_watch
        for name, values in fetch_w.times.items():
            watch.add(name, values[0])
        result = watch.time(TOTALS["recommend"], lambda h=history: bundle.recommend(h, K))
        if known:
            # what a request that computes its view reads too: the row's stored vectors
            watch.time("  stored vectors read (a view not kept: user_vectors)",
                       lambda u=user: reader.read_vectors([u]))
            served_stored = Histories.from_row(reader.read([user])[user])
        if known and served_stored.vectors_for(bundle.identity):
            # a first request whose row carries the vectors written with it (user_vectors)
            stored = Histories(served.products, served.event_types, served.timestamps,
                               served.profiles, served.purchased,
                               profile_row=served.profile_row, stored=served_stored.stored)
            watch.time("  a first request, vectors stored with the row (user_vectors)",
                       lambda h=stored: bundle.recommend(h, K))
            rank_pieces(watch, bundle, stored, "  stored: ",
                        served_stored.vectors_for(bundle.identity))
        if known:  # the same row again: the view the bundle kept (SHOPREC_SERVING_USER_CACHE)
            bundle.recommend(served, K)
            watch.time("  the same row again (view kept by the bundle)",
                       lambda h=served: bundle.recommend(h, K))
        if result is not None and RecommendedItem is not None:
            items = result[0]
            watch.time("response items (pydantic)",
                       lambda it=items: [RecommendedItem(**vars(i)) for i in it])
        if known:
            rank_pieces(watch, bundle, history)
    return known_watch.rows(), cold_watch.rows()


def rank_pieces(watch: Stopwatch, bundle: Any, history: Any, prefix: str = "",
                stored: Any = None) -> None:
    """The pieces of ``Scorer.rank`` (and the bundle's reasons), re-run one by one on one
    user's history; stops at the first piece the scorer lacks. With ``stored`` (the
    row's ``StoredVectors``), only the view and the candidates, from them (``prefix``
    names the rows)."""
    import numpy as np

    scorer = bundle.scorer
    stamps = history.timestamps[0]
    now = max(scorer.state.cut.timestamp(),
              float(stamps[np.isfinite(stamps)].max(initial=0.0)))
    views = watch.time(f"{prefix}user view: user tower, text mean, ALS solve, co-occurrence",
                       lambda: scorer._views(history, None, stored))
    if views is None:
        return
    candidates = watch.time(f"{prefix}candidates (retrieval x3, neighbours, popular)",
                            lambda: scorer.candidates(history, views=views))
    if candidates is None or stored is not None:
        return
    watch.add("  candidates per request (count, not ms)", float(len(candidates[0])))
    built = watch.time("features of the candidates (Scorer.features)",
                       lambda: scorer.features(history, now, candidates, views))
    if built is None:
        return
    features, columns = built
    for setting in ("all", "new"):  # "new": what exclude_purchased=true ranks with
        stage = getattr(scorer, "stages", {}).get(setting, "mlp")
        ranked = watch.time(f"ranking stage, setting {setting} ({stage})",
                            lambda setting=setting: scorer._apply(setting, features, columns < 0))
        if setting == "all":
            scores = ranked
    if scores is None:
        return
    picked = watch.time("top-k", lambda: columns[0][np.lexsort((columns[0], -scores[0]))][:K])
    if picked is None:
        return
    known_rows = [bundle.item_row[p] for p in history.products[0] if p in bundle.item_row]
    watch.time("reasons (Bundle._reasons)",
               lambda: bundle._reasons([int(r) for r in picked], known_rows,
                                       history.event_types[0], history.products[0]))


def similar_pieces(bundle: Any, products: list[str]) -> list[dict[str, Any]]:
    """/similar's pieces for the catalogue products among ``products``."""
    import numpy as np

    watch = Stopwatch()
    for product in products:
        row = bundle.item_row.get(product)
        if row is None:
            continue
        query = bundle.item_embeddings[row : row + 1].astype(np.float32)
        watch.time("two-tower index search (k+1)",
                   lambda q=query: bundle.indexes["two_tower"].search(q, K + 1))
        watch.time(TOTALS["similar"], lambda p=product: bundle.similar(p, K))
    return watch.rows()


def search_pieces(bundle: Any, queries: list[str]) -> list[dict[str, Any]]:
    """/search's pieces for ``queries``: encoding, lexical and semantic parts, the whole."""
    from serving.search import tokens

    watch = Stopwatch()
    encoder = getattr(bundle, "query_encoder", None)
    index = getattr(bundle, "search_index", None)
    for query in queries:
        vector = None
        if encoder is not None:
            vector = watch.time(f"query encoding (text encoder, {encoder.kind})",
                                lambda q=query: encoder.encode(q))
        if index is not None:
            watch.time("lexical (BM25 over the catalogue)",
                       lambda q=query: index.lexical(tokens(q)))
            if vector is not None and index.retrieval is not None:
                watch.time(f"semantic candidates ({index.retrieval.kind} text index)",
                           lambda v=vector: index.retrieval.top(v[None, :], 200))
            watch.time("search index total (lexical + semantic + top-k)",
                       lambda q=query, v=vector: index.search(q, K, query_vector=v))
        watch.time(TOTALS["search"], lambda q=query: bundle.search(q, K))
    return watch.rows()
