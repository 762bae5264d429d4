"""`python -m lightning_cls fit|validate|test|predict`: LightningCLI with the project's defaults and links."""

from __future__ import annotations

import importlib
import sys
from typing import Any

from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_cls.data import ScientificTextDataModule
from lightning_cls.model import TextClassifier

DESCRIPTION = """Fine-tune DistilBERT, GPT-2 or any Hugging Face encoder/decoder with a sequence-classification head
on labelled scientific text, with PyTorch Lightning.

  python -m lightning_cls fit --config configs/quickstart.yaml            train (offline sample data)
  python -m lightning_cls test --config configs/quickstart.yaml --ckpt_path runs/.../last.ckpt
  python -m lightning_cls fit --help                                    every option, documented

With --ckpt_path, the model is rebuilt from the checkpoint alone (no download of pretrained weights).
Beside the Trainer subcommands: {extra} (each with --help)."""

# Subcommands that are not Trainer methods: name -> module with a `main(argv)` (parsed by jsonargparse from its
# signature and docstring, like the rest of the CLI).
EXTRA_COMMANDS: dict[str, str] = {}


class ClassifierCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The model uses the data's tokenizer, and learns the label names from the data module once it exists:
        # neither is typed twice, and both are saved in the checkpoint's hyperparameters.
        parser.link_arguments("data.tokenizer", "model.tokenizer")
        parser.link_arguments("data.label_names", "model.label_names", apply_on="instantiate")

        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/f1_macro",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "epoch{epoch:02d}-step{step}-f1{val/f1_macro:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.set_defaults(
            {"early_stopping.monitor": "val/f1_macro", "early_stopping.mode": "max", "early_stopping.patience": 3}
        )
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults(
            {
                "lr_monitor.logging_interval": "step",
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "default"},
                },
            }
        )


def main(args: list[str] | None = None) -> Any:
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in EXTRA_COMMANDS:
        return importlib.import_module(EXTRA_COMMANDS[argv[0]]).main(argv[1:])
    return ClassifierCLI(
        TextClassifier,
        ScientificTextDataModule,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "parser_mode": "omegaconf",
            "prog": "python -m lightning_cls",
            "description": DESCRIPTION.format(extra=", ".join(EXTRA_COMMANDS) or "none yet"),
        },
        args=args,
    )
