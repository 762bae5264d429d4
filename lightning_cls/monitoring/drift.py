"""Drift of predictions against the training data: population stability index, the drift report, and the sliding
window of live traffic. Pure numpy: the service (`serving`) and the offline `monitor` command both build on it.

The reference is the training split's summary written at export (`lightning_cls.json` -> `reference`): its label
counts and its token lengths binned at their deciles. Predictions are compared with it on three signals:

- label PSI: predicted labels vs the training label distribution,
- length PSI: token lengths (as the model saw them, i.e. truncated) in the reference's bins,
- low-confidence share: the share of predictions whose top probability is below a threshold,
- window PSI (texts read as windows only): texts by the number of windows read vs the training texts'.

A PSI above ``PSI_WARNING`` (0.2, the usual rule of thumb: < 0.1 stable, 0.1-0.2 moderate shift, > 0.2 large
shift) is an alert, as is a low-confidence share above its own threshold (`DriftThresholds`).

Accuracy, without and with true labels:

- estimated accuracy: the mean probability of the predicted label (confidence-based performance estimation: with
  calibrated probabilities, the expected share of right answers), in the drift report and its window;
- realized accuracy, macro-F1 and ECE against true labels (`label_scores`, `top_label_ece`), over the last labelled
  predictions of the service (`FeedbackWindow`, fed by POST /feedback) or offline (`monitor --labels`).

A multi-label model's answers are label sets: `monitoring.label_set_drift` reads these reports for sets (each
label's predicted rate against its training rate, the expected micro-F1, live scores of true label sets).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from lightning_cls.data.split_reference import length_histogram
from lightning_cls.errors import InputError
from lightning_cls.task.scores import label_positions

if TYPE_CHECKING:  # the task package loads torch: the service's logger process needs only its answers
    from lightning_cls.task import Task, Truth

# Proportions below this are raised to it before the PSI's logarithm: an empty bin on either side would otherwise
# give an infinite index. 1e-4 keeps one empty bin that held 10% of the reference at about 0.1 * ln(0.1 / 1e-4)
# = 0.69, i.e. clearly over the warning threshold, without letting a single empty bin dominate everything.
PSI_EPSILON = 1e-4
PSI_WARNING = 0.2  # PSI above this is a large shift: an alert
LOW_CONFIDENCE = 0.5  # a prediction whose top probability is below this counts as low-confidence
LOW_CONFIDENCE_WARNING = 0.3  # a low-confidence share above this is an alert
PSI_SIGNALS = ("label_psi", "length_psi", "window_psi")
# A multi-label window's largest per-label PSI (`label_set_drift`): an alert over the same threshold.
LABEL_RATE_SIGNAL = "label_rate_psi"
# Equal-width confidence bins of the ECE: the same 15 as `lightning_cls.model.calibration.ECE_BINS` (a test checks), not
# imported from there because that module loads torchmetrics, seconds of start-up for the service's processes.
ECE_BINS = 15


@dataclass(frozen=True)
class DriftThresholds:
    """Drift thresholds: when a signal is an alert (`serve` logs a warning; `monitor` lists it under alerts).

    Args:
        low_confidence: A prediction whose probability is below this counts as low-confidence.
        psi_warning: Population stability index above which a drift signal is an alert (`serve` logs a warning).
        low_confidence_warning: Low-confidence share (of the window, for `serve`) above which it is an alert.
    """

    low_confidence: float = LOW_CONFIDENCE
    psi_warning: float = PSI_WARNING
    low_confidence_warning: float = LOW_CONFIDENCE_WARNING


DEFAULT_THRESHOLDS = DriftThresholds()


def psi(expected: Sequence[float], actual: Sequence[float], eps: float = PSI_EPSILON) -> float:
    """Population stability index of ``actual`` against ``expected`` (both counts or proportions, same bins).

    PSI = sum_i (a_i - e_i) * ln(a_i / e_i) over the proportions, each raised to at least ``eps``.
    """
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.shape != a.shape or e.ndim != 1:
        raise ValueError(f"PSI needs two count vectors of the same length, got shapes {e.shape} and {a.shape}.")
    if e.sum() <= 0 or a.sum() <= 0:
        raise ValueError("PSI needs at least one observation on each side.")
    e = np.maximum(e / e.sum(), eps)
    a = np.maximum(a / a.sum(), eps)
    return float(np.sum((a - e) * np.log(a / e)))


def label_counts(labels: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """Counts of each name in ``labels``, in the order of ``names``; an unknown label is an error naming it."""
    return np.bincount(label_positions(labels, names), minlength=len(names))


def window_count_bins(windows: Sequence[int], reference: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Texts by window count, live and reference, in the bins 1, 2, ..., the reference's largest count (open: the
    window cap may have changed since, so anything above falls in the last bin)."""
    top = max(int(k) for k in reference)
    ref = np.zeros(top, dtype=np.int64)
    for k, count in reference.items():
        ref[int(k) - 1] += count
    live = np.bincount(np.clip(np.asarray(windows, dtype=np.int64), 1, top) - 1, minlength=top)
    return live, ref


