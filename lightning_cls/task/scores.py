"""Decisions and scores of both tasks, as pure functions on numpy arrays: one label per text (`task_scores`) and
label sets (`decide`, `multilabel_scores`, `fit_thresholds`, `label_ece`, `epoch_report`). `lightning_cls.task`'s
`SingleLabel` / `LabelSet` are what the rest of the code asks; these are their arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lightning_cls.errors import InputError


def multi_hot(sets: Sequence[Sequence[str]], names: Sequence[str]) -> np.ndarray:
    """(N, len(names)) uint8: 1 where the row has the label. Labels not in `names` are left out (filtered)."""
    index = {name: i for i, name in enumerate(names)}
    out = np.zeros((len(sets), len(names)), dtype=np.uint8)
    for row, labels in enumerate(sets):
        for label in labels:
            if label in index:
                out[row, index[label]] = 1
    return out


def task_scores(predicted: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """Accuracy and macro-F1 (the mean F1 over the classes that occur in the labels or the predictions, as
    scikit-learn averages) of predicted class ids against true ones."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    f1 = []
    for c in np.union1d(predicted, labels):
        tp = int(np.sum((predicted == c) & (labels == c)))
        wrong = int(np.sum(predicted == c)) + int(np.sum(labels == c)) - 2 * tp  # false positives + negatives
        f1.append(2 * tp / (2 * tp + wrong))
    return {
        "accuracy": float(np.mean(predicted == labels)) if len(labels) else float("nan"),
        "macro_f1": float(np.mean(f1)) if f1 else float("nan"),
    }


def fit_thresholds(probs: np.ndarray, y: np.ndarray, grid: np.ndarray | None = None) -> np.ndarray:
    """Per label, the probability threshold in `grid` that maximises that label's F1 on these rows (validation,
    never test); 0.5 for a label with no positive row."""
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y, dtype=bool)
    grid = np.round(np.arange(0.05, 0.96, 0.05), 2) if grid is None else np.asarray(grid)
    thresholds = np.full(y.shape[1], 0.5)
    for j in range(y.shape[1]):
        if not y[:, j].any():
            continue
        predicted = probs[:, j][None, :] >= grid[:, None]  # (grid, N)
        tp = (predicted & y[:, j]).sum(1)
        f1 = 2 * tp / np.maximum(predicted.sum(1) + y[:, j].sum(), 1)
        thresholds[j] = grid[int(np.argmax(f1))]
    return thresholds


def decide(probs: np.ndarray, thresholds: np.ndarray | float) -> np.ndarray:
    """Multi-hot decisions: a label where its probability reaches its threshold; a row with none gets its most
    probable label (every text is tagged with at least one subject)."""
    probs = np.asarray(probs)
    out = probs >= np.asarray(thresholds)
    empty = ~out.any(1)
    out[empty, probs[empty].argmax(1)] = True
    return out


def multilabel_scores(predicted: np.ndarray, y: np.ndarray, names: Sequence[str]) -> dict:
    """Micro-F1 (with its precision and recall), macro-F1, subset accuracy, Hamming loss, label cardinality
    (predicted and true) and per-label precision, recall, F1 and support of multi-hot decisions against the truth."""
    p, t = np.asarray(predicted, dtype=bool), np.asarray(y, dtype=bool)
    tp, fp, fn = (p & t).sum(0), (p & ~t).sum(0), (~p & t).sum(0)

    def ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.divide(a, b, out=np.zeros(np.shape(a), dtype=float), where=np.asarray(b) > 0)

    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    f1 = ratio(2 * tp, 2 * tp + fp + fn)
    micro = float(ratio(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum()))
    return {
        "rows": len(t),
        "micro_f1": micro,
        # A tagger's two errors, apart: tags given that the paper does not have, and its subjects left untagged.
        "micro_precision": float(ratio(tp.sum(), tp.sum() + fp.sum())),
        "micro_recall": float(ratio(tp.sum(), tp.sum() + fn.sum())),
        "macro_f1": float(f1.mean()) if len(f1) else 0.0,
        "subset_accuracy": float((p == t).all(1).mean()) if len(t) else 0.0,
        "hamming_loss": float((p != t).mean()) if t.size else 0.0,
        "cardinality": {"predicted": float(p.sum(1).mean()), "true": float(t.sum(1).mean())} if len(t) else {},
        "per_label": {
            name: {
                "precision": float(precision[j]),
                "recall": float(recall[j]),
                "f1": float(f1[j]),
                "support": int(t[:, j].sum()),
            }
            for j, name in enumerate(names)
        },
    }


