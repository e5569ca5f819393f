"""The HTTP API (OpenAPI at /docs): recommendations, search, similar and complementary
products from the champion bundle; events into the online store; health, version and
Prometheus metrics.

The app answers from one immutable ``Bundle`` held in ``BundleSlot``; a reload (``POST
/admin/reload``, or the poll of the champion alias every ``SHOPREC_SERVING_POLL_SECONDS``)
builds the next bundle off the request path and swaps the reference in one assignment, so a
request sees either the old model or the new one, never a mix; a bundle that fails to load
leaves the old one serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import hmac
import logging
import sqlite3
import threading
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Header, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from core import __version__
from core.settings import Settings
from serving.bundle import Bundle
from serving.cache import LRU
from serving.metrics import Metrics
from serving.runtime import (
    QueryBatcher,
    ThreadLimits,
    WorkerReadiness,
    no_gc_pauses,
    short_gil_slices,
    warm,
    worker_logging,
)
from serving.schemas import (
    INVALID,
    MAX_EVENTS,
    UNKNOWN,
    ErrorResponse,
    EventIn,
    Health,
    IndexInfo,
    IngestReport,
    K,
    Readiness,
    Recommendations,
    RecommendedItem,
    RelatedProducts,
    ReloadResult,
    SearchResults,
    VersionInfo,
)
from serving.search import MAX_QUERY_CHARS
from serving.watchdog import LoopWatchdog
from training.ranking.histories import Histories, MalformedHistory, StoredVectors, row_digest
from training.registry import CHAMPION

# POST /events writes the user vectors of at most this many users it changed (a bulk
# import's batch is left to the requests: computing it would hold the worker up).
REALTIME_VECTOR_USERS = 64

log = logging.getLogger("shoprec.serving")


class BundleSlot:
    """The current bundle, swapped whole; readers never lock.

    ``load`` builds the next bundle off the request path (a thread), then replaces the
    reference in one assignment: requests that already read the old bundle finish on it.
    A failed load keeps the old bundle and records why (``last_error``, /readyz).
    """

    def __init__(self) -> None:
        self.bundle: Bundle | None = None
        self.loaded_at: float | None = None
        self.last_error: str = ""
        self.on_loaded: Any = None  # called after each bundle taken into service
        self.one_loader: Any = contextlib.nullcontext  # held while loading (runtime)
        self._reload_lock = threading.Lock()

    def load(self, settings: Settings, *, only_if_changed: bool = False) -> Bundle | None:
        """Load the champion; with ``only_if_changed``, only when its version differs.

        Returns:
            The bundle now served (None when unchanged and nothing was loaded).
        """
        from serving.publish import champion_version, load_version_bundle

        with self._reload_lock:  # one reload at a time; requests keep using the old bundle
            try:
                if only_if_changed and self.bundle is not None \
                        and champion_version(settings) == self.bundle.version:
                    return None
                swap = self.bundle is not None  # requests are being served meanwhile
                with self.one_loader(), no_gc_pauses(), (
                        short_gil_slices() if swap else contextlib.nullcontext()):
                    bundle = load_version_bundle(settings)
                    # before it takes traffic (a failure is refused); on a swap once: each
                    # extra round is GIL time taken from this worker's requests
                    spent = warm(bundle, rounds=1 if swap else 3)
            except Exception as exc:  # MLflow down, bad bundle, ...: keep serving the old one
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.error("could not load the champion: %s (serving %s)", self.last_error,
                          f"v{self.bundle.version}" if self.bundle else "nothing")
                raise
            self.bundle, self.loaded_at, self.last_error = bundle, time.time(), ""
            if self.on_loaded is not None:
                self.on_loaded()
            log.info("serving %s v%s (%d products; indexes %s; warmed in %s)", bundle.name,
                     bundle.version, bundle.size,
                     ", ".join(f"{n} {i.kind}" for n, i in bundle.indexes.items()),
                     ", ".join(f"{k} {v:.2f} s" for k, v in spent.items()))
            return bundle

    async def poll(self, settings: Settings) -> None:
        """Follow the champion alias: every ``serving_poll_seconds``, load it if it moved."""
        while True:
            await asyncio.sleep(settings.serving_poll_seconds)
            try:
                await run_in_threadpool(self.load, settings, only_if_changed=True)
            except Exception:  # logged in load(); try again next time
                pass


@functools.cache
def store_outages() -> tuple[type[BaseException], ...]:
    """The errors that mean the online store is unavailable, not that the code is wrong:
    connections refused or reset, timeouts, I/O errors, SQLite's database errors (locked,
    unreadable, gone), and Redis' connection and timeout errors when redis is installed."""
    kinds: list[type[BaseException]] = [OSError, TimeoutError, sqlite3.DatabaseError]
    try:
        from redis import exceptions as redis_errors
    except ImportError:  # the embedded profile may run without redis
        pass
    else:
        kinds += [redis_errors.ConnectionError, redis_errors.TimeoutError,
                  redis_errors.BusyLoadingError]
    return tuple(kinds)


