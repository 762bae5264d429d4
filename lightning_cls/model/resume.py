"""Stopping and resuming training without losing or changing anything.

What Lightning 2.6 already does, and what this module adds:

- On SIGTERM, Lightning's signal connector sets a flag and the fit loop raises ``SIGTERMException`` at the next safe
  point (after the current batch and any validation due after it). It writes no checkpoint and, as a ``SystemExit``
  without a code, the process would exit with status 0. :class:`ResumableCheckpoint` writes ``last.ckpt`` at that
  point and the CLI exits with 128 + the signal number.
- Ctrl-C (SIGINT) raises ``KeyboardInterrupt`` wherever the process is, possibly half-way through an optimizer step;
  :class:`ResumableCheckpoint` turns the first Ctrl-C during training into the SIGTERM path above.
- ``ModelCheckpoint`` writes ``last.ckpt`` only when it also saves a top-k checkpoint (so, with ``save_top_k: 1``,
  only when the monitored metric improves), and with ``every_n_train_steps=N`` nothing before the first validation.
  :class:`ResumableCheckpoint` writes ``last.ckpt`` after every validation, epoch and N steps.
- With ``every_n_train_steps=N``, ``ModelCheckpoint`` saves its top-k checkpoints every N steps only, each scored
  with the latest validation's metric: the weights of step N are filed under the score of other, older weights, and
  the weights that scored best are never saved when no multiple of N coincides with their validation.
  :class:`ResumableCheckpoint` uses N for ``last.ckpt`` only and saves top-k checkpoints at validations, each
  scored by the metric of exactly the weights it holds.
- Lightning restores the loops, optimizer, scheduler and callbacks, and the state of a *stateful* train loader, but
  not the random number generators, and a plain DataLoader restarts its epoch from the first batch.
  :class:`ResumableDataLoader` skips the batches the interrupted epoch already used, and :class:`ExactResume` reseeds
  torch before every batch from (seed, epoch, batch), so dropout draws the same masks in a resumed run.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_cls.data.samplers import ResumableDataLoader  # noqa: F401  (re-exported: resuming uses both)


@dataclass
class Interruption:
    """How the last training run was stopped by a signal: what the CLI reports before it exits."""

    signum: int
    epoch: int = 0
    step: int = 0
    checkpoint: str | None = None


# Set by ResumableCheckpoint when a signal stops a run; read by the CLI for its exit status and message.
last_interruption: Interruption | None = None


class ResumableCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that keeps a run resumable: it writes ``last.ckpt`` at the end of every epoch and of training,
    every ``every_n_train_steps`` steps (even before the first validation), and when SIGTERM or Ctrl-C stops
    training. ``save_last: false`` writes it on SIGTERM/Ctrl-C only."""

    # Lightning 2.6's ModelCheckpoint writes last.ckpt only at steps where it also saves a top-k checkpoint, so with
    # `save_top_k: 1` last.ckpt is a copy of the best one, not the latest state. This class writes last.ckpt itself,
    # and only at points from which Lightning resumes cleanly: at the end of a batch that no validation follows, after
    # a mid-epoch validation, and after the epoch-end hooks. A checkpoint taken between the epoch-end validation and
    # those hooks resumes into `EarlyStopping` without its metric (Lightning issue #18595).
    _writes_last: bool | None = None
    _last_step_written = -1
    _pending: tuple[int, Any] | None = None  # a signal received, waiting for the next safe point
    _lightning_sigterm: Any = None
    _last_every = 0  # last.ckpt every this many training steps (the `every_n_train_steps` argument)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self._writes_last is None:  # take over `save_last` from the parent, which then never writes last.ckpt
            self._writes_last, self.save_last = bool(self.save_last), False
            # ... and `every_n_train_steps`, which would make the parent save top-k checkpoints between validations
            # under the previous validation's score: the parent then saves them after each validation instead.
            self._last_every, self._every_n_train_steps = self._every_n_train_steps, 0
            if self._last_every and not self._every_n_epochs and self._train_time_interval is None:
                self._every_n_epochs = 1

    # ------------------------------------------------------------------------------------------------ signals
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        global last_interruption
        last_interruption, self._pending = None, None
        if threading.current_thread() is not threading.main_thread():
            return
        # Lightning registered its SIGTERM handler just before this hook and restores every handler when the run
        # ends. Its handler makes the loops stop at their next check, even mid-validation; on one device ours holds
        # the signal until a safe point (`_release`). Under DDP, Lightning's handler coordinates the ranks: keep it.
        if trainer.world_size == 1:
            self._lightning_sigterm = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        global last_interruption
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C aborts at once, saving nothing
            rank_zero_info("Ctrl-C: stopping at the next safe point and saving last.ckpt (Ctrl-C again to abort now).")
        if self._pending is None:
            last_interruption = Interruption(signum)
            self._pending = (signum, frame)
        if self._lightning_sigterm is None and signum == signal.SIGINT:  # DDP: Lightning's handler is in charge
            signal.raise_signal(signal.SIGTERM)

    def _release(self) -> None:
        """Pass a held signal on to Lightning, whose loops then stop at their next check (a safe one from here)."""
        if self._pending is not None and callable(self._lightning_sigterm):
            self._lightning_sigterm(signal.SIGTERM, self._pending[1])

    # ------------------------------------------------------------------------------------------------ save points
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # the epoch-end hooks are still to come: on_train_epoch_end saves and releases
        if not _validation_follows(trainer):
            self._release()  # Lightning stops right after this batch
        every = self._last_every
        if self._writes_last and every and trainer.global_step % every == 0:
            self._write_last_once(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        if fitting and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:  # a mid-epoch validation
            self._release()
            if self._writes_last:
                self.write_last(trainer)  # again if written before this validation: its results belong in the state

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)  # runs after EarlyStopping's check: that is in the state
        self._release()  # Lightning stops once the epoch is recorded as complete
        if self._writes_last:
            self.write_last(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self._writes_last:
            self._write_last_once(trainer)  # e.g. `max_steps` reached mid-epoch

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # A signal stops the loops at a safe point. Any other exception may have struck half-way through a step:
        # the last regular checkpoint is the one to resume from.
        if isinstance(exception, SIGTERMException) and trainer.state.fn == TrainerFn.FITTING:
            global last_interruption
            info = last_interruption or Interruption(signal.SIGTERM)
            info.epoch, info.step = trainer.current_epoch, trainer.global_step
            if not trainer.sanity_checking:  # nothing trained yet: keep the checkpoint the run started from
                info.checkpoint = self.write_last(trainer)
            last_interruption = info
            return
        super().on_exception(trainer, pl_module, exception)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        state_dict.pop("last_monitored", None)  # kept by earlier versions, which scored top-k files between validations
        super().load_state_dict(state_dict)

    def _write_last_once(self, trainer: Trainer) -> None:
        if self._last_step_written != trainer.global_step and not trainer.sanity_checking:
            self.write_last(trainer)

    def write_last(self, trainer: Trainer) -> str:
        """Writes ``last.ckpt`` now (the file ``--ckpt_path last`` resumes from) and returns its path."""
        path = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)
        self.last_model_path = path  # recorded before saving: it is part of the saved state
        # Lightning writes to a temporary file in $TMPDIR and moves it into place: a copy, not an atomic rename, when
        # $TMPDIR is another filesystem. A kill during a copy onto last.ckpt would destroy the one file to resume
        # from, so it is written beside it first, then renamed over it.
        local = _is_local_file_protocol(path)
        written = f"{path}.tmp" if local else path
        trainer.save_checkpoint(written, self.save_weights_only)
        if local and trainer.is_global_zero:
            os.replace(written, path)
        self._last_step_written = trainer.global_step
        return path


