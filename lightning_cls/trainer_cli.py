"""The Trainer subcommands (`fit | validate | test | predict`) and `calibrate`: LightningCLI with the project's
defaults, links and callbacks. Imported by `cli` only when one of them runs: Lightning takes seconds to import, and
the other subcommands (`deployment show`, `monitor`, ...) should not wait for it."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_cls.arg_parser import bad_option
from lightning_cls.atomic import atomic_file
from lightning_cls.data.datamodule import ScientificTextDataModule
from lightning_cls.errors import CheckpointError, ConfigError
from lightning_cls.model.checkpoints import (
    CALIBRATION_KEY,
    LEXICAL_KEY,
    LEXICAL_WEIGHT_KEY,
    TEMPERATURE_KEY,
    THRESHOLDS_KEY,
    load_checkpoint,
)
from lightning_cls.model.classifier import TextClassifier
from lightning_cls.model.precision import Trainer
from lightning_cls.model.predictions import PredictionWriter
from lightning_cls.model.resume import ExactResume, ResumableCheckpoint, exit_interrupted, find_last_checkpoint

DESCRIPTION = """Fine-tune DistilBERT, GPT-2 or any Hugging Face encoder/decoder with a sequence-classification head
on labelled scientific text, with PyTorch Lightning.

  python -m lightning_cls fit --config configs/quickstart.yaml            train (offline sample data)
  python -m lightning_cls test --config configs/quickstart.yaml --ckpt_path runs/.../last.ckpt
  python -m lightning_cls fit --help                                    every option, documented

With --ckpt_path, the model is rebuilt from the checkpoint alone (no download of pretrained weights).
Beside the Trainer subcommands: {extra} (each with --help)."""


class OneLineErrorParser(LightningArgumentParser):
    """LightningArgumentParser that reports a bad option in one line, with the closest valid option, instead of the
    full usage (`arg_parser.bad_option`, as for the other subcommands); option prefixes are not accepted (a typo that
    is a prefix of a real option must not pass)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        sys.stderr.write(f"error: {bad_option(message, ex, self)}\n")
        self.exit(2)


