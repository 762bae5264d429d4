"""Drift and accuracy of label sets, the multi-label side of `drift.py`: pure numpy, used by the service's logger
process (`serving.label_metrics`) and by the offline `monitor`.

A multi-label model answers each text with a set of labels, so each label is its own yes/no question:

- **predicted rate**: the share of answers whose set has the label, against its **reference rate**, the share of
  the training texts that have it (the export's reference counts each label's texts). Their drift is a two-bin
  population stability index per label (tagged or not: `rate_psi`), read against the same threshold as the other
  PSI signals; the window's alert `label_rate_psi` is the largest of them.
- **label PSI** of a set model compares the labels' shares of all the tags given (each answer's labels counted
  once each) with the reference's label counts: the multi-label reading of `drift.drift_report`'s label PSI.
- **estimated micro-F1**, without true labels: with probabilities that mean what they say, a tagged label is right
  with its probability and an untagged one wrong with its own, so the expected true positives, false positives and
  false negatives are sums of probabilities (confidence-based performance estimation, as `estimated_accuracy` for
  one label). Only as good as the probabilities' calibration.
- **live scores** against the true label sets sent to POST /feedback (`drift.FeedbackWindow` of a `LabelSet`
  task; `task.scores.set_scores`): micro-F1, macro-F1 over the labels present or predicted (as the single-label
  live macro-F1 counts classes), subset accuracy (the whole set right: `live_accuracy`'s multi-label reading) and
  each label's precision, recall and F1 (None where undefined: a label neither sent nor predicted in the window).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from lightning_cls.errors import InputError
from lightning_cls.monitoring.drift import (
    DEFAULT_THRESHOLDS,
    LABEL_RATE_SIGNAL,
    PSI_EPSILON,
    DriftThresholds,
    DriftWindow,
    alerts_of,
    psi,
)
from lightning_cls.task.scores import set_matrix

RATE_SIGNAL = LABEL_RATE_SIGNAL  # the window's per-label drift signal: the largest per-label PSI


def reference_rates(reference: dict | None, names: Sequence[str]) -> np.ndarray | None:
    """Each label's share of the reference's texts (None without a reference, or one without a row count)."""
    if reference is None or not reference.get("rows"):
        return None
    counts = np.asarray([reference["label_counts"].get(name, 0) for name in names], dtype=np.float64)
    return counts / float(reference["rows"])


def rate_psi(expected: np.ndarray, actual: np.ndarray, eps: float = PSI_EPSILON) -> np.ndarray:
    """Per label, the PSI of two bins (tagged, not tagged) of the ``actual`` rates against the ``expected`` ones."""
    return np.asarray([psi([e, 1 - e], [a, 1 - a], eps) for e, a in zip(expected, actual, strict=True)])


def expected_micro_f1(probabilities: np.ndarray, tagged: np.ndarray) -> float | None:
    """The micro-F1 to expect from the probabilities of the labels tagged and not tagged (see the module's
    docstring): 2 E[TP] / (2 E[TP] + E[FP] + E[FN]). None without rows."""
    p, d = np.asarray(probabilities, dtype=np.float64), np.asarray(tagged, dtype=bool)
    if not p.size:
        return None
    tp, fp, fn = p[d].sum(), (1 - p[d]).sum(), p[~d].sum()
    return float(2 * tp / (2 * tp + fp + fn)) if 2 * tp + fp + fn > 0 else None


def set_drift(
    report: dict[str, Any],
    reference: dict | None,
    names: Sequence[str],
    sets: Sequence[Sequence[str]],
    probabilities: Sequence[Sequence[float]] | None = None,
    thresholds: DriftThresholds = DEFAULT_THRESHOLDS,
) -> dict[str, Any]:
    """A `drift.drift_report` of the same predictions, read for label sets: the label PSI over the tags, each
    label's rate against its reference rate (``per_label``), their largest PSI (``label_rate_psi``, an alert over
    the PSI threshold; ``label_rate_alerts`` names the labels), and with every label's probability the
    ``estimated_micro_f1``. Changes and returns ``report``."""
    if len(sets) != report["texts"]:
        raise ValueError(f"{len(sets)} label sets for {report['texts']} predictions.")
    tagged = set_matrix(sets, names)
    live = tagged.sum(0)
    rates = live / len(sets) if len(sets) else np.full(len(names), np.nan)
    expected = reference_rates(reference, names)
    report["labels"]["live"] = live.tolist()  # tags per label, the multi-label "predicted labels"
    report["per_label"] = {
        name: {"rate": None if np.isnan(rates[j]) else float(rates[j]), "reference_rate": None, "psi": None}
        for j, name in enumerate(names)
    }
    report[RATE_SIGNAL], report["label_rate_alerts"] = None, []
    if expected is not None and len(sets):
        report["label_psi"] = psi(report["labels"]["reference"], live) if live.sum() else None
        per_label = rate_psi(expected, rates)
        for j, name in enumerate(names):
            report["per_label"][name].update(reference_rate=float(expected[j]), psi=float(per_label[j]))
        report[RATE_SIGNAL] = float(per_label.max())
        report["label_rate_alerts"] = [n for n, v in zip(names, per_label, strict=True) if v > thresholds.psi_warning]
    report["estimated_micro_f1"] = (
        expected_micro_f1(np.asarray(probabilities, dtype=np.float64), tagged) if probabilities is not None else None
    )
    report["alerts"] = alerts_of(report, thresholds)
    return report


class LabelSetWindow(DriftWindow):
    """The drift window of a multi-label model: each prediction's label set and every label's probability beside
    what `DriftWindow` keeps, and its report read for label sets (`set_drift`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sets: deque[tuple[tuple[str, ...], tuple[float, ...]]] = deque(maxlen=self.items.maxlen)

    def add(
        self,
        labels: Sequence[str],
        probabilities: Sequence[float],
        lengths: Sequence[int],
        windows: Sequence[int] | None = None,
        label_sets: Sequence[Sequence[str]] | None = None,
        all_probabilities: Sequence[Sequence[float]] | None = None,
    ) -> None:
        """As `DriftWindow.add`, with each prediction's label set and probabilities (every label's)."""
        if label_sets is None or all_probabilities is None:
            raise ValueError("A multi-label window needs each prediction's label set and every label's probability.")
        super().add(labels, probabilities, lengths, windows)
        self.sets.extend(zip(map(tuple, label_sets), map(tuple, all_probabilities), strict=True))

    def report(self) -> dict[str, Any]:
        report = super().report()
        if len(self) < self.min_texts:
            report.update({RATE_SIGNAL: None, "label_rate_alerts": [], "estimated_micro_f1": None, "per_label": None})
            return report
        sets, probabilities = zip(*self.sets, strict=True)
        return set_drift(report, self.reference, self.names, sets, probabilities, self.thresholds)


def parse_label_sets(values: Sequence[Any], source: str, column: str) -> list[list[str]]:
    """Label sets as files hold them: lists (JSONL), JSON lists written as text (the service's database), or names
    separated by ";" (`predict`'s CSV, the database's `feedback.label`); repeats dropped. A row without a set is an
    error naming the file, the column and the rows."""
    sets, bad = [], []
    for i, value in enumerate(values):
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError:
                    value = None
            else:
                value = [part.strip() for part in text.split(";") if part.strip()]
        ok = isinstance(value, list | tuple) and value and all(isinstance(x, str) and x for x in value)
        sets.append(list(dict.fromkeys(value)) if ok else [])
        if not ok:
            bad.append(i)
    if bad:
        raise InputError(
            f"{source}: column {column!r} has no label set at rows {bad[:10]}{' ...' if len(bad) > 10 else ''} "
            '(a list of label names, or names separated by ";").'
        )
    return sets


# ------------------------------------------------------------------------------------------------ against true sets


def drift_window(task: Any, reference: dict | None, **window: Any) -> DriftWindow:
    """The drift window of a task's answers (the one place that tells them apart): a label-set task's also watches
    each label's rate (`LabelSetWindow`)."""
    return (LabelSetWindow if task.multi_label else DriftWindow)(task.names, reference, **window)
