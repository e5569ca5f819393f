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
from training.embeddings import ItemFeatures, encode_items, encode_users, history_matrix
from training.text import TextEncoder, TrainableTextEncoder
from training.towers import EVENT_TYPE_IDS, TwoTowerModel
from training.user_features import N_NUMERIC, unknown_numeric

pytestmark = pytest.mark.fast

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
    assert vocab == {"categories": ["candles", "garden"], "brands": ["acme"], "countries": []}


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
    frozen = TextEncoder(TINY_TEXT.replace(precision="fp32"), progress=False).encode(
        TEXTS, progress=False)  # the trainable encoder runs in fp32 on the CPU
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


# --- user features in the user tower -------------------------------------------------------

COUNTRIES = ["France", "United Kingdom"]


@pytest.fixture
def profile_model() -> TwoTowerModel:
    """A model with user features whose every weight (the zero-initialised profile
    projection included) is non-default, as after training."""
    torch.manual_seed(0)
    model = TwoTowerModel(
        text_dim=H, categories=["candles", "garden"], brands=["acme"], embedding_dim=D,
        category_dim=4, brand_dim=4, hidden_dim=32, history_len=L, dropout=0.0,
        countries=COUNTRIES, country_dim=3,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def _profiles(countries: list[str | None]) -> pd.DataFrame:
    """Profiles that differ only by country, plus a user_id column encode_users ignores."""
    return pd.DataFrame({"user_id": [f"u{i}" for i in range(len(countries))],
                         "purchase_count_30d": [3] * len(countries),
                         "days_since_last_purchase": [2] * len(countries),
                         "country": countries})


def test_user_inputs_map_unknown_countries_to_zero(profile_model: TwoTowerModel) -> None:
    numeric, country = profile_model.user_inputs(
        _profiles(["United Kingdom", "France", "Narnia", None]), 4)
    assert numeric.shape == (4, N_NUMERIC) and numeric.dtype == np.float32
    assert country.tolist() == [2, 1, 0, 0]
    unknown_rows, unknown_ids = profile_model.user_inputs(None, 2)
    np.testing.assert_array_equal(unknown_rows, np.stack([unknown_numeric()] * 2))
    assert unknown_ids.tolist() == [0, 0]
    with pytest.raises(ValueError, match="3 rows of user features for 2 users"):
        profile_model.user_inputs(_profiles(["France"] * 3), 2)


def test_a_new_model_starts_as_the_history_only_tower(features: ItemFeatures) -> None:
    torch.manual_seed(0)
    kwargs = dict(text_dim=H, categories=["candles"], brands=[], embedding_dim=D,
                  hidden_dim=32, history_len=L)
    with_features = TwoTowerModel(**kwargs, countries=COUNTRIES).eval()
    torch.manual_seed(0)
    without = TwoTowerModel(**kwargs, user_features=False).eval()
    assert with_features.user_features and not without.user_features
    index = {p: i for i, p in enumerate(features.product_ids)}
    emb = encode_items(with_features, features)
    np.testing.assert_array_equal(emb, encode_items(without, features))
    hist = [["p0", "p2"], []]
    profiled = encode_users(with_features, hist, None, index, emb,
                            user_features=_profiles(["France", None]))
    # The profile's projection starts at zero, and the history part drew the same weights.
    np.testing.assert_allclose(profiled, encode_users(without, hist, None, index, emb),
                               atol=1e-6)
    # A history-only model ignores user features.
    np.testing.assert_array_equal(
        encode_users(without, hist, None, index, emb, user_features=_profiles(["France"] * 2)),
        encode_users(without, hist, None, index, emb))


def test_profile_makes_cold_users_distinct(
    profile_model: TwoTowerModel, features: ItemFeatures
) -> None:
    index = {p: i for i, p in enumerate(features.product_ids)}
    emb = encode_items(profile_model, features)
    cold = [[], [], [], []]
    out = encode_users(profile_model, cold, None, index, emb,
                       user_features=_profiles(["France", "United Kingdom", None, "Narnia"]))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(out[0], out[1], atol=1e-3)  # the country moves a cold user
    np.testing.assert_allclose(out[2], out[3], atol=1e-6)  # unknown country = null country
    unknown = encode_users(profile_model, cold[:1], None, index, emb)  # no features at all
    assert not np.allclose(out[2], unknown[0], atol=1e-3)  # a known profile, unknown country
    np.testing.assert_allclose(  # absent columns and rows read as unknown
        encode_users(profile_model, cold[:1], None, index, emb,
                     user_features=pd.DataFrame(index=range(1))), unknown, atol=1e-6)


def test_forward_matches_serving_path_with_user_features(
    profile_model: TwoTowerModel, features: ItemFeatures
) -> None:
    item_emb = encode_items(profile_model, features)
    index = {p: i for i, p in enumerate(features.product_ids)}
    histories, profiles = [["p0", "p2", "p1"], []], _profiles(["France", "United Kingdom"])
    served = encode_users(profile_model, histories, None, index, item_emb,
                          user_features=profiles)
    rows, events = history_matrix(histories, None, index, L)
    numeric, country = profile_model.user_inputs(profiles, 2)
    feats = features.tensors(profile_model, torch.device("cpu"))
    batch = {
        "item_text": feats["text"], "item_category": feats["category"],
        "item_brand": feats["brand"], "item_price": feats["price"],
        "target": torch.tensor([3, 0]), "history": torch.from_numpy(rows),
        "history_mask": torch.from_numpy(rows >= 0), "history_event": torch.from_numpy(events),
        "user_numeric": torch.from_numpy(numeric), "user_country": torch.from_numpy(country),
    }
    with torch.no_grad():
        users, _ = profile_model(batch)
    np.testing.assert_allclose(served, users.numpy(), atol=1e-5)


def test_checkpoint_roundtrip_keeps_the_country_vocabulary(
    profile_model: TwoTowerModel, features: ItemFeatures, tmp_path
) -> None:
    save_model(profile_model, TrainConfig(text_encoder="tiny"), tmp_path / "ckpt")
    loaded, _ = load_model(tmp_path / "ckpt")
    assert loaded.countries == COUNTRIES and loaded.user_features
    assert loaded.spec() == profile_model.spec()
    vocab = json.loads((tmp_path / "ckpt" / "vocabularies.json").read_text())
    assert vocab["countries"] == COUNTRIES
    index = {p: i for i, p in enumerate(features.product_ids)}
    emb = encode_items(profile_model, features)
    hist, profiles = [["p0"], []], _profiles(["United Kingdom", "France"])
    np.testing.assert_array_equal(
        encode_users(profile_model, hist, None, index, emb, user_features=profiles),
        encode_users(loaded, hist, None, index, emb, user_features=profiles))


def _old_format_checkpoint(folder, features: ItemFeatures) -> TwoTowerModel:
    """A checkpoint as written before user features: no profile weights, no
    ``user_features``/``country_dim`` in model.json, no countries in vocabularies.json."""
    torch.manual_seed(3)
    old = TwoTowerModel(text_dim=H, categories=["candles", "garden"], brands=["acme"],
                        embedding_dim=D, category_dim=4, brand_dim=4, hidden_dim=32,
                        history_len=L, dropout=0.0, user_features=False)
    with torch.no_grad():
        for p in old.parameters():
            p.add_(0.2 * torch.randn_like(p))
    save_model(old, TrainConfig(text_encoder="tiny"), folder)
    for name, keys in (("model.json", ("user_features", "country_dim")),
                       ("vocabularies.json", ("countries",))):
        data = json.loads((folder / name).read_text())
        for key in keys:
            del data[key]
        (folder / name).write_text(json.dumps(data))
    return old.eval()


def test_old_checkpoint_loads_and_warm_starts_a_profile_model(
    features: ItemFeatures, tmp_path
) -> None:
    old = _old_format_checkpoint(tmp_path / "old", features)
    loaded, _ = load_model(tmp_path / "old")
    assert not loaded.user_features and loaded.countries == []
    index = {p: i for i, p in enumerate(features.product_ids)}
    emb = encode_items(old, features)
    hist = [["p0", "p1"], []]
    before = encode_users(old, hist, None, index, emb)
    np.testing.assert_array_equal(encode_users(loaded, hist, None, index, emb), before)

    torch.manual_seed(4)
    new = TwoTowerModel(text_dim=H, categories=["candles", "garden"], brands=["acme"],
                        embedding_dim=D, category_dim=4, brand_dim=4, hidden_dim=32,
                        history_len=L, dropout=0.0, countries=COUNTRIES, country_dim=3)
    fresh = {k: v.clone() for k, v in new.state_dict().items()
             if k.startswith("user_tower.profile")}
    report = warm_start(new, tmp_path / "old")
    assert fresh and all(any(s.startswith(f"{k} (not in the checkpoint")
                             for s in report["skipped"]) for k in fresh)
    assert len(report["skipped"]) == len(fresh) and not report["unused"]
    for name, value in fresh.items():  # the new parameters keep their initialisation
        assert torch.equal(new.state_dict()[name], value), name
    # Everything else came from the checkpoint, and the projection is still zero:
    # the warm-started model scores like the old one, profiles or not.
    new.eval()
    np.testing.assert_allclose(encode_items(new, features), emb, atol=1e-6)
    np.testing.assert_allclose(
        encode_users(new, hist, None, index, emb, user_features=_profiles(["France", None])),
        before, atol=1e-6)


def test_warm_start_maps_country_rows_by_value(profile_model: TwoTowerModel, tmp_path) -> None:
    save_model(profile_model, TrainConfig(), tmp_path / "champion")
    torch.manual_seed(1)
    new = TwoTowerModel(text_dim=H, categories=["candles", "garden"], brands=["acme"],
                        embedding_dim=D, category_dim=4, brand_dim=4, hidden_dim=32,
                        history_len=L, dropout=0.0, countries=["Germany", "United Kingdom"],
                        country_dim=3)
    fresh_germany = new.user_tower.profile.country.weight[1].detach().clone()
    report = warm_start(new, tmp_path / "champion")
    old_rows = profile_model.user_tower.profile.country.weight
    new_rows = new.user_tower.profile.country.weight
    torch.testing.assert_close(new_rows[0], old_rows[0])  # unknown
    torch.testing.assert_close(new_rows[1], fresh_germany)  # new country: fresh
    torch.testing.assert_close(new_rows[2], old_rows[2])  # United Kingdom: row 2 both times
    assert any(m.startswith("user_tower.profile.country.weight (1 of 2 countries")
               for m in report["mapped"])
    torch.testing.assert_close(new.user_tower.profile.mlp[-1].weight,
                               profile_model.user_tower.profile.mlp[-1].weight)
