"""`python -m lightning_cls export`: a checkpoint as a Hugging Face model folder (optionally also ONNX).

The folder loads with `transformers.pipeline("text-classification", model=folder)` with no network: the model
(safetensors) with `id2label`/`label2id`, the tokenizer with its pad token and the training truncation length, and
`lightning_cls.json`, which records the labels, the settings and the training split's label and token-length
distribution that monitoring compares live traffic with, and how well each faster way of running the model (bf16,
fp16, ONNX, ONNX int8) agrees with fp32 on validation texts: `serve --precision auto` only uses one that agrees
enough (`lightning_cls.export.runtime`).
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
from lightning_cls.arg_parser import run_command
from lightning_cls.atomic import atomic_folder
from lightning_cls.data.tables import read_text_chunks
from lightning_cls.data.tokenization import load_tokenizer
from lightning_cls.errors import CheckpointError, DataError, ExportError
from lightning_cls.export.answer import check_student
from lightning_cls.export.folder import (
    INT8_ONNX_FILE,
    ONNX_FILE,
    STUDENT_DIR,
    ExportMetadata,
    SplitReference,
    read_export_metadata,
    write_export_metadata,
)
from lightning_cls.export.model_card import model_card, read_test_report
from lightning_cls.export.onnx_optimize import (
    OPTIMIZED_ONNX_FILE,
    int8_sensitivity,
    optimized_onnx,
    quantizable_nodes,
    quantize_int8,
)
from lightning_cls.export.runtime import STUDENT
from lightning_cls.export.variants import measure_variants
from lightning_cls.model.adapters import merged
from lightning_cls.model.checkpoints import load_checkpoint
from lightning_cls.model.classifier import TextClassifier, max_positions

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
        thresholds=(model.thresholds or [0.5] * len(model.label_names)) if model.multi_label else None,
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


def _sample(count: int, limit: int, seed: int = 0) -> np.ndarray:
    """Positions of at most `limit` of `count` items, a seeded random sample in their original order."""
    if count <= limit:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).permutation(count)[:limit])


def split_sample(checkpoint: dict[str, Any], split: str, limit: int) -> tuple[list[str], list[str], str]:
    """Up to `limit` texts of a split (train / val / test) of the data the checkpoint was trained on (a seeded
    sample) and their label names, rebuilt from the data settings it records, and a phrase saying where they are
    from. Raises when the data cannot be read."""
    from lightning_cls.data.datamodule import data_module_from_settings

    saved = checkpoint.get("datamodule_hyper_parameters")
    if not saved:
        raise DataError("the checkpoint records no data settings")
    data = data_module_from_settings(saved)  # settings this version no longer takes are left out
    plan, source = data.plan(), data.source
    rows = plan.rows[split]
    name = {"val": "validation"}.get(split, split)
    if not len(rows):
        raise DataError(f"the {name} split of {source} is empty")
    picked = rows[_sample(len(rows), limit)]
    texts = plan.table["text"].to_numpy()[picked].tolist()
    ids = plan.label_ids[picked]
    if ids.ndim == 2:  # label sets (a multi-hot matrix): each row's names, as a tuple
        labels = [tuple(plan.names[j] for j in np.flatnonzero(row)) for row in ids]
    else:
        labels = [plan.names[i] for i in ids]
    return texts, labels, f"{name} split of {source} ({len(picked)} of its {len(rows)} texts)"


def validation_split(checkpoint: dict[str, Any], limit: int) -> tuple[list[str], list[str], str]:
    """`split_sample` of the validation split: what each variant is measured on at export."""
    return split_sample(checkpoint, "val", limit)


def agreement_inputs(
    checkpoint: dict[str, Any], path: str | None, limit: int
) -> tuple[list[str], list[str] | None, str]:
    """The texts to measure each variant on, their label names (None: unknown) and where they are from: `path`'s
    texts when given (no labels), else the checkpoint's validation split; no texts (and the reason, recorded in
    lightning_cls.json) when neither can be read."""
    if path is not None:  # read errors here are the user's to fix: they reach cli.main as one line
        if not Path(path).is_file():
            raise ExportError(f"--agreement_data {path} does not exist (or is not a file).")
        texts = [t for _, chunk in read_text_chunks(path, id_column=None) for t in chunk]
        picked = [texts[i] for i in _sample(len(texts), limit)]
        return picked, None, f"{path} ({len(picked)} of its {len(texts)} texts)"
    try:
        return validation_split(checkpoint, limit)
    except Exception as err:  # optional evidence: a moved data file, the hub offline, an old checkpoint...
        why = f"the validation split could not be read ({type(err).__name__}: {err}); give --agreement_data"
        return [], None, why


def label_ids(names: list | None, labels: list[str]) -> tuple[list | None, str]:
    """Label names as the model's class ids (label sets, tuples of names: multi-hot rows), or None and why not (no
    labels, or labels the model does not have)."""
    if names is None:
        return None, "the texts have no labels (--agreement_data); --gate agreement judges by labels alone"
    index = {name: i for i, name in enumerate(labels)}
    sets = bool(names) and isinstance(names[0], tuple)
    unknown = sorted({n for item in names for n in (item if sets else (item,))} - set(index))
    if unknown:
        return None, f"the validation labels {unknown[:3]} are not the model's"
    if sets:
        return [[int(name in item) for name in labels] for item in names], ""
    return [index[n] for n in names], ""


def most_sensitive_nodes(model: Path, tokenizer: Any, texts: list[str], count: int, max_length: int) -> list[str]:
    """The `count` nodes whose int8 weights change the answers most (`onnx_optimize.int8_sensitivity` on up to 64
    of the texts): the ones to keep in fp32."""
    if count <= 0 or not texts:
        return []
    feeds = []
    for start in range(0, min(len(texts), 64), 16):
        batch = tokenizer(texts[start : start + 16], truncation=True, max_length=max_length, padding=True)
        feeds.append({k: np.asarray(batch[k], dtype=np.int64) for k in ("input_ids", "attention_mask")})
    cost = int8_sensitivity(model, feeds, quantizable_nodes(model))
    everything = cost.pop("")
    ranked = sorted(cost, key=lambda node: cost[node])  # lowest divergence without it: the costliest node first
    print(
        f"int8 sensitivity (mean KL from fp32 on {min(len(texts), 64)} texts): all quantized {everything:.2e}; "
        + ", ".join(f"without {n} {cost[n]:.2e}" for n in ranked[:count])
    )
    return ranked[:count]


def _print_agreement(records: dict[str, dict[str, Any]]) -> None:
    first = next(iter(records.values()))
    fused = " (fused with the lexical expert)" if first.get("fused") else ""
    print(f"Each way of running the model on {first['device']}, texts from {first['source']}{fused}:")
    for name, r in records.items():
        if "skipped" in r:
            print(f"  {name:10s} skipped: {r['skipped']}")
            continue
        score = (
            f"macro-F1 {r['macro_f1']:.4f}, accuracy {r['accuracy']:.4f}, {r['changed']} labels changed "
            f"({r['now_right']} now right, {r['now_wrong']} now wrong), "
            if "macro_f1" in r
            else ""
        )
        print(
            f"  {name:10s} {score}{r['agreement']:.2%} same labels as fp32, max probability difference "
            f"{r['max_prob_diff']:.1e}, {r['texts_per_s']:.1f} texts/s"
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


def _optimize(model: nn.Module, folder: Path, pad_token_id: int) -> dict[str, Any]:
    """model.opt.onnx in `folder` (`onnx_optimize.optimized_onnx`), or why there is none: what it records."""
    try:
        info = optimized_onnx(model, folder / OPTIMIZED_ONNX_FILE, pad_token_id)
    except ValueError as err:
        print(f"Note: no optimized ONNX graph: {err}; ONNX Runtime runs {ONNX_FILE}.")
        return {"skipped": str(err)}
    fused = ", ".join(f"{count} {op}" for op, count in info["fused"].items())
    print(
        f"ONNX: {OPTIMIZED_ONNX_FILE} (fused: {fused}), vs PyTorch max probability difference "
        f"{info['max_prob_diff']:.1e}"
    )
    return {"file": OPTIMIZED_ONNX_FILE, **info}


def export(
    ckpt_path: str,
    output_dir: str,
    format: Literal["hf", "onnx"] = "hf",
    max_length: int | None = None,
    opset: int = 18,
    test_report: str | None = None,
    quantize: Literal["int8"] | None = None,
    optimize: bool = True,
    int8_keep_fp32: int = 0,
    int8_exclude: list[str] | None = None,
    agreement_texts: int = 2000,
    agreement_data: str | None = None,
    agreement_seconds: float = 60.0,
    agreement_device: str = "cpu",
    student_ckpt: str | None = None,
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
            dynamic quantization, one scale per output channel), for `serve --backend onnx --precision int8`;
            quantized from the optimized graph when there is one.
        optimize: With --format onnx: also model.opt.onnx, ONNX Runtime's fused transformer graph (attention,
            LayerNorm, GELU; `export.onnx_optimize`), checked against PyTorch; ONNX fp32 then runs it. Only
            BERT-like encoders and DistilBERT; other architectures get model.onnx alone (a note says so).
        int8_keep_fp32: With --quantize int8: measure each quantized node's effect on the answers on validation
            texts and keep this many of the costliest in fp32 (0: quantize every one).
        int8_exclude: With --quantize int8: node names to keep in fp32 (as printed by --int8_keep_fp32).
        agreement_texts: Texts to run each variant on (torch fp32, bf16, fp16, and ONNX fp32 / int8 when written): a
            seeded sample of the checkpoint's validation split with its labels (or of --agreement_data, without).
            Each variant's macro-F1, accuracy and label agreement with fp32 are recorded in lightning_cls.json
            (`inference`); `serve --precision auto` takes the fastest one whose macro-F1 is within the gate of
            fp32's. 0: measure nothing.
        agreement_data: A .txt / .csv / .jsonl file of texts (column or field `text`) to measure on instead of the
            validation split (which is rebuilt from the data settings in the checkpoint, if that data is at hand).
            Without labels only the agreement is recorded (`serve --gate agreement`).
        agreement_seconds: A variant whose measurement would take longer than this and than three times fp32's
            (estimated from its first batch) is skipped, with the reason recorded: bf16 and fp16 on a CPU without
            AMX / AVX512-BF16 run several times slower than fp32.
        agreement_device: Device to measure on (cpu, cuda): the one the model will be served on.
        student_ckpt: A student distilled from this checkpoint (`python -m lightning_cls distill`, then `calibrate`
            when the teacher fuses a lexical expert): exported into the folder's `student/` with the same format,
            and measured as the `student` variant beside the others (the same texts, the same gate against this
            model's fp32), so that `serve --precision auto` answers with it when it keeps the accuracy and is faster.
    """
    ckpt, output = Path(ckpt_path), Path(output_dir)
    checkpoint = _check_paths(ckpt, output)
    if quantize is not None and format != "onnx":
        raise ExportError(f"--quantize {quantize} quantizes the ONNX model: add --format onnx.")
    if (int8_keep_fp32 or int8_exclude) and quantize != "int8":
        raise ExportError("--int8_keep_fp32 / --int8_exclude choose what int8 leaves out: add --quantize int8.")
    if int8_keep_fp32 < 0:
        raise ExportError(f"--int8_keep_fp32 must be 0 or more, got {int8_keep_fp32}.")
    if agreement_texts < 0:
        raise ExportError(f"--agreement_texts must be 0 (measure nothing) or more, got {agreement_texts}.")
    report = read_test_report(test_report) if test_report else None  # a wrong path fails before any work
    # A bad --agreement_data fails here, before any work; texts for the agreement, or the reason there are none.
    texts, names, source = ([], None, "")
    if agreement_texts:
        texts, names, source = agreement_inputs(checkpoint, agreement_data, agreement_texts)
    if int8_keep_fp32 and not texts:
        why = source or "--agreement_texts is 0"
        raise ExportError(f"--int8_keep_fp32 measures on the validation texts, and there are none ({why}).")
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
    # What the pipeline applies to the logits: a softmax over the labels, or a sigmoid per label (multi-label).
    hf_model.config.problem_type = "multi_label_classification" if model.multi_label else "single_label_classification"
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
        if (
            model.lexical is not None
        ):  # arrays in safetensors, checked by SHA-256 on load (`lightning_cls.model.lexical`)
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
            graph = tmp / ONNX_FILE
            if optimize:
                metadata.extra["onnx"] = {"optimized": _optimize(hf_model, tmp, tokenizer.pad_token_id)}
                graph = tmp / OPTIMIZED_ONNX_FILE if (tmp / OPTIMIZED_ONNX_FILE).is_file() else graph
            if quantize == "int8":
                exclude = list(int8_exclude or [])
                exclude += most_sensitive_nodes(graph, tokenizer, texts, int8_keep_fp32, length)
                quantize_int8(graph, tmp / INT8_ONNX_FILE, exclude)
                quantized = {"from": graph.name, "per_channel": True, "dynamic": True, "kept_fp32": exclude}
                metadata.extra.setdefault("onnx", {})["int8"] = quantized
            write_export_metadata(tmp, metadata)
        if student_ckpt:
            export_student(student_ckpt, tmp, metadata, format, optimize)
        if agreement_texts:
            variants = ["fp32", "bf16", "fp16"] + (["onnx_fp32"] if format == "onnx" else [])
            variants += ["onnx_int8"] if quantize == "int8" else []
            variants += [STUDENT] if student_ckpt else []
            ids, unscored = label_ids(names, metadata.labels)
            metadata.inference = measure_variants(
                tmp, texts, source, agreement_device, agreement_seconds, variants, ids, unscored
            )
            write_export_metadata(tmp, metadata)
            _print_agreement(metadata.inference)
        # save_pretrained may write owner-only files (and the student's folder is a temporary one's): a server under
        # another user reads them.
        for path in tmp.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        if output.exists():
            output.rmdir()  # checked empty above
    if metadata.reference is None:
        print(f'Note: {ckpt} records no training data reference; lightning_cls.json has "reference": null.')
    print(f"Exported {ckpt} to {output} ({len(metadata.labels)} labels, max_length {length}).")
    return output


def export_student(student_ckpt: str, folder: Path, metadata: ExportMetadata, format: str, optimize: bool) -> None:
    """The student checkpoint exported into `folder`'s `STUDENT_DIR` (a whole export of its own, unmeasured: the
    teacher's measurement judges it), refused unless it answers the teacher's labels and task."""
    if not Path(student_ckpt).is_file():
        raise ExportError(f"--student_ckpt {student_ckpt} does not exist.")
    student = export(student_ckpt, str(folder / STUDENT_DIR), format=format, optimize=optimize, agreement_texts=0)
    check_student(metadata, read_export_metadata(student), student)


def main(argv: list[str]) -> Path:
    """`python -m lightning_cls export --ckpt_path CKPT --output_dir DIR ...`."""
    return run_command(export, argv, "export", config_file=True)
