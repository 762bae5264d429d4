"""`trainer.precision: auto`: train in bf16 only where the hardware runs it natively.

bf16 pays only on hardware that has it: a CUDA GPU of capability 8.0 or more, or a CPU with AMX or AVX512-BF16
(measured here: about 2.7x fp32's speed). Elsewhere PyTorch emulates it, and a step runs many times slower than fp32,
with no word why. `auto` asks `lightning_cls.hardware` and says what it chose in one log line; bf16 asked for
explicitly on a CPU that only emulates it is kept (it is still correct) with a one-line warning of the cost.
"""

from __future__ import annotations

from typing import Any, get_args

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_cls.errors import ConfigError
from lightning_cls.hardware import detect_hardware

# Measured on this project's machines (issue #33): the cost a user pays for bf16 on a CPU that emulates it.
EMULATED_BF16_COST = (
    "a MiniLM training step (16 x 256 tokens, last two blocks) took 23.6 s in bf16-mixed against 1.5 s in 32-true "
    "on an AVX2-only CPU, 16x slower"
)


def _known_precisions() -> set[str]:
    values: set[str] = set()
    for part in get_args(_PRECISION_INPUT):
        values.update(str(v) for v in get_args(part))
    return values


def choose_precision(precision: str | int | None, accelerator: Any = "auto") -> tuple[str | int | None, str | None]:
    """The precision to train in, and the line that says why (None: nothing to say). `auto` takes bf16-mixed where
    the device runs bf16 natively, 16-mixed on an older CUDA GPU, else 32-true; any other value is Lightning's."""
    if precision is not None and precision != "auto" and str(precision) not in _known_precisions():
        raise ConfigError(
            f"--trainer.precision {precision!r} is not a precision: use auto, 32-true, bf16-mixed, 16-mixed, "
            "bf16-true or 64-true."
        )
    wants_gpu = str(accelerator) in ("gpu", "cuda") or (str(accelerator) == "auto" and torch.cuda.is_available())
    hardware = detect_hardware("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")
    if precision == "auto":
        if hardware.bf16:
            chosen, why = "bf16-mixed", f"{hardware.note}: bf16 is native"
        elif hardware.device != "cpu" and hardware.fp16:
            chosen, why = "16-mixed", f"{hardware.note}: fp16 is native, bf16 is not"
        else:
            chosen, why = "32-true", f"{hardware.note}: bf16 would be emulated ({EMULATED_BF16_COST})"
        return chosen, f"trainer.precision auto: {chosen} ({why})."
    if precision is not None and str(precision).startswith("bf16") and not hardware.bf16:
        rank_zero_warn(
            f"trainer.precision {precision} on a {hardware.note}: bf16 is emulated here ({EMULATED_BF16_COST}); "
            "use --trainer.precision auto or 32-true."
        )
    return precision, None


class Trainer(pl.Trainer):
    """Lightning's Trainer, with `precision: auto` chosen by the hardware."""

    def __init__(self, *, precision: str | int | None = None, **kwargs: Any) -> None:
        """
        Args:
            precision: auto (bf16-mixed where the hardware runs bf16 natively: a CUDA GPU of capability 8.0+, a CPU
                with AMX or AVX512-BF16; 16-mixed on an older GPU; else 32-true; the choice is logged), or one of
                Lightning's: 32-true, bf16-mixed, 16-mixed, bf16-true, 64-true. Default: 32-true.
        """
        chosen, said = choose_precision(precision, kwargs.get("accelerator", "auto"))
        super().__init__(precision=chosen, **kwargs)
        if said:
            rank_zero_info(said)
