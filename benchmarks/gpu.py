"""Accelerator throughput of the training and indexing steps, on whatever device is here.

Three figures, each printed as a JSON line and then in a table:

1. **catalogue encoding** (titles/s): the frozen text encoder (MiniLM-L6, 32 tokens) over N
   synthetic product titles, tokenization included (``TextEncoder.encode``: the fast
   tokenizer's batch encoder feeding the model one batch ahead), and the tokenizer alone;
2. **fine-tuning** (pairs/s): training steps of the two-tower model with the text encoder's
   top layers trainable (``text_trainable_layers``), bf16 autocast on CUDA, batch
   ``--finetune-batch`` (the daily training's setting when CUDA is present);
3. **FAISS** build and search (queries/s) of the exact inner-product index over N vectors,
   on a GPU copy when ``faiss.get_num_gpus() > 0`` (the ``gpu`` extra), else on the CPU.

Reference on one H100 (issue 13), same encoder and 32 tokens: encoding 209,000 titles/s at
batch 4,096 with tokenization done beforehand; the tokenizer alone 240,000 titles/s on 16
cores; fine-tuning in bf16 22,800 pairs/s at batch 2,048.

    .venv/bin/python benchmarks/gpu.py                      # sizes for the device found
    .venv/bin/python benchmarks/gpu.py --titles 20000 --encoder tiny   # a quick CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

WORDS = ("vintage", "glass", "heart", "lantern", "set", "of", "red", "blue", "ceramic", "mug",
         "cake", "tin", "paper", "party", "bag", "christmas", "wooden", "frame", "retro",
         "spot", "cushion", "cover", "union", "jack", "doormat", "hanging", "t-light")


def titles(n: int, seed: int = 0) -> list[str]:
    """n product titles of 4 to 9 words (about 12-24 tokens)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 10, size=n)
    picks = rng.integers(0, len(WORDS), size=int(lengths.sum()))
    out, at = [], 0
    for length in lengths:
        out.append(" ".join(WORDS[i] for i in picks[at:at + length]) + f" {at % 997}")
        at += length
    return out


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encoding(config, texts: list[str]) -> dict:
    """Titles/s of the tokenizer alone and of tokenizer + frozen encoder."""
    from training.text import TextEncoder, encode_tokens

    encoder = TextEncoder(config, progress=False)
    encoder.encode(texts[: config.text_batch_size], progress=False)  # warm-up
    started = time.perf_counter()
    encode_tokens(encoder.tokenizer, texts)
    tokenize_s = time.perf_counter() - started
    _sync(encoder.device)
    started = time.perf_counter()
    encoder.encode(texts, progress=False)
    _sync(encoder.device)
    seconds = time.perf_counter() - started
    return {"figure": "catalogue encoding", "device": str(encoder.device),
            "titles": len(texts), "batch": config.text_batch_size,
            "tokenizer_titles_per_s": round(len(texts) / tokenize_s),
            "titles_per_s": round(len(texts) / seconds), "seconds": round(seconds, 2)}


def finetune(config, n_products: int, n_pairs: int) -> dict:
    """Pairs/s of two-tower training with the top text layers trainable."""
    import pandas as pd

    from training.train import train

    rng = np.random.default_rng(1)
    catalog = pd.DataFrame({
        "product_id": [f"P{i:06d}" for i in range(n_products)],
        "title": titles(n_products, seed=2), "description": None,
        "category": [f"c{i % 20}" for i in range(n_products)], "brand": None,
        "price": rng.uniform(1, 50, n_products), "image_url": None,
        "updated_at": pd.Timestamp("2026-01-01", tz="UTC")})
    ids = catalog["product_id"].to_numpy()
    examples = pd.DataFrame({
        "user_id": [f"U{i % 5000}" for i in range(n_pairs)],
        "product_id": ids[rng.integers(0, n_products, n_pairs)],
        "event_timestamp": pd.Timestamp("2026-01-02", tz="UTC")
        + pd.to_timedelta(np.arange(n_pairs), unit="s"),
        "recent_product_ids": [list(ids[rng.integers(0, n_products, 8)]) for _ in range(n_pairs)],
        "recent_event_types": [["view"] * 8 for _ in range(n_pairs)]})
    result = train(config, catalog, examples, progress=False, cache_dir=None)
    epoch = result.history[-1]
    return {"figure": "fine-tuning", "device": result.device, "pairs": result.n_examples,
            "batch": config.batch_size_cuda if result.device.startswith("cuda")
            else config.batch_size, "trainable_layers": config.text_trainable_layers,
            "pairs_per_s": round(epoch["examples_per_s"]), "epoch_seconds":
            round(epoch["seconds"], 2)}