def drift_report(
    reference: dict | None,
    names: Sequence[str],
    labels: Sequence[str],
    probabilities: Sequence[float],
    lengths: Sequence[int] | None,
    thresholds: DriftThresholds = DEFAULT_THRESHOLDS,
    windows: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Drift of a set of predictions against the export's reference (its `to_dict()` form): label PSI, length PSI,
    low-confidence share, and window PSI when the reference and the predictions have window counts.

    Signals that cannot be computed (no reference, no lengths, no predictions) are None; ``alerts`` lists the
    signals over their threshold.
    """
    n = len(labels)
    if len(probabilities) != n or (lengths is not None and len(lengths) != n):
        raise ValueError("labels, probabilities and lengths must have one entry per prediction.")
    t = thresholds
    live_labels = label_counts(labels, names)
    report: dict[str, Any] = {
        "texts": n,
        "thresholds": {
            "psi": t.psi_warning,
            "low_confidence": t.low_confidence,
            "low_confidence_share": t.low_confidence_warning,
        },
        "psi_epsilon": PSI_EPSILON,
        "label_psi": None,
        "length_psi": None,
        "window_psi": None,
        "low_confidence_share": float(np.mean(np.asarray(probabilities) < t.low_confidence)) if n else None,
        # the mean probability of the predicted labels: with calibrated probabilities, the expected accuracy
        "estimated_accuracy": float(np.mean(np.asarray(probabilities, dtype=float))) if n else None,
        "labels": {"names": list(names), "live": live_labels.tolist(), "reference": None},
        "lengths": None,
        # the top probabilities in tenths, for the plot
        "confidence": np.histogram(np.asarray(probabilities, dtype=float), bins=10, range=(0, 1))[0].tolist(),
    }
    if reference is not None and n:
        ref_labels = np.asarray([reference["label_counts"].get(name, 0) for name in names])
        report["labels"]["reference"] = ref_labels.tolist()
        report["label_psi"] = psi(ref_labels, live_labels)
        token_length = reference.get("token_length") or {}
        # (references made before the length bins were recorded have statistics but no bins: no length PSI)
        if lengths is not None and token_length.get("bin_edges") is not None:
            edges = token_length["bin_edges"]
            live_bins = length_histogram(lengths, edges)
            report["length_psi"] = psi(token_length["bin_counts"], live_bins)
            report["lengths"] = {
                "bin_edges": list(edges),
                "live": live_bins.tolist(),
                "reference": token_length["bin_counts"],
            }
        if windows is not None and reference.get("window_counts"):
            live_windows, ref_windows = window_count_bins(windows, reference["window_counts"])
            report["window_psi"] = psi(ref_windows, live_windows)
            report["windows"] = {"live": live_windows.tolist(), "reference": ref_windows.tolist()}
    report["alerts"] = alerts_of(report, t)
    return report


def alerts_of(report: dict[str, Any], t: DriftThresholds) -> list[str]:
    """The signals of a drift report over their threshold (a multi-label report's `label_rate_psi` too)."""
    alerts = [k for k in (*PSI_SIGNALS, LABEL_RATE_SIGNAL) if report.get(k) is not None and report[k] > t.psi_warning]
    share = report["low_confidence_share"]
    if share is not None and share > t.low_confidence_warning:
        alerts.append("low_confidence_share")
    return alerts


class DriftWindow:
    """The last ``size`` predictions of live traffic (label, top probability, token length, windows read) and their
    drift."""

    def __init__(
        self,
        names: Sequence[str],
        reference: dict | None,
        size: int = 1000,
        min_texts: int = 100,
        thresholds: DriftThresholds = DEFAULT_THRESHOLDS,
    ) -> None:
        if not 1 <= min_texts <= size:
            raise InputError(
                f"The drift window needs 1 <= min_texts (--min_window) <= size (--window_size), "
                f"got {min_texts} and {size}."
            )
        self.names, self.reference, self.min_texts = list(names), reference, min_texts
        self.thresholds = thresholds
        self.items: deque[tuple[str, float, int, int]] = deque(maxlen=size)

    def add(
        self,
        labels: Sequence[str],
        probabilities: Sequence[float],
        lengths: Sequence[int],
        windows: Sequence[int] | None = None,
    ) -> None:
        """Append predictions (``windows``: windows read per text, default 1); the oldest fall out of the window."""
        windows = [1] * len(labels) if windows is None else windows
        self.items.extend(zip(labels, probabilities, lengths, windows, strict=True))

    def __len__(self) -> int:
        return len(self.items)

    def report(self) -> dict[str, Any]:
        """The drift report of the predictions now in the window; no signal while it holds under ``min_texts``."""
        labels, probabilities, lengths, windows = (
            (list(c) for c in zip(*self.items, strict=True)) if self.items else ([], [], [], [])
        )
        report = drift_report(self.reference, self.names, labels, probabilities, lengths, self.thresholds, windows)
        if len(self) < self.min_texts:
            # A handful of predictions always looks drifted (most bins empty): wait for a meaningful sample.
            report.update(
                label_psi=None,
                length_psi=None,
                window_psi=None,
                low_confidence_share=None,
                estimated_accuracy=None,
                alerts=[],
            )
            report["note"] = f"{len(self)} predictions, fewer than {self.min_texts}: no drift signal yet"
        return report


# ------------------------------------------------------------------------------------------------ against true labels
def top_label_ece(confidence: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS) -> float | None:
    """Expected calibration error from each row's top probability and whether its label was right: the row-weighted
    mean gap between accuracy and mean confidence over ``bins`` equal-width bins of (0, 1], binned like
    `calibration.reliability_bins` (so it equals `calibration.expected_calibration_error` of the full
    probabilities). None without rows."""
    c = np.asarray(confidence, dtype=np.float64)
    right = np.asarray(correct, dtype=np.float64)
    if c.shape != right.shape or c.ndim != 1:
        raise ValueError(f"ECE needs one confidence per correctness flag, got shapes {c.shape} and {right.shape}.")
    if not len(c):
        return None
    index = np.clip(np.ceil(c * bins).astype(np.int64) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    gap = np.bincount(index, weights=right, minlength=bins) - np.bincount(index, weights=c, minlength=bins)
    return float(np.abs(gap).sum() / counts.sum())


class FeedbackWindow:
    """The last ``size`` labelled predictions of live traffic (predicted, true: names, or label sets for a label-set
    task) and their scores as the ``task`` computes them (`Task.live_scores`: accuracy and macro-F1; label sets add
    micro-F1 and per-label scores), None until the window holds ``min_labels``."""

    def __init__(self, task: Task, size: int = 1000, min_labels: int = 50) -> None:
        if not 1 <= min_labels <= size:
            raise InputError(
                f"The feedback window needs 1 <= --min_feedback <= --feedback_window, got {min_labels} and {size}."
            )
        self.task, self.min_labels = task, min_labels
        self.items: deque[tuple[Truth, Truth]] = deque(maxlen=size)

    def add(self, pairs: Sequence[tuple[Truth, Truth]]) -> None:
        """Append (predicted, true) pairs, oldest first, as the task reads them (a pair it cannot score, such as a
        label set sent to a single-label model, is left out); the oldest fall out of the window."""
        for pair in pairs:
            read = tuple(self.task.truth_of(v) for v in pair)
            if None not in read:
                self.items.append(read)

    def __len__(self) -> int:
        return len(self.items)

    def report(self) -> dict[str, Any]:
        if len(self) < self.min_labels:
            return self.task.no_scores(len(self))
        return self.task.live_scores([p for p, _ in self.items], [t for _, t in self.items])
