"""Each way of running an exported folder (a *variant*: torch fp32 / bf16 / fp16, ONNX fp32 / int8) measured on
validation texts against torch fp32 and the truth: what `export` records in `lightning_cls.json` (`inference`) and
`serve --precision auto` chooses by (`lightning_cls.export.runtime.choose`).

Every variant answers through the folder's one answer path (`ExportedModel.answer`: windows, the runtime, the mean
over windows, the lexical expert fused in, the task's decision); only the runtime differs between them.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_cls.export.answer import Answers, ExportedModel, check_student
from lightning_cls.export.folder import METADATA_FILE, STUDENT_DIR, ExportMetadata, read_export_metadata
from lightning_cls.export.runtime import DTYPES, STUDENT, VARIANTS, InferenceSettings, Runner
from lightning_cls.task import Task

# export skips measuring a variant whose first batch says it would take longer than `seconds` and than this many
# times fp32's time: bf16 on a CPU without AMX / AVX512-BF16 runs tens of times slower than fp32.
SKIP_FACTOR = 3.0


def agreement(task: Task, reference: Answers, answers: Answers) -> tuple[float, float]:
    """(share of answers identical to the reference's, largest probability difference): identical labels or label
    sets, and each label's probability (a softmax over the labels, or each label's sigmoid)."""
    if not len(reference.decided):
        return 1.0, 0.0
    same = float(task.same(reference.decided, answers.decided).mean())
    return same, (reference.probs - answers.probs).abs().max().item()


def measure_variants(
    model_dir: str | Path,
    texts: Sequence[str],
    source: str,
    device: str = "cpu",
    seconds: float = 60.0,
    variants: Sequence[str] | None = None,
    labels: Sequence[int] | None = None,
    unscored: str = "the texts have no labels",
) -> dict[str, dict[str, Any]]:
    """Each variant run on `texts` as `serve` runs it, against torch fp32 and, given `labels` (class ids in the
    folder's label order, or multi-hot rows for a label-set folder), against the truth:
    ``{"fp32": {...}, "bf16": {...}, "onnx_int8": {...}}``.

    Every entry says `device`, `source` and `fused` (the answers scored are the fused ones); a measured one
    `agreement` (share of answers identical to fp32's), `max_prob_diff` (largest probability difference, before
    any temperature), `texts`, `texts_per_s` (the answer path with the lexical expert's scores computed once for all
    variants, on this machine as it was loaded) and, with labels, the task's scores (`accuracy`, `macro_f1`; for
    label sets `macro_f1` over the labels, what the gate reads, `micro_f1` and the subset accuracy as `accuracy`),
    `changed` (answers unlike fp32's), `now_right` / `now_wrong` (of those, how many became right / wrong); without
    labels `unscored` (why). A skipped one says `skipped` (why): its folder lacks the file, or its first batch says
    the whole measurement would take longer than both `seconds` and three times fp32's time (bf16 on a CPU without
    AMX / AVX512-BF16: several times slower than fp32).
    """
    folder, meta = Path(model_dir), read_export_metadata(model_dir)
    names, texts = list(variants or VARIANTS), list(texts)
    reference_model = ExportedModel.load(folder, device=device, use_temperature=False, metadata=meta)
    task = reference_model.task
    base = {"device": str(device), "source": source, "fused": reference_model.fusion is not None}
    if not texts:
        return {name: {**base, "skipped": f"no texts to measure on ({source})"} for name in names}
    truth = None if labels is None else np.asarray(labels)
    if task.multi_label and truth is not None and truth.ndim != 2:
        truth, unscored = None, "a multi-label model: its labels are label sets, the texts' are single labels"
    if truth is not None and len(truth) != len(texts):
        raise ValueError(f"{len(truth)} labels for {len(texts)} texts")
    lexical = reference_model.lexical_scores(texts)  # the same for every variant: once

    def timed(model: ExportedModel, batch: list[str], scores: np.ndarray | None) -> tuple[Answers, float]:
        start = time.perf_counter()
        answers = model.answer(batch, lexical=scores)
        return answers, time.perf_counter() - start

    def scored(answers: Answers) -> dict[str, Any]:
        if truth is None:
            return {"unscored": unscored}
        found = task.scores(answers.decided, truth)
        if task.multi_label:  # the record's `accuracy` of label sets is the subset accuracy
            found = {"macro_f1": found["macro_f1"], "micro_f1": found["micro_f1"], "accuracy": found["subset_accuracy"]}
        changed = ~task.same(answers.decided, reference.decided)
        right, was_right = task.same(answers.decided, truth), task.same(reference.decided, truth)
        return {
            **{k: round(v, 6) for k, v in found.items()},
            "changed": int(changed.sum()),
            "now_right": int((changed & right).sum()),
            "now_wrong": int((changed & was_right).sum()),
        }

    probe = texts[: min(8, len(texts))]
    reference_model.network_logits(texts[:1])  # the first pass is slow (kernels chosen, memory allocated)
    reference, reference_s = timed(reference_model, texts, lexical)
    records = {"fp32": {**base, "agreement": 1.0, "max_prob_diff": 0.0, "texts": len(texts)}}
    records["fp32"].update(texts_per_s=round(len(texts) / reference_s, 2), **scored(reference))
    for name in names:
        if name == "fp32":
            continue
        if name == STUDENT:
            records[name] = {**base, **measure_student(folder, meta, texts, device, reference, scored, lexical)}
            continue
        backend, precision = ("onnx", name[5:]) if name.startswith("onnx_") else ("torch", name)
        settings = InferenceSettings(precision=precision, backend=backend)
        problems = settings.problems(folder)
        if problems:
            records[name] = {**base, "skipped": problems[0]}
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "not measured yet": that is what this does
            runner = Runner(folder, settings, device, tokenizer=reference_model.tokenizer, metadata=meta)
        model = reference_model.with_runner(runner)
        model.network_logits(probe)  # once untimed: the first passes of each shape choose kernels (bf16: slower)
        _, probe_s = timed(model, probe, None if lexical is None else lexical[: len(probe)])
        estimate = probe_s / len(probe) * len(texts)
        allowed = max(seconds, SKIP_FACTOR * reference_s)
        if estimate > allowed:
            why = "" if precision not in DTYPES or getattr(runner.hardware, precision) else f"; {runner.hardware.note}"
            records[name] = {
                **base,
                "skipped": f"about {estimate:.0f} s for {len(texts)} texts at {len(probe) / probe_s:.1f} texts/s "
                f"(fp32: {records['fp32']['texts_per_s']:.1f}), over the {allowed:.0f} s allowed{why}",
            }
            continue
        answers, elapsed = timed(model, texts, lexical)
        records[name] = {**base, **measured(task, reference, answers, elapsed), **scored(answers)}
        if backend == "onnx":
            records[name]["graph"] = runner.onnx_file
        del model, runner
    return {name: records[name] for name in names if name in records}


def measured(task: Task, reference: Answers, answers: Answers, elapsed: float) -> dict[str, Any]:
    """A measured variant's record against fp32's answers: agreement, largest probability difference, texts, speed."""
    same, diff = agreement(task, reference, answers)
    return {
        "agreement": round(same, 6),
        "max_prob_diff": float(f"{diff:.3g}"),
        "texts": len(answers.decided),
        "texts_per_s": round(len(answers.decided) / elapsed, 2),
    }


def measure_student(
    folder: Path,
    meta: ExportMetadata,
    texts: list[str],
    device: str,
    reference: Answers,
    scored: Any,
    lexical: np.ndarray | None,
) -> dict[str, Any]:
    """The `student` variant: the folder's distilled student (`STUDENT_DIR`, its own folder: weights, fusion,
    calibration) answering the same texts in torch fp32, against the model's fp32 answers and the truth. Its
    lexical expert's scores are the model's when it is the same expert (the same SHA-256: timed alike), else its
    own, scored in its time."""
    path = folder / STUDENT_DIR
    if not (path / METADATA_FILE).is_file():
        return {"skipped": f"no {STUDENT_DIR}/ in the folder (export with --student_ckpt)"}
    student_meta = read_export_metadata(path)
    check_student(meta, student_meta, path)
    student = ExportedModel.load(path, device=device, use_temperature=False, metadata=student_meta)
    same_expert = (meta.lexical or {}).get("sha256") == (student_meta.lexical or {}).get("sha256")
    scores = lexical if same_expert and student.fusion is not None else None
    student.network_logits(texts[: min(8, len(texts))])  # the slow first passes, untimed
    start = time.perf_counter()
    answers = student.answer(texts, lexical=scores)
    elapsed = time.perf_counter() - start
    return {**measured(student.task, reference, answers, elapsed), "folder": STUDENT_DIR, **scored(answers)}