class UserHistory:
    """Reads users' recent products and profiles from the Feast online store, and writes
    incoming events into it.

    When the online store fails (``store_outages``: Redis or the SQLite file unreachable,
    timeouts, I/O errors), requests are not failed: a user read
    before gets their last-known row (an LRU of ``cache_size`` users, refreshed on every
    successful read), anybody else is served as a visitor without history; the answer is
    flagged ``degraded`` and /readyz says since when. While the store is down it is tried
    again at most every ``retry_seconds`` (requests in between do not wait on it); the
    first success ends the degraded state. Any other error while reading is a bug and
    fails the request. A row the store returns whose lists disagree (``MalformedHistory``)
    is logged, counted (``shoprec_malformed_online_rows`` in /metrics) and answered without
    history, flagged ``degraded`` with the reason; the store is not marked down for it.

    Args:
        settings: where the store is.
        cache_size: last-known rows kept.
        retry_seconds: how often a failed store is tried again.
    """

    def __init__(self, settings: Settings, cache_size: int = 10_000,
                 retry_seconds: float = 2.0) -> None:
        self.settings = settings
        self.cache_size = cache_size
        self.retry_seconds = retry_seconds
        self._store = None
        self._reader = None
        self._lock = threading.Lock()
        self._known = LRU(cache_size)  # user id -> last row the store gave
        self.down_since: float | None = None
        self.down_reason = ""
        self._last_try = 0.0
        self.malformed = 0  # rows refused as malformed (``MalformedHistory``), for /metrics

    def _open(self):
        from features.store import OnlineUserReader, feature_store

        if self._store is None:
            self._store = feature_store(self.settings)
            self._reader = OnlineUserReader(self._store)
        return self._store

    @property
    def degraded(self) -> str | None:
        """Why answers are degraded now (None: the online store works)."""
        if self.down_since is None:
            return None
        since = dt.datetime.fromtimestamp(self.down_since, dt.UTC).isoformat(timespec="seconds")
        return f"online store unavailable since {since} ({self.down_reason})"

    def warm(self) -> None:
        """Open the store and read one (unknown) user, so the first request does not pay
        for connecting and loading the registry; an outage here is only logged."""
        try:
            self.get("__shoprec_warm_up__")
        except Exception as exc:  # noqa: BLE001 - requests will report it
            log.warning("online store not warmed: %s: %s", type(exc).__name__, exc)

    def get(self, user_id: str) -> tuple[Histories, str | None]:
        """The user's history as the online store holds it (empty when unknown), and why
        the answer is degraded (None when it is not)."""
        with self._lock:  # the SQLite online store is not shared across threads
            row = None
            now = time.monotonic()
            if self.down_since is None or now - self._last_try >= self.retry_seconds:
                self._last_try = now
                try:
                    self._open()
                    row = self._reader.read([user_id], vectors=False)[user_id]
                except store_outages() as exc:  # a failing store must not take the API down
                    if self.down_since is None:
                        log.warning("online store unavailable (%s: %s); serving last-known "
                                    "features or popularity until it answers again",
                                    type(exc).__name__, exc)
                        self.down_since = time.time()
                    self.down_reason = f"{type(exc).__name__}: {str(exc)[:200]}"
                else:
                    if self.down_since is not None:
                        log.warning("online store answers again after %.0f s",
                                    time.time() - self.down_since)
                        self.down_since, self.down_reason = None, ""
            if row is not None:
                try:
                    user = Histories.from_row(row)
                    user.load_stored = functools.partial(self._stored, user_id, row)
                except MalformedHistory as exc:  # a writer's bug: say so, never guess
                    self.malformed += 1
                    log.error("malformed online row for user %r, served without history: %s",
                              user_id, exc)
                    return Histories.empty(1), f"malformed online row: {exc}"
                self._known.put(user_id, row)
                return user, None
            known = self._known.get(user_id)
            if known is not None:
                return (Histories.from_row(known),
                        f"{self.degraded}: last-known features")
            return Histories.empty(1), f"{self.degraded}: served without history"

    def ingest(self, events: list[dict[str, Any]], ingest: Any) -> Any:
        """``features.realtime.ingest_events`` on this store.

        Raises:
            HTTPException: 503 when the online store is unavailable.
        """
        from features.realtime import InvalidEvent

        with self._lock:
            try:
                return ingest(self._open(), events)
            except InvalidEvent:
                raise
            except Exception as exc:
                log.error("could not write events to the online store: %s", exc)
                raise HTTPException(503, detail=f"online store unavailable: {exc}") from exc


    def _stored(self, user_id: str, row: dict[str, Any]) -> StoredVectors | None:
        """The user's stored vectors (``serving.user_vectors``), read only when a request
        computes a view (not for a kept view or a cold user); None when there are none or the
        store fails now (the request computes)."""
        with self._lock:
            try:
                [values] = self._reader.read_vectors([user_id])
            except store_outages() as exc:
                log.warning("stored user vectors not read (%s: %s): computing",
                            type(exc).__name__, exc)
                return None
        stored = StoredVectors.from_values(values)
        if stored is not None:
            stored.row_now = row_digest(row)
        return stored

    def write_vectors(self, bundle: Any, users: list[str]) -> None:
        """The user vectors of ``bundle`` for these users' rows just written
        (``serving.user_vectors``): their next request reads them instead of computing.
        The store's lock is held for the read and the write only, so this worker's requests
        go on meanwhile; a batch of more than ``REALTIME_VECTOR_USERS`` users is left to the
        requests. A failure is logged only: the events are in, and a request computes what
        is missing."""
        if bundle is None or not users or self.settings.user_vectors_days <= 0 \
                or len(users) > REALTIME_VECTOR_USERS:
            return
        from serving.user_vectors import write_user_vectors

        try:
            with self._lock:
                self._open()
            write_user_vectors(self._store, self._reader, bundle, users,
                               guard=lambda: self._lock)
        except Exception as exc:  # noqa: BLE001 - a cache: never fail the events for it
            log.warning("user vectors not written for %d users: %s: %s", len(users),
                        type(exc).__name__, exc)


