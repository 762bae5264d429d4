"""Reading checkpoints that may come from elsewhere: weights only (no code runs), one-line errors naming the file."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch

from lightning_cls.errors import CheckpointError, first_line


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
