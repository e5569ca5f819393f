"""The towers, the model's vocabularies, its config and its checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from training.checkpoint import load_model, save_model
from training.config import TrainConfig
from training.towers import (
    EVENT_TYPE_IDS,
    ItemFeatures,
    TwoTowerModel,
    encode_items,
    encode_users,
    history_matrix,
)

H, D, L = 8, 16, 6


@pytest.fixture
def model() -> TwoTowerModel:
    torch.manual_seed(0)
    return TwoTowerModel(
        text_dim=H, categories=["candles", "garden"], brands=["acme"], embedding_dim=D,
        category_dim=4, brand_dim=4, hidden_dim=32, history_len=L, dropout=0.0,
    ).eval()


@pytest.fixture
def features() -> ItemFeatures:
    rng = np.random.default_rng(0)
    catalog = pd.DataFrame({
        "product_id": ["p0", "p1", "p2", "p3"],
        "category": ["candles", "garden", "candles", "toys"],  # toys: unknown to the model
        "brand": ["acme", None, "acme", "other"],
        "price": [1.0, 10.0, 100.0, 0.0],
    })
    return ItemFeatures.from_catalog(catalog, rng.normal(size=(4, H)).astype(np.float32))


def test_item_tower_gives_unit_vectors(model: TwoTowerModel, features: ItemFeatures) -> None:
    emb = encode_items(model, features)
    assert emb.shape == (4, D) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


def test_unknown_category_and_brand_map_to_index_zero(model: TwoTowerModel) -> None:
    assert model.category_ids(["candles", "garden", "toys", None]).tolist() == [1, 2, 0, 0]
    assert model.brand_ids(["acme", "other"]).tolist() == [1, 0]


def test_user_tower_gives_unit_vectors(model: TwoTowerModel) -> None:
    items = torch.nn.functional.normalize(torch.randn(3, L, D), dim=-1)  # (B, L, D)
    events = torch.randint(0, len(EVENT_TYPE_IDS) + 1, (3, L))  # (B, L)
    mask = torch.tensor([[True] * L, [True, True] + [False] * (L - 2), [False] * L])
    with torch.no_grad():
        out = model.user_tower(items, events, mask)
    assert out.shape == (3, D)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))


def test_empty_history_is_finite(model: TwoTowerModel) -> None:
    with torch.no_grad():
        out = model.user_tower(
            torch.randn(2, L, D), torch.zeros(2, L, dtype=torch.long),
            torch.zeros(2, L, dtype=torch.bool),
        )
        zero_length = model.user_tower(
            torch.randn(2, 0, D), torch.zeros(2, 0, dtype=torch.long),
            torch.zeros(2, 0, dtype=torch.bool),
        )
    assert torch.isfinite(out).all() and torch.isfinite(zero_length).all()
    torch.testing.assert_close(out[0], zero_length[0])


def test_empty_history_gets_gradients(model: TwoTowerModel) -> None:
    model.train()
    out = model.user_tower(
        torch.randn(2, L, D), torch.zeros(2, L, dtype=torch.long),
        torch.zeros(2, L, dtype=torch.bool),
    )
    out.sum().backward()
    assert model.user_tower.empty.grad is not None
    assert torch.isfinite(model.user_tower.empty.grad).all()


def test_padding_content_does_not_change_the_output(model: TwoTowerModel) -> None:
    torch.manual_seed(1)
    items = torch.randn(2, L, D)  # (B, L, D)
    events = torch.randint(1, len(EVENT_TYPE_IDS) + 1, (2, L))  # (B, L)
    mask = torch.tensor([[True, True, True] + [False] * (L - 3)] * 2)
    other_items, other_events = items.clone(), events.clone()
    other_items[:, 3:] = 1e3 * torch.randn(2, L - 3, D)
    other_events[:, 3:] = 0
    with torch.no_grad():
        a = model.user_tower(items, events, mask)
        b = model.user_tower(other_items, other_events, mask)
        c = model.user_tower(other_items, other_events, torch.ones_like(mask))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.allclose(a, c)  # the same content, unmasked, does change it


def test_event_type_and_order_matter(model: TwoTowerModel) -> None:
    # Randomise the (small-initialised) event/position embeddings, as training would.
    with torch.no_grad():
        model.user_tower.event.weight.normal_()
        model.user_tower.position.weight.normal_()
    items = torch.randn(1, L, D)
    mask = torch.ones(1, L, dtype=torch.bool)
    views = torch.full((1, L), EVENT_TYPE_IDS["view"])
    buys = torch.full((1, L), EVENT_TYPE_IDS["purchase"])
    with torch.no_grad():
        a = model.user_tower(items, views, mask)
        b = model.user_tower(items, buys, mask)
        c = model.user_tower(items.flip(1), views, mask)
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, c)


def test_history_matrix_is_most_recent_first_and_skips_unknown() -> None:
    index = {"a": 0, "b": 1, "c": 2}
    rows, events = history_matrix(
        [["a", "zzz", "b", "c"], [], None, ["a", "b"], float("nan")],
        [["view", "view", "add_to_cart", "purchase"], [], None, ["view"], None],
        index,
        history_len=2,
    )
    assert rows.tolist() == [[2, 1], [-1, -1], [-1, -1], [1, 0], [-1, -1]]
    purchase, cart = EVENT_TYPE_IDS["purchase"], EVENT_TYPE_IDS["add_to_cart"]
    # Row 3's event list has the wrong length: its types are unknown (0).
    assert events.tolist() == [[purchase, cart], [0, 0], [0, 0], [0, 0], [0, 0]]


def test_forward_matches_serving_path(model: TwoTowerModel, features: ItemFeatures) -> None:
    """Training's forward and encode_users over precomputed item embeddings agree."""
    item_emb = encode_items(model, features)
    index = {p: i for i, p in enumerate(features.product_ids)}
    histories = [["p0", "p2", "p1"], []]
    types = [["view", "purchase", "add_to_cart"], []]
    served = encode_users(model, histories, types, index, item_emb)
    rows, events = history_matrix(histories, types, index, L)
    feats = features.tensors(model, torch.device("cpu"))
    batch = {
        "item_text": feats["text"], "item_category": feats["category"],
        "item_brand": feats["brand"], "item_price": feats["price"],
        "target": torch.tensor([3, 0]), "history": torch.from_numpy(rows),
        "history_mask": torch.from_numpy(rows >= 0), "history_event": torch.from_numpy(events),
    }
    with torch.no_grad():
        users, targets = model(batch)
    assert users.shape == targets.shape == (2, D)
    np.testing.assert_allclose(served, users.numpy(), atol=1e-5)
    np.testing.assert_allclose(targets.numpy(), item_emb[[3, 0]], atol=1e-5)


