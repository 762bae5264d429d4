"""Test-only helpers for the reliability tests, importable by the `python -m lightning_cls` subprocesses they start."""

from __future__ import annotations

import time
from pathlib import Path

from lightning.pytorch import Callback


class Throttle(Callback):
    """Sleeps after every training (and validation) batch, so that a test can signal a run while it works; touches
    ``marker`` when the first validation after some training starts."""

    def __init__(self, seconds: float = 0.2, validation_seconds: float = 0.0, marker: str | None = None) -> None:
        self.seconds, self.validation_seconds, self.marker = seconds, validation_seconds, marker

    def on_train_batch_end(self, *args, **kwargs) -> None:
        time.sleep(self.seconds)

    def on_validation_start(self, trainer, *args, **kwargs) -> None:
        if self.marker and not trainer.sanity_checking:
            Path(self.marker).touch()

    def on_validation_batch_end(self, trainer, *args, **kwargs) -> None:
        if not trainer.sanity_checking:
            time.sleep(self.validation_seconds)
