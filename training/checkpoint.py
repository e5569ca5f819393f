"""Save and load a trained two-tower model: weights, configuration and vocabularies.

A checkpoint folder holds::

    model.safetensors   the state dict
    model.json          the model's constructor arguments (sizes, price scaling)
    vocabularies.json   category and brand vocabularies (index 0 = unknown is implicit)
    config.json         the TrainConfig it was trained with

No pickle is involved, so loading a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from training.config import TrainConfig
from training.towers import TwoTowerModel

WEIGHTS = "model.safetensors"
MODEL_SPEC = "model.json"
VOCABULARIES = "vocabularies.json"
CONFIG = "config.json"


def save_model(model: TwoTowerModel, config: TrainConfig, folder: os.PathLike[str] | str) -> Path:
    """Write a checkpoint folder (created if needed; its files are replaced).

    Args:
        model: the model to save (any device).
        config: the configuration it was trained with.
        folder: target folder.

    Returns:
        The folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
    spec = model.spec()
    vocabularies = {"categories": spec.pop("categories"), "brands": spec.pop("brands")}
    (folder / MODEL_SPEC).write_text(json.dumps(spec, indent=2, sort_keys=True))
    (folder / VOCABULARIES).write_text(json.dumps(vocabularies, indent=2))
    (folder / CONFIG).write_text(json.dumps(config.to_params(), indent=2, sort_keys=True))
    return folder


def load_model(
    folder: os.PathLike[str] | str, device: torch.device | str = "cpu"
) -> tuple[TwoTowerModel, TrainConfig]:
    """Read a checkpoint folder written by ``save_model``.

    Args:
        folder: the checkpoint folder.
        device: where to put the model.

    Returns:
        The model (in eval mode) and its TrainConfig.
    """
    folder = Path(folder)
    spec = json.loads((folder / MODEL_SPEC).read_text())
    vocabularies = json.loads((folder / VOCABULARIES).read_text())
    config = TrainConfig.from_params(json.loads((folder / CONFIG).read_text()))
    model = TwoTowerModel(**spec, **vocabularies)
    model.load_state_dict(load_file(str(folder / WEIGHTS)), strict=True)
    return model.to(device).eval(), config