class MeasureRequests:
    """ASGI middleware: count and time every HTTP request by route, method and status (a
    plain ASGI wrapper, cheaper per request than ``@app.middleware("http")``)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_note(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe(endpoint, scope["method"], status,
                                 time.perf_counter() - started)


async def current_bundle(request: Request) -> Bundle:
    """The bundle that answers this request (read once: a reload cannot change it midway)."""
    slot: BundleSlot = request.app.state.slot
    bundle = slot.bundle
    if bundle is None:
        raise HTTPException(503, detail=f"no model loaded yet: {slot.last_error or 'loading'}")
    return bundle


def create_app(settings: Settings | None = None, *, load_on_start: bool = True) -> FastAPI:
    """Build the API. ``uvicorn --factory serving.app:create_app`` serves it."""
    worker_logging()  # a uvicorn worker process starts without the CLI's logging
    settings = settings or Settings.from_env()
    slot = BundleSlot()
    workers = WorkerReadiness(settings.serving_workers)
    slot.on_loaded, slot.one_loader = workers.mark_ready, workers.one_loader
    history = UserHistory(settings)
    queries = QueryBatcher()  # /search's queries encoded together when they arrive together
    metrics = Metrics()
    watchdog = LoopWatchdog()  # logs where the event loop stalled, and counts it

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        limits = ThreadLimits(settings.serving_threads)
        watchdog.start()
        await run_in_threadpool(history.warm)  # the store's first read, before /readyz
        if load_on_start:
            try:
                await run_in_threadpool(slot.load, settings)
            except Exception:  # noqa: S110 - /readyz and the log report it; the poll retries
                pass
        poller = (asyncio.create_task(slot.poll(settings))
                  if settings.serving_poll_seconds > 0 else None)
        yield
        if poller is not None:
            poller.cancel()
        workers.unmark()
        watchdog.stop()
        limits.restore()

    app = FastAPI(
        title="shoprec",
        version=__version__,
        description="Recommendations, search and related products from the shop's champion "
                    "model. Every result carries a score and a reason.",
        lifespan=lifespan,
    )
    app.state.slot = slot
    app.state.settings = settings
    app.state.metrics = metrics

    app.add_middleware(MeasureRequests, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 with one readable reason per problem (and FastAPI's details)."""
        reasons = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}"
                   for e in exc.errors()]
        return JSONResponse(status_code=422, content={
            "detail": jsonable_encoder(exc.errors()), "reason": "; ".join(reasons)})

    def _items(recs) -> list[RecommendedItem]:
        return [RecommendedItem(**vars(r)) for r in recs]

    def _json(answer: Any) -> Response:
        """The answer serialised by its pydantic model once, returned as is: FastAPI would
        otherwise dump it to a dict, validate that against the response model again and
        encode it (``response_model`` still documents it in the OpenAPI schema)."""
        return Response(answer.model_dump_json(), media_type="application/json")

    def _product(bundle: Bundle, product_id: str) -> int:
        row = bundle.item_row.get(product_id)
        if row is None:
            raise HTTPException(404, detail=f"unknown product {product_id!r}: not in the "
                                            f"catalogue of model v{bundle.version}")
        return row

    def _category(bundle: Bundle, category: str | None) -> str | None:
        if category is not None and category not in bundle.categories:
            raise HTTPException(404, detail=f"unknown category {category!r}")
        return category

    @app.get("/healthz", response_model=Health, tags=["ops"])
    def healthz() -> Health:
        """Liveness: the process answers."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Readiness, tags=["ops"],
             responses={503: {"model": Readiness, "description": "no bundle loaded"}})
    def readyz():
        """Readiness: a model bundle is loaded and warmed, in every worker of the server
        (the detail says when a reload failed)."""
        if slot.bundle is None:
            return JSONResponse(status_code=503, content=Readiness(
                ready=False, detail=slot.last_error or "no bundle loaded").model_dump())
        done, expected = workers.ready()
        if done < expected:
            return JSONResponse(status_code=503, content=Readiness(
                ready=False, detail=f"waiting for workers: {done} of {expected} have loaded "
                                    f"and warmed v{slot.bundle.version}").model_dump())
        detail = f"serving v{slot.bundle.version}"
        if slot.last_error:
            detail += f"; last reload failed, kept v{slot.bundle.version}: {slot.last_error}"
        if history.degraded:
            detail += f"; degraded: {history.degraded}"
        return Readiness(ready=True, detail=detail)

    @app.get("/version", response_model=VersionInfo, tags=["ops"])
    def version() -> VersionInfo:
        """Which model version answers, what it was trained on, and its indexes."""
        b = slot.bundle
        cuts = ({k: str(b.manifest[k]) for k in ("validation_cut", "test_cut", "end")
                 if k in b.manifest} if b else None)
        return VersionInfo(
            app_version=__version__,
            model_name=b.name if b else None, model_version=b.version if b else None,
            alias=CHAMPION, run_id=b.run_id if b else None,
            interval=b.manifest.get("interval") if b else None, cuts=cuts,
            index_kind=b.indexes["two_tower"].kind if b else None,
            index_size=b.indexes["two_tower"].size if b else None,
            indexes=({name: IndexInfo(**index.info(), searches=index.searches)
                      for name, index in b.indexes.items()} if b else None),
            loaded_at=slot.loaded_at,
        )

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    def prometheus_metrics() -> PlainTextResponse:
        """Prometheus text format: requests and latency per endpoint, the bundle served, online
        rows refused as malformed, event-loop stalls."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if slot.bundle is not None:
            metrics.bundle = (float(slot.bundle.version), slot.bundle.size)
        metrics.malformed_rows = history.malformed
        metrics.loop_stalls = watchdog.stalls
        return PlainTextResponse(generate_latest(metrics.registry),
                                 media_type=CONTENT_TYPE_LATEST)

    @app.get("/recommend/{user_id}", response_model=Recommendations, tags=["recommend"],
             responses=UNKNOWN)
    async def recommend(
        user_id: Annotated[str, Path(min_length=1, max_length=128)],
        bundle: Annotated[Bundle, Depends(current_bundle)],
        k: K = 10,
        exclude_purchased: Annotated[bool, Query(
            description="leave out products the user already bought")] = False,
        category: Annotated[str | None, Query(
            min_length=1, max_length=200, description="only products of this category")] = None,
        country: Annotated[str | None, Query(
            min_length=1, max_length=100,
            description="the visitor's country, for users without history")] = None,
    ) -> Response:
        """Top-k products for a user, from their recent behaviour in the online store.

        Users without known history get what is popular in their country (when known), or
        popular, trending and new products (`cold_start`: true).
        """
        user, degraded = history.get(user_id)
        items, cold = bundle.recommend(user, k, exclude_purchased=exclude_purchased,
                                       category=_category(bundle, category), country=country)
        return _json(Recommendations(user_id=user_id, model_name=bundle.name,
                                     model_version=bundle.version, cold_start=cold,
                                     degraded=degraded, items=_items(items)))

    @app.get("/search", response_model=SearchResults, tags=["search"], responses=UNKNOWN)
    async def search(
        q: Annotated[str, Query(min_length=1, max_length=MAX_QUERY_CHARS,
                                description="what the shopper typed")],
        bundle: Annotated[Bundle, Depends(current_bundle)],
        k: K = 10,
        user_id: Annotated[str | None, Query(
            min_length=1, max_length=128, description="personalise for this user")] = None,
        category: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
    ) -> Response:
        """Products matching a query: its words and codes (a brand, a stock code) and its
        meaning (the shared text encoder); personalised by the user's ranking when given."""
        if not q.strip():
            raise HTTPException(422, detail="the query is blank")
        category = _category(bundle, category)  # 404 before any work
        user, degraded = history.get(user_id) if user_id else (None, None)
        vector = (await queries.encode(bundle.query_encoder, q)
                  if bundle.query_encoder is not None else None)
        items = bundle.search(q, k, history=user, category=category, query_vector=vector)
        return _json(SearchResults(query=q, user_id=user_id, model_name=bundle.name,
                                   model_version=bundle.version, degraded=degraded,
                                   items=_items(items)))

    @app.get("/similar/{product_id}", response_model=RelatedProducts, tags=["products"],
             responses=UNKNOWN)
    async def similar(
        product_id: Annotated[str, Path(min_length=1, max_length=128)],
        bundle: Annotated[Bundle, Depends(current_bundle)],
        k: K = 10,
    ) -> Response:
        """Products whose embeddings are nearest (text, category, brand, price, behaviour)."""
        row = _product(bundle, product_id)
        return _json(RelatedProducts(
            product_id=product_id, title=bundle.title(row),
            model_name=bundle.name, model_version=bundle.version,
            items=_items(bundle.similar(product_id, k))))

    @app.get("/complementary/{product_id}", response_model=RelatedProducts, tags=["products"],
             responses=UNKNOWN)
    async def complementary(
        product_id: Annotated[str, Path(min_length=1, max_length=128)],
        bundle: Annotated[Bundle, Depends(current_bundle)],
        k: K = 10,
    ) -> Response:
        """Products bought together with this one (co-occurrence of buyers)."""
        row = _product(bundle, product_id)
        items, fallback = bundle.complementary(product_id, k)
        return _json(RelatedProducts(
            product_id=product_id, title=bundle.title(row),
            model_name=bundle.name, model_version=bundle.version, fallback=fallback,
            items=_items(items)))

    @app.post("/events", response_model=IngestReport, tags=["events"],
              responses={**INVALID, 503: {"model": ErrorResponse,
                                          "description": "the online store is unavailable"}})
    def events(body: Annotated[EventIn | list[EventIn], Body(
            description="one event or a batch (at most 1000)")]) -> IngestReport:
        """Validate events against the data contract and fold them into the users' online
        features: the user's next /recommend reflects them. One bad event refuses the batch."""
        from features.realtime import InvalidEvent, ingest_events

        batch = body if isinstance(body, list) else [body]
        if len(batch) > MAX_EVENTS:
            raise HTTPException(422, detail=f"{len(batch)} events; at most {MAX_EVENTS}")
        try:
            result = history.ingest([e.model_dump() for e in batch], ingest_events)
        except InvalidEvent as exc:
            raise HTTPException(422, detail=str(exc)) from exc
        history.write_vectors(slot.bundle, result.users)
        return IngestReport(events=result.events, users=result.users)

    @app.post("/admin/reload", response_model=ReloadResult, tags=["ops"],
              responses={401: {"model": ErrorResponse, "description": "missing token"},
                         403: {"model": ErrorResponse,
                               "description": "wrong token or reload disabled"},
                         **INVALID})
    async def admin_reload(authorization: Annotated[str | None, Header()] = None) -> Any:
        """Load the current champion off the request path and swap it in."""
        if not settings.admin_token:
            raise HTTPException(403, detail="reload disabled: SHOPREC_ADMIN_TOKEN is not set")
        if not authorization or not authorization.startswith("Bearer "):
            raise HTTPException(401, detail="missing 'Authorization: Bearer <token>' header")
        if not hmac.compare_digest(authorization.removeprefix("Bearer "), settings.admin_token):
            raise HTTPException(403, detail="wrong token")
        try:
            bundle = await run_in_threadpool(slot.load, settings)
        except Exception as exc:  # noqa: BLE001 - reported; the old bundle keeps serving
            current = slot.bundle.version if slot.bundle else None
            return ReloadResult(reloaded=False, model_version=current,
                                detail=f"kept the current bundle: {exc}")
        return ReloadResult(reloaded=True, model_version=bundle.version,
                            detail=f"serving v{bundle.version}")

    return app
