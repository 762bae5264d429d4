"""`python -m lightning_cls export`: a checkpoint as a Hugging Face model folder (optionally also ONNX).

The folder loads with `transformers.pipeline("text-classification", model=folder)` with no network: the model
(safetensors) with `id2label`/`label2id`, the tokenizer with its pad token and the training truncation length, and
`lightning_cls.json`, which records the labels, the settings and the training split's label and token-length
distribution that monitoring compares live traffic with, and how well each faster way of running the model (bf16,
fp16, ONNX, ONNX int8) agrees with fp32 on validation texts: `serve --precision auto` only uses one that agrees
enough (`lightning_cls.inference`).
"""

from __future__ import annotations

import copy
import inspect
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning_utilities.core.imports import RequirementCache
from torch import nn

from lightning_cls import __version__
from lightning_cls.adapters import merged
from lightning_cls.atomic import atomic_folder
from lightning_cls.checkpoints import load_checkpoint
from lightning_cls.errors import CheckpointError, DataError, ExportError
from lightning_cls.export_format import (
    INT8_ONNX_FILE,
    ONNX_FILE,
    ExportMetadata,
    SplitReference,
    write_export_metadata,
)
from lightning_cls.inference import measure_agreement
from lightning_cls.model import TextClassifier, max_positions
from lightning_cls.model_card import model_card, read_test_report
from lightning_cls.tables import read_text_chunks
from lightning_cls.tokenization import load_tokenizer

_ONNX_AVAILABLE = RequirementCache("onnxruntime") and RequirementCache("onnxscript") and RequirementCache("onnx")


def export_metadata(model: TextClassifier, ckpt_path: str | Path, max_length: int) -> ExportMetadata:
    """The content of `lightning_cls.json` (the serving and monitoring code read it)."""
    reference = model.data_reference
    return ExportMetadata(
        labels=list(model.label_names),
        max_length=int(max_length),
        max_windows=int((reference or {}).get("max_windows") or 1),
        window_stride=(reference or {}).get("window_stride"),
        model_name_or_path=model.hparams.model_name_or_path,
        checkpoint=str(Path(ckpt_path).resolve()),
        exported_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        lightning_cls_version=__version__,
        temperature=model.temperature,
        calibration=model.calibration,
        reference=SplitReference.from_dict(copy.deepcopy(reference["train"])) if reference else None,
    )


def _check_paths(ckpt_path: Path, output_dir: Path) -> dict[str, Any]:
    """The checkpoint (weights memory-mapped), once the paths are checked."""
    if not ckpt_path.is_file():
        raise ExportError(f"Checkpoint {ckpt_path} does not exist (or is not a file).")
    try:
        checkpoint = load_checkpoint(ckpt_path, mmap=True)  # truncated or tampered: one line naming it, before any work
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise ExportError(f"Output folder {output_dir} exists and is not empty: remove it or choose another.")
    return checkpoint


def _sample(texts: list[str], limit: int, seed: int = 0) -> list[str]:
    """At most `limit` of the texts, a seeded random sample in their original order."""
    if len(texts) <= limit:
        return texts
    keep = np.sort(np.random.default_rng(seed).permutation(len(texts))[:limit])
    return [texts[i] for i in keep]


def validation_texts(checkpoint: dict[str, Any], limit: int) -> tuple[list[str], str]:
    """Up to `limit` texts of the validation split the checkpoint was trained beside (a seeded sample), rebuilt from
    the data settings it records, and a phrase saying where they are from. Raises when the data cannot be read."""
    from lightning_cls.data import ScientificTextDataModule

    saved = checkpoint.get("datamodule_hyper_parameters")
    if not saved:
        raise DataError("the checkpoint records no data settings")
    known = inspect.signature(ScientificTextDataModule.__init__).parameters
    data = ScientificTextDataModule(**{k: v for k, v in saved.items() if k in known and k != "self"})
    plan, source = data.plan(), data.source
    texts = plan.table["text"].to_numpy()[plan.rows["val"]].tolist()
    if not texts:
        raise DataError(f"the validation split of {source} is empty")
    picked = _sample(texts, limit)
    return picked, f"validation split of {source} ({len(picked)} of its {len(texts)} texts)"


def agreement_inputs(checkpoint: dict[str, Any], path: str | None, limit: int) -> tuple[list[str], str]:
    """The texts to measure agreement on: `path`'s when given, else the checkpoint's validation split; no texts
    (and the reason, recorded in lightning_cls.json) when neither can be read."""
    if path is not None:  # read errors here are the user's to fix: they reach cli.main as one line
        if not Path(path).is_file():
            raise ExportError(f"--agreement_data {path} does not exist (or is not a file).")
        texts = [t for _, chunk in read_text_chunks(path, id_column=None) for t in chunk]
        picked = _sample(texts, limit)
        return picked, f"{path} ({len(picked)} of its {len(texts)} texts)"
    try:
        return validation_texts(checkpoint, limit)
    except Exception as err:  # optional evidence: a moved data file, the hub offline, an old checkpoint...
        return [], f"the validation split could not be read ({type(err).__name__}: {err}); give --agreement_data"


