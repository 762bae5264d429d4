"""How an exported folder's model is run: the backend (PyTorch, or ONNX Runtime on `model.onnx`), the precision,
and forward passes of at most a token budget. `serve`, the prediction benchmark and `export` share it (export uses it
to measure each precision's agreement with fp32 and records that in `lightning_cls.json`); it knows nothing of
LitServe.

    runner = Runner("outputs/model", InferenceSettings(precision="auto", backend="torch"), device="cpu")
    logits = runner.logits(token_id_lists)  # (N, num_labels) float32, in the order given

Precision `auto` is the fastest precision that the hardware runs well *and* whose agreement with fp32, measured at
export and recorded in `lightning_cls.json` (`inference`), is at least `agreement_gate`; anything else is fp32:

- torch: bf16 on CPUs with AMX or AVX512-BF16 (`/proc/cpuinfo` flags `amx_bf16` / `avx512_bf16`) and on GPUs of
  CUDA capability 8.0 or more; elsewhere bf16 runs, but slower than fp32 (measured several times slower on an AVX2
  CPU), so `auto` never picks it there. fp16 is only run when asked for: it runs on CPUs too (torch's CPU autocast),
  as slowly as bf16 on one without AVX512-FP16 / AMX-FP16.
- onnx: int8 (`model.int8.onnx`, written by `export --quantize int8`) on the CPU, else fp32 (`model.onnx`).

An explicitly asked precision is used as asked, with a warning when its agreement is below the gate or unmeasured,
or when the hardware runs it slowly. Low precision runs under `torch.autocast` with the fp32 weights kept: measured on
the fine-tuned MiniLM here, casting the whole model (`model.to(bfloat16)`) doubled the largest probability difference
from fp32 (0.0082 vs 0.0041) at the same speed, and autocast keeps one set of weights for every precision.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning_utilities.core.imports import RequirementCache

from lightning_cls.errors import ConfigError
from lightning_cls.export_format import INT8_ONNX_FILE, ONNX_FILE, ExportMetadata, read_export_metadata

Precision = Literal["auto", "fp32", "bf16", "fp16", "int8"]
Backend = Literal["torch", "onnx"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16", "int8")
BACKENDS: tuple[str, ...] = ("torch", "onnx")
DEFAULT_AGREEMENT_GATE = 0.995
# Tokens per forward pass (rows x padded length) when `max_batch_tokens` is not given. CPU: 32 rows of 128 tokens,
# where MiniLM's throughput levelled off here (8 rows: 0.65x, 16: 0.84x, 64: 0.92x of 32 rows' texts/s; one run on
# a loaded machine). GPU: a larger budget keeps the device busy; not measured here (no GPU was lent).
DEFAULT_MAX_BATCH_TOKENS = {"cpu": 4096, "cuda": 32768}
# Most padding tokens one forward pass may carry. On a CPU compute grows with the tokens of a pass, padding
# included, and a pass has a fixed cost: for MiniLM here about as much as 18 more tokens in torch fp32 and 4 in
# ONNX int8 (a linear fit of the time of passes from 1x8 to 4x128 tokens, one thread, the machine otherwise idle:
# scripts/bench_pass_cost.py; 16-20 for both on a loaded machine). The bound is set near fp32's, what runs by
# default. A short text joins a pass of long ones only while the pass's padding stays under it, so a burst of short
# queries and long abstracts runs as a long pass and a short one instead of every query padded to the longest
# abstract. GPU: padding is nearly free next to a kernel launch; no bound (not measured here: no GPU was lent).
DEFAULT_MAX_PADDING = {"cpu": 24, "cuda": None}
# The agreement record's names: torch precisions by their own name, ONNX ones prefixed.
VARIANTS: tuple[str, ...] = ("fp32", "bf16", "fp16", "onnx_fp32", "onnx_int8")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_ONNXRUNTIME = RequirementCache("onnxruntime")


def variant_name(backend: str, precision: str) -> str:
    """The name of a backend and precision in the agreement record: `bf16`, `onnx_int8`, ..."""
    return precision if backend == "torch" else f"onnx_{precision}"


# ------------------------------------------------------------------------------------------------ hardware
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@dataclass(frozen=True)
class Hardware:
    """Which low precisions a device runs well (faster than fp32), and why, in words."""

    device: str
    bf16: bool
    fp16: bool
    note: str


def detect_hardware(device: str | torch.device = "cpu") -> Hardware:
    """bf16 runs well on CPUs with AMX or AVX512-BF16 and GPUs of CUDA capability >= 8.0; fp16 on CPUs with AMX-FP16
    or AVX512-FP16 and GPUs of capability >= 7.0."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return Hardware(str(device), (major, minor) >= (8, 0), major >= 7, f"CUDA capability {major}.{minor}")
    if device.type != "cpu":
        return Hardware(str(device), False, False, f"{device.type}: low precision not measured here")
    flags = cpu_flags()
    bf16 = sorted(flags & {"amx_bf16", "avx512_bf16"})
    fp16 = sorted(flags & {"amx_fp16", "avx512_fp16"})
    note = f"CPU with {', '.join(bf16 + fp16)}" if bf16 or fp16 else "CPU without AMX / AVX512-BF16 / AVX512-FP16"
    return Hardware("cpu", bool(bf16), bool(fp16), note)


