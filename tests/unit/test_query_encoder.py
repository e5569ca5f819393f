"""The /search query encoder: the traced (bf16 where native) graph against eager fp32, and
its fallbacks."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from serving import query_encoder as qe
from serving.query_encoder import QueryEncoder
from training.config import TrainConfig, native_bf16

pytestmark = pytest.mark.fast

CONFIG = TrainConfig(text_encoder="tiny", device="cpu")
TEXTS = ["mug", "red ceramic mug for tea", "a much longer query about a blue enamel mug with "
         "a handle, a lid and a saucer for the garden table", "heart candle"]


def _cosines(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    return np.array([float(x @ y) for x, y in zip(a, b, strict=True)])


def test_traced_graph_gives_the_eager_fp32_vectors_alone_and_batched() -> None:
    eager = QueryEncoder(CONFIG, cache_size=0, mode="eager")
    traced = QueryEncoder(CONFIG, cache_size=0, mode="auto")
    assert eager.kind == "eager"
    assert traced.kind == ("traced-bf16" if native_bf16() else "traced-fp32")
    want = [eager.encode(t) for t in TEXTS]
    assert np.all(_cosines([traced.encode(t) for t in TEXTS], want) >= qe.MIN_COSINE)
    # shapes other than the traced one: a padded batch, and a text longer than the example
    assert np.all(_cosines(traced.encode_many(TEXTS), want) >= qe.MIN_COSINE)
    for vector in traced.encode_many(TEXTS):
        assert vector.dtype == np.float32 and abs(np.linalg.norm(vector) - 1) < 1e-3
    fp32 = QueryEncoder(CONFIG, cache_size=0, mode="fp32")
    assert fp32.kind == "traced-fp32"
    np.testing.assert_allclose(fp32.encode_many(TEXTS), want, atol=1e-5)


def test_a_graph_that_strays_or_cannot_be_traced_falls_back_to_eager(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="serving.query_encoder")
    monkeypatch.setattr(qe, "MIN_COSINE", 1.5)  # no graph can meet it
    strays = QueryEncoder(CONFIG, cache_size=0, mode="fp32")
    assert strays.kind == "eager" and "strays from fp32" in caplog.text
    monkeypatch.undo()

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("cannot trace this model")

    monkeypatch.setattr("torch.jit.trace", refuse)
    caplog.clear()
    untraced = QueryEncoder(CONFIG, cache_size=0)
    assert untraced.kind == "eager" and "cannot trace this model" in caplog.text
    np.testing.assert_allclose(untraced.encode("heart candle"), strays.encode("heart candle"),
                               atol=1e-6)


def test_graph_mode_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOPREC_QUERY_GRAPH", " Eager ")
    assert qe.graph_mode() == "eager"
    monkeypatch.setenv("SHOPREC_QUERY_GRAPH", "onnx")
    with pytest.raises(ValueError, match="SHOPREC_QUERY_GRAPH='onnx'"):
        qe.graph_mode()
