"""The end of a validation or test epoch, past the network: the scores the model logs and the report files it writes
(single label: per-class report, confusion matrix and reliability diagram; label sets: per-label report at the
thresholds). The numbers come from `evaluation`, `calibration` and `task.scores`; this module names and writes them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
)

from lightning_cls.task import LabelSet
from lightning_cls.task.scores import epoch_report, format_label_set_report, label_ece, top_label_in_set

# The validation scores kept with a multi-label model's fitted thresholds (export writes them: the baseline of the
# service's micro-F1 alerts, `serving.server.validation_micro_f1`).
LABEL_SET_VALIDATION_KEYS = (
    "micro_f1",
    "macro_f1",
    "subset_accuracy",
    "hamming_loss",
    "mean_label_ece",
    "mean_label_ece_uncalibrated",
    "temperature",
    "rows",
)


@dataclass
class Epoch:
    """An evaluation epoch as the code after the network needs it: its split, whether to fit on its rows, and where
    its report goes."""

    stage: str  # "val" or "test"
    # Fit the temperature or the thresholds (and a lexical weight) on these rows: validation during `fit` with
    # `model.calibrate`, or for the `calibrate` command; never test, never the sanity check.
    fit: bool
    sanity: bool  # Lightning's sanity check: a couple of batches only, not a report of the split
    during_fit: bool  # during `fit` a report belongs to an epoch; `validate` / `test` report on a checkpoint
    epoch: int
    step: int
    checkpoint: str | None
    log_dir: str | None  # None on ranks other than 0: one rank writes
    # Rank 0's value on every rank: each rank has the same rows, and no rounding difference may split them.
    broadcast: Callable[[Any], Any]
    loggers: list[Any] = field(default_factory=list)


def paper_subjects_of(datamodule: Any, row_ids: torch.Tensor) -> np.ndarray | None:
    """Each evaluated text's subjects (multi-hot, in the order of `row_ids`) from the data module's
    `data.subjects_path`, or None: not set (or no data module: a bare `validate` on a model)."""
    table = datamodule.paper_subjects() if hasattr(datamodule, "paper_subjects") else None
    return None if table is None else table[row_ids.numpy()]


def single_label_scores(
    stage: str,
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_labels: int,
    components: dict | None,
    subjects: np.ndarray | None = None,
) -> dict[str, torch.Tensor]:
    """What a single-label epoch logs: accuracy and macro-F1 of the answers (and macro-F1 of the neural head and the
    lexical expert alone, for a fused model; with each text's `subjects`, the share whose answer is one of them)."""
    predicted = logits.argmax(-1)
    # Every rank holds the whole split (gathered): the values are the same everywhere, no sync needed.
    scores = {
        f"{stage}/acc": multiclass_accuracy(predicted, labels, num_labels, average="micro"),
        f"{stage}/f1_macro": multiclass_f1_score(predicted, labels, num_labels, average="macro"),
    }
    for part in ("neural", "lexical") if components else ():
        scores[f"{stage}/f1_macro_{part}"] = torch.tensor(components[part]["macro_f1"])
    if subjects is not None:
        scores[f"{stage}/top_in_set"] = torch.tensor(top_label_in_set(logits.numpy(), subjects))
    return scores


def write_single_label_report(
    epoch: Epoch,
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_names: list[str],
    calibration: dict[str, Any],
    components: dict | None,
    subjects: np.ndarray | None = None,
) -> None:
    """Per-class report (text + JSON), confusion matrix and reliability diagram (PNG + the loggers') of the epoch in
    its log folder, with the calibration scores (`calibration.calibration_report`) before and after the temperature,
    and with each text's `subjects` the share whose answer is one of them (`top_label_in_set`)."""
    if epoch.log_dir is None:
        return
    # Imported here: keeps matplotlib off the import path of code that only needs the model.
    from lightning_cls.model.calibration import reliability_figure
    from lightning_cls.model.evaluation import log_figure, write_evaluation

    if epoch.fit:
        source = "fitted on this split"
    else:
        source = "from the checkpoint" if calibration["temperature"] is not None else "the checkpoint has none"
    calibration = {**calibration, "temperature_source": source}
    matrix = multiclass_confusion_matrix(logits.argmax(-1), labels, len(label_names)).numpy()
    if epoch.during_fit:
        context = {"epoch": epoch.epoch, "global_step": epoch.step}
    else:
        context = {"checkpoint": epoch.checkpoint}
    tagger = None if subjects is None else {"top_label_in_set": top_label_in_set(logits.numpy(), subjects)}
    report, fig, paths = write_evaluation(
        matrix, label_names, epoch.stage, epoch.log_dir, context, calibration, components, tagger
    )
    log_figure(epoch.loggers, f"{epoch.stage}/confusion_matrix", fig, epoch.step)
    title = f"{epoch.stage}: reliability, {calibration['rows']} rows, temperature {source}"
    fig = reliability_figure(logits, labels, calibration["temperature"], title=title)
    paths["reliability"] = Path(epoch.log_dir) / f"{epoch.stage}_reliability.png"
    fig.savefig(paths["reliability"], dpi=110)
    log_figure(epoch.loggers, f"{epoch.stage}/reliability", fig, epoch.step)
    before, after, t = calibration["before"], calibration["after"], calibration["temperature"]
    rank_zero_info(
        f"{epoch.stage} report: accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f}; temperature "
        f"{f'{t:.4f}' if t is not None else 'none'}: ECE {before['ece']:.4f} -> {after['ece']:.4f}, NLL "
        f"{before['nll']:.4f} -> {after['nll']:.4f}; wrote " + ", ".join(str(p) for p in paths.values())
    )


def label_set_report(task: LabelSet, logits: torch.Tensor, y: np.ndarray, components: dict | None) -> dict[str, Any]:
    """A multi-label epoch's report (`task.scores.epoch_report`: per-label scores, thresholds and calibration) of
    the task's answers to `logits`: its probabilities (under its temperature) and thresholds, with the mean label ECE
    of the plain sigmoids beside (what the temperature changed); with a lexical expert, its `components` beside."""
    probs = task.probabilities(logits).numpy()
    report = epoch_report(probs, y, task.names, np.asarray(task.thresholds))
    report["temperature"] = task.temperature
    plain = label_ece(logits.float().sigmoid().numpy(), y) if task.temperature is not None else None
    report["mean_label_ece_uncalibrated"] = (
        float(plain.mean()) if plain is not None and len(plain) else report["mean_label_ece"]
    )
    if components:
        report["components"] = components
    return report


def label_set_validation(report: dict[str, Any], step: int) -> dict[str, Any]:
    """The validation scores kept with the thresholds fitted on them (the model's `calibration`)."""
    return {k: report[k] for k in LABEL_SET_VALIDATION_KEYS} | {"split": "validation", "global_step": step}


def label_set_scores(stage: str, report: dict[str, Any], components: dict | None) -> dict[str, torch.Tensor]:
    """What a multi-label epoch logs: micro- and macro-F1, subset accuracy, Hamming loss, micro precision and recall
    of the thresholded label sets, the share whose most probable label is one of the text's (and micro-F1 of the
    neural head and the lexical expert alone, for a fused model)."""
    scores = {
        f"{stage}/f1_micro": report["micro_f1"],
        f"{stage}/f1_macro": report["macro_f1"],
        f"{stage}/subset_acc": report["subset_accuracy"],
        f"{stage}/hamming_loss": report["hamming_loss"],
        f"{stage}/precision_micro": report["micro_precision"],
        f"{stage}/recall_micro": report["micro_recall"],
        f"{stage}/top_in_set": report["top_label_in_set"],  # the first suggestion is one of the text's labels
    }
    for part in ("neural", "lexical") if components else ():
        scores[f"{stage}/f1_micro_{part}"] = components[part]["micro_f1"]
    return {k: torch.tensor(v) for k, v in scores.items()}


def write_label_set_report(epoch: Epoch, report: dict[str, Any]) -> None:
    """`<stage>_report.json` and `<stage>_report.txt` of a multi-label epoch in its log folder."""
    if epoch.sanity or epoch.log_dir is None:
        return
    folder = Path(epoch.log_dir)
    folder.mkdir(parents=True, exist_ok=True)
    context = {"global_step": epoch.step} if epoch.during_fit else {}
    (folder / f"{epoch.stage}_report.json").write_text(
        json.dumps({"stage": epoch.stage, **context, **report}, indent=2)
    )
    (folder / f"{epoch.stage}_report.txt").write_text(
        f"{epoch.stage}: multi-label\n\n" + format_label_set_report(report)
    )
    rank_zero_info(
        f"{epoch.stage} report: micro-F1 {report['micro_f1']:.4f}, macro-F1 {report['macro_f1']:.4f}; wrote "
        f"{folder / f'{epoch.stage}_report.txt'}"
    )
