"""Save and load a trained two-tower model: weights, configuration and vocabularies.

A checkpoint folder holds::

    model.safetensors   the state dict (a fine-tuned text encoder's weights included)
    model.json          the model's constructor arguments (sizes, price scaling, whether the
                        user tower reads user features)
    vocabularies.json   category, brand and country vocabularies (index 0 = unknown is
                        implicit)
    config.json         the TrainConfig it was trained with
    text_encoder.json   only with a fine-tuned text encoder: its architecture, tokenizer
                        and trainable depth, so serving needs no other model files

No pickle is involved, so loading a checkpoint cannot run code. ``warm_start`` initialises
a new model (possibly of another catalogue version) from a checkpoint.

Checkpoints written before user features existed (no ``user_features`` in model.json, no
countries) load as the history-only model they are, and warm-start a new model everywhere
but its user-profile parameters, which keep their initialisation.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from training.config import TrainConfig
from training.text import TrainableTextEncoder
from training.towers import TwoTowerModel

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
MODEL_SPEC = "model.json"
VOCABULARIES = "vocabularies.json"
CONFIG = "config.json"
TEXT_ENCODER = "text_encoder.json"
# Embedding tables whose rows follow a vocabulary (row 0 = unknown), with the vocabulary.
VOCABULARY_TABLES = {"item_tower.category.weight": "categories",
                     "item_tower.brand.weight": "brands",
                     "user_tower.profile.country.weight": "countries"}


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
    vocabularies = {name: spec.pop(name) for name in VOCABULARY_TABLES.values()}
    (folder / MODEL_SPEC).write_text(json.dumps(spec, indent=2, sort_keys=True))
    (folder / VOCABULARIES).write_text(json.dumps(vocabularies, indent=2))
    (folder / CONFIG).write_text(json.dumps(config.to_params(), indent=2, sort_keys=True))
    if model.text_encoder is not None:
        (folder / TEXT_ENCODER).write_text(json.dumps(model.text_encoder.spec()))
    else:
        (folder / TEXT_ENCODER).unlink(missing_ok=True)
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
    model = _empty_model(folder)
    model.load_state_dict(load_file(str(folder / WEIGHTS)), strict=True)
    config = TrainConfig.from_params(json.loads((folder / CONFIG).read_text()))
    return model.to(device).eval(), config


def _empty_model(folder: Path) -> TwoTowerModel:
    """A model of the checkpoint's architecture, before its weights are loaded."""
    spec = json.loads((folder / MODEL_SPEC).read_text())
    spec.setdefault("user_features", False)  # written before user features existed
    vocabularies = json.loads((folder / VOCABULARIES).read_text())
    model = TwoTowerModel(**spec, **vocabularies)
    if (folder / TEXT_ENCODER).is_file():
        encoder_spec = json.loads((folder / TEXT_ENCODER).read_text())
        model.attach_text_encoder(TrainableTextEncoder.from_spec(encoder_spec))
    return model


def warm_start(model: TwoTowerModel, folder: os.PathLike[str] | str) -> dict[str, list[str]]:
    """Initialise ``model`` from a checkpoint wherever the two agree.

    A parameter (or buffer) is copied when the checkpoint has one of the same name and
    shape. The category, brand and country tables are mapped row by row through their
    vocabularies (they differ between catalogue versions and training sets): a value both
    know keeps its learned row, a new value keeps its fresh initialisation, row 0 (unknown)
    is copied. Everything else (a different size, a text encoder or user features only one
    side has) keeps its fresh values.

    Args:
        model: a freshly built model (vocabularies of the new catalogue).
        folder: a checkpoint folder written by ``save_model``.

    Returns:
        ``{"loaded": [...], "mapped": [...], "skipped": [...], "unused": [...]}``:
        parameter names, the mapped and skipped ones with the reason in parentheses.
    """
    folder = Path(folder)
    saved = load_file(str(folder / WEIGHTS))
    old_vocab = json.loads((folder / VOCABULARIES).read_text())
    new_vocab = {"categories": model.categories, "brands": model.brands,
                 "countries": model.countries}
    report: dict[str, list[str]] = {"loaded": [], "mapped": [], "skipped": [], "unused": []}
    update: dict[str, torch.Tensor] = {}
    for name, current in model.state_dict().items():
        old = saved.get(name)
        if old is None:
            report["skipped"].append(f"{name} (not in the checkpoint)")
        elif name in VOCABULARY_TABLES and old.shape[1:] == current.shape[1:]:
            which = VOCABULARY_TABLES[name]
            old_row = {value: i + 1 for i, value in enumerate(old_vocab.get(which, []))}
            rows = current.detach().cpu().clone()  # (V_new, E), fresh init
            rows[0] = old[0]  # unknown
            kept = 0
            for j, value in enumerate(new_vocab[which], start=1):
                if value in old_row and old_row[value] < len(old):
                    rows[j] = old[old_row[value]]
                    kept += 1
            update[name] = rows
            report["mapped"].append(f"{name} ({kept} of {len(new_vocab[which])} {which} "
                                    f"from the checkpoint, {len(new_vocab[which]) - kept} new)")
        elif old.shape == current.shape:
            update[name] = old
            report["loaded"].append(name)
        else:
            report["skipped"].append(
                f"{name} (shape {tuple(old.shape)} in the checkpoint, {tuple(current.shape)} now)")
    report["unused"] = sorted(set(saved) - set(model.state_dict()))
    model.load_state_dict(update, strict=False)
    log.info("warm start from %s: %d tensors loaded, %d mapped by vocabulary, %d skipped%s, "
             "%d unused", folder, len(report["loaded"]), len(report["mapped"]),
             len(report["skipped"]),
             f" ({', '.join(report['skipped'][:5])}{', ...' if len(report['skipped']) > 5 else ''})"
             if report["skipped"] else "", len(report["unused"]))
    return report