def _validation_follows(trainer: Trainer) -> bool:
    """Whether a validation runs right after the current training batch (Lightning's own rule)."""
    loop = trainer.fit_loop
    try:
        return bool(loop.epoch_loop._should_check_val_fx(loop._data_fetcher))
    except (AttributeError, TypeError):  # a Lightning without these internals: assume it does, which is safe
        return True


class ExactResume(Callback):
    """What a resumed run needs, beyond what Lightning restores, to continue exactly as if never stopped.

    - Torch is reseeded before every training batch from (run seed, epoch, batch index, rank): dropout masks then
      depend only on the position in training, not on how many random numbers were drawn before (model
      initialisation, DataLoader iterators). The run seed is saved in the checkpoint.
    - The training loader's saved position is applied: Lightning skips it when ``configure_optimizers`` asks for
      ``trainer.estimated_stepping_batches`` (our linear schedule does), Lightning issue #20550.
    """

    def __init__(self) -> None:
        self.seed: int | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.seed is None:  # not restored from a checkpoint
            self.seed = torch.initial_seed()  # `seed_everything` sets it; otherwise random per process

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Runs after the checkpoint was restored and before the first batch is drawn (ResumableDataLoader reads its
        # state lazily, at the first batch).
        loop = trainer.fit_loop
        states = getattr(loop, "_combined_loader_states_to_load", None)
        if states and loop._combined_loader is not None:
            loop._combined_loader._load_state_dicts(states)
            loop._combined_loader_states_to_load = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(batch_seed(self.seed or 0, trainer.current_epoch, batch_idx, trainer.global_rank))

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = state_dict["seed"]


def batch_seed(seed: int, epoch: int, batch_idx: int, rank: int = 0) -> int:
    """A 63-bit seed for one training batch, well mixed from its position in training."""
    return int(np.random.SeedSequence([seed, epoch, batch_idx, rank]).generate_state(1, np.uint64)[0] >> 1)


def find_last_checkpoint(folder: str | Path) -> Path | None:
    """The most recently written ``last*.ckpt`` in ``folder`` or in its runs' ``*/checkpoints/`` folders."""
    folder = Path(folder)
    candidates = [
        p for pattern in ("last*.ckpt", "*/checkpoints/last*.ckpt") for p in folder.glob(pattern) if p.is_file()
    ]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns, default=None)


def interruption_message(info: Interruption | None) -> tuple[str, int]:
    """The one-line report and the exit status (128 + signal number, as the shell reports a signal) of a stop."""
    info = info or Interruption(signal.SIGTERM)
    name = signal.Signals(info.signum).name
    saved = f"saved {info.checkpoint}" if info.checkpoint else "no new checkpoint (stopped before training)"
    return (
        f"Interrupted by {name} at epoch {info.epoch}, global step {info.step}: {saved}. "
        "Resume with the same command plus `--ckpt_path last`.",
        128 + info.signum,
    )


def exit_interrupted() -> None:
    """Print why training stopped and exit with 128 + the signal number (never 0: the run is not finished)."""
    message, status = interruption_message(last_interruption)
    sys.stderr.write(message + "\n")
    raise SystemExit(status)