# ------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class InferenceSettings:
    """How an exported model is run (the `serve` flags of the same names).

    Args:
        precision: auto (the fastest precision this hardware runs well whose agreement with fp32, recorded at
            export, is at least `agreement_gate`; else fp32), fp32, bf16, fp16 (torch backend) or int8 (onnx
            backend: model.int8.onnx, from `export --format onnx --quantize int8`).
        backend: torch (the folder's safetensors weights) or onnx (ONNX Runtime on model.onnx, from
            `export --format onnx`).
        max_batch_tokens: Most tokens per forward pass, padding included (rows x padded length); texts run longest
            first, so each pass holds texts of similar length. Default: 4096 on a CPU, 32768 on a GPU. At least the
            model's max_length.
        agreement_gate: Least share of labels identical to fp32's (measured at export) for `auto` to use a lower
            precision.
    """

    precision: Precision = "auto"
    backend: Backend = "torch"
    max_batch_tokens: int | None = None
    agreement_gate: float = DEFAULT_AGREEMENT_GATE

    def problems(self, model_dir: str | Path, max_length: int | None = None) -> list[str]:
        """Everything wrong with these settings for this folder, each naming the flag and the fix."""
        folder, problems = Path(model_dir), []
        if self.precision not in PRECISIONS:
            problems.append(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.backend not in BACKENDS:
            problems.append(f"--backend must be torch or onnx, got {self.backend!r}")
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
        return problems

    def check(self, model_dir: str | Path, max_length: int | None = None) -> None:
        """Raise one ``ConfigError`` listing every problem (call it where the flags are parsed, before any worker)."""
        problems = self.problems(model_dir, max_length)
        if problems:
            raise ConfigError("; ".join(problems) + ".")


@dataclass(frozen=True)
class Choice:
    """The backend and precision that will run, why, and any warnings about them."""

    backend: str
    precision: str
    reason: str
    warnings: tuple[str, ...] = field(default=())

    @property
    def variant(self) -> str:
        return variant_name(self.backend, self.precision)


def recorded_agreement(record: dict[str, Any] | None, variant: str) -> tuple[float | None, str]:
    """A variant's agreement with fp32 from the export's `inference` record, and a phrase saying so (or why not)."""
    entry = (record or {}).get(variant)
    if not record:
        return None, "the export records no agreement (exported before it was measured, or with --agreement_texts 0)"
    if not isinstance(entry, dict):
        return None, f"the export did not measure {variant}"
    if entry.get("agreement") is None:
        return None, f"{variant} was not measured at export ({entry.get('skipped', 'no reason recorded')})"
    agreement = float(entry["agreement"])
    return agreement, f"{variant} agreed with fp32 on {agreement:.2%} of {entry.get('texts', '?')} texts"


def choose(
    settings: InferenceSettings, hardware: Hardware, record: dict[str, Any] | None, model_dir: str | Path
) -> Choice:
    """Resolve `auto` (and check an explicit precision) against the hardware and the export's agreement record."""
    gate = settings.agreement_gate
    if settings.precision != "auto":
        variant = variant_name(settings.backend, settings.precision)
        notes = []
        if settings.precision != "fp32":
            agreement, said = recorded_agreement(record, variant)
            if agreement is None:
                notes.append(f"{said}: its labels may differ from fp32's")
            elif agreement < gate:
                notes.append(f"{said}, below --agreement_gate {gate}")
        if settings.precision in _DTYPES and not getattr(hardware, settings.precision):
            notes.append(f"{settings.precision} runs slower than fp32 on this hardware ({hardware.note})")
        return Choice(settings.backend, settings.precision, "asked for", tuple(notes))
    if settings.backend == "torch":
        candidate, fast = "bf16", hardware.bf16
        slow_reason = f"bf16 does not run faster than fp32 here ({hardware.note})"
    else:
        candidate, fast = "int8", hardware.device == "cpu" and (Path(model_dir) / INT8_ONNX_FILE).is_file()
        slow_reason = (
            f"no {INT8_ONNX_FILE} (export with --quantize int8)"
            if hardware.device == "cpu"
            else "int8 (dynamic quantization) runs on the CPU"
        )
    if not fast:
        return Choice(settings.backend, "fp32", f"auto: {slow_reason}")
    agreement, said = recorded_agreement(record, variant_name(settings.backend, candidate))
    if agreement is None:
        return Choice(settings.backend, "fp32", f"auto: {said}")
    if agreement < gate:
        return Choice(settings.backend, "fp32", f"auto: {said}, below --agreement_gate {gate}")
    return Choice(settings.backend, candidate, f"auto: {hardware.note}; {said} (gate {gate})")


# ------------------------------------------------------------------------------------------------ batches
def padded_width(length: int, multiple: int = 1) -> int:
    return max(1, -(-length // multiple) * multiple)


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


def pad_batch(
    ids: Sequence[Sequence[int]], pad_token_id: int, left: bool = False, multiple: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), both (B, T) int64, padded on the tokenizer's side to the longest row."""
    width = padded_width(max((len(row) for row in ids), default=0), multiple)
    input_ids = np.full((len(ids), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for i, row in enumerate(ids):
        where = slice(width - len(row), width) if left else slice(0, len(row))
        input_ids[i, where], mask[i, where] = row, 1
    return input_ids, mask


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
            from lightning_cls.tokenization import load_tokenizer

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
        self._dtype = _DTYPES.get(self.choice.precision)
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
        return (
            f"{self.backend} {self.precision} on {self.device} ({self.choice.reason}); at most "
            f"{self.max_batch_tokens} tokens per forward pass"
        )

    def _load_torch(self) -> None:
        from lightning_cls.export_format import load_classifier

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
        path = self.model_dir / (INT8_ONNX_FILE if self.choice.precision == "int8" else ONNX_FILE)
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


# ------------------------------------------------------------------------------------------------ agreement
def compare(reference: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """(share of identical labels, largest probability difference) of logits against the fp32 reference."""
    p, q = reference.float().softmax(-1), logits.float().softmax(-1)
    same = (p.argmax(-1) == q.argmax(-1)).float().mean().item() if len(p) else 1.0
    return same, (p - q).abs().max().item() if len(p) else 0.0


def measure_agreement(
    model_dir: str | Path,
    texts: Sequence[str],
    source: str,
    device: str = "cpu",
    seconds: float = 60.0,
    variants: Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Each variant's agreement with torch fp32 on `texts`, read as `serve` reads them (windows, if the export has
    them; a text's logits are its windows' mean): ``{"fp32": {...}, "bf16": {...}, "onnx_int8": {...}}``.

    Every entry says `device` and `source`; a measured one `agreement` (share of identical labels), `max_prob_diff`
    (largest probability difference, raw softmax), `texts` and `texts_per_s` (on this machine, as it was loaded);
    a skipped one `skipped` (why). A variant is skipped when its folder lacks the file, or when its first batch says
    the whole measurement would take longer than `seconds` (bf16 on a CPU without AMX / AVX512-BF16: several times
    slower than fp32).
    """
    from lightning_cls.windows import WindowSpec, mean_logits_per_text, window_token_ids

    folder, meta = Path(model_dir), read_export_metadata(model_dir)
    spec = WindowSpec(int(meta.max_length), int(meta.max_windows or 1), meta.window_stride)
    names = list(variants or VARIANTS)
    base = {"device": str(device), "source": source}
    texts = list(texts)
    if not texts:
        return {name: {**base, "skipped": f"no texts to measure on ({source})"} for name in names}

    def run(runner: Runner, batch: list[str]) -> torch.Tensor:
        windows = window_token_ids(runner.tokenizer, batch, spec)
        return mean_logits_per_text(runner.logits(windows.input_ids), windows.text_index, windows.num_texts)

    def timed(runner: Runner, batch: list[str]) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        logits = run(runner, batch)
        return logits, time.perf_counter() - start

    reference_runner = Runner(folder, InferenceSettings(precision="fp32"), device, metadata=meta)
    tokenizer = reference_runner.tokenizer
    run(reference_runner, texts[:1])  # the first pass is slow (kernels chosen, memory allocated)
    reference, elapsed = timed(reference_runner, texts)
    records = {"fp32": {**base, "agreement": 1.0, "max_prob_diff": 0.0, "texts": len(texts)}}
    records["fp32"]["texts_per_s"] = round(len(texts) / elapsed, 2)
    del reference_runner
    probe = texts[: min(8, len(texts))]
    for name in names:
        if name == "fp32":
            continue
        backend, precision = ("onnx", name[5:]) if name.startswith("onnx_") else ("torch", name)
        settings = InferenceSettings(precision=precision, backend=backend)
        problems = settings.problems(folder)
        if problems:
            records[name] = {**base, "skipped": problems[0]}
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "not measured yet": that is what this does
            runner = Runner(folder, settings, device, tokenizer=tokenizer, metadata=meta)
        run(runner, texts[:1])
        _, probe_s = timed(runner, probe)
        estimate = probe_s / len(probe) * len(texts)
        if estimate > seconds:
            why = "" if precision not in _DTYPES or getattr(runner.hardware, precision) else f"; {runner.hardware.note}"
            records[name] = {
                **base,
                "skipped": f"about {estimate:.0f} s for {len(texts)} texts at {len(probe) / probe_s:.1f} texts/s "
                f"(fp32: {records['fp32']['texts_per_s']:.1f}), over the {seconds:g} s allowed{why}",
            }
            continue
        logits, elapsed = timed(runner, texts)
        same, diff = compare(reference, logits)
        records[name] = {
            **base,
            "agreement": round(same, 6),
            "max_prob_diff": float(f"{diff:.3g}"),
            "texts": len(texts),
            "texts_per_s": round(len(texts) / elapsed, 2),
        }
    return {name: records[name] for name in names if name in records}
