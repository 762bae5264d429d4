"""Evaluation reports from a confusion matrix: per-class precision / recall / F1 / support, a table, JSON and a figure.

Everything is derived from the epoch's confusion matrix (rows: true class, columns: predicted class), so the numbers
cover the whole split and agree with the macro-F1 that torchmetrics logs.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_cls.model.calibration import format_calibration


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (the convention of torchmetrics and scikit-learn's zero_division=0)."""
    return np.divide(num, den, out=np.zeros(len(num), dtype=float), where=den > 0)


def classification_report(confmat: np.ndarray, label_names: list[str]) -> dict[str, Any]:
    """Accuracy, macro and weighted averages and per-class precision / recall / F1 / support of a confusion matrix."""
    cm = np.asarray(confmat, dtype=np.int64)
    if cm.shape != (len(label_names), len(label_names)):
        raise ValueError(f"Confusion matrix of shape {cm.shape} does not match {len(label_names)} labels.")
    tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    # Like torchmetrics' macro average: a class that is neither present nor predicted does not count.
    present = (support + predicted) > 0
    rows = int(cm.sum())

    def macro(values: np.ndarray) -> float:
        return float(values[present].mean()) if present.any() else 0.0

    return {
        "rows": rows,
        "accuracy": float(tp.sum() / rows) if rows else 0.0,
        "macro_f1": macro(f1),
        "macro_precision": macro(precision),
        "macro_recall": macro(recall),
        "weighted_f1": float((f1 * support).sum() / rows) if rows else 0.0,
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(label_names, precision, recall, f1, support, strict=True)
        },
        "labels": list(label_names),
        "confusion_matrix": cm.tolist(),
    }


