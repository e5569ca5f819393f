"""Feature views. Schemas are declared in full so that `feast apply` reads no data.

Every view keeps a snapshot valid until a newer one replaces it (long ttl): the offline build
writes a new snapshot whenever a value can have changed, and only then (see features/build.py);
values that would change on days without events (a window moving, days since a purchase or
since a product was first seen) are stored as what they are computed from, and readers compute
them at their own time: ``user_profile`` holds a user's last 30 days of activity per day
(``features.user_state.read_profiles`` turns it into counts over 7 and 30 days and the rest).
"""

from datetime import timedelta

from data_sources import (
    product_catalog_source,
    product_stats_source,
    product_text_source,
    user_profile_push,
    user_recent_products_push,
    user_vectors_source,
)
from entities import product, user
from feast import FeatureView, Field
from feast.types import Array, Float32, Float64, Int64, String

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
        Field(name="purchased_product_ids", dtype=Array(String),
              description="Every product the user bought, however long ago, in order of "
                          "first purchase (the last 5,000: features.user_state."
                          "PURCHASED_LEN); what exclude_purchased leaves out."),
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
        Field(name="active_days", dtype=Array(Int64),
              description="Days (since the epoch) with an event among the last 30, "
                          "ascending; the lists below are aligned with it."),
        *[Field(name=f"{t}_by_day", dtype=Array(Int64),
                description=f"{t} events on each of those days.")
          for t in EVENT_TYPES],
        Field(name="basket_value_by_day", dtype=Array(Float64),
              description="sum(quantity * price) of each day's purchases (0 without)."),
        Field(name="recent_categories", dtype=Array(String),
              description="Categories of the products touched in those days."),
        Field(name="recent_category_days", dtype=Array(Int64),
              description="The last day each of them was touched."),
        Field(name="last_purchase_epoch_s", dtype=Int64,
              description="Time of the last purchase, epoch seconds; -1 when never."),
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

user_vectors = FeatureView(
    name="user_vectors",
    entities=[user],
    ttl=FOREVER,
    schema=[
        Field(name="user_id", dtype=String),
        Field(name="vectors_bundle", dtype=String,
              description="The served bundle these were computed with (model name, version "
                          "and run): another bundle computes its own."),
        Field(name="vectors_row", dtype=String,
              description="Digest of the user's online row they were computed from "
                          "(training.ranking.histories.row_digest): a changed row is "
                          "computed again."),
        Field(name="two_tower_vector", dtype=Array(Float32),
              description="The user tower's embedding of the row (empty: none)."),
        Field(name="text_vector", dtype=Array(Float32),
              description="Unit mean text vector of the row's products (empty: none)."),
        Field(name="als_vector", dtype=Array(Float32),
              description="ALS user factors solved from the row (empty: none)."),
        Field(name="sequence_vector", dtype=Array(Float32),
              description="The sequence encoder's vector of the row, bias entry last "
                          "(empty: none, or a bundle without the encoder)."),
        *[Field(name=f"retrieved_{space}", dtype=Array(Int64),
                description=f"Catalogue rows the {space} index returned for that vector.")
          for space in ("two_tower", "text", "als", "sequence")],
    ],
    source=user_vectors_source,
    online=True,
    tags={"team": "recsys", "tower": "user", "written_by": "serving.user_vectors"},
)
