"""The towers, the model's vocabularies, its config, its checkpoint and warm start."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from training.checkpoint import load_model, save_model, warm_start
from training.config import TrainConfig, step_batch_size
from training.text import TextEncoder, TrainableTextEncoder
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


# --- a fine-tuned text encoder inside the item tower -------------------------------------

TINY_TEXT = TrainConfig(text_encoder="tiny", device="cpu", max_text_tokens=12,
                        text_trainable_layers=1)
TINY_H = 32  # training.text.TINY_BERT hidden size
TEXTS = ["red heart candle", "garden hose 20m", "", "wooden toy train " * 10]


@pytest.fixture
def encoder() -> TrainableTextEncoder:
    return TrainableTextEncoder.from_config(TINY_TEXT, progress=False)


def _tuned_model(encoder: TrainableTextEncoder) -> TwoTowerModel:
    torch.manual_seed(0)
    model = TwoTowerModel(
        text_dim=TINY_H, categories=["candles", "garden"], brands=["acme"], embedding_dim=D,
        category_dim=4, brand_dim=4, hidden_dim=32, history_len=L, dropout=0.0,
    )
    return model.attach_text_encoder(encoder).eval()


def _text_catalog() -> pd.DataFrame:
    return pd.DataFrame({
        "product_id": ["p0", "p1", "p2", "p3"], "title": TEXTS,
        "category": ["candles", "garden", "candles", "toys"],
        "brand": ["acme", None, "acme", "other"], "price": [1.0, 10.0, 100.0, 0.0],
    })


def test_trainable_encoder_starts_as_the_frozen_encoder(encoder: TrainableTextEncoder) -> None:
    """Layer by layer (with or without precomputed states) it gives the frozen vectors."""
    frozen = TextEncoder(TINY_TEXT, progress=False).encode(TEXTS, progress=False)
    ids, mask = (torch.from_numpy(a) for a in encoder.tokenize(TEXTS))  # (N, T) each
    from_ids = encoder.encode(ids, mask)  # (N, H)
    states = encoder.frozen_states(ids, mask)  # (N, T, H)
    from_states = encoder.encode(ids, mask, states=states)
    np.testing.assert_allclose(from_ids.numpy(), frozen, atol=1e-5)
    torch.testing.assert_close(from_states, from_ids, rtol=0, atol=1e-6)
    assert states.shape == (4, 12, TINY_H) and not states.requires_grad


def test_only_the_top_layers_train(encoder: TrainableTextEncoder) -> None:
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("transformer.encoder.layer.1.") for n in trainable)
    encoder.train()
    assert encoder.training and not encoder.transformer.embeddings.training
    assert not encoder.transformer.encoder.layer[0].training  # frozen: no dropout either
    assert encoder.transformer.encoder.layer[1].training
    before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    ids, mask = (torch.from_numpy(a) for a in encoder.tokenize(TEXTS))
    optimizer = torch.optim.SGD([p for p in encoder.parameters() if p.requires_grad], lr=1.0)
    encoder(mask, ids=ids).sum().backward()
    optimizer.step()
    moved = {n for n, p in encoder.named_parameters() if not torch.equal(before[n], p)}
    assert moved and moved <= trainable  # the frozen part never moves
    assert all(p.grad is None for n, p in encoder.named_parameters() if n not in trainable)


@pytest.mark.parametrize("layers", [0, 3])
def test_trainable_layers_must_exist(layers: int) -> None:
    with pytest.raises(ValueError, match="layers"):
        TrainableTextEncoder.from_config(TINY_TEXT.replace(text_trainable_layers=layers),
                                         progress=False)


def test_forward_with_fresh_text_and_hard_negatives(encoder: TrainableTextEncoder) -> None:
    model = _tuned_model(encoder)
    features = ItemFeatures.from_catalog(_text_catalog(), np.zeros((4, TINY_H), np.float32))
    feats = features.tensors(model, torch.device("cpu"))
    ids, mask = (torch.from_numpy(a) for a in encoder.tokenize(features.texts))
    batch = {
        "item_text": torch.zeros(4, TINY_H), "item_category": feats["category"],
        "item_brand": feats["brand"], "item_price": feats["price"],
        "target": torch.tensor([0, 1]), "history": torch.tensor([[2, 3], [3, -1]]),
        "history_mask": torch.tensor([[True, True], [True, False]]),
        "history_event": torch.zeros(2, 2, dtype=torch.long),
        "hard": torch.tensor([[2, 3, 1], [0, 2, 3]]),
        "fresh": torch.tensor([0, 1, 2, 3]), "fresh_mask": mask, "fresh_ids": ids,
    }
    with torch.no_grad():
        users, candidates = model(batch)
    assert users.shape == (2, D) and candidates.shape == (2, 4, D)
    # The fresh text replaced the zero placeholders: the item embeddings are the served ones.
    np.testing.assert_allclose(candidates[:, 0].numpy(), encode_items(model, features)[[0, 1]],
                               atol=1e-5)


def test_encode_items_reencodes_texts_with_the_models_encoder(
    encoder: TrainableTextEncoder,
) -> None:
    model = _tuned_model(encoder)
    catalog = _text_catalog()
    stale = ItemFeatures.from_catalog(catalog, np.zeros((4, TINY_H), np.float32))
    with torch.no_grad():  # fine-tune "by hand": the top layer moves
        for p in encoder.transformer.encoder.layer[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids, mask = encoder.tokenize(stale.texts)
    tokenized = ItemFeatures.from_catalog(catalog, np.ones((4, TINY_H), np.float32),
                                          tokens=(ids, mask))
    a, b = encode_items(model, stale), encode_items(model, tokenized)
    np.testing.assert_allclose(a, b, atol=1e-6)  # features' own vectors are ignored
    frozen = _tuned_model(TrainableTextEncoder.from_config(TINY_TEXT, progress=False))
    assert not np.allclose(a, encode_items(frozen, stale), atol=1e-3)
    without_texts = dataclasses.replace(stale, texts=None)
    with pytest.raises(ValueError, match="texts"):
        encode_items(model, without_texts)


def test_checkpoint_with_a_fine_tuned_encoder_is_self_contained(
    encoder: TrainableTextEncoder, tmp_path
) -> None:
    model = _tuned_model(encoder)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    save_model(model, TINY_TEXT, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "text_encoder.json").is_file()
    loaded, config = load_model(tmp_path / "ckpt")
    assert config == TINY_TEXT
    assert loaded.text_encoder is not None and loaded.text_encoder.trainable_layers == 1
    features = ItemFeatures.from_catalog(_text_catalog(), np.zeros((4, TINY_H), np.float32))
    np.testing.assert_array_equal(encode_items(model, features), encode_items(loaded, features))
    # Saving a frozen-text model over it removes the stale encoder description.
    save_model(TwoTowerModel(text_dim=H, categories=[], brands=[]), TINY_TEXT, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "text_encoder.json").exists()
    assert load_model(tmp_path / "ckpt")[0].text_encoder is None


def test_warm_start_maps_vocabulary_rows_by_value(model: TwoTowerModel, tmp_path) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_model(model, TrainConfig(), tmp_path / "champion")
    torch.manual_seed(1)
    new = TwoTowerModel(  # the next catalogue: "candles" gone, "toys" new; wider hidden MLP
        text_dim=H, categories=["garden", "toys"], brands=["acme"], embedding_dim=D,
        category_dim=4, brand_dim=4, hidden_dim=64, history_len=L, dropout=0.0,
    )
    fresh_toys = new.item_tower.category.weight[2].detach().clone()
    report = warm_start(new, tmp_path / "champion")
    old_cat, new_cat = model.item_tower.category.weight, new.item_tower.category.weight
    torch.testing.assert_close(new_cat[0], old_cat[0])  # unknown
    torch.testing.assert_close(new_cat[1], old_cat[2])  # garden: row 2 before, row 1 now
    torch.testing.assert_close(new_cat[2], fresh_toys)  # toys: new, freshly initialised
    torch.testing.assert_close(new.user_tower.query, model.user_tower.query)
    torch.testing.assert_close(new.item_tower.text_skip.weight, model.item_tower.text_skip.weight)
    assert not torch.equal(new.item_tower.mlp[0].weight[:32], model.item_tower.mlp[0].weight)
    assert "item_tower.text_skip.weight" in report["loaded"]
    assert any(m.startswith("item_tower.category.weight (1 of 2") for m in report["mapped"])
    assert any(s.startswith("item_tower.mlp.0.weight (shape") for s in report["skipped"])


@pytest.mark.parametrize("bad", [{"text_trainable_layers": -1}, {"hard_negatives": -2},
                                 {"patience": 0}, {"early_stopping_k": 0}, {"text_lr": 0.0},
                                 {"batch_size_cuda": -1}])
def test_config_rejects_bad_training_options(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainConfig(**bad)


def test_new_config_fields_default_to_todays_behaviour() -> None:
    config = TrainConfig()
    assert config.text_trainable_layers == 0 and config.hard_negatives == 0
    assert step_batch_size(config, torch.device("cpu")) == config.batch_size
    assert step_batch_size(config, torch.device("cuda")) == config.batch_size_cuda >= 2048
    assert step_batch_size(config.replace(batch_size_cuda=0), torch.device("cuda")) == 512
