"""Feature views. Schemas are declared in full so that `feast apply` reads no data.

Every view keeps a snapshot valid until a newer one replaces it (long ttl): the offline build
writes a new snapshot whenever a value can have changed, and only then (see features/build.py);
values that would change every day by themselves (days since a purchase, since a product was
first seen) are stored as the time they count from.
"""

from datetime import timedelta

from data_sources import (
    product_catalog_source,
    product_stats_source,
    product_text_source,
    user_profile_push,
    user_recent_products_push,
)
from entities import product, user
from feast import FeatureView, Field
from feast.types import Array, Float64, Int64, String

EVENT_TYPES = ("view", "add_to_cart", "purchase", "search")
WINDOWS_DAYS = (7, 30)
# Online reads drop rows older than the ttl (by wall clock): keep history readable.
FOREVER = timedelta(days=3650)

user_recent_products = FeatureView(
    name="user_recent_products",
    entities=[user],
    ttl=FOREVER,
    schema=[
        Field(name="user_id", dtype=String),
        Field(name="recent_product_ids", dtype=Array(String),
              description="Last 200 products the user touched (features.build.HISTORY_LEN), "
                          "oldest first."),
        Field(name="recent_event_types", dtype=Array(String),
              description="Event type of each recent product (view, add_to_cart, purchase)."),
        Field(name="recent_timestamps", dtype=Array(Int64),
              description="Time of each recent product event, epoch seconds (UTC)."),
        Field(name="n_events_total", dtype=Int64,
              description="All product events of the user so far."),
    ],
    source=user_recent_products_push,
    online=True,
    tags={"team": "recsys", "tower": "user"},
)

user_profile = FeatureView(
    name="user_profile",
    entities=[user],
    ttl=FOREVER,
    schema=[
        Field(name="user_id", dtype=String),
        *[Field(name=f"{t}_count_{w}d", dtype=Int64,
                description=f"{t} events in the last {w} days.")
          for w in WINDOWS_DAYS for t in EVENT_TYPES],
        Field(name="last_purchase_epoch_s", dtype=Int64,
              description="Time of the last purchase, epoch seconds; -1 when never. Readers "
                          "turn it into days since the last purchase at their own time."),
        Field(name="distinct_categories_30d", dtype=Int64,
              description="Categories of the products touched in the last 30 days."),
        Field(name="mean_basket_value_30d", dtype=Float64,
              description="Mean of sum(quantity * price) per purchase day, last 30 days; "
                          "0 without purchases."),
        Field(name="country", dtype=String, description="Latest known country."),
    ],
    source=user_profile_push,
    online=True,
    tags={"team": "recsys", "tower": "user"},
)

product_stats = FeatureView(
    name="product_stats",
    entities=[product],
    ttl=FOREVER,
    schema=[
        Field(name="product_id", dtype=String),
        *[Field(name=f"product_{t}_count_{w}d", dtype=Int64,
                description=f"{t} events of the product in the last {w} days.")
          for w in WINDOWS_DAYS for t in ("view", "purchase")],
        Field(name="conversion_rate_30d", dtype=Float64,
              description="Purchases / views over 30 days; 0 without views."),
        Field(name="price", dtype=Float64),
        Field(name="category", dtype=String),
        Field(name="brand", dtype=String),
        Field(name="first_seen_epoch_s", dtype=Int64,
              description="When the product first appeared in the catalogue, epoch seconds "
                          "(a row changes only when a value does; readers count the days)."),
    ],
    source=product_stats_source,
    online=True,
    tags={"team": "recsys", "tower": "item"},
)

product_text = FeatureView(
    name="product_text",
    entities=[product],
    ttl=FOREVER,
    schema=[
        Field(name="product_id", dtype=String),
        Field(name="text", dtype=String,
              description='What the item tower reads: "title | category | brand | description".'),
    ],
    source=product_text_source,
    online=True,
    tags={"team": "recsys", "tower": "item"},
)

product_catalog = FeatureView(
    name="product_catalog",
    entities=[product],
    ttl=FOREVER,
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
