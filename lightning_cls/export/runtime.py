"""How an exported folder's model is run: the backend (PyTorch, or ONNX Runtime on `model.onnx`), the precision,
and forward passes of at most a token budget. `serve`, the prediction benchmark and `export` share it (export uses it
to measure each precision's agreement with fp32 and records that in `lightning_cls.json`); it knows nothing of
LitServe.

    runner = Runner("outputs/model", InferenceSettings(precision="auto", backend="torch"), device="cpu")
    logits = runner.logits(token_id_lists)  # (N, num_labels) float32, in the order given

Precision `auto` takes the fastest way of running the folder (a *variant*: torch fp32 / bf16 / fp16, ONNX fp32 /
int8) that passes the gate, by the measurements `export` recorded in `lightning_cls.json` (`inference`) on the
validation split:

- the gate (`gate`): `macro_f1` (default): the variant's macro-F1 on the validation texts (with the export's lexical
  expert fused, when it has one) is at most `max_f1_drop` (default 0.005: half a point, absolute) below fp32's, as
  quantization toolkits judge a faster model (by the task metric it keeps, not by identical labels);
  `agreement`: at least `agreement_gate` of its labels are fp32's (the older, stricter gate).
- fastest: the highest texts/s recorded at export on the same kind of device; a variant must be recorded at least
  `MIN_SPEEDUP` times faster than the fp32 it replaces, so that the noise of one measurement never trades accuracy
  for nothing.
- the hardware must run it well: bf16 on CPUs with AMX or AVX512-BF16 (`/proc/cpuinfo` flags `amx_bf16` /
  `avx512_bf16`) and on GPUs of CUDA capability 8.0 or more (elsewhere bf16 runs, but several times slower than
  fp32); fp16 on CPUs with AMX-FP16 / AVX512-FP16 and GPUs of capability 7.0 or more; ONNX int8 on the CPU.
- which variants: those of `backend` (torch, onnx), or of both with `backend auto`. fp32 of the backend is the
  fallback, always allowed. A folder exported with `--student_ckpt` also holds a distilled student (`student/`),
  judged by the same gate against the model's fp32: `ExportedModel.load` answers with the student's folder when
  `auto` takes it (a `Runner` runs one folder's weights and never switches).

An explicitly asked precision is used as asked, with a warning when it fails the gate or was not measured, or when
the hardware runs it slowly. Low precision runs under `torch.autocast` with the fp32 weights kept: measured on
the fine-tuned MiniLM here, casting the whole model (`model.to(bfloat16)`) doubled the largest probability difference
from fp32 (0.0082 vs 0.0041) at the same speed, and autocast keeps one set of weights for every precision. ONNX fp32
runs the folder's optimized graph (`model.opt.onnx`, fused attention / LayerNorm / GELU, `export --optimize`) when it
has one, else `model.onnx`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning_utilities.core.imports import RequirementCache

from lightning_cls.data.tokenization import pad_batch, padded_width
from lightning_cls.errors import ConfigError
from lightning_cls.export.folder import (
    INT8_ONNX_FILE,
    METADATA_FILE,
    ONNX_FILE,
    STUDENT_DIR,
    ExportMetadata,
    read_export_metadata,
)
from lightning_cls.export.onnx_optimize import OPTIMIZED_ONNX_FILE
from lightning_cls.hardware import Hardware, detect_hardware

Precision = Literal["auto", "fp32", "bf16", "fp16", "int8"]
Backend = Literal["auto", "torch", "onnx"]
Gate = Literal["macro_f1", "agreement"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16", "int8")
BACKENDS: tuple[str, ...] = ("auto", "torch", "onnx")
GATES: tuple[str, ...] = ("macro_f1", "agreement")
DEFAULT_AGREEMENT_GATE = 0.995
# Most macro-F1 a faster variant may lose against fp32 on the validation split (absolute: 0.005 is half a point).
DEFAULT_MAX_F1_DROP = 0.005
# `auto` takes a faster variant only if export recorded it at least this many times fp32's texts/s: one measurement
# on a shared machine moves by 10-30%, and a variant that is not clearly faster is not worth any accuracy.
MIN_SPEEDUP = 1.1
# Tokens per forward pass (rows x padded length) when `max_batch_tokens` is not given. CPU: 32 rows of 128 tokens,
# where MiniLM's throughput levelled off here (8 rows: 0.65x, 16: 0.84x, 64: 0.92x of 32 rows' texts/s; one run on
# a loaded machine). GPU: a larger budget keeps the device busy; not measured here (no GPU was lent).
DEFAULT_MAX_BATCH_TOKENS = {"cpu": 4096, "cuda": 32768}
# Most padding tokens one forward pass may carry. On a CPU compute grows with the tokens of a pass, padding
# included, and a pass has a fixed cost: for MiniLM here about as much as 18 more tokens in torch fp32 and 4 in
# ONNX int8 (a linear fit of the time of passes from 1x8 to 4x128 tokens, one thread, the machine otherwise idle:
# benchmarks/bench_pass_cost.py; 16-20 for both on a loaded machine). The bound is set near fp32's, what runs by
# default. A short text joins a pass of long ones only while the pass's padding stays under it, so a burst of short
# queries and long abstracts runs as a long pass and a short one instead of every query padded to the longest
# abstract. GPU: padding is nearly free next to a kernel launch; no bound (not measured here: no GPU was lent).
DEFAULT_MAX_PADDING = {"cpu": 24, "cuda": None}
# The agreement record's names: torch precisions by their own name, ONNX ones prefixed; `student` the distilled
# student exported beside the model (`STUDENT_DIR`), run in torch fp32.
STUDENT = "student"
VARIANTS: tuple[str, ...] = ("fp32", "bf16", "fp16", "onnx_fp32", "onnx_int8", STUDENT)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_ONNXRUNTIME = RequirementCache("onnxruntime")


def variant_name(backend: str, precision: str) -> str:
    """The name of a backend and precision in the agreement record: `bf16`, `onnx_int8`, ..."""
    return precision if backend == "torch" else f"onnx_{precision}"


# ------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class InferenceSettings:
    """How an exported model is run (the `serve` flags of the same names).

    Args:
        precision: auto (the fastest variant this hardware runs well that passes the gate, by what export recorded
            on the validation split; else fp32), fp32, bf16, fp16 (torch backend) or int8 (onnx backend:
            model.int8.onnx, from `export --format onnx --quantize int8`).
        backend: torch (the folder's safetensors weights), onnx (ONNX Runtime on model.opt.onnx or model.onnx, from
            `export --format onnx`) or auto (with --precision auto: the fastest variant of either).
        max_batch_tokens: Most tokens per forward pass, padding included (rows x padded length); texts run longest
            first, so each pass holds texts of similar length. Default: 4096 on a CPU, 32768 on a GPU. At least the
            model's max_length.
        agreement_gate: With --gate agreement: least share of labels identical to fp32's (measured at export) for
            `auto` to take a faster variant.
        gate: What `auto` judges a faster variant by: macro_f1 (its validation macro-F1 at most --max_f1_drop below
            fp32's) or agreement (at least --agreement_gate of its labels identical to fp32's).
        max_f1_drop: With --gate macro_f1: most validation macro-F1 a faster variant may lose against fp32
            (absolute; 0.005 is half a point).
    """

    precision: Precision = "auto"
    backend: Backend = "torch"
    max_batch_tokens: int | None = None
    agreement_gate: float = DEFAULT_AGREEMENT_GATE
    gate: Gate = "macro_f1"
    max_f1_drop: float = DEFAULT_MAX_F1_DROP

    def __post_init__(self) -> None:
        # --backend auto (serve's default) with an explicit precision: the backend that precision runs on.
        if self.backend == "auto" and self.precision in PRECISIONS and self.precision != "auto":
            object.__setattr__(self, "backend", "onnx" if self.precision == "int8" else "torch")

    def problems(self, model_dir: str | Path, max_length: int | None = None) -> list[str]:
        """Everything wrong with these settings for this folder, each naming the flag and the fix."""
        folder, problems = Path(model_dir), []
        if self.precision not in PRECISIONS:
            problems.append(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.backend not in BACKENDS:
            problems.append(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "torch" and self.precision == "int8":
            problems.append(
                "--precision int8 is the ONNX backend's quantized model: use --backend onnx (with a folder exported "
                "with --format onnx --quantize int8)"
            )
        if self.backend == "onnx":
            if self.precision in ("bf16", "fp16"):
                problems.append(
                    f"--precision {self.precision} runs on --backend torch; --backend onnx runs fp32 ({ONNX_FILE}) "
                    f"or int8 ({INT8_ONNX_FILE})"
                )
            if not _ONNXRUNTIME:
                problems.append("--backend onnx needs onnxruntime: pip install 'lightning_cls[onnx]'")
            if self.precision in ("auto", "fp32") and not (folder / ONNX_FILE).is_file():
                problems.append(
                    f"--backend onnx needs {folder / ONNX_FILE}: export the checkpoint with --format onnx "
                    "(or serve with --backend torch)"
                )
            if self.precision == "int8" and not (folder / INT8_ONNX_FILE).is_file():
                problems.append(
                    f"--precision int8 needs {folder / INT8_ONNX_FILE}: export the checkpoint with --format onnx "
                    "--quantize int8"
                )
        if self.max_batch_tokens is not None and max_length is not None and self.max_batch_tokens < max_length:
            problems.append(
                f"--max_batch_tokens {self.max_batch_tokens} is below the model's max_length {max_length}: one "
                f"sequence would not fit; give at least {max_length}"
            )
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            problems.append(f"--max_batch_tokens must be positive, got {self.max_batch_tokens}")
        if not 0 < self.agreement_gate <= 1:
            problems.append(f"--agreement_gate must be in (0, 1], got {self.agreement_gate}")
        if self.gate not in GATES:
            problems.append(f"--gate must be macro_f1 or agreement, got {self.gate!r}")
        if not 0 <= self.max_f1_drop <= 1:
            problems.append(
                f"--max_f1_drop must be in [0, 1] (absolute: 0.005 is half a point), got {self.max_f1_drop}"
            )
        return problems

    def check(self, model_dir: str | Path, max_length: int | None = None) -> None:
        """Raise one ``ConfigError`` listing every problem (call it where the flags are parsed, before any worker)."""
        problems = self.problems(model_dir, max_length)
        if problems:
            raise ConfigError("; ".join(problems) + ".")

    def describe_gate(self) -> str:
        if self.gate == "agreement":
            return f"agreement: at least {self.agreement_gate:.2%} of labels identical to fp32's"
        return f"macro_f1: validation macro-F1 at most {self.max_f1_drop * 100:.2f} point below fp32's"


@dataclass(frozen=True)
class Choice:
    """The backend and precision that will run, why, any warnings about them, and (for `auto`) the verdict on each
    variant considered."""

    backend: str
    precision: str
    reason: str
    warnings: tuple[str, ...] = field(default=())
    verdicts: dict[str, str] = field(default_factory=dict)
    student: bool = False  # the folder's distilled student runs (`STUDENT_DIR`, torch fp32), not its own model

    @property
    def variant(self) -> str:
        return STUDENT if self.student else variant_name(self.backend, self.precision)


def judge(settings: InferenceSettings, record: dict[str, Any] | None, variant: str) -> tuple[bool | None, str]:
    """Whether a variant passes the gate by the export's record, and a phrase saying why; None: not measured."""
    entry = (record or {}).get(variant)
    if not record:
        return None, "the export records no measurements (exported before they were made, or with --agreement_texts 0)"
    if not isinstance(entry, dict):
        return None, f"the export did not measure {variant}"
    if entry.get("agreement") is None:
        return None, f"{variant} was not measured at export ({entry.get('skipped', 'no reason recorded')})"
    agreement, texts = float(entry["agreement"]), entry.get("texts", "?")
    if settings.gate == "agreement":
        passes = agreement >= settings.agreement_gate
        where = "at least" if passes else "below"
        gate = settings.agreement_gate
        return passes, f"{variant}: {agreement:.2%} of {texts} labels as fp32's, {where} --agreement_gate {gate}"
    f1, reference = entry.get("macro_f1"), (record.get("fp32") or {}).get("macro_f1")
    if f1 is None or reference is None:
        why = entry.get("unscored") or (record.get("fp32") or {}).get("unscored") or "no labels"
        return None, f"{variant}: no macro-F1 recorded ({why}); --gate agreement judges by labels alone"
    drop = float(reference) - float(f1)
    passes = drop <= settings.max_f1_drop + 1e-9
    return passes, (
        f"{variant}: macro-F1 {f1:.4f} vs fp32's {reference:.4f} ({-drop * 100:+.2f} points, "
        f"{'within' if passes else 'beyond'} -{settings.max_f1_drop * 100:.2f}), {agreement:.2%} of labels as fp32's, "
        f"on {texts} validation texts"
    )