def test_encode_users_handles_cold_users_and_unknown_products(
    model: TwoTowerModel, features: ItemFeatures
) -> None:
    item_emb = encode_items(model, features)
    index = {p: i for i, p in enumerate(features.product_ids)}
    out = encode_users(model, [[], None, ["nope"], ["p1", "nope"]], None, index, item_emb)
    assert out.shape == (4, D) and np.isfinite(out).all()
    np.testing.assert_allclose(out[0], out[2], atol=1e-6)  # unknown products are skipped
    np.testing.assert_allclose(out[3], encode_users(model, [["p1"]], None, index, item_emb)[0],
                               atol=1e-6)


def test_checkpoint_roundtrip_gives_identical_outputs(
    model: TwoTowerModel, features: ItemFeatures, tmp_path
) -> None:
    with torch.no_grad():  # make the weights non-default everywhere
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    config = TrainConfig(text_encoder="tiny", embedding_dim=D, history_len=L, epochs=3)
    save_model(model, config, tmp_path / "ckpt")
    loaded, loaded_config = load_model(tmp_path / "ckpt")
    assert loaded_config == config
    assert loaded.categories == model.categories and loaded.brands == model.brands
    index = {p: i for i, p in enumerate(features.product_ids)}
    a, b = encode_items(model, features), encode_items(loaded, features)
    np.testing.assert_array_equal(a, b)
    hist = [["p0", "p3"], []]
    np.testing.assert_array_equal(
        encode_users(model, hist, None, index, a), encode_users(loaded, hist, None, index, b)
    )
    vocab = json.loads((tmp_path / "ckpt" / "vocabularies.json").read_text())
    assert vocab == {"categories": ["candles", "garden"], "brands": ["acme"]}


def test_config_params_are_flat_and_roundtrip_through_strings() -> None:
    config = TrainConfig(text_encoder="tiny", epochs=7, lr=0.01, logq_correction=False)
    params = config.to_params()
    assert all(isinstance(v, str | int | float | bool) for v in params.values())
    assert TrainConfig.from_params({k: str(v) for k, v in params.items()}) == config


def test_config_fingerprint_is_stable_and_sensitive() -> None:
    a = TrainConfig()
    assert a.fingerprint() == TrainConfig().fingerprint()
    assert a.fingerprint() != a.replace(temperature=0.1).fingerprint()
    assert len(a.fingerprint()) == 12


@pytest.mark.parametrize("bad", [{"temperature": 0.0}, {"batch_size": 0}, {"precision": "fp8"}])
def test_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        TrainConfig(**bad)
