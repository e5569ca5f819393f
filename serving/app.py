"""The HTTP API: recommendations from the champion bundle (OpenAPI at /docs).

The app answers from one immutable ``Bundle`` held in ``BundleSlot``; a reload builds the
next bundle off the request path and swaps the reference in one assignment, so a request
sees either the old model or the new one, never a mix.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any

import pandas as pd
from fastapi import Depends, FastAPI, Header, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from serving.bundle import Bundle, BundleError
from shoprec import __version__
from shoprec.settings import Settings
from training.scorer import Histories

log = logging.getLogger("shoprec.serving")


class RecommendedItem(BaseModel):
    product_id: str
    title: str
    score: float = Field(description="The served ranking's score (two-tower, co-occurrence, "
                                     "ALS and purchase facts blended); higher is better.")
    reason: str = Field(description="Why this product is recommended.")


class Recommendations(BaseModel):
    user_id: str
    model_name: str
    model_version: str
    cold_start: bool = Field(description="True when the user has no known history: the "
                                         "ranking falls back to popularity, trend and newness.")
    items: list[RecommendedItem]


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    detail: str


class VersionInfo(BaseModel):
    app_version: str
    model_name: str | None
    model_version: str | None
    run_id: str | None
    interval: str | None
    index_kind: str | None
    index_size: int | None
    loaded_at: float | None


class ReloadResult(BaseModel):
    reloaded: bool
    model_version: str | None
    detail: str


class BundleSlot:
    """The current bundle, swapped whole; readers never lock."""

    def __init__(self) -> None:
        self.bundle: Bundle | None = None
        self.loaded_at: float | None = None
        self.last_error: str = ""
        self._reload_lock = threading.Lock()

    def load(self, settings: Settings) -> Bundle:
        from serving.publish import load_version_bundle

        with self._reload_lock:  # one reload at a time; requests keep using the old bundle
            try:
                bundle = load_version_bundle(settings)
            except (BundleError, OSError) as exc:
                self.last_error = str(exc)
                log.error("could not load the champion: %s (serving %s)", exc,
                          f"v{self.bundle.version}" if self.bundle else "nothing")
                raise
            self.bundle, self.loaded_at, self.last_error = bundle, time.time(), ""
            log.info("serving %s v%s (%d products, %s index)", bundle.name, bundle.version,
                     bundle.size, bundle.index_meta.get("kind"))
            return bundle


class UserHistory:
    """Reads users' recent products from the Feast online store."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._store = None
        self._lock = threading.Lock()

    def get(self, user_id: str) -> Histories:
        """The user's history as the online store holds it (empty when unknown or the store
        is unavailable)."""
        from features.store import feature_store, online_user_history

        with self._lock:  # the SQLite online store is not shared across threads
            try:
                if self._store is None:
                    self._store = feature_store(self.settings)
                row = online_user_history(self._store, [user_id])[user_id]
            except Exception as exc:  # a missing store must not take the API down
                log.warning("online features unavailable (%s); serving without history", exc)
                return Histories.empty(1)
        return Histories.from_feast(pd.DataFrame([row]))


def current_bundle(request: Request) -> Bundle:
    """The bundle that answers this request (read once: a reload cannot change it midway)."""
    slot: BundleSlot = request.app.state.slot
    bundle = slot.bundle
    if bundle is None:
        raise HTTPException(503, detail=f"no model loaded yet: {slot.last_error or 'loading'}")
    return bundle


def create_app(settings: Settings | None = None, *, load_on_start: bool = True) -> FastAPI:
    """Build the API. ``uvicorn --factory serving.app:create_app`` serves it."""
    settings = settings or Settings.from_env()
    slot = BundleSlot()
    history = UserHistory(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if load_on_start:
            try:
                await run_in_threadpool(slot.load, settings)
            except (BundleError, OSError):
                pass  # /readyz reports it; a later reload can fix it
        yield

    app = FastAPI(
        title="shoprec",
        version=__version__,
        description="Recommendations from the shop's champion two-tower model. Every result "
                    "carries a score and a reason.",
        lifespan=lifespan,
    )
    app.state.slot = slot
    app.state.settings = settings

    @app.get("/healthz", response_model=Health, tags=["ops"])
    def healthz() -> Health:
        """Liveness: the process answers."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Readiness, tags=["ops"],
             responses={503: {"model": Readiness}})
    def readyz():
        """Readiness: a model bundle is loaded."""
        from fastapi.responses import JSONResponse

        if slot.bundle is None:
            return JSONResponse(status_code=503, content=Readiness(
                ready=False, detail=slot.last_error or "no bundle loaded").model_dump())
        detail = f"serving v{slot.bundle.version}"
        if slot.last_error:
            detail += f"; last reload failed: {slot.last_error}"
        return Readiness(ready=True, detail=detail)

    @app.get("/version", response_model=VersionInfo, tags=["ops"])
    def version() -> VersionInfo:
        """Which model version answers, what it was trained on, and its index."""
        b = slot.bundle
        return VersionInfo(
            app_version=__version__,
            model_name=b.name if b else None, model_version=b.version if b else None,
            run_id=b.run_id if b else None,
            interval=b.manifest.get("interval") if b else None,
            index_kind=b.index_meta.get("kind") if b else None,
            index_size=b.index_meta.get("size") if b else None,
            loaded_at=slot.loaded_at,
        )

    @app.get("/recommend/{user_id}", response_model=Recommendations, tags=["recommend"],
             responses={503: {"description": "no model loaded yet"}})
    def recommend(
        user_id: Annotated[str, Path(min_length=1, max_length=128)],
        bundle: Annotated[Bundle, Depends(current_bundle)],
        k: Annotated[int, Query(ge=1, le=1000, description="number of products")] = 10,
        exclude_purchased: Annotated[bool, Query(
            description="leave out products the user already bought")] = False,
    ) -> Recommendations:
        """Top-k products for a user, from their recent behaviour in the online store.

        Users without known history get popular, trending and new products
        (`cold_start`: true).
        """
        items, cold = bundle.recommend(history.get(user_id), k,
                                       exclude_purchased=exclude_purchased)
        return Recommendations(
            user_id=user_id, model_name=bundle.name, model_version=bundle.version,
            cold_start=cold,
            items=[RecommendedItem(**vars(item)) for item in items],
        )

    @app.post("/admin/reload", response_model=ReloadResult, tags=["ops"],
              responses={401: {"description": "missing token"},
                         403: {"description": "wrong token or reload disabled"}})
    async def admin_reload(authorization: Annotated[str | None, Header()] = None) -> Any:
        """Load the current champion off the request path and swap it in."""
        if not settings.admin_token:
            raise HTTPException(403, detail="reload disabled: SHOPREC_ADMIN_TOKEN is not set")
        if not authorization or not authorization.startswith("Bearer "):
            raise HTTPException(401, detail="missing 'Authorization: Bearer <token>' header")
        if authorization.removeprefix("Bearer ") != settings.admin_token:
            raise HTTPException(403, detail="wrong token")
        try:
            bundle = await run_in_threadpool(slot.load, settings)
        except (BundleError, OSError) as exc:
            current = slot.bundle.version if slot.bundle else None
            return ReloadResult(reloaded=False, model_version=current,
                                detail=f"kept the current bundle: {exc}")
        return ReloadResult(reloaded=True, model_version=bundle.version,
                            detail=f"serving v{bundle.version}")

    return app
