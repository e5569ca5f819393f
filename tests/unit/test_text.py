"""Product text, tokenization (and its cache), and the frozen text encoder (the "tiny" one,
and the packaged MiniLM)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for the hub, even by accident

import numpy as np
import pandas as pd
import pytest
import torch

from features.contract import product_text
from training import text_cache
from training.config import TrainConfig, autocast_dtype, native_bf16, text_dtype
from training.text import TextEncoder, encode_tokens, encoder_dim, encoder_path, load_tokenizer
from training.text_cache import embed_texts, token_ids

pytestmark = pytest.mark.fast

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
    monkeypatch.setattr(text_cache, "TextEncoder", CountingEncoder)
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
    monkeypatch.setattr(text_cache, "MAX_CACHE_SHARDS", 2)
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


class CountingTokenizer:
    """Wraps a Rust tokenizer and counts ``encode_batch`` calls (cache hits make none)."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0

    def to_str(self) -> str:
        return self.inner.to_str()

    @property
    def padding(self):
        return self.inner.padding

    def encode_batch(self, texts):
        self.calls += 1
        return self.inner.encode_batch(texts)


def test_backend_tokenization_matches_the_transformers_call() -> None:
    from transformers import AutoTokenizer

    slow = AutoTokenizer.from_pretrained(encoder_path("minilm"), local_files_only=True)
    expected = slow(TEXTS, truncation=True, max_length=16, padding="max_length")
    ids, mask = encode_tokens(load_tokenizer(TINY), TEXTS)
    assert ids.dtype == mask.dtype == np.int32 and ids.shape == (len(TEXTS), 16)
    np.testing.assert_array_equal(ids, np.array(expected["input_ids"]))
    np.testing.assert_array_equal(mask, np.array(expected["attention_mask"]))


def test_token_ids_are_cached_per_catalogue_version(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(text_cache, "TOKENIZE_CHUNK", 2)  # several chunks, tokenized ahead
    tokenizer = CountingTokenizer(load_tokenizer(TINY))
    ids, mask = token_ids(TEXTS, tokenizer, tmp_path)
    assert tokenizer.calls == 3  # 5 texts in chunks of 2
    expected = encode_tokens(tokenizer.inner, TEXTS)
    np.testing.assert_array_equal(ids, expected[0])
    np.testing.assert_array_equal(mask, expected[1])
    again = token_ids(TEXTS, tokenizer, tmp_path)
    assert tokenizer.calls == 3  # a hit: nothing tokenized
    np.testing.assert_array_equal(again[0], ids)
    assert again[0].dtype == np.int32
    token_ids(TEXTS[:-1], tokenizer, tmp_path)  # another catalogue version
    assert tokenizer.calls == 5
    shorter = CountingTokenizer(load_tokenizer(TINY.replace(max_text_tokens=8)))
    assert token_ids(TEXTS, shorter, tmp_path)[0].shape == (len(TEXTS), 8)
    assert shorter.calls == 3 and len(list((tmp_path / "tokens").glob("*.npz"))) == 3


def test_token_ids_without_a_cache_or_texts() -> None:
    ids, mask = token_ids([], load_tokenizer(TINY))
    assert ids.shape == mask.shape == (0, 16)


def test_frozen_encoder_gives_the_same_vectors_in_any_batching() -> None:
    """Tokenizing one batch ahead keeps every vector in its place (fp32: exact up to
    rounding; the CPU's bf16 agrees to a cosine of 0.999)."""
    fp32 = TINY.replace(precision="fp32")
    one = TextEncoder(fp32.replace(text_batch_size=1), progress=False).encode(TEXTS,
                                                                              progress=False)
    many = TextEncoder(fp32.replace(text_batch_size=64), progress=False).encode(TEXTS,
                                                                                progress=False)
    np.testing.assert_allclose(one, many, atol=1e-5)
    assert not np.allclose(one[0], one[1])
    bf16 = TextEncoder(TINY.replace(precision="bf16", text_batch_size=2), progress=False)
    assert bf16.autocast == torch.bfloat16 and bf16.identity.split("|")[1] == "bfloat16"
    assert np.all((bf16.encode(TEXTS, progress=False) * one).sum(1) >= 0.999)


def test_text_dtype_is_bf16_on_the_cpu_only_where_native_and_asked() -> None:
    cpu = torch.device("cpu")
    assert text_dtype(cpu, "fp32") is None
    assert text_dtype(cpu, "bf16") == torch.bfloat16
    assert text_dtype(cpu, "auto") == (torch.bfloat16 if native_bf16() else None)
    assert autocast_dtype(cpu, "auto") is None  # training stays fp32 on the CPU
