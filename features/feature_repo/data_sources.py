"""Offline sources: parquet tables written per data interval by features.build.

Each table lives in ``$SHOPREC_OFFLINE_ROOT/<table>/date=YYYY-MM-DD/part-0.parquet``; a rerun
of an interval replaces exactly its own partition.
"""

import os

from feast import FileSource
from feast.data_format import ParquetFormat

OFFLINE_ROOT = os.environ.get("SHOPREC_OFFLINE_ROOT", "state/features")


def _partitions(table: str) -> str:
    return f"{OFFLINE_ROOT}/{table}/*/*.parquet"


user_recent_products_source = FileSource(
    name="user_recent_products_source",
    path=_partitions("user_recent_products"),
    file_format=ParquetFormat(),
    timestamp_field="event_timestamp",
    description="End-of-day snapshot of each active user's recent products.",
)

product_catalog_source = FileSource(
    name="product_catalog_source",
    path=_partitions("product_catalog"),
    file_format=ParquetFormat(),
    timestamp_field="event_timestamp",
    description="Product attributes, one row per product added or changed that day.",
)
