"""The HTTP API's request and response models and its error responses (the OpenAPI schema
at /docs is generated from them)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from fastapi import Query
from pydantic import BaseModel, Field

from features.validation_suites import MAX_PRICE, MAX_QUANTITY

MAX_EVENTS = 1000
K = Annotated[int, Query(ge=1, le=1000, description="number of products (1..1000)")]


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
    degraded: str | None = Field(None, description="Set when the online store was "
                                 "unavailable: why, and what was served instead (the user's "
                                 "last-known features, or no history).")
    items: list[RecommendedItem]


class SearchResults(BaseModel):
    query: str
    user_id: str | None
    model_name: str
    model_version: str
    degraded: str | None = Field(None, description="Set when personalisation was asked for "
                                 "and the online store was unavailable.")
    items: list[RecommendedItem]


class RelatedProducts(BaseModel):
    product_id: str
    title: str
    model_name: str
    model_version: str
    fallback: bool = Field(False, description="True when co-occurrence had fewer than k "
                                              "products and popular ones filled the list.")
    items: list[RecommendedItem]


class EventIn(BaseModel):
    """One event, as the data contract defines it (features/contract.py EVENTS)."""

    event_id: str = Field(min_length=1, max_length=128)
    user_id: str = Field(min_length=1, max_length=128)
    event_type: Literal["view", "add_to_cart", "purchase", "search"]
    product_id: str | None = Field(None, min_length=1, max_length=128,
                                   description="a catalogue product; null only for search")
    query: str | None = Field(None, max_length=500, description="search events: the query")
    quantity: int = Field(1, ge=1, le=MAX_QUANTITY)
    price: float | None = Field(None, gt=0, le=MAX_PRICE)
    ts: dt.datetime = Field(description="when it happened, ISO 8601 with a time zone; not "
                                        "in the future")


class ErrorResponse(BaseModel):
    """A 4xx/5xx answer: ``detail`` says what is wrong (FastAPI's list of problems for a
    malformed request), ``reason`` one readable line when the request did not validate."""

    detail: str | list[dict[str, Any]]
    reason: str | None = None


class IngestReport(BaseModel):
    events: int
    users: list[str]


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    detail: str


class IndexInfo(BaseModel):
    kind: str = Field(description="exact (up to exact_max products) or hnsw")
    size: int
    dim: int
    recall_at_50: float | None = Field(description="against exact search, measured at build")
    exact_max: int
    searches: int = Field(description="queries this index answered since the bundle loaded")


class VersionInfo(BaseModel):
    app_version: str
    model_name: str | None
    model_version: str | None
    alias: str | None = Field(description="the registry alias this server follows")
    run_id: str | None
    interval: str | None = Field(description="the data interval the model was trained on")
    cuts: dict[str, str] | None = Field(description="validation cut, test cut, end")
    index_kind: str | None = Field(description="the two-tower index's kind (what /similar "
                                   "searches): exact or hnsw")
    index_size: int | None
    indexes: dict[str, IndexInfo] | None = Field(
        description="every index the served model retrieves from, by vector space "
                    "(two_tower, text, als): kind, size, dim and recall@50 measured at build")
    loaded_at: float | None


class ReloadResult(BaseModel):
    reloaded: bool
    model_version: str | None
    detail: str


INVALID = {422: {"model": ErrorResponse, "description": "the request breaks the schema or "
                                                       "the data contract"}}
NOT_LOADED = {503: {"model": ErrorResponse, "description": "no model loaded yet"}, **INVALID}
UNKNOWN = {404: {"model": ErrorResponse, "description": "unknown product or category"},
           **NOT_LOADED}