def format_class_report(report: dict[str, Any]) -> str:
    """The report as a fixed-width text table (one row per class, then accuracy and the averages)."""
    width = max(len("weighted avg"), *(len(name) for name in report["per_class"]))
    line = f"{{:<{width}}}  {{:>9}}  {{:>9}}  {{:>9}}  {{:>8}}"
    out = [line.format("", "precision", "recall", "f1", "support")]
    for name, m in report["per_class"].items():
        out.append(line.format(name, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", m["support"]))
    rows = report["rows"]
    out.append("")
    out.append(line.format("accuracy", "", "", f"{report['accuracy']:.4f}", rows))
    out.append(
        line.format(
            "macro avg",
            f"{report['macro_precision']:.4f}",
            f"{report['macro_recall']:.4f}",
            f"{report['macro_f1']:.4f}",
            rows,
        )
    )
    out.append(line.format("weighted avg", "", "", f"{report['weighted_f1']:.4f}", rows))
    return "\n".join(out) + "\n"


def confusion_figure(confmat: np.ndarray, label_names: list[str], title: str = "") -> Figure:
    """Raw counts (left) and row-normalised rates (right, each true class sums to 1), label names on both axes.

    Built on the Agg canvas directly (no pyplot): no GUI backend, no global figure registry, safe in any process.
    """
    cm = np.asarray(confmat, dtype=np.int64)
    n = len(label_names)
    # Long names ("electrical engineering and systems science") are wrapped onto several short lines.
    names = [textwrap.fill(name, 18) for name in label_names]
    label_width = 0.075 * max(len(line) for name in names for line in name.split("\n"))  # inches at font size 8
    cell = 0.55 if n <= 20 else max(0.18, 11 / n)  # inches per cell; very many labels shrink to fit
    side = n * cell
    # Each panel: the matrix, the names beside it (y) and under it (x, written upwards), a colour bar.
    fig = Figure(figsize=(2 * (side + label_width + 1.3), side + label_width + 1.2), layout="constrained")
    FigureCanvasAgg(fig)
    rates = _ratio_rows(cm)
    axes = fig.subplots(1, 2)
    font = 8 if n <= 12 else 6
    for ax, values, panel, fmt in (
        (axes[0], cm, "counts", "d"),
        (axes[1], rates, "row-normalised (recall on the diagonal)", ".2f"),
    ):
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if values is rates else max(int(cm.max()), 1))
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
        ax.set_title(panel, fontsize=10)
        ax.set_xticks(range(n), names, rotation=90, fontsize=font)
        ax.set_yticks(range(n), names, fontsize=font)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if n <= 30:  # numbers in the cells stay legible up to about this many classes
            threshold = values.max() / 2 if values.max() > 0 else 1
            for i in range(n):
                for j in range(n):
                    if values[i, j] or i == j:
                        color = "white" if values[i, j] > threshold else "black"
                        text = format(values[i, j], fmt)
                        ax.text(j, i, text, ha="center", va="center", fontsize=font - 1, color=color)
    if title:
        fig.suptitle(title)
    return fig


def _ratio_rows(cm: np.ndarray) -> np.ndarray:
    totals = cm.sum(1, keepdims=True)
    return np.divide(cm, totals, out=np.zeros(cm.shape, dtype=float), where=totals > 0)


def write_evaluation(
    confmat: np.ndarray,
    label_names: list[str],
    stage: str,
    folder: str | Path,
    context: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
    components: dict[str, Any] | None = None,
    tagger: dict[str, float] | None = None,
) -> tuple[dict[str, Any], Figure, dict[str, Path]]:
    """Write `<stage>_report.txt`, `<stage>_report.json` and `<stage>_confusion_matrix.png` into `folder`.

    Returns the report, the figure (for TensorBoard) and the paths written. `context` (epoch, step, checkpoint, ...)
    is stored in the JSON beside the metrics; `calibration` (`calibration.calibration_report`: ECE, NLL and Brier
    before and after temperature scaling) under `calibration`, and as a table below the per-class one. `components`
    (a fused model's: the neural head alone, the lexical expert alone and the fusion, `fusion.component_scores`)
    under `components`, and as a table; the per-class report is the fused model's. `tagger` (`top_label_in_set`:
    the share of texts whose answer is one of their subjects, `data.subjects_path`) beside the metrics.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    report = {"stage": stage, **(context or {}), **classification_report(confmat, label_names), **(tagger or {})}
    if calibration is not None:
        report["calibration"] = calibration
    if components is not None:
        report["components"] = components
    paths = {
        "text": folder / f"{stage}_report.txt",
        "json": folder / f"{stage}_report.json",
        "figure": folder / f"{stage}_confusion_matrix.png",
    }
    header = f"{stage}: {report['rows']} rows" + "".join(f", {k} {v}" for k, v in (context or {}).items()) + "\n\n"
    table = format_class_report(report)
    if tagger is not None:
        table += f"\ntop label one of the paper's subjects (data.subjects_path) {tagger['top_label_in_set']:.4f}\n"
    if components is not None:
        table += "\n" + format_components(components)
    if calibration is not None:
        table += "\n" + format_calibration(calibration, calibration.get("temperature_source", ""))
    paths["text"].write_text(header + table)
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    title = f"{stage}: accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f}, {report['rows']} rows"
    fig = confusion_figure(confmat, label_names, title)
    fig.savefig(paths["figure"], dpi=110)
    return report, fig, paths


def log_figure(loggers: list[Any], tag: str, fig: Figure, step: int) -> None:
    """Add the figure to every logger that takes figures (TensorBoard's SummaryWriter.add_figure)."""
    for logger in loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_figure"):
            # close=False: the figure is not pyplot's, there is nothing to close.
            experiment.add_figure(tag, fig, global_step=step, close=False)


def format_components(components: dict[str, Any]) -> str:
    """The fused model's parts side by side: accuracy and macro-F1 of the neural head alone, the lexical expert alone
    and the fusion (the answer the model gives)."""
    lines = [f"fusion: neural logits + {components['lexical_weight']:.4f} x lexical logits", ""]
    lines.append(f"{'':>10s} {'accuracy':>9s} {'macro-F1':>9s}")
    for name in ("neural", "lexical", "fused"):
        lines.append(f"{name:>10s} {components[name]['accuracy']:9.4f} {components[name]['macro_f1']:9.4f}")
    return "\n".join(lines) + "\n"
