"""Versioned feature services: what the training and serving paths read.

A service's name is a contract: change what it returns by adding a new version, never by
editing one in use.
"""

from feast import FeatureService
from feature_views import (
    product_catalog,
    product_stats,
    product_text,
    user_profile,
    user_recent_products,
    user_vectors,
)

two_tower_training_v1 = FeatureService(
    name="two_tower_training_v1",
    features=[user_recent_products, user_profile, product_stats, product_text],
    description="Point-in-time training rows (user_id, product_id, event_timestamp): "
                "user-tower and item-tower inputs, version 1.",
)

two_tower_serving_v1 = FeatureService(
    name="two_tower_serving_v1",
    features=[user_recent_products, user_profile],
    description="User-tower inputs read online per request, version 1.",
)

two_tower_items_v1 = FeatureService(
    name="two_tower_items_v1",
    features=[product_stats, product_text],
    description="Item-tower inputs per product, version 1.",
)

product_catalog_v1 = FeatureService(
    name="product_catalog_v1",
    features=[product_catalog],
    description="Product attributes shown with results.",
)

user_vectors_v1 = FeatureService(
    name="user_vectors_v1",
    features=[user_vectors],
    description="User-side vectors of the served bundle, written online when a user's row "
                "changes (daily and real time); read with the serving row, version 1.",
)