def faiss_figures(n: int, dim: int, queries: int, k: int) -> dict:
    """Build seconds and search queries/s of the exact inner-product index."""
    import faiss

    from training.index import _on_gpu

    rng = np.random.default_rng(3)
    matrix = rng.standard_normal((n, dim), dtype=np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    q = matrix[rng.integers(0, n, queries)]
    gpus = getattr(faiss, "get_num_gpus", lambda: 0)()
    started = time.perf_counter()
    index = faiss.IndexFlatIP(dim)
    index.add(matrix)
    searcher = _on_gpu(index)
    build = time.perf_counter() - started
    searcher.search(q[:16], k)  # warm-up
    started = time.perf_counter()
    searcher.search(q, k)
    seconds = time.perf_counter() - started
    return {"figure": "faiss exact", "device": f"{gpus} GPU(s)" if gpus else "cpu",
            "vectors": n, "dim": dim, "build_s": round(build, 3), "k": k,
            "queries_per_s": round(queries / seconds)}


def main(argv: list[str] | None = None) -> int:
    import torch

    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="minilm", help="minilm, tiny or a model folder")
    parser.add_argument("--titles", type=int, default=1_000_000 if cuda else 20_000)
    parser.add_argument("--batch", type=int, default=4096 if cuda else 256,
                        help="texts per encoder forward pass")
    parser.add_argument("--pairs", type=int, default=400_000 if cuda else 4_000)
    parser.add_argument("--finetune-batch", type=int, default=2048 if cuda else 256)
    parser.add_argument("--layers", type=int, default=2, help="trainable text layers")
    parser.add_argument("--vectors", type=int, default=1_000_000 if cuda else 100_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from training.config import TrainConfig

    config = TrainConfig(text_encoder=args.encoder, max_text_tokens=32,
                         text_batch_size=args.batch, epochs=1, min_examples=1,
                         text_trainable_layers=args.layers, batch_size=args.finetune_batch,
                         batch_size_cuda=args.finetune_batch, user_features=False)
    figures = []
    for step in (lambda: encoding(config, titles(args.titles)),
                 lambda: finetune(config, max(1000, args.pairs // 20), args.pairs),
                 lambda: faiss_figures(args.vectors, 64, args.queries, 100)):
        figures.append(step())
        print(json.dumps(figures[-1]), flush=True)
    print()
    print(f"{'figure':<20} {'device':<12} {'throughput':>22}  detail")
    for f in figures:
        rate = next(f"{v:,} {k.removesuffix('_per_s').replace('_', ' ')}/s"
                    for k, v in f.items() if k.endswith("_per_s") and k != "tokenizer_titles_per_s")
        detail = ", ".join(f"{k} {v}" for k, v in f.items()
                           if k not in ("figure", "device") and not k.endswith("_per_s"))
        if "tokenizer_titles_per_s" in f:
            detail = f"tokenizer alone {f['tokenizer_titles_per_s']:,} titles/s; " + detail
        print(f"{f['figure']:<20} {f['device']:<12} {rate:>22}  {detail}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(figures, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
