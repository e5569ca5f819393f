"""Behaviour: a tiny two-tower model learns that users buy within a category, with frozen or
fine-tuned text, with hard negatives, with early stopping and from a warm start."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pandas as pd
import pytest
import torch

from features.contract import product_text
from training.checkpoint import load_model, save_model
from training.config import TrainConfig
from training.embeddings import ItemFeatures, encode_items, encode_users
from training.examples import unique_products
from training.metrics import evaluate_model
from training.text_cache import embed_texts
from training.train import NotEnoughData, TrainResult, ValidationSet, train

pytestmark = pytest.mark.fast

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


def _new_users(seed: int = 1, categories: list[str] = CATEGORIES
               ) -> tuple[dict[str, list[str]], dict[str, set[str]]]:
    """Users unseen in training: 3 products of one category, then a 4th of it."""
    rng = np.random.default_rng(seed)
    histories, truth = {}, {}
    for i, category in enumerate(categories * 5):
        picks = rng.permutation(PER_CATEGORY)
        histories[f"new{i}"] = [f"{category}-{j}" for j in picks[:3]]
        truth[f"new{i}"] = {f"{category}-{picks[3]}"}
    return histories, truth


def _recall_at_10(result: TrainResult, seed: int = 1) -> float:
    histories, truth = _new_users(seed)
    return evaluate_model(result.model, None, result.item_embeddings, result.product_ids,
                          histories, None, truth, ks=(10,))["recall_at_10"]


def test_users_rank_their_category_above_others(trained) -> None:
    """A new user's unseen same-category product beats random products of other categories."""
    rng = np.random.default_rng(1)
    histories, truth = _new_users()
    # Random ranking: 10 / 40 = 0.25. Same-category products all first: 1.0.
    assert _recall_at_10(trained) >= 0.8

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


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    config = CONFIG.replace(text_trainable_layers=1, hard_negatives=3)
    return train(config, _catalog(), _examples(), progress=False,
                 cache_dir=tmp_path_factory.mktemp("cache"))


def test_fine_tuned_text_encoder_learns_and_moves(fine_tuned: TrainResult) -> None:
    assert fine_tuned.losses[-1] < 0.8 * fine_tuned.losses[0]
    assert _recall_at_10(fine_tuned) >= 0.8
    encoder = fine_tuned.model.text_encoder
    assert encoder is not None and encoder.trainable_layers == 1
    # The fine-tuned text vectors differ from the frozen encoder's; the frozen part did not.
    frozen = embed_texts(product_text(unique_products(_catalog())), CONFIG, progress=False)
    assert fine_tuned.text_embeddings.shape == frozen.shape
    assert not np.allclose(fine_tuned.text_embeddings, frozen, atol=1e-3)


def test_fine_tuned_bundle_serves_the_same_embeddings(fine_tuned: TrainResult, tmp_path) -> None:
    """Saved, loaded and re-encoded from the catalogue (the serving/evaluation path), the
    fine-tuned model reproduces its training-time item embeddings."""
    save_model(fine_tuned.model, fine_tuned.config, tmp_path / "model")
    model, config = load_model(tmp_path / "model")
    catalog = unique_products(_catalog())
    # What pipeline.catalog_embeddings does: frozen vectors, ignored by a fine-tuned model.
    features = ItemFeatures.from_catalog(
        catalog, embed_texts(product_text(catalog), config, progress=False))
    np.testing.assert_allclose(encode_items(model, features), fine_tuned.item_embeddings,
                               atol=1e-5)


def test_hard_negatives_train_a_ranking_model() -> None:
    result = train(CONFIG.replace(hard_negatives=4), _catalog(), _examples(), progress=False)
    assert result.losses[-1] < 0.8 * result.losses[0]
    assert _recall_at_10(result) >= 0.8


