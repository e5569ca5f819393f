"""Feature views. Schemas are declared in full so that `feast apply` reads no data."""

from datetime import timedelta

from data_sources import product_catalog_source, user_recent_products_source
from entities import product, user
from feast import FeatureView, Field
from feast.types import Array, Float64, Int64, String

user_recent_products = FeatureView(
    name="user_recent_products",
    entities=[user],
    # A snapshot stays valid until the user acts again, however long that takes.
    ttl=timedelta(days=3650),
    schema=[
        Field(name="user_id", dtype=String),
        Field(name="recent_product_ids", dtype=Array(String),
              description="Last products the user touched, oldest first."),
        Field(name="recent_event_types", dtype=Array(String),
              description="Event type of each recent product (view, add_to_cart, purchase)."),
        Field(name="n_events_total", dtype=Int64),
    ],
    source=user_recent_products_source,
    online=True,
    tags={"team": "recsys", "tower": "user"},
)

product_catalog = FeatureView(
    name="product_catalog",
    entities=[product],
    ttl=timedelta(days=3650),
    schema=[
        Field(name="product_id", dtype=String),
        Field(name="title", dtype=String),
        Field(name="category", dtype=String),
        Field(name="brand", dtype=String),
        Field(name="price", dtype=Float64),
    ],
    source=product_catalog_source,
    online=True,
    tags={"team": "recsys", "tower": "item"},
)
