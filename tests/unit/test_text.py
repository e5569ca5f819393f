"""Product text and the frozen text encoder (the "tiny" one, and the packaged MiniLM)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for the hub, even by accident

import numpy as np
import pandas as pd
import pytest
import torch

from training import text as text_module
from training.config import TrainConfig
from training.text import TextEncoder, embed_texts, encoder_dim, product_text

TINY = TrainConfig(text_encoder="tiny", device="cpu", max_text_tokens=16, text_batch_size=4)
TEXTS = ["red heart candle", "garden hose 20m", "", "a much longer text " * 20, "red heart candle"]


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"title": "Mug", "category": "Kitchen", "brand": "Acme", "description": "Blue"},
         "Mug | Kitchen | Acme | Blue"),
        ({"title": "Mug", "category": "Kitchen", "brand": None, "description": "  "},
         "Mug | Kitchen"),
        ({"title": " Mug ", "category": "", "brand": "Acme", "description": float("nan")},
         "Mug | Acme"),
    ],
)
def test_product_text_skips_empty_parts(row: dict, expected: str) -> None:
    assert product_text(pd.DataFrame([row])) == [expected]


def test_product_text_without_optional_columns() -> None:
    catalog = pd.DataFrame({"title": ["Mug", "Hose"], "category": ["Kitchen", "Garden"]})
    assert product_text(catalog) == ["Mug | Kitchen", "Hose | Garden"]


def test_tiny_encoder_shape_dtype_and_unit_norm() -> None:
    out = embed_texts(TEXTS, TINY, progress=False)
    assert out.shape == (len(TEXTS), 32) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(out[0], out[4])  # same text, same vector
    assert not np.allclose(out[0], out[1])


def test_tiny_encoder_is_seeded_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = TextEncoder(TINY, progress=False).encode(TEXTS, progress=False)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = TextEncoder(TINY, progress=False).encode(TEXTS, progress=False)
    c = TextEncoder(TINY.replace(seed=7), progress=False).encode(TEXTS, progress=False)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_tokenizer_pads_and_truncates_to_max_tokens() -> None:
    ids, mask = TextEncoder(TINY, progress=False).tokenize(["short", "long " * 100])
    assert ids.shape == mask.shape == (2, 16)
    assert mask[0].sum() < 16 and mask[1].sum() == 16


def test_empty_input_gives_an_empty_matrix() -> None:
    out = embed_texts([], TINY, progress=False)
    assert out.shape == (0, encoder_dim(TINY)) and out.dtype == np.float32


class CountingEncoder(TextEncoder):
    """Counts what it encodes, to prove cache hits compute nothing."""

    calls = 0
    texts = 0

    def encode(self, texts, *, progress=True):
        CountingEncoder.calls += 1
        CountingEncoder.texts += len(texts)
        return super().encode(texts, progress=progress)


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> type[CountingEncoder]:
    CountingEncoder.calls = CountingEncoder.texts = 0
    monkeypatch.setattr(text_module, "TextEncoder", CountingEncoder)
    return CountingEncoder


def test_cache_hit_computes_nothing(tmp_path, counting: type[CountingEncoder]) -> None:
    first = embed_texts(TEXTS, TINY, tmp_path, progress=False)
    assert counting.calls == 1 and counting.texts == len(set(TEXTS))  # duplicates once
    second = embed_texts(TEXTS, TINY, tmp_path, progress=False)
    assert counting.calls == 1  # nothing loaded, nothing encoded
    np.testing.assert_array_equal(first, second)

    third = embed_texts(["new text", *TEXTS[:2]], TINY, tmp_path, progress=False)
    assert counting.calls == 2 and counting.texts == len(set(TEXTS)) + 1  # only the new one
    np.testing.assert_array_equal(third[1:], first[:2])


def test_cache_is_keyed_on_encoder_and_token_budget(
    tmp_path, counting: type[CountingEncoder]
) -> None:
    embed_texts(TEXTS[:2], TINY, tmp_path, progress=False)
    embed_texts(TEXTS[:2], TINY.replace(max_text_tokens=8), tmp_path, progress=False)
    embed_texts(TEXTS[:2], TINY.replace(seed=1), tmp_path, progress=False)
    assert counting.calls == 3
    # Parameters that do not change the vectors do not invalidate the cache.
    embed_texts(TEXTS[:2], TINY.replace(epochs=99, text_batch_size=1), tmp_path, progress=False)
    assert counting.calls == 3


def test_cache_shards_are_merged(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(text_module, "MAX_CACHE_SHARDS", 2)
    vectors = [embed_texts([f"text {i}"], TINY, tmp_path, progress=False) for i in range(4)]
    shards = list(tmp_path.rglob("shard-*.npz"))
    assert len(shards) <= 2
    again = embed_texts([f"text {i}" for i in range(4)], TINY, tmp_path, progress=False)
    np.testing.assert_array_equal(again, np.concatenate(vectors))


def test_minilm_puts_similar_products_close() -> None:
    config = TrainConfig(text_encoder="minilm", device="cpu")
    out = embed_texts(
        ["red heart candle", "heart shaped candle holder", "garden hose"], config, progress=False
    )
    assert out.shape == (3, 384) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    assert out[0] @ out[1] > out[0] @ out[2] + 0.2