def test_early_stopping_keeps_the_best_epoch() -> None:
    histories, truth = _new_users(seed=7)
    validation = ValidationSet(histories=histories, truth=truth)
    config = CONFIG.replace(epochs=20, patience=2, early_stopping_k=10)
    seen: list[dict[str, float]] = []
    result = train(config, _catalog(), _examples(), progress=False, validation=validation,
                   on_epoch=lambda epoch, metrics: seen.append(metrics))
    curve = [m["val_recall_at_10"] for m in result.history]
    assert seen == result.history and len(curve) < 20  # stopped early
    assert result.best_epoch == int(np.argmax(curve))  # the first best
    assert len(curve) == result.best_epoch + 1 + config.patience
    # The kept weights are the best epoch's: they score exactly that recall again.
    again = evaluate_model(result.model, None, result.item_embeddings, result.product_ids,
                           histories, None, truth, ks=(10,))["recall_at_10"]
    assert again == curve[result.best_epoch] == max(curve) >= 0.8


def test_warm_start_continues_from_the_champion(trained: TrainResult, tmp_path) -> None:
    save_model(trained.model, CONFIG, tmp_path / "champion")
    untrained = CONFIG.replace(epochs=0)
    same = train(untrained, _catalog(), _examples(), progress=False,
                 warm_start=tmp_path / "champion")
    np.testing.assert_allclose(same.item_embeddings, trained.item_embeddings, atol=1e-6)
    assert same.warm_start is not None and not same.warm_start["skipped"]
    # A new catalogue version: "toys" replaced by "books". Known products keep their place.
    catalog = _catalog()
    catalog["category"] = catalog["category"].replace("toys", "books")
    moved = train(untrained, catalog, _examples(), progress=False,
                  warm_start=tmp_path / "champion")
    assert any("3 of 4 categories" in m for m in moved.warm_start["mapped"])
    cold = train(untrained, catalog, _examples(), progress=False)
    # Random ranking: 0.25; the books users lose their (new, untrained) category row.
    assert _recall_at_10(moved) >= 0.6 and _recall_at_10(cold) < 0.4


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


def test_on_epoch_reports_each_epoch() -> None:  # no validation: no val_ metric
    seen = []
    train(CONFIG.replace(epochs=2), _catalog(), _examples(80), progress=False,
          on_epoch=lambda epoch, metrics: seen.append((epoch, sorted(metrics))))
    assert seen == [(e, ["examples", "examples_per_s", "loss", "seconds"]) for e in range(2)]


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fine_tunes_with_hard_negatives_on_cuda() -> None:
    config = CONFIG.replace(device="cuda", text_trainable_layers=1, hard_negatives=3,
                            batch_size_cuda=128)
    result = train(config, _catalog(), _examples(), progress=False)
    assert result.device.startswith("cuda")
    assert np.isfinite(result.item_embeddings).all()
    assert result.losses[-1] < result.losses[0]
    assert _recall_at_10(result) >= 0.8


def test_fine_tuning_without_room_for_frozen_states_gives_the_same_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Too big a catalogue to keep the frozen layers' states: they are recomputed per batch,
    which changes the cost, not the result."""
    from training import catalog_text
    from training.text import TrainableTextEncoder

    calls = []
    original = TrainableTextEncoder.frozen_states
    monkeypatch.setattr(TrainableTextEncoder, "frozen_states",
                        lambda self, ids, mask: calls.append(len(ids)) or original(self, ids, mask))
    config = CONFIG.replace(epochs=2, text_trainable_layers=1)
    kept = train(config, _catalog(), _examples(), progress=False)
    assert calls == [40]  # once, for the whole catalogue
    monkeypatch.setattr(catalog_text, "FROZEN_STATES_MAX_BYTES", 0)
    recomputed = train(config, _catalog(), _examples(), progress=False)
    assert len(calls) > 10  # for every batch and every refresh
    np.testing.assert_allclose(recomputed.losses, kept.losses, rtol=1e-4)
    np.testing.assert_allclose(recomputed.item_embeddings, kept.item_embeddings, atol=1e-4)
