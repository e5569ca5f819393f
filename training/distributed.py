"""Multi-process training through torchrun: DistributedDataParallel over ``train``.

Run::

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m training.distributed \\
        --catalog catalog.parquet --examples examples.parquet --out runs/ddp \\
        --text-encoder tiny --epochs 5 --batch-size 256

Every ``TrainConfig`` field is an option (``--text-trainable-layers 1``,
``--logq-correction false``, ...). Each process joins the process group torchrun describes
(NCCL on CUDA, one GPU per process by LOCAL_RANK; gloo on the CPU), and ``train`` wraps the
model in DistributedDataParallel: every epoch's shuffled examples are cut into disjoint,
equal shards, one per rank (``training.batches.epoch_batches``); gradients are averaged; all
ranks are seeded alike. Rank 0 writes::

    <out>/model/               the checkpoint (training.checkpoint)
    <out>/item_embeddings.npy  (N, D) float32
    <out>/product_ids.json     ids aligned with the embeddings
    <out>/history.json         per-epoch metrics

Without torchrun (no RANK in the environment) it trains in one process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.config import TrainConfig, resolve_device


def _parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {value!r}")


def parser() -> argparse.ArgumentParser:
    """The command line: data, output, and one option per TrainConfig field."""
    p = argparse.ArgumentParser(prog="python -m training.distributed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--catalog", type=Path, required=True, help="catalogue parquet")
    p.add_argument("--examples", type=Path, required=True, help="training examples parquet")
    p.add_argument("--out", type=Path, required=True, help="output folder (rank 0 writes)")
    p.add_argument("--cache-dir", type=Path, default=None, help="text/token cache folder")
    p.add_argument("--warm-start", type=Path, default=None, help="checkpoint to start from")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    config = p.add_argument_group("training configuration (TrainConfig fields)")
    for f in dataclasses.fields(TrainConfig):
        default = f.default
        kind: Any = _parse_bool if isinstance(default, bool) else type(default)
        config.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind,
                            default=None, help=f"default {default!r}")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A TrainConfig with the options given on the command line, defaults elsewhere."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})


def main(argv: Sequence[str] | None = None) -> int:
    """Train (in every process torchrun started) and let rank 0 write the outputs.

    Returns:
        The exit status.
    """
    import numpy as np
    import pandas as pd
    import torch
    import torch.distributed as dist

    from training.checkpoint import save_model
    from training.train import train

    args = parser().parse_args(argv)
    config = config_from_args(args)
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    cuda = resolve_device(config.device).type == "cuda"
    if launched:
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank() if launched else 0
    world = dist.get_world_size() if launched else 1
    try:
        started = time.perf_counter()
        catalog = pd.read_parquet(args.catalog)
        examples = pd.read_parquet(args.examples)
        result = train(config, catalog, examples, cache_dir=args.cache_dir,
                       progress=not args.quiet and rank == 0, warm_start=args.warm_start)
        if rank == 0:
            args.out.mkdir(parents=True, exist_ok=True)
            save_model(result.model, config, args.out / "model")
            np.save(args.out / "item_embeddings.npy", result.item_embeddings)
            (args.out / "product_ids.json").write_text(json.dumps(result.product_ids))
            (args.out / "history.json").write_text(json.dumps(result.history, indent=2))
            loss = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
            print(f"trained on {result.n_examples} examples x {len(result.history)} epochs in "
                  f"{world} process(es) on {result.device} in "
                  f"{time.perf_counter() - started:.1f}s (loss {loss}); wrote {args.out}",
                  flush=True)
        if launched:
            dist.barrier()
    finally:
        if launched:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
