"""Reading files and the hub, labels and label sets, splits, tokenization and its cache, windows, feedback rows as
training data: everything up to the batches the model reads.

`lightning_cls.data.ScientificTextDataModule` (the configs' and checkpoints' class path) is the data module of
`datamodule.py`, imported on first use so that importing a small module of this package stays cheap.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "ScientificTextDataModule":
        from lightning_cls.data.datamodule import ScientificTextDataModule

        return ScientificTextDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
