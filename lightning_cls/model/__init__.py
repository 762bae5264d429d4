"""The LightningModule and what it is made of: pooling, adapters, the lexical expert and fusion, calibration,
evaluation reports, predictions and checkpoint keys.

`lightning_cls.model.TextClassifier` (the configs' and checkpoints' class path) is the LightningModule of
`classifier.py`, imported on first use: the serving workers import `fusion` and `lexical` without Lightning.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "TextClassifier":
        from lightning_cls.model.classifier import TextClassifier

        return TextClassifier
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