def quantize_int8(model: Path, output: Path) -> None:
    """`model` (ONNX) with the weights of its matrix products in int8, one scale per output channel, activations
    quantized on the fly (onnxruntime dynamic quantization). Per channel: on the fine-tuned MiniLM here, 97.3% of
    labels agreed with fp32 against 94.1% with one scale per matrix (256 abstracts)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # not its advice to run shape-inference pre-processing first (a logging warning)
    try:
        quantize_dynamic(str(model), str(output), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.setLevel(level)


def _print_agreement(records: dict[str, dict[str, Any]]) -> None:
    first = next(iter(records.values()))
    print(f"Agreement with fp32 on {first['device']}, texts from {first['source']}:")
    for name, r in records.items():
        if "skipped" in r:
            print(f"  {name:10s} skipped: {r['skipped']}")
        else:
            print(
                f"  {name:10s} {r['agreement']:.2%} same labels, max probability difference {r['max_prob_diff']:.1e}, "
                f"{r['texts_per_s']:.1f} texts/s"
            )


def _training_max_length(model: TextClassifier, max_length: int | None) -> int:
    if max_length is not None:
        return max_length
    if model.data_reference and model.data_reference.get("max_length"):
        return int(model.data_reference["max_length"])
    limit = max_positions(model.model) or 512
    rank_zero_warn(
        f"The checkpoint records no training max_length: the exported tokenizer truncates at the model's {limit} "
        "positions. Pass --max_length to match training."
    )
    return int(limit)


class _Logits(nn.Module):
    """The classifier as a plain (input_ids, attention_mask) -> logits function, for tracing to ONNX."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, num_labels)