def recorded_speed(record: dict[str, Any] | None, variant: str, device: str) -> float | None:
    """The texts/s export recorded for a variant on this kind of device (cpu, cuda), if any."""
    entry = (record or {}).get(variant)
    if not isinstance(entry, dict) or not entry.get("texts_per_s"):
        return None
    return float(entry["texts_per_s"]) if torch.device(entry.get("device", "cpu")).type == device else None


def runnable(
    settings: InferenceSettings, hardware: Hardware, model_dir: str | Path, students: bool = False
) -> dict[str, str | None]:
    """The variants `auto` considers for the settings' backend: each with None (runs well here) or why not.
    `students`: the folder's student too (what loads the whole answer path can switch folders; a `Runner` cannot)."""
    folder, device, out = Path(model_dir), torch.device(hardware.device).type, {}
    if settings.backend in ("torch", "auto"):
        out["fp32"] = None
        for name in DTYPES:
            out[name] = (
                None if getattr(hardware, name) else f"{name} does not run faster than fp32 here ({hardware.note})"
            )
    if settings.backend in ("onnx", "auto"):
        missing = None if (folder / ONNX_FILE).is_file() else f"no {ONNX_FILE} (export with --format onnx)"
        out["onnx_fp32"] = missing if _ONNXRUNTIME else "onnxruntime is not installed"
        if device != "cpu":
            out["onnx_int8"] = "int8 (dynamic quantization) runs on the CPU"
        elif not (folder / INT8_ONNX_FILE).is_file():
            out["onnx_int8"] = f"no {INT8_ONNX_FILE} (export with --format onnx --quantize int8)"
        else:
            out["onnx_int8"] = out["onnx_fp32"]
    if students and settings.backend in ("torch", "auto"):
        found = (folder / STUDENT_DIR / METADATA_FILE).is_file()
        out[STUDENT] = None if found else f"no {STUDENT_DIR}/ (export with --student_ckpt)"
    return out