def label_ece(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> np.ndarray:
    """Per label, the expected calibration error of its probability: the row-weighted mean, over equal-width bins
    of the probability, of |share of positives - mean probability| (0 is calibrated)."""
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y, dtype=np.float64)
    which = np.minimum((probs * bins).astype(int), bins - 1)
    out = np.zeros(probs.shape[1])
    for j in range(probs.shape[1]):
        counts = np.bincount(which[:, j], minlength=bins)
        gap = np.abs(np.bincount(which[:, j], y[:, j], bins) - np.bincount(which[:, j], probs[:, j], bins))
        out[j] = gap.sum() / max(counts.sum(), 1)
    return out


def top_label_in_set(scores: np.ndarray, y: np.ndarray) -> float:
    """The share of texts whose most probable label is one of their true labels: a tagger's first suggestion is
    right (a paper's primary subject is only one of its subjects). 0 without rows."""
    scores, y = np.asarray(scores), np.asarray(y, dtype=bool)
    if not len(y):
        return 0.0
    return float(y[np.arange(len(y)), scores.argmax(1)].mean())


def epoch_report(probs: np.ndarray, y: np.ndarray, names: Sequence[str], thresholds: np.ndarray) -> dict:
    """A multi-label split's report: the scores of the thresholded decisions, the thresholds, and calibration per
    label (ECE of each label's probability)."""
    report = multilabel_scores(decide(probs, thresholds), y, names)
    report["top_label_in_set"] = top_label_in_set(probs, y)
    ece = label_ece(probs, y)
    for j, name in enumerate(names):
        report["per_label"][name].update(threshold=float(thresholds[j]), ece=float(ece[j]))
    report["mean_label_ece"] = float(ece.mean()) if len(ece) else 0.0
    return report