def export_onnx(model: nn.Module, path: Path, max_positions: int, pad_token_id: int, opset: int = 18) -> float:
    """Write `model` as ONNX with dynamic batch and sequence axes (inputs `input_ids`, `attention_mask`, int64;
    output `logits`); returns the largest probability difference from PyTorch on a padded test batch."""
    import onnxruntime

    wrapper = _Logits(model).eval()
    example = torch.randint(0, max(pad_token_id + 1, 100), (2, 16))  # (B, T)
    mask = torch.ones_like(example)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=max_positions)
    axes = {0: batch, 1: sequence}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on unused torchvision ops and the like
        torch.onnx.export(
            wrapper,
            (example, mask),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_shapes={"input_ids": axes, "attention_mask": axes},
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    # A different batch size and length than the traced one, with right padding: the axes must really be dynamic.
    ids = torch.randint(0, max(pad_token_id + 1, 100), (3, 11))
    mask = torch.ones_like(ids)
    ids[1, 6:], mask[1, 6:] = pad_token_id, 0
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        reference = wrapper(ids, mask).softmax(-1)
    return float((torch.from_numpy(logits).softmax(-1) - reference).abs().max())


def export(
    ckpt_path: str,
    output_dir: str,
    format: Literal["hf", "onnx"] = "hf",
    max_length: int | None = None,
    opset: int = 18,
    test_report: str | None = None,
    quantize: Literal["int8"] | None = None,
    agreement_texts: int = 512,
    agreement_data: str | None = None,
    agreement_seconds: float = 60.0,
    agreement_device: str = "cpu",
) -> Path:
    """Export a checkpoint as a Hugging Face model folder that `transformers.pipeline` loads offline.

    Args:
        ckpt_path: The Lightning checkpoint (e.g. runs/quickstart/version_0/checkpoints/last.ckpt).
        output_dir: The folder to create; it must not exist or be empty. Written atomically (built beside it, then
            renamed).
        format: `hf`: model (safetensors), tokenizer, config with id2label/label2id and lightning_cls.json. `onnx`:
            the same plus model.onnx (dynamic batch and sequence axes), checked against PyTorch with onnxruntime.
        max_length: Truncation length of the exported tokenizer (default: the training data's, from the checkpoint).
        opset: ONNX opset version.
        test_report: `test_report.json` written by `python -m lightning_cls test` on this checkpoint: the model card
            (README.md) quotes its metrics.
        quantize: int8 (with --format onnx): also model.int8.onnx, its matrix products' weights in int8 (onnxruntime
            dynamic quantization, one scale per output channel), for `serve --backend onnx --precision int8`.
        agreement_texts: Texts to measure each way of running the model on (fp32, bf16, fp16, and ONNX / int8 when
            written) against fp32: a seeded sample of the checkpoint's validation split (or of --agreement_data).
            Recorded in lightning_cls.json (`inference`); `serve --precision auto` uses a lower precision only if
            its agreement is at least the gate. 0: measure nothing.
        agreement_data: A .txt / .csv / .jsonl file of texts (column or field `text`) to measure on instead of the
            validation split (which is rebuilt from the data settings in the checkpoint, if that data is at hand).
        agreement_seconds: A way of running the model whose measurement would take longer than this (estimated
            from its first batch) is skipped, with the reason recorded: bf16 and fp16 on a CPU without AMX /
            AVX512-BF16 run several times slower than fp32.
        agreement_device: Device to measure on (cpu, cuda): the one the model will be served on.
    """
    ckpt, output = Path(ckpt_path), Path(output_dir)
    checkpoint = _check_paths(ckpt, output)
    if quantize is not None and format != "onnx":
        raise ExportError(f"--quantize {quantize} quantizes the ONNX model: add --format onnx.")
    if agreement_texts < 0:
        raise ExportError(f"--agreement_texts must be 0 (measure nothing) or more, got {agreement_texts}.")
    report = read_test_report(test_report) if test_report else None  # a wrong path fails before any work
    # A bad --agreement_data fails here, before any work; texts for the agreement, or the reason there are none.
    texts, source = agreement_inputs(checkpoint, agreement_data, agreement_texts) if agreement_texts else ([], "")
    if format == "onnx" and not _ONNX_AVAILABLE:
        raise ExportError(
            f"--format onnx needs onnx, onnxruntime and onnxscript: pip install 'lightning_cls[onnx]'. "
            f"({_ONNX_AVAILABLE.message})"
        )
    # The checkpoint's hyperparameters hold the full HF config: the model is rebuilt offline, weights only.
    # Exporting runs the model a few times at most: compiling it (if it was trained with `model.compile`) is wasted.
    overrides = {"compile": False} if "compile" in inspect.signature(TextClassifier.__init__).parameters else {}
    model = TextClassifier.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True, **overrides).eval()
    hf_model = merged(model.model)  # LoRA adapters folded into the weights: a standard folder, no PEFT needed
    hf_model.config.problem_type = "single_label_classification"  # the pipeline applies a softmax
    length = _training_max_length(model, max_length)
    # A copy: load_tokenizer's result is shared (cached) and must keep its own settings.
    tokenizer = copy.deepcopy(load_tokenizer(model.hparams.tokenizer or model.hparams.model_name_or_path))
    tokenizer.model_max_length = length  # `pipeline(..., truncation=True)` truncates where training did
    tokenizer.padding_side = "right"

    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(output) as tmp:  # built beside `output`, renamed to it once complete
        hf_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        metadata = export_metadata(model, ckpt, length)
        if model.lexical is not None:  # arrays in safetensors, checked by SHA-256 on load (`lightning_cls.lexical`)
            if model.lexical_weight is None:
                raise ExportError(f"{ckpt} has a lexical expert but no fusion weight: run `calibrate` on it first.")
            metadata.lexical = {**model.lexical.save(tmp, metadata.labels), "weight": model.lexical_weight}
        write_export_metadata(tmp, metadata)
        (tmp / "README.md").write_text(model_card(metadata, dict(model.hparams), report))
        if format == "onnx":
            limit = max_positions(hf_model) or length
            diff = export_onnx(hf_model, tmp / ONNX_FILE, limit, tokenizer.pad_token_id, opset)
            if diff > 1e-3:
                raise ExportError(f"ONNX export differs from PyTorch by {diff:.2e} in probability (more than 1e-3).")
            print(f"ONNX: {ONNX_FILE}, onnxruntime vs PyTorch max probability difference {diff:.1e}")
            if quantize == "int8":
                quantize_int8(tmp / ONNX_FILE, tmp / INT8_ONNX_FILE)
        if agreement_texts:
            variants = ["fp32", "bf16", "fp16"] + (["onnx_fp32"] if format == "onnx" else [])
            variants += ["onnx_int8"] if quantize == "int8" else []
            metadata.inference = measure_agreement(tmp, texts, source, agreement_device, agreement_seconds, variants)
            write_export_metadata(tmp, metadata)
            _print_agreement(metadata.inference)
        for file in tmp.iterdir():
            file.chmod(0o644)  # save_pretrained may write owner-only files; a server under another user reads them
        if output.exists():
            output.rmdir()  # checked empty above
    if metadata.reference is None:
        print(f'Note: {ckpt} records no training data reference; lightning_cls.json has "reference": null.')
    print(f"Exported {ckpt} to {output} ({len(metadata.labels)} labels, max_length {length}).")
    return output


def main(argv: list[str]) -> Path:
    """`python -m lightning_cls export ...`; an ``ExportError`` (or any user error) reaches `cli.main`, which reports
    it in one line."""
    from jsonargparse import CLI

    return CLI(export, args=argv, as_positional=False, prog="python -m lightning_cls export")
