"""Versioned feature services: what the training and serving paths read."""

from feast import FeatureService
from feature_views import product_catalog, user_recent_products

two_tower_v1 = FeatureService(
    name="two_tower_v1",
    features=[user_recent_products],
    description="User-tower inputs of the two-tower model, version 1.",
)

product_catalog_v1 = FeatureService(
    name="product_catalog_v1",
    features=[product_catalog],
    description="Product attributes shown with results.",
)