def format_label_set_report(report: dict) -> str:
    """The report as text: per-label precision, recall, F1, support, threshold and ECE, then the set scores."""
    width = max([len(name) for name in report["per_label"]] + [10])
    lines = [f"{'':{width}s} {'precision':>9s} {'recall':>9s} {'f1':>9s} {'support':>9s} {'threshold':>9s} {'ece':>9s}"]
    for name, m in report["per_label"].items():
        lines.append(
            f"{name:{width}s} {m['precision']:9.4f} {m['recall']:9.4f} {m['f1']:9.4f} {m['support']:9d} "
            f"{m['threshold']:9.2f} {m['ece']:9.4f}"
        )
    c = report["cardinality"]
    lines += [
        "",
        f"micro-F1 {report['micro_f1']:.4f} (precision {report.get('micro_precision', 0):.4f}, recall "
        f"{report.get('micro_recall', 0):.4f}), top label one of the text's {report.get('top_label_in_set', 0):.4f}",
        f"macro-F1 {report['macro_f1']:.4f}, subset accuracy "
        f"{report['subset_accuracy']:.4f}, Hamming loss {report['hamming_loss']:.4f}, labels per text "
        f"{c.get('predicted', 0):.2f} predicted / {c.get('true', 0):.2f} true, mean label ECE "
        f"{report['mean_label_ece']:.4f}; {report['rows']} rows",
    ]
    t = report.get("temperature")
    if t is not None:  # calibrated: what the temperature changed (the thresholds are on the scaled probabilities)
        lines.append(
            f"probabilities sigmoid(logits / {t:.4f}): mean label ECE {report['mean_label_ece_uncalibrated']:.4f} "
            f"without the temperature"
        )
    parts = report.get("components")
    if parts:  # a fused lexical expert (`lightning_cls.model.fusion`): each part at a 0.5 threshold
        lines += ["", f"fusion: neural logits + {parts['lexical_weight']:.3f} x lexical logits (at a 0.5 threshold):"]
        lines += [
            f"  {name:8s} micro-F1 {parts[name]['micro_f1']:.4f}, macro-F1 {parts[name]['macro_f1']:.4f}"
            for name in ("neural", "lexical", "fused")
        ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ answers and truths as label names (live scores)
def label_positions(labels: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """The position of each label among ``names``; an unknown label is an error naming it."""
    position = {name: i for i, name in enumerate(names)}
    unknown = sorted({label for label in labels if label not in position})
    if unknown:
        raise InputError(f"Labels {unknown} are not among the model's labels {list(names)}.")
    return np.asarray([position[label] for label in labels], dtype=np.int64)


def set_matrix(sets: Sequence[Sequence[str]], names: Sequence[str]) -> np.ndarray:
    """(N, len(names)) bool: True where row i's set has the label; an unknown label is an error naming it."""
    out = np.zeros((len(sets), len(names)), dtype=bool)
    flat = [label for labels in sets for label in labels]
    rows = np.repeat(np.arange(len(sets)), [len(labels) for labels in sets])
    out[rows, label_positions(flat, names)] = True
    return out


def label_scores(true: Sequence[str], predicted: Sequence[str], names: Sequence[str]) -> dict[str, Any]:
    """Accuracy and macro-F1 of predicted labels against true ones (the model's ``names``; unknown ones are an
    error naming them), as the task scores them (`task_scores`: a class that is neither
    present nor predicted does not count, so a window of one subject is not marked down for the nine others). None
    for both when there are no rows."""
    if len(true) != len(predicted):
        raise ValueError(f"{len(true)} true labels but {len(predicted)} predicted ones.")
    if not len(true):
        return {"rows": 0, "accuracy": None, "macro_f1": None}
    return {"rows": len(true), **task_scores(label_positions(predicted, names), label_positions(true, names))}


def set_scores(true: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]], names: Sequence[str]) -> dict:
    """Micro-F1, macro-F1 (over the labels present or predicted), subset accuracy, the share whose first predicted
    label (answers list the most probable first) is one of the true ones, and per-label precision, recall and F1
    (None where undefined) of predicted label sets against true ones. None for the scores without rows."""
    if len(true) != len(predicted):
        raise ValueError(f"{len(true)} true label sets but {len(predicted)} predicted ones.")
    if not len(true):
        return {
            "rows": 0,
            "accuracy": None,
            "macro_f1": None,
            "micro_f1": None,
            "top_label_in_set": None,
            "per_label": None,
        }
    t, p = set_matrix(true, names), set_matrix(predicted, names)
    tp, fp, fn = (t & p).sum(0), (~t & p).sum(0), (t & ~p).sum(0)

    def ratio(a: np.ndarray, b: np.ndarray) -> list[float | None]:
        return [float(x / y) if y else None for x, y in zip(a, b, strict=True)]

    precision, recall, f1 = ratio(tp, tp + fp), ratio(tp, tp + fn), ratio(2 * tp, 2 * tp + fp + fn)
    seen = [v for v in f1 if v is not None]
    micro_den = 2 * tp.sum() + fp.sum() + fn.sum()
    return {
        "rows": len(true),
        "accuracy": float((t == p).all(1).mean()),  # subset accuracy: the whole set right
        "macro_f1": float(np.mean(seen)) if seen else None,
        "micro_f1": float(2 * tp.sum() / micro_den) if micro_den else None,
        "top_label_in_set": float(
            np.mean([bool(got) and got[0] in want for got, want in zip(predicted, true, strict=True)])
        ),
        "per_label": {
            name: {"precision": precision[j], "recall": recall[j], "f1": f1[j], "support": int(tp[j] + fn[j])}
            for j, name in enumerate(names)
        },
    }
