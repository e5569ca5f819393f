"""What a serving process sets up around its bundles: thread limits and warm-up.

- ``ThreadLimits``: a request's work is a few small matrix products, an index search and a
  tiny network. With one uvicorn worker per core, letting torch, BLAS and FAISS (OpenMP) start
  a thread per core in every worker only adds threads that spin and contend: measured as
  shipped, /recommend spent 11.9 ms of CPU per request against 8.25 ms with one thread. The
  app limits them to ``SHOPREC_SERVING_THREADS`` (default 1) while it serves and restores
  the previous limits when it stops (tests run the app inside a process that trains).
- ``warm``: a bundle just loaded pays for its first requests (the Feast store's first
  read, the query encoder's first forward passes, lazily built caches and masks, the first
  calls into torch, FAISS and scipy). ``BundleSlot.load`` calls it before the bundle takes
  traffic, at start before /readyz says ready and on a swap before the reference moves, so
  those costs are paid off the request path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("shoprec.serving")

# Queries /search is warmed with: a few shapes (a word, words, a code, digits); their
# vectors are not kept (forgotten after warming, unless a shopper's query had left them).
SWAP_SWITCH_INTERVAL = 0.0005  # seconds: sys.setswitchinterval while a swap loads
WARM_QUERIES = ("gift", "red metal lantern", "set of 3 heart cake tins", "85123A", "2011")


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def worker_logging() -> bool:
    """Give a serving process the CLI's log format when nobody configured logging.

    ``shoprec serve`` configures logging in its own process, but uvicorn starts each of
    ``--workers N`` in a fresh (spawned) interpreter: without this, a worker's INFO lines
    (bundle loaded and warmed) are dropped and its warnings (stalls, degraded store) print
    without time or logger. Returns whether it configured anything.
    """
    root = logging.getLogger()
    if root.handlers:
        return False
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    return True


class ThreadLimits:
    """Limit torch, BLAS/OpenMP and FAISS to ``threads`` each (0: leave them); ``restore``
    puts back what was there."""

    def __init__(self, threads: int):
        self.threads = threads
        self._restore: list[Any] = []
        if threads <= 0:
            return
        import faiss
        import torch
        from threadpoolctl import threadpool_limits

        before_torch, before_faiss = torch.get_num_threads(), faiss.omp_get_max_threads()
        pools = threadpool_limits(limits=threads)  # BLAS and OpenMP pools of every library
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
        self._restore = [pools.restore_original_limits,
                         lambda: torch.set_num_threads(before_torch),
                         lambda: faiss.omp_set_num_threads(before_faiss)]
        log.info("serving with %d thread(s) per process for torch, BLAS and FAISS "
                 "(SHOPREC_SERVING_THREADS)", threads)

    def restore(self) -> None:
        for undo in reversed(self._restore):
            undo()
        self._restore = []


@contextlib.contextmanager
def short_gil_slices(seconds: float = SWAP_SWITCH_INTERVAL) -> Iterator[None]:
    """Let a serving thread take the GIL back sooner while a background load runs.

    A thread that wants the GIL waits until the holder drops it, at the latest after
    ``sys.getswitchinterval()`` (5 ms by default); a request that releases and retakes the
    GIL around each numpy/FAISS call can wait that long each time while another thread
    loads a bundle. Lowered to ``seconds`` for the duration, then restored.
    """
    import sys

    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, seconds))
    try:
        yield
    finally:
        sys.setswitchinterval(before)


@contextlib.contextmanager
def no_gc_pauses() -> Iterator[None]:
    """Load a bundle without the cyclic collector's pauses, then take what is alive out of
    its scans.

    A full collection walks every tracked object of the process (the frameworks, the loaded
    bundle: millions) with the GIL held; building a bundle allocates enough survivors to
    trigger several, and each stalled the serving thread for up to 0.34 s during a swap
    (``benchmarks/load_stalls.py`` at 100,000 products). The collector is paused for the
    load, and ``gc.freeze()`` at the end moves everything alive into the permanent
    generation, so later collections (a swap's, the requests' own) only walk what is new.
    Frozen objects are still freed by reference counting when their bundle is dropped (a
    dropped, warmed bundle leaves no cyclic garbage: checked at 100,000 products).
    """
    import gc

    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def warm(bundle: Any, *, rounds: int = 3) -> dict[str, float]:
    """Run the bundle's request paths a few times off the request path.

    Every endpoint's code runs on this bundle's own data: /recommend for a user with a history
    of popular products (with and without ``exclude_purchased``, and in the most common
    category), for a visitor without one; /similar and /complementary of the most popular
    product; /search for ``WARM_QUERIES``, with and without a user. The arrays every request
    reads (embeddings, vectors, facts) are read through once, so their pages are resident.

    Returns:
        Seconds spent per path (for the log).
    """
    from training.ranking.histories import Histories

    spent: dict[str, float] = {}

    def timed(name: str, fn: Any) -> None:
        started = time.perf_counter()
        fn()
        spent[name] = spent.get(name, 0.0) + time.perf_counter() - started

    state = bundle.scorer.state
    arrays = [bundle.item_embeddings, state.embeddings, state.text_vectors, state.als_items,
              *state.facts.values()]
    timed("pages", lambda: [float(np.add.reduce(a, axis=None)) for a in arrays
                            if isinstance(a, np.ndarray)])
    popular = [int(r) for r in state.popularity_order()[:20]]
    ids = [str(bundle.products.product_id.iat[r]) for r in popular]
    end = state.cut.timestamp()
    user = Histories(products=[ids], timestamps=[end - 3600.0 * np.arange(len(ids))[::-1]],
                     event_types=[["purchase" if i % 4 == 0 else "view"
                                   for i in range(len(ids))]])
    stranger = Histories.empty(1)
    encoder = bundle.query_encoder  # shared across bundles: keep what the shop's queries left
    ours = [q for q in WARM_QUERIES if encoder is None or encoder.cached(q) is None]
    category = str(bundle.products["category"].mode().iat[0]) if bundle.size else None
    for _ in range(rounds):
        timed("recommend", lambda: bundle.recommend(user, 10))
        timed("recommend", lambda: bundle.recommend(user, 10, exclude_purchased=True))
        timed("recommend", lambda: bundle.recommend(user, 10, category=category))
        timed("recommend", lambda: bundle.recommend(stranger, 10))
        if ids:
            timed("similar", lambda: bundle.similar(ids[0], 10))
            timed("complementary", lambda: bundle.complementary(ids[0], 10))
        for query in WARM_QUERIES:
            timed("search", lambda q=query: bundle.search(q, 10))
        timed("search", lambda: bundle.search(WARM_QUERIES[0], 10, history=user))
    if encoder is not None:
        encoder.forget(ours)  # the warm-up's queries are not the shop's
    return spent


class WorkerReadiness:
    """Whether every worker of a multi-process server (uvicorn ``--workers N``) is ready.

    /readyz is answered by whichever worker accepts the connection: the first worker to
    finish loading would say "ready" while the others still load, and a load balancer would
    send the full traffic to one process. Each worker that has loaded and warmed its bundle
    leaves a marker (its pid) in a folder named after the supervisor's pid; /readyz says ready
    only when ``workers`` live workers have one. A process that is not a worker of a
    multi-process server (one uvicorn process, an app inside a test) expects only itself.
    """

    def __init__(self, workers: int, folder: Path | None = None):
        import multiprocessing

        # uvicorn starts its workers with multiprocessing: they have a parent process
        self.workers = workers if multiprocessing.parent_process() is not None else 1
        self.folder = folder or Path(tempfile.gettempdir()) / f"shoprec-serving-{os.getppid()}"
        self._marker = self.folder / str(os.getpid())

    @contextlib.contextmanager
    def one_loader(self) -> Iterator[None]:
        """Held while this worker loads a bundle: one worker of the server at a time, so a
        swap never takes both cores (a load pauses its worker's requests, GIL-bound parts of
        it up to a few hundred ms; the other worker answers in full meanwhile)."""
        if self.workers <= 1:
            yield
            return
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / "reload.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def mark_ready(self) -> None:
        if self.workers > 1:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._marker.touch()

    def unmark(self) -> None:
        self._marker.unlink(missing_ok=True)

    def ready(self) -> tuple[int, int]:
        """(live workers with a marker, workers expected); (1, 1) with a single worker."""
        if self.workers <= 1:
            return 1, 1
        alive = 0
        for marker in self.folder.glob("*") if self.folder.is_dir() else []:
            try:
                os.kill(int(marker.name), 0)
            except (ValueError, ProcessLookupError):
                marker.unlink(missing_ok=True)  # a worker that died: the supervisor restarts it
                continue
            except PermissionError:
                pass
            alive += 1
        return alive, self.workers


class QueryBatcher:
    """Encodes the queries of concurrent /search requests together.

    Sixteen short queries through the text encoder cost about five times one, and a worker
    answers requests on one event loop: while a batch encodes (in a thread: the traced
    graph runs without the GIL), the queries of requests that arrive meanwhile
    wait and go together into the next batch. Under light load a batch is one query, under
    heavy load it grows, so the encoder keeps up with the arrival rate instead of queueing.
    Kept vectors (``QueryEncoder.cached``) are answered at once.

    Args:
        max_batch: queries per forward pass at most.
    """

    def __init__(self, max_batch: int = 32):
        self.max_batch = max_batch
        self._pending: list[tuple[Any, str, Any]] = []  # (encoder, text, future)
        self._draining = False
        self.batches = self.queries = 0  # for the log and tests

    async def encode(self, encoder: Any, text: str) -> np.ndarray:
        import asyncio

        kept = encoder.cached(text)
        if kept is not None:
            return kept
        future = asyncio.get_running_loop().create_future()
        self._pending.append((encoder, text, future))
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        from fastapi.concurrency import run_in_threadpool

        try:
            while self._pending:
                batch = self._pending[:self.max_batch]
                del self._pending[:self.max_batch]
                for encoder in {id(e): e for e, _, _ in batch}.values():  # a swap: two encoders
                    part = [(t, f) for e, t, f in batch if e is encoder]
                    try:
                        vectors = await run_in_threadpool(encoder.encode_many,
                                                          [t for t, _ in part])
                    except Exception as exc:  # noqa: BLE001 - each request reports it
                        for _, future in part:
                            if not future.done():
                                future.set_exception(exc)
                        continue
                    self.batches += 1
                    self.queries += len(part)
                    for (_, future), vector in zip(part, vectors, strict=True):
                        if not future.done():
                            future.set_result(vector)
        finally:
            self._draining = False
