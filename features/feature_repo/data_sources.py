"""Offline sources: parquet tables written per data interval by features.build, and the push
sources through which the serving layer updates user features as events arrive.

Each table lives in ``$SHOPREC_OFFLINE_ROOT/<table>/date=YYYY-MM-DD/part-0.parquet``; a rerun
of an interval replaces exactly its own partition.
"""

import os

from feast import FileSource, PushSource
from feast.data_format import ParquetFormat

OFFLINE_ROOT = os.environ.get("SHOPREC_OFFLINE_ROOT", "state/features")


def _partitions(table: str) -> str:
    return f"{OFFLINE_ROOT}/{table}/*/*.parquet"


def _daily(table: str, description: str) -> FileSource:
    return FileSource(
        name=f"{table}_source",
        path=_partitions(table),
        file_format=ParquetFormat(),
        timestamp_field="event_timestamp",
        description=description,
    )


user_recent_products_source = _daily(
    "user_recent_products",
    "End-of-day snapshot of each active user's recent products, event types and times.")

user_profile_source = _daily(
    "user_profile",
    "End-of-day snapshot of each recently active user's windowed counters and profile.")

product_stats_source = _daily(
    "product_stats",
    "End-of-day snapshot of every catalogue product's windowed counters and attributes.")

product_text_source = _daily(
    "product_text",
    "Item-tower text of products added or changed that day, stamped at the day's end.")

product_catalog_source = FileSource(
    name="product_catalog_source",
    path=_partitions("product_catalog"),
    file_format=ParquetFormat(),
    timestamp_field="event_timestamp",
    description="Product attributes, one row per product added or changed that day.",
)

# Real-time updates (features/realtime.py pushes whole rows, online only); the batch source
# backs materialization and historical retrieval.
user_recent_products_push = PushSource(
    name="user_recent_products_push",
    batch_source=user_recent_products_source,
    description="A user's recent products after each incoming event.",
)

user_profile_push = PushSource(
    name="user_profile_push",
    batch_source=user_profile_source,
    description="A user's counters after each incoming event.",
)

# Online only: the user-side vectors of the served model are written to the online store when
# a user's row changes (serving/user_vectors.py); no partition is ever written here.
user_vectors_source = _daily(
    "user_vectors", "Never written offline: user vectors live in the online store only.")
