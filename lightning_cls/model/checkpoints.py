"""Checkpoints: the keys our models write beside their weights, what reads and writes them, and reading a checkpoint
that may come from elsewhere (weights only: no code runs; one-line errors naming the file)."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch

from lightning_cls.errors import CheckpointError, ConfigError, first_line

# Checkpoint key set when the checkpoint holds only the trained parameters (adapters and head): `save_adapter_only`.
ADAPTER_ONLY_KEY = "lightning_cls_adapter_only"
# Checkpoint key of the training data's summary (`classifier.data_reference`).
DATA_REFERENCE_KEY = "lightning_cls_data_reference"
# Checkpoint keys of the calibration temperature (a float; absent: never calibrated, T = 1) and of its report (the
# validation scores before and after it). Keys beside the weights rather than a buffer: `save_adapter_only` keeps only
# trained parameters, and `calibrate` can rewrite them without rebuilding the model.
TEMPERATURE_KEY = "lightning_cls_temperature"
CALIBRATION_KEY = "lightning_cls_calibration"
# Checkpoint keys of the lexical expert (`LexicalExpert.state()`: tensors only) and of its fusion weight (a float).
LEXICAL_KEY = "lightning_cls_lexical"
LEXICAL_WEIGHT_KEY = "lightning_cls_lexical_weight"
# Checkpoint key of a multi-label model's per-label decision thresholds (a list of floats, fitted on validation).
THRESHOLDS_KEY = "lightning_cls_thresholds"


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint's dictionary, loaded with ``weights_only=True`` onto the CPU.

    The weights-only unpickler builds tensors and plain containers only, so a tampered file cannot run code; a
    missing, truncated or foreign file raises ``CheckpointError`` naming it. ``mmap=True`` reads the tensors lazily
    (a cheap check of a large file).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist.")
    if not zipfile.is_zipfile(path):
        # torch.save has written zip archives since torch 1.6; a truncated one has lost its central directory.
        raise CheckpointError(f"Checkpoint {path} is truncated or not a PyTorch checkpoint (not a complete zip file).")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # the unpickler's errors are many and long: one line says enough
        kind = "refused by the weights-only loader" if "weights_only" in str(err) else "unreadable"
        raise CheckpointError(f"Checkpoint {path} is {kind}: {first_line(err)}") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no `state_dict` in it).")
    return checkpoint


def write_fitted(checkpoint: dict[str, Any], model: Any) -> None:
    """Write what `model` (a `TextClassifier`) fitted beside its weights: the training data's summary, the temperature
    or the thresholds with their validation scores, the lexical expert and its weight. A value not fitted is left out.
    """
    if model.data_reference is not None:
        checkpoint[DATA_REFERENCE_KEY] = model.data_reference
    if model.temperature is not None:
        checkpoint[TEMPERATURE_KEY] = model.temperature
        checkpoint[CALIBRATION_KEY] = model.calibration
    if model.thresholds is not None:
        checkpoint[THRESHOLDS_KEY] = list(model.thresholds)
        if model.calibration is not None:  # the validation scores at those thresholds
            checkpoint[CALIBRATION_KEY] = model.calibration
    if model.lexical_fusion.expert is not None:
        checkpoint[LEXICAL_KEY] = model.lexical_fusion.expert.state()
        checkpoint[LEXICAL_WEIGHT_KEY] = model.lexical_fusion.weight


def read_fitted(checkpoint: dict[str, Any], model: Any) -> None:
    """Set on `model` (a `TextClassifier`) what `write_fitted` wrote; what the checkpoint lacks stays as it is."""
    # The label names reach the model from the data module; a data config selecting other labels than the
    # checkpoint was trained on would otherwise give wrong names to the right ids (or a shape error).
    trained_on = checkpoint.get("hyper_parameters", {}).get("label_names")
    if trained_on is not None and list(trained_on) != model.label_names:
        raise ConfigError(
            f"The checkpoint was trained on the labels {list(trained_on)}, but the data module selects "
            f"{model.label_names}: set data.labels (or data.min_count) as in training."
        )
    model.data_reference = checkpoint.get(DATA_REFERENCE_KEY, model.data_reference)
    # Checkpoints from before calibration (or with `model.calibrate` false) have none: T = 1, the raw softmax.
    model.temperature = checkpoint.get(TEMPERATURE_KEY, model.temperature)
    model.calibration = checkpoint.get(CALIBRATION_KEY, model.calibration)
    model.thresholds = checkpoint.get(THRESHOLDS_KEY, model.thresholds)
    if LEXICAL_KEY in checkpoint:
        model.lexical_fusion.restore(checkpoint[LEXICAL_KEY], checkpoint.get(LEXICAL_WEIGHT_KEY))
