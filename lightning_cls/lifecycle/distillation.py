"""The student's training as a LightningModule: the KL divergence from a frozen teacher's softened probabilities.

`distill` (`lifecycle/distill.py`) builds the student and the teacher and runs this module with a `Trainer`:
`predict` once for the teacher's logits, `validate` for the divergence before and after, `fit` for the training.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the two softmaxes at `temperature`, averaged over the batch's texts."""
    target = F.log_softmax(teacher_logits.float() / temperature, -1)  # (B, C)
    student = F.log_softmax(student_logits.float() / temperature, -1)  # (B, C)
    return F.kl_div(student, target, log_target=True, reduction="batchmean")


def warmup_then_decay(step: int, warmup: int, total: int) -> float:
    """The learning rate's factor at optimizer step `step`: linear warm-up over `warmup` steps, then linear to 0."""
    return min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's notes (devices found, precision, tips, why fit stopped) and its warning that fit runs no validation
    kept out of the output: `distill` prints its own summary (and the validation it runs is its own, before and
    after)."""
    log = logging.getLogger("lightning.pytorch")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="You defined a `validation_step` but have no `val_dataloader`")
            yield
    finally:
        log.setLevel(level)


def distillation_trainer(epochs: int, bf16: bool) -> pl.Trainer:
    """One device, the options' epochs, precision and gradient clipping; no logger, checkpoints or progress bar."""
    return pl.Trainer(
        accelerator="gpu" if torch.cuda.is_available() else "cpu",
        devices=1,
        max_epochs=epochs,
        precision="bf16-mixed" if bf16 else "32-true",
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,  # the student checkpoint is written once, at the end, by `distill`
        enable_progress_bar=False,
        enable_model_summary=False,
    )


class DistillationModule(pl.LightningModule):
    """Trains `student` to give the `teacher`'s probabilities at `temperature` (Hinton et al.); true labels are unused.

    The teacher answers every text once, before training (`Trainer.predict`: eval mode, inference mode, under the
    Trainer's precision), and is dropped with `keep_teacher_logits`: an epoch then costs the student's passes only
    (the teacher has twice its layers: answering again every epoch would add about two thirds to each step), and the
    teacher's memory is free while the student trains. The steps read the teacher's logits by the batch's row ids.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 2.0,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.06,
    ) -> None:
        super().__init__()
        self.student = student  # a TextClassifier: forward(input_ids, attention_mask) -> logits (B, C)
        self.teacher: nn.Module | None = teacher.eval().requires_grad_(False)
        self.temperature, self.learning_rate = temperature, learning_rate
        self.weight_decay, self.warmup_ratio = weight_decay, warmup_ratio
        # The teacher's logits of every text, by row id (N, C); filled by `keep_teacher_logits`.
        self.register_buffer("teacher_logits", torch.empty(0), persistent=False)
        self._started = 0.0

    # ------------------------------------------------------------------------------------------------ the teacher
    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.teacher is None:
            raise RuntimeError("the teacher was dropped: its logits are already kept")
        logits = self.teacher(batch["input_ids"], batch["attention_mask"]).float()  # (B, C)
        return batch["row_id"].cpu(), logits.cpu()

    def keep_teacher_logits(self, answers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep the teacher's logits (what `Trainer.predict` returned, batches in any order) and drop the teacher."""
        rows = torch.cat([r for r, _ in answers])  # (N,)
        logits = torch.cat([x for _, x in answers])  # (N, C)
        self.teacher_logits = torch.empty_like(logits)
        self.teacher_logits[rows] = logits
        self.teacher = None

    # ------------------------------------------------------------------------------------------------ the student
    def divergence(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.student(batch["input_ids"], batch["attention_mask"])  # (B, C)
        return kl_divergence(logits, self.teacher_logits[batch["row_id"]], self.temperature)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # Scaled by T^2: the soft targets' gradients shrink as 1 / T^2 (Hinton et al.).
        return self.divergence(batch) * self.temperature**2

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # The epoch's value is the mean over texts (batches weighted by their size): `Trainer.validate` returns it.
        self.log("kl", self.divergence(batch), batch_size=len(batch["row_id"]))

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.student.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = max(1, int(self.warmup_ratio * total))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_then_decay(s, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_train_start(self) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step, steps = self.global_step, int(self.trainer.estimated_stepping_batches)
        if step % 50 == 0 or step == steps:
            loss, seconds = float(outputs["loss"]), time.perf_counter() - self._started
            self.print(f"epoch {self.current_epoch} step {step}/{steps}: loss {loss:.4f} ({seconds:.0f} s)")
