"""Drift of predictions against the training data: population stability index, the drift report, and the sliding
window of live traffic. Pure numpy: the service (`serving`) and the offline `monitor` command both build on it.

The reference is the training split's summary written at export (`lightning_cls.json` -> `reference`): its label
counts and its token lengths binned at their deciles. Predictions are compared with it on three signals:

- label PSI: predicted labels vs the training label distribution,
- length PSI: token lengths (as the model saw them, i.e. truncated) in the reference's bins,
- low-confidence share: the share of predictions whose top probability is below a threshold.

A PSI above ``PSI_WARNING`` (0.2, the usual rule of thumb: < 0.1 stable, 0.1-0.2 moderate shift, > 0.2 large
shift) is an alert, as is a low-confidence share above its own threshold (`DriftThresholds`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_cls.errors import InputError
from lightning_cls.export_format import length_histogram

# Proportions below this are raised to it before the PSI's logarithm: an empty bin on either side would otherwise
# give an infinite index. 1e-4 keeps one empty bin that held 10% of the reference at about 0.1 * ln(0.1 / 1e-4)
# = 0.69, i.e. clearly over the warning threshold, without letting a single empty bin dominate everything.
PSI_EPSILON = 1e-4
PSI_WARNING = 0.2  # PSI above this is a large shift: an alert
LOW_CONFIDENCE = 0.5  # a prediction whose top probability is below this counts as low-confidence
LOW_CONFIDENCE_WARNING = 0.3  # a low-confidence share above this is an alert


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

    @classmethod
    def pick(cls, values: dict[str, Any]) -> DriftThresholds:
        """The thresholds among parsed command-line values (the other keys are left alone)."""
        return cls(**{name: values[name] for name in cls.__dataclass_fields__})


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
    position = {name: i for i, name in enumerate(names)}
    unknown = sorted({label for label in labels if label not in position})
    if unknown:
        raise InputError(f"Labels {unknown} are not among the model's labels {list(names)}.")
    return np.bincount([position[label] for label in labels], minlength=len(names))


def drift_report(
    reference: dict | None,
    names: Sequence[str],
    labels: Sequence[str],
    probabilities: Sequence[float],
    lengths: Sequence[int] | None,
    thresholds: DriftThresholds = DEFAULT_THRESHOLDS,
) -> dict[str, Any]:
    """Drift of a set of predictions against the export's reference (its `to_dict()` form): label PSI, length PSI,
    low-confidence share.

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
        "low_confidence_share": float(np.mean(np.asarray(probabilities) < t.low_confidence)) if n else None,
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
    alerts = [k for k in ("label_psi", "length_psi") if report[k] is not None and report[k] > t.psi_warning]
    share = report["low_confidence_share"]
    if share is not None and share > t.low_confidence_warning:
        alerts.append("low_confidence_share")
    report["alerts"] = alerts
    return report


class DriftWindow:
    """The last ``size`` predictions of live traffic (label, top probability, token length) and their drift."""

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
        self.items: deque[tuple[str, float, int]] = deque(maxlen=size)

    def add(self, labels: Sequence[str], probabilities: Sequence[float], lengths: Sequence[int]) -> None:
        """Append predictions; the oldest fall out of the window."""
        self.items.extend(zip(labels, probabilities, lengths, strict=True))

    def __len__(self) -> int:
        return len(self.items)

    def report(self) -> dict[str, Any]:
        """The drift report of the predictions now in the window; no signal while it holds under ``min_texts``."""
        labels, probabilities, lengths = (
            (list(c) for c in zip(*self.items, strict=True)) if self.items else ([], [], [])
        )
        report = drift_report(self.reference, self.names, labels, probabilities, lengths, self.thresholds)
        if len(self) < self.min_texts:
            # A handful of predictions always looks drifted (most bins empty): wait for a meaningful sample.
            report.update(label_psi=None, length_psi=None, low_confidence_share=None, alerts=[])
            report["note"] = f"{len(self)} predictions, fewer than {self.min_texts}: no drift signal yet"
        return report