# Which faster variant `auto` prefers when export recorded no speeds on this kind of device.
_PREFERENCE = ("onnx_int8", "bf16", "fp16", "onnx_fp32", STUDENT, "fp32")


def choose(
    settings: InferenceSettings,
    hardware: Hardware,
    record: dict[str, Any] | None,
    model_dir: str | Path,
    students: bool = False,
) -> Choice:
    """Resolve `auto` (and check an explicit precision) against the hardware and the export's record. `students`:
    `auto` may take the folder's distilled student (`ExportedModel.load` then answers with its folder)."""
    if settings.precision != "auto":
        variant = variant_name(settings.backend, settings.precision)
        notes = []
        if settings.precision != "fp32":
            passes, said = judge(settings, record, variant)
            if passes is None:
                notes.append(f"{said}: its answers may differ from fp32's")
            elif not passes:
                notes.append(f"{said}: it fails the gate ({settings.describe_gate()})")
        if settings.precision in DTYPES and not getattr(hardware, settings.precision):
            notes.append(f"{settings.precision} runs slower than fp32 on this hardware ({hardware.note})")
        return Choice(settings.backend, settings.precision, "asked for", tuple(notes))
    device = torch.device(hardware.device).type
    fallback = "onnx_fp32" if settings.backend == "onnx" else "fp32"
    verdicts, passing = {}, [fallback]
    for variant, why_not in runnable(settings, hardware, model_dir, students).items():
        if why_not is not None:
            verdicts[variant] = f"not run: {why_not}"
            continue
        passes, said = judge(settings, record, variant)
        if variant == fallback:
            verdicts[variant] = f"the fallback ({said})"
        elif passes:
            passing.append(variant)
            verdicts[variant] = f"passes: {said}"
        else:
            verdicts[variant] = f"refused: {said}"
    speeds = {v: recorded_speed(record, v, device) for v in passing}
    base = speeds[fallback] or recorded_speed(record, "fp32", device)
    if base is None:  # no speed recorded on this kind of device: the usual order
        taken = next(v for v in _PREFERENCE if v in passing)
        how = f"no speeds recorded on a {device} at export: by the usual order {', '.join(_PREFERENCE)}"
    else:
        timed = [v for v in passing if speeds[v] is not None]
        taken = max(timed, key=lambda v: speeds[v], default=fallback)
        if taken != fallback and speeds[taken] < MIN_SPEEDUP * base:
            verdicts[taken] += f"; but only {speeds[taken] / base:.2f}x fp32's speed (less than {MIN_SPEEDUP}x)"
            taken = fallback
        how = (
            "the fastest that passes: "
            + ", ".join(f"{v} {speeds[v]:.1f} texts/s" for v in sorted(timed, key=lambda v: -speeds[v]))
            + f" at export on a {device}"
        )
    verdicts[taken] = f"taken; {verdicts[taken]}"
    backend, precision = ("onnx", taken[5:]) if taken.startswith("onnx_") else ("torch", taken)
    if taken == STUDENT:
        precision = "fp32"
    reason = f"auto ({settings.describe_gate()}) on a {hardware.note}: {taken}, {how}"
    if taken != fallback:
        reason += f"; {verdicts[taken].removeprefix('taken; passes: ')}"
    else:  # say why nothing faster was taken
        reason += "".join(f"; {v} {why}" for v, why in verdicts.items() if v != taken)
    return Choice(backend, precision, reason, verdicts=verdicts, student=taken == STUDENT)