class LearningRateLogger(LearningRateMonitor):
    """LearningRateMonitor that stays quiet under `trainer.logger: false` instead of failing at the first step:
    it is on by default, and turning the logger off should not also require turning it off."""

    def on_train_start(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


class ClassifierCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The model uses the data's tokenizer, and learns the label names from the data module once it exists:
        # neither is typed twice, and both are saved in the checkpoint's hyperparameters.
        parser.link_arguments("data.tokenizer", "model.tokenizer")
        parser.link_arguments("data.label_names", "model.label_names", apply_on="instantiate")
        parser.link_arguments("data.multi_label", "model.multi_label")

        # ModelCheckpoint that also writes last.ckpt every `every_n_train_steps` and on SIGTERM / Ctrl-C (resume.py).
        parser.add_lightning_class_args(ResumableCheckpoint, "checkpoint")
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
        # Checked after each validation only: Lightning's default also checks at the end of a training epoch, where a
        # run cut short by --trainer.max_steps (before its first validation) has no validation metric and fails.
        parser.set_defaults(
            {
                "early_stopping.monitor": "val/f1_macro",
                "early_stopping.mode": "max",
                "early_stopping.patience": 3,
                "early_stopping.check_on_train_epoch_end": False,
            }
        )
        parser.add_lightning_class_args(LearningRateLogger, "lr_monitor")
        parser.set_defaults(
            {
                "lr_monitor.logging_interval": "step",
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "default"},
                },
            }
        )
        # `predict` writes one row per input, in input order, to a CSV/JSONL file (default: beside the run's logs).
        parser.add_lightning_class_args(PredictionWriter, "prediction_writer")

    def predict(self, **kwargs: Any) -> Any:
        """`Trainer.predict`, not also returning the predictions when the writer streams them to a file."""
        # Returning them would hold every prediction of the input in memory at once; `--return_predictions true`
        # still asks for them.
        if kwargs.get("return_predictions") is None and any(
            isinstance(c, PredictionWriter) for c in self.trainer.callbacks
        ):
            kwargs["return_predictions"] = False
        return self.trainer.predict(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then resolve `--ckpt_path last` and check the checkpoint, before LightningCLI reads its
        hyperparameters: a bad file is reported in one line naming it, not as a pickle traceback."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand:
            resolve_ckpt_path(self.config[subcommand], subcommand)


def resolve_ckpt_path(config: Namespace, subcommand: str) -> None:
    """`last` -> the newest last*.ckpt of the checkpoint folder, or of the logger's runs (whose version folder the
    resumed run then continues in); `fit` with none found starts a new run. A checkpoint file is checked (weights
    only, read lazily): missing, truncated or tampered files raise ``CheckpointError``."""
    if config.get("weights_only") is None:
        config.weights_only = True  # Lightning then loads --ckpt_path with torch's weights-only unpickler: no code runs
    ckpt_path = config.get("ckpt_path")
    logger_args = getattr(config.get("trainer.logger"), "init_args", None)
    if ckpt_path == "last":
        dirpath = config.get("checkpoint.dirpath")
        folder = dirpath or (Path(logger_args.save_dir) / (logger_args.name or "") if logger_args else None)
        found = find_last_checkpoint(folder) if folder is not None else None
        if found is None and folder is not None:
            if subcommand != "fit":
                raise CheckpointError(f"--ckpt_path last: no last*.ckpt under {folder}.")
            rank_zero_info(f"--ckpt_path last: no checkpoint under {folder} yet; starting a new run.")
            config.ckpt_path = None
            return
        if found is not None:
            config.ckpt_path = ckpt_path = str(found)
            in_run = not dirpath and found.parent.name == "checkpoints" and found.parents[2] == Path(folder)
            if in_run and getattr(logger_args, "version", None) is None:
                logger_args.version = found.parents[1].name  # keep logging and checkpointing in the same run folder
    if (
        ckpt_path
        and ckpt_path not in ("last", "best", "hpc")
        and not ckpt_path.startswith("registry:")
        and "://" not in ckpt_path
    ):
        checkpoint = load_checkpoint(ckpt_path, mmap=True)
        if subcommand == "fit":
            check_resume_epochs(checkpoint, ckpt_path, config.get("trainer.max_epochs"))


def check_resume_epochs(checkpoint: dict[str, Any], ckpt_path: str, max_epochs: int | None) -> None:
    """Refuse a `--trainer.max_epochs` below the epochs the checkpoint has already trained, before any work.

    Lightning would silently stop at once (or fail with a traceback when it is two epochs below); neither says which
    option to change."""
    if max_epochs is None or max_epochs < 0:  # Lightning's default (1000, or unbounded with max_steps) and -1
        return
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    # `processed`: epochs whose training part is done (the last one's validation may have been running when saved).
    done = progress.get("processed", checkpoint.get("epoch", 0))
    if max_epochs < done:
        raise ConfigError(
            f"--trainer.max_epochs={max_epochs} is below the epochs that checkpoint {ckpt_path} has already trained "
            f"({done} epochs): set it above {done} to train on, or leave out --ckpt_path to start a new run."
        )


def run(args: list[str] | None, extra: list[str]) -> ClassifierCLI:
    """`python -m lightning_cls fit|validate|test|predict ...` (``extra``: the other subcommands, for --help)."""
    description = DESCRIPTION.format(extra=", ".join(extra) or "none yet")
    try:
        return _cli(ClassifierCLI, args, "python -m lightning_cls", description)
    except SIGTERMException:  # SIGTERM or Ctrl-C stopped `fit` after saving last.ckpt: say so, exit 128 + signal
        exit_interrupted()


def _cli(cli_class: type[ClassifierCLI], args: list[str] | None, prog: str, description: str) -> ClassifierCLI:
    return cli_class(
        TextClassifier,
        ScientificTextDataModule,
        trainer_class=Trainer,  # Lightning's, with `precision: auto` chosen by the hardware (model/precision.py)
        save_config_kwargs={"overwrite": True},
        parser_class=OneLineErrorParser,  # a typo in an option: one line naming it and the closest valid one
        parser_kwargs={"parser_mode": "omegaconf", "prog": prog, "description": description},
        # Always present, not configurable: per-batch seeds and the loader position make resuming exact (resume.py).
        trainer_defaults={"callbacks": [ExactResume()]},
        args=args,  # None: LightningCLI reads sys.argv itself (given both, it warns)
    )


# ------------------------------------------------------------------------------------------------ calibrate
CALIBRATE_DESCRIPTION = """Fit the temperature of a checkpoint on the validation split (temperature scaling) and write
it into a copy of the checkpoint: runs `validate` with the same options (--config with the training's data settings,
--ckpt_path), fits T there, and writes the validation report with ECE, NLL and Brier before and after.

With --model.lexical true on a checkpoint without a lexical expert, it first fits one on the training split, then
fits its fusion weight beside the temperature (`lightning_cls.model.fusion`); a checkpoint that has one gets its weight
refitted.

  python -m lightning_cls calibrate validate --config configs/quickstart.yaml --ckpt_path runs/.../last.ckpt"""


class CalibrateCLI(ClassifierCLI):
    """`validate` of a checkpoint that refits its temperature on the validation split; `calibrate` writes it."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"validate": LightningCLI.subcommands()["validate"]}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument(
            "--output_path",
            type=str | None,
            default=None,
            help="Where to write the calibrated checkpoint (default: calibrated-<name> beside --ckpt_path). The "
            "checkpoint's own path updates it in place; either way the file is replaced atomically.",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)  # resolves `last`; a missing or broken file is a CheckpointError here
        if not self.config["validate"].get("ckpt_path"):
            raise ConfigError("calibrate needs --ckpt_path: the checkpoint whose temperature to fit (or `last`).")

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        self.model.refit_temperature = True


def calibrate(argv: list[str]) -> Path | None:
    """`python -m lightning_cls calibrate [validate] --config ... --ckpt_path CKPT [--output_path PATH]`.

    Writes a new checkpoint by default, not the given one: the trained file stays as training left it, and rewriting
    it would make an old run's last.ckpt the newest one that `--ckpt_path last` resumes. The new name does not match
    `last*.ckpt` for the same reason. Returns the path written (None on ranks other than 0).
    """
    if not argv or argv[0] != "validate":  # `calibrate` runs `validate`; saying so is optional
        argv = ["validate", *argv]
    with warnings.catch_warnings():
        # LightningCLI warns when given `args` while sys.argv has some too: here they are sys.argv's, less the
        # command's name. (sys.argv itself must stay: DDP starts the other ranks with it.)
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        try:
            cli = _cli(CalibrateCLI, argv, "python -m lightning_cls calibrate", CALIBRATE_DESCRIPTION)
        except SIGTERMException:
            exit_interrupted()
    model, config = cli.model, cli.config["validate"]
    if model.refit_temperature:  # still set: no validation epoch ended, so nothing was fitted
        raise ConfigError(
            "calibrate: the validation split gave no rows to fit a temperature on: check data.val_fraction and "
            "--trainer.limit_val_batches."
        )
    if not cli.trainer.is_global_zero:
        return None
    ckpt = Path(config["ckpt_path"])
    output = Path(config.get("output_path") or ckpt.with_name(f"calibrated-{ckpt.name}"))
    checkpoint = load_checkpoint(ckpt)  # the file as it is (optimizer and loop states too): only these keys change
    checkpoint[CALIBRATION_KEY] = {**model.calibration, "global_step": checkpoint.get("global_step")}
    if model.lexical is not None:
        checkpoint[LEXICAL_KEY], checkpoint[LEXICAL_WEIGHT_KEY] = model.lexical.state(), model.lexical_weight
    fused = f"lexical weight {model.lexical_weight:.4f}, " if model.lexical is not None else ""
    checkpoint[TEMPERATURE_KEY] = model.temperature
    if model.multi_label:  # the temperature, then per-label thresholds on the probabilities it gives
        checkpoint[THRESHOLDS_KEY] = list(model.thresholds)
        thresholds = ", ".join(f"{t:.2f}" for t in model.thresholds)
        c = model.calibration
        fitted = (
            f"temperature {model.temperature:.4f}, mean label ECE {c['mean_label_ece_uncalibrated']:.4f} -> "
            f"{c['mean_label_ece']:.4f}, thresholds {thresholds}, micro-F1 {c['micro_f1']:.4f}"
        )
    else:
        before, after = model.calibration["before"], model.calibration["after"]
        fitted = (
            f"temperature {model.temperature:.4f}, ECE {before['ece']:.4f} -> {after['ece']:.4f}, "
            f"NLL {before['nll']:.4f} -> {after['nll']:.4f}"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(output) as tmp:
        torch.save(checkpoint, tmp)
    print(f"Calibrated {ckpt} on {model.calibration['rows']} validation rows: {fused}{fitted}; wrote {output}.")
    return output
