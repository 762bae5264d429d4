"""The Prometheus gauges of a multi-label model's label sets, per label and for the sets as a whole, recorded in the
logger process beside the others (`metrics.LoggerState` makes them for a model whose export has per-label thresholds).

The computations are `lightning_cls.monitoring.label_set_drift`'s; this module only sets gauges from its reports. Every
per-label series is labelled with one of the model's own label names (never a value from a request), so there are
as many series as the model has labels, all made at start (NaN until their window is full enough).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lightning_cls.monitoring.label_set_drift import reference_rates
from lightning_cls.serving.gauges import GAUGE


def _value(x: float | None) -> float:
    return math.nan if x is None else float(x)


class LabelSetMetrics:
    """Per label: its predicted rate over the drift window, its training rate and their PSI; its live precision,
    recall and F1 on the feedback window. For the sets: the estimated and live micro-F1 and the export's validation
    micro-F1 they are compared with."""

    def __init__(self, names: Sequence[str], reference: dict | None, validation_micro_f1: float | None) -> None:
        from prometheus_client import Gauge

        self.names = list(names)

        def per_label(name: str, doc: str) -> Any:
            gauge = Gauge(f"lightning_cls_{name}", doc, ["label"], **GAUGE)
            for label in self.names:
                gauge.labels(label).set(math.nan)
            return gauge

        self.rate = per_label(
            "label_rate", "Share of the drift window's answers whose label set has the label; NaN under --min_window"
        )
        self.reference_rate = per_label(
            "label_reference_rate", "Share of the training texts that have the label (the export's reference)"
        )
        self.rate_psi = per_label(
            "drift_label_rate_psi",
            "PSI of the label's predicted rate (tagged or not) vs its training rate; NaN under --min_window",
        )
        self.precision = per_label(
            "live_label_precision", "Precision of the label over the feedback window; NaN when never predicted there"
        )
        self.recall = per_label(
            "live_label_recall", "Recall of the label over the feedback window; NaN when never a true label there"
        )
        self.f1 = per_label("live_label_f1", "F1 of the label over the feedback window; NaN when neither")
        self.estimated_micro_f1 = Gauge(
            "lightning_cls_estimated_micro_f1",
            "Micro-F1 expected from the label probabilities over the drift window (no labels needed); NaN under "
            "--min_window",
            **GAUGE,
        )
        self.live_micro_f1 = Gauge(
            "lightning_cls_live_micro_f1",
            "Micro-F1 of the label sets over the last --feedback_window labelled predictions; NaN under --min_feedback",
            **GAUGE,
        )
        self.live_top_label_in_set = Gauge(
            "lightning_cls_live_top_label_in_set",
            "Share of the last --feedback_window labelled predictions whose most probable label is one of the true "
            "ones (a tagger's first suggestion is right); NaN under --min_feedback",
            **GAUGE,
        )
        self.validation_micro_f1 = Gauge(
            "lightning_cls_validation_micro_f1",
            "Micro-F1 of the exported model on its validation split, from the export (NaN: not recorded)",
            **GAUGE,
        )
        self.validation_micro_f1.set(_value(validation_micro_f1))
        self.estimated_micro_f1.set(math.nan)
        self.live_micro_f1.set(math.nan)
        self.live_top_label_in_set.set(math.nan)
        rates = reference_rates(reference, self.names)
        if rates is not None:
            for label, rate in zip(self.names, rates, strict=True):
                self.reference_rate.labels(label).set(float(rate))

    def observe(self, report: dict[str, Any]) -> None:
        """The drift gauges from a `label_set_drift.LabelSetWindow` report."""
        per_label = report.get("per_label") or {}
        for label in self.names:
            row = per_label.get(label) or {}
            self.rate.labels(label).set(_value(row.get("rate")))
            self.rate_psi.labels(label).set(_value(row.get("psi")))
        self.estimated_micro_f1.set(_value(report.get("estimated_micro_f1")))

    def set_live(self, report: dict[str, Any]) -> None:
        """The live gauges from a `drift.FeedbackWindow` report (a label-set task's)."""
        per_label = report.get("per_label") or {}
        for label in self.names:
            row = per_label.get(label) or {}
            self.precision.labels(label).set(_value(row.get("precision")))
            self.recall.labels(label).set(_value(row.get("recall")))
            self.f1.labels(label).set(_value(row.get("f1")))
        self.live_micro_f1.set(_value(report.get("micro_f1")))
        self.live_top_label_in_set.set(_value(report.get("top_label_in_set")))
