"""Behaviour: a tiny two-tower model learns that users buy within a category."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pandas as pd
import pytest
import torch

from training.config import TrainConfig
from training.evaluate import evaluate_model
from training.towers import encode_users
from training.train import NotEnoughData, train

CATEGORIES = ["candles", "garden", "kitchen", "toys"]
PER_CATEGORY = 10
CONFIG = TrainConfig(
    text_encoder="tiny", device="cpu", epochs=8, batch_size=64, embedding_dim=32,
    hidden_dim=64, history_len=10, min_examples=50, lr=3e-3,
)


def _catalog() -> pd.DataFrame:
    rows = [
        {
            "product_id": f"{c}-{j}", "title": f"{c} product {j}", "description": None,
            "category": c, "brand": f"brand-{j % 3}", "price": float(1 + j),
            "image_url": None, "updated_at": pd.Timestamp("2024-01-01", tz="UTC"),
        }
        for c in CATEGORIES
        for j in range(PER_CATEGORY)
    ]
    return pd.DataFrame(rows)


def _examples(n_users: int = 320, seed: int = 0) -> pd.DataFrame:
    """Each user views a few products of one category, then buys another of it."""
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2024-01-02", tz="UTC")
    rows = []
    for u in range(n_users):
        category = CATEGORIES[u % len(CATEGORIES)]
        picks = rng.permutation(PER_CATEGORY)
        history = [f"{category}-{j}" for j in picks[:4]]
        rows.append({
            "user_id": f"u{u}", "product_id": f"{category}-{picks[4]}",
            "event_timestamp": start + pd.Timedelta(minutes=u),
            "recent_product_ids": history + ["not-in-catalogue"],
            "recent_event_types": ["view", "view", "add_to_cart", "view", "view"],
        })
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def trained():
    return train(CONFIG, _catalog(), _examples(), progress=False)


def test_loss_goes_down(trained) -> None:
    assert len(trained.losses) == CONFIG.epochs
    assert trained.losses[-1] < 0.8 * trained.losses[0]
    assert trained.n_examples == 320


def test_item_embeddings_cover_the_catalogue(trained) -> None:
    assert trained.item_embeddings.shape == (len(CATEGORIES) * PER_CATEGORY, CONFIG.embedding_dim)
    assert trained.item_embeddings.dtype == np.float32
    assert sorted(trained.product_ids) == sorted(_catalog()["product_id"])


def test_users_rank_their_category_above_others(trained) -> None:
    """A new user's unseen same-category product beats random products of other categories."""
    rng = np.random.default_rng(1)
    histories, truth = {}, {}
    for i, category in enumerate(CATEGORIES * 5):
        picks = rng.permutation(PER_CATEGORY)
        histories[f"new{i}"] = [f"{category}-{j}" for j in picks[:3]]
        truth[f"new{i}"] = {f"{category}-{picks[3]}"}
    metrics = evaluate_model(trained.model, None, trained.item_embeddings, trained.product_ids,
                             histories, None, truth, ks=(10,))
    # Random ranking: 10 / 40 = 0.25. Same-category products all first: 1.0.
    assert metrics["recall_at_10"] >= 0.8

    index = trained.item_index
    users = encode_users(trained.model, list(histories.values()), None, index,
                         trained.item_embeddings)
    scores = users @ trained.item_embeddings.T  # (U, N)
    wins = 0
    for u, products in enumerate(truth.values()):
        target = index[next(iter(products))]
        category = next(iter(products)).split("-")[0]
        others = [index[p] for p in trained.product_ids if not p.startswith(category)]
        sample = rng.choice(others, size=5, replace=False)
        wins += bool((scores[u, target] > scores[u, sample]).all())
    assert wins >= 0.9 * len(truth)


def test_training_is_reproducible(trained) -> None:
    again = train(CONFIG, _catalog(), _examples(), progress=False)
    np.testing.assert_array_equal(trained.item_embeddings, again.item_embeddings)
    assert trained.losses == again.losses
    for a, b in zip(trained.model.state_dict().values(), again.model.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    # The row order of the examples does not matter either.
    shuffled = _examples().sample(frac=1.0, random_state=3)
    np.testing.assert_array_equal(
        trained.item_embeddings, train(CONFIG, _catalog(), shuffled, progress=False).item_embeddings
    )


def test_on_epoch_reports_each_epoch() -> None:
    seen = []
    train(CONFIG.replace(epochs=2), _catalog(), _examples(80), progress=False,
          on_epoch=lambda epoch, metrics: seen.append((epoch, sorted(metrics))))
    assert seen == [(e, ["examples_per_s", "loss", "seconds"]) for e in range(2)]


def test_too_few_examples_is_a_clear_error() -> None:
    examples = _examples(40)
    examples.loc[:20, "product_id"] = "unknown-product"  # dropped: not in the catalogue
    with pytest.raises(NotEnoughData, match="19 usable"):
        train(CONFIG, _catalog(), examples, progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trains_with_mixed_precision_on_cuda() -> None:
    result = train(CONFIG.replace(device="cuda"), _catalog(), _examples(), progress=False)
    assert result.device.startswith("cuda")
    assert np.isfinite(result.item_embeddings).all()
    assert result.losses[-1] < result.losses[0]
