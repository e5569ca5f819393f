"""Multi-process training: torchrun, two CPU processes, gloo, DistributedDataParallel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

# The toy task of the behaviour test next door (pytest puts this folder on sys.path).
from test_two_tower_learns import _catalog, _examples, _new_users

from training.batches import epoch_batches
from training.checkpoint import load_model
from training.distributed import config_from_args, parser
from training.metrics import evaluate_model

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("n", "step", "world"), [(320, 64, 1), (320, 32, 2), (101, 16, 3),
                                                  (7, 64, 2), (9, 4, 2)])
def test_each_rank_gets_a_disjoint_equal_shard(n: int, step: int, world: int) -> None:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    shards = [epoch_batches(order, step, rank, world) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1  # the same number of steps on every rank
    seen = torch.cat([b for s in shards for b in s])
    assert sorted(seen.tolist()) == list(range(n))  # disjoint and complete
    assert all(len(b) >= 2 for s in shards for b in s)  # in-batch negatives everywhere
    assert all(len(b) <= 2 * step for s in shards for b in s)


def test_the_command_line_takes_every_config_field() -> None:
    args = parser().parse_args(["--catalog", "c", "--examples", "e", "--out", "o",
                                "--epochs", "3", "--logq-correction", "false",
                                "--text-encoder", "tiny", "--lr", "0.01",
                                "--text-trainable-layers", "1"])
    config = config_from_args(args)
    assert (config.epochs, config.logq_correction, config.text_encoder, config.lr,
            config.text_trainable_layers) == (3, False, "tiny", 0.01, 1)
    assert config.batch_size == 512  # untouched fields keep their defaults


def test_torchrun_trains_with_two_gloo_processes(tmp_path: Path) -> None:
    _catalog().to_parquet(tmp_path / "catalog.parquet")
    _examples().to_parquet(tmp_path / "examples.parquet")
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "training.distributed",
        "--catalog", str(tmp_path / "catalog.parquet"),
        "--examples", str(tmp_path / "examples.parquet"), "--out", str(out),
        "--cache-dir", str(tmp_path / "cache"), "--quiet",
        "--text-encoder", "tiny", "--device", "cpu", "--epochs", "8", "--batch-size", "32",
        "--embedding-dim", "32", "--hidden-dim", "64", "--history-len", "10",
        "--min-examples", "50", "--lr", "3e-3",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "in 2 process(es) on cpu" in done.stdout
    print(f"torchrun, 2 gloo processes: {seconds:.1f}s")

    model, config = load_model(out / "model")
    assert config.epochs == 8 and config.batch_size == 32
    embeddings = np.load(out / "item_embeddings.npy")
    product_ids = json.loads((out / "product_ids.json").read_text())
    history = json.loads((out / "history.json").read_text())
    assert embeddings.shape == (40, 32) and len(product_ids) == 40
    assert len(history) == 8 and history[-1]["loss"] < 0.8 * history[0]["loss"]
    histories, truth = _new_users()
    metrics = evaluate_model(model, None, embeddings, product_ids, histories, None, truth,
                             ks=(10,))
    assert metrics["recall_at_10"] >= 0.8  # random ranking: 0.25
