"""Behaviour: with user features the tiny two-tower model learns what only the profile tells.

Each user's next product comes from the category of their country, and their history is a
random draw from the whole catalogue (it says nothing). The model that reads the country
ranks the country's products first; the history-only tower cannot beat chance.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pandas as pd
import pytest

# The toy catalogue of the behaviour test next door (pytest puts this folder on sys.path).
from test_two_tower_learns import CATEGORIES, CONFIG, PER_CATEGORY, _catalog

from training.embeddings import encode_users
from training.metrics import evaluate_model
from training.train import TrainResult, ValidationSet, train

pytestmark = pytest.mark.fast

# Each country buys from one category.
COUNTRY_CATEGORY = dict(zip(["France", "Germany", "United Kingdom", "Netherlands"], CATEGORIES,
                            strict=True))
COUNTRIES = list(COUNTRY_CATEGORY)
ALL_PRODUCTS = [f"{c}-{j}" for c in CATEGORIES for j in range(PER_CATEGORY)]


def _examples(n_users: int = 320, seed: int = 0) -> pd.DataFrame:
    """Random histories over every category; the target from the country's category."""
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2024-01-02", tz="UTC")
    rows = []
    for u in range(n_users):
        country = COUNTRIES[u % len(COUNTRIES)]
        history = list(rng.choice(ALL_PRODUCTS, size=4, replace=False))
        rows.append({
            "user_id": f"u{u}",
            "product_id": f"{COUNTRY_CATEGORY[country]}-{rng.integers(PER_CATEGORY)}",
            "event_timestamp": start + pd.Timedelta(minutes=u),
            "recent_product_ids": history,
            "recent_event_types": ["view"] * 4,
            "country": country,
            "purchase_count_30d": int(rng.integers(0, 5)),  # noise
        })
    return pd.DataFrame(rows)


def _new_users(seed: int = 1) -> tuple[dict[str, list[str]], dict[str, set[str]], pd.DataFrame]:
    """Unseen users: a random history, one product of their country's category to find."""
    rng = np.random.default_rng(seed)
    histories, truth, countries = {}, {}, []
    for i in range(100):
        country = COUNTRIES[i % len(COUNTRIES)]
        histories[f"new{i}"] = list(rng.choice(ALL_PRODUCTS, size=3, replace=False))
        truth[f"new{i}"] = {f"{COUNTRY_CATEGORY[country]}-{rng.integers(PER_CATEGORY)}"}
        countries.append(country)
    profiles = pd.DataFrame({"user_id": list(histories), "country": countries})
    return histories, truth, profiles


def _recall_at_10(result: TrainResult, with_profiles: bool = True) -> float:
    histories, truth, profiles = _new_users()
    return evaluate_model(result.model, None, result.item_embeddings, result.product_ids,
                          histories, None, truth, ks=(10,),
                          user_features=profiles if with_profiles else None)["recall_at_10"]


@pytest.fixture(scope="module")
def with_features() -> TrainResult:
    return train(CONFIG, _catalog(), _examples(), progress=False)


def test_the_model_learns_from_the_country(with_features: TrainResult) -> None:
    assert with_features.model.countries == sorted(COUNTRIES)
    # Random ranking: 10 / 40 = 0.25; the country's category first: 1.0.
    assert _recall_at_10(with_features) >= 0.8
    # The same users without their profile: nothing left to go on.
    assert _recall_at_10(with_features, with_profiles=False) <= 0.45


def test_country_products_rank_above_random_ones(with_features: TrainResult) -> None:
    rng = np.random.default_rng(2)
    histories, truth, profiles = _new_users()
    index = with_features.item_index
    users = encode_users(with_features.model, list(histories.values()), None, index,
                         with_features.item_embeddings, user_features=profiles)
    scores = users @ with_features.item_embeddings.T  # (U, N)
    wins = 0
    for u, products in enumerate(truth.values()):
        target = next(iter(products))
        category = target.split("-")[0]
        others = [index[p] for p in ALL_PRODUCTS if not p.startswith(category)]
        sample = rng.choice(others, size=5, replace=False)
        wins += bool((scores[u, index[target]] > scores[u, sample]).all())
    assert wins >= 0.9 * len(truth)


def test_without_user_features_the_tower_cannot() -> None:
    history_only = train(CONFIG.replace(user_features=False), _catalog(), _examples(),
                         progress=False)
    assert not history_only.model.user_features
    assert _recall_at_10(history_only) <= 0.45  # the profile is ignored: chance level
    no_profiles = train(CONFIG, _catalog(), _examples().drop(columns=["country",
                                                                      "purchase_count_30d"]),
                        progress=False)
    assert no_profiles.model.countries == []  # every example's profile was unknown
    assert _recall_at_10(no_profiles) <= 0.45


def test_validation_reads_user_features() -> None:
    histories, truth, profiles = _new_users(seed=7)
    config = CONFIG.replace(epochs=4, patience=4, early_stopping_k=10)
    profiled = train(config, _catalog(), _examples(), progress=False,
                     validation=ValidationSet(histories=histories, truth=truth,
                                              user_features=profiles))
    blind = train(config, _catalog(), _examples(), progress=False,
                  validation=ValidationSet(histories=histories, truth=truth))
    assert profiled.history[-1]["val_recall_at_10"] >= 0.8
    assert blind.history[-1]["val_recall_at_10"] <= 0.45
    # The validation set changes what is measured, not how the model trains.
    assert profiled.losses == blind.losses