def onnx_file(model_dir: str | Path, precision: str) -> str:
    """The ONNX file a precision runs: int8's, else the optimized graph when the folder has one, else model.onnx."""
    if precision == "int8":
        return INT8_ONNX_FILE
    return OPTIMIZED_ONNX_FILE if (Path(model_dir) / OPTIMIZED_ONNX_FILE).is_file() else ONNX_FILE


# ------------------------------------------------------------------------------------------------ batches
def plan_batches(
    lengths: Sequence[int], max_batch_tokens: int, multiple: int = 1, max_padding: int | None = None
) -> list[list[int]]:
    """Positions of the sequences per forward pass: longest first, each pass at most `max_batch_tokens` tokens
    (rows x the pass's padded length) and at most `max_padding` padding tokens (None: no bound). A sequence longer
    than the budget on its own runs alone."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: equal lengths keep their order
    widths = [padded_width(lengths[i], multiple) for i in order]
    batches, start = [], 0
    while start < len(order):
        rows, end, padding = max(1, max_batch_tokens // widths[start]), start + 1, 0
        while end < len(order) and end - start < rows:
            padding += widths[start] - widths[end]  # what the next, shorter sequence adds, padded to the pass
            if max_padding is not None and padding > max_padding:
                break
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


# ------------------------------------------------------------------------------------------------ the runner
class Runner:
    """An exported folder's model, run as `settings` say: `logits(token id lists)` -> (N, num_labels) float32.

    The tokenizer (default: the folder's) gives the pad id and side. The model is loaded once, at construction.
    """

    def __init__(
        self,
        model_dir: str | Path,
        settings: InferenceSettings | None = None,
        device: str | torch.device = "cpu",
        tokenizer: Any = None,
        metadata: ExportMetadata | None = None,
    ) -> None:
        self.model_dir, self.settings = Path(model_dir), settings or InferenceSettings()
        self.metadata = metadata or read_export_metadata(model_dir)
        self.settings.check(model_dir, int(self.metadata.max_length))
        self.device = torch.device(device)
        self.hardware = detect_hardware(self.device)
        self.choice = choose(self.settings, self.hardware, getattr(self.metadata, "inference", None), model_dir)
        for note in self.choice.warnings:
            warnings.warn(f"{self.model_dir}: --precision {self.choice.precision}: {note}.", UserWarning, stacklevel=2)
        if tokenizer is None:
            from lightning_cls.data.tokenization import load_tokenizer

            tokenizer = load_tokenizer(str(model_dir))
        self.tokenizer = tokenizer
        self.pad_token_id, self.pad_left = int(tokenizer.pad_token_id), tokenizer.padding_side == "left"
        self.labels = list(self.metadata.labels)
        kind = "cuda" if self.device.type == "cuda" else "cpu"
        self.pad_multiple = 8 if kind == "cuda" else 1  # tensor cores like multiples of 8; a CPU gains nothing
        self.max_batch_tokens = self.settings.max_batch_tokens or max(
            DEFAULT_MAX_BATCH_TOKENS[kind], padded_width(int(self.metadata.max_length), self.pad_multiple)
        )
        self.max_padding = DEFAULT_MAX_PADDING[kind]
        self._dtype = DTYPES.get(self.choice.precision)
        if self.choice.backend == "torch":
            self._load_torch()
        else:
            self._load_onnx()

    @property
    def precision(self) -> str:
        return self.choice.precision

    @property
    def backend(self) -> str:
        return self.choice.backend

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def describe(self) -> str:
        """One line for the log: what runs, why, and the token budget."""
        graph = f" ({self.onnx_file})" if self.backend == "onnx" else ""
        graph += f", the distilled student in {self.model_dir}" if self.choice.student else ""
        return (
            f"{self.backend} {self.precision}{graph} on {self.device} ({self.choice.reason}); at most "
            f"{self.max_batch_tokens} tokens per forward pass"
        )

    def _load_torch(self) -> None:
        from lightning_cls.export.folder import load_classifier

        self.model = load_classifier(self.model_dir, dtype=torch.float32).to(self.device).eval()

    def _load_onnx(self) -> None:
        import onnxruntime

        if self.device.type == "cpu":
            providers = ["CPUExecutionProvider"]
        elif self.device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            if self.choice.precision == "int8":
                raise ConfigError("--precision int8 (dynamic quantization) runs on the CPU: use fp32 on a GPU.")
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0})]
        else:
            raise ConfigError(
                f"--backend onnx on {self.device}: this onnxruntime has no provider for it (CPU only: "
                "pip install onnxruntime-gpu for CUDA), or use --backend torch."
            )
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the same threads as torch's: `serve` sets them
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: not the graph optimizer's notes
        self.onnx_file = onnx_file(self.model_dir, self.choice.precision)
        path = self.model_dir / self.onnx_file
        self.session = onnxruntime.InferenceSession(str(path), options, providers=providers)

    def _forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> torch.Tensor:
        """One forward pass: (B, T) int64 arrays -> (B, num_labels) float32 logits on the CPU."""
        if self.backend == "onnx":
            feed = {"input_ids": input_ids, "attention_mask": attention_mask}
            return torch.from_numpy(self.session.run(["logits"], feed)[0]).float()
        ids = torch.from_numpy(input_ids).to(self.device, non_blocking=True)
        mask = torch.from_numpy(attention_mask).to(self.device, non_blocking=True)
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=self._dtype or torch.bfloat16, enabled=self._dtype is not None),
        ):
            return self.model(input_ids=ids, attention_mask=mask).logits.float().cpu()  # (B, num_labels)

    def logits(self, ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Logits (N, num_labels) float32 of token id lists (whole texts or windows), in the order given.

        Longest first, in passes of at most `max_batch_tokens` tokens and (on a CPU) `max_padding` padding tokens:
        sequences of similar length share a pass, so little compute goes to padding; the answers do not depend on
        either bound (tested)."""
        out = torch.empty(len(ids), self.num_labels, dtype=torch.float32)
        lengths = [len(row) for row in ids]
        for rows in plan_batches(lengths, self.max_batch_tokens, self.pad_multiple, self.max_padding):
            input_ids, mask = pad_batch([ids[i] for i in rows], self.pad_token_id, self.pad_left, self.pad_multiple)
            out[rows] = self._forward(input_ids, mask)
        return out
