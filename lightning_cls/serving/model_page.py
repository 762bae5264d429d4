"""The model page's numbers over time, from the service's own store (`store.history`): per time bucket and version,
answers, their mean probability (the estimated accuracy of a calibrated model), abstentions, the label PSI against
the training split (`monitoring.drift.psi`, the drift gauge's signal), true labels received and the live accuracy
on them; and the alerts those series raise by the thresholds the service alerts by (`--accuracy_alert_margin`, the
drift thresholds). Pure functions of rows: the page draws the series (inline SVG), nothing here draws.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_cls.monitoring.drift import DriftThresholds, psi

BUCKETS = 40  # most points per series
NICE_WIDTHS = (60, 300, 900, 3600, 4 * 3600, 86400, 7 * 86400)  # seconds per bucket


@dataclass
class PageSettings:
    """What the page needs to judge the series: the labels, the training split's label counts, the baselines."""

    names: list[str]
    reference_counts: dict[str, int] | None = None
    validation_accuracy: float | None = None
    alert_margin: float = 0.05
    drift: DriftThresholds = field(default_factory=DriftThresholds)
    min_bucket: int = 20  # answers (or labels) a bucket needs before it is judged


def bucket_width(first: float, last: float) -> int:
    """The narrowest nice width that fits the span in at most BUCKETS buckets."""
    span = max(last - first, 1.0)
    return next((w for w in NICE_WIDTHS if span / w <= BUCKETS), NICE_WIDTHS[-1])


def _labels_of(label: str, labels: str | None) -> tuple[str, ...]:
    return tuple(sorted(json.loads(labels))) if labels else (label,)


def series(answers: Sequence[tuple], feedback: Sequence[tuple], s: PageSettings) -> dict[str, Any]:
    """``answers``: (time, version, label, labels, probability, abstained); ``feedback``: (time, version, predicted
    label, predicted labels, true label, true labels), both oldest first. Per version, one point per bucket."""
    times = [a[0] for a in answers] + [f[0] for f in feedback]
    if not times:
        return {"bucket_seconds": None, "versions": {}, "alerts": []}
    width = bucket_width(min(times), max(times))
    versions: dict[str, dict[int, dict[str, Any]]] = {}
    for t, version, label, labels, probability, abstained in answers:
        b = versions.setdefault(version, {}).setdefault(int(t // width), _empty())
        b["answers"] += 1
        b["probability_sum"] += probability
        b["abstained"] += int(bool(abstained))
        b["low_confidence"] += int(probability < s.drift.low_confidence)
        for name in _labels_of(label, labels):
            b["labels"][name] = b["labels"].get(name, 0) + 1
    for t, version, label, labels, true, trues in feedback:
        b = versions.setdefault(version, {}).setdefault(int(t // width), _empty())
        b["feedback"] += 1
        b["correct"] += int(_labels_of(label, labels) == _labels_of(true, trues))
    out, alerts = {}, []
    for version, buckets in versions.items():
        points, total_feedback = [], 0
        for key in sorted(buckets):
            b = buckets[key]
            total_feedback += b["feedback"]
            point = {
                "time": key * width,
                "answers": b["answers"],
                "estimated_accuracy": b["probability_sum"] / b["answers"] if b["answers"] else None,
                "abstained_share": b["abstained"] / b["answers"] if b["answers"] else None,
                "low_confidence_share": b["low_confidence"] / b["answers"] if b["answers"] else None,
                "label_psi": _label_psi(b["labels"], s),
                "feedback": b["feedback"],
                "feedback_total": total_feedback,
                "live_accuracy": b["correct"] / b["feedback"] if b["feedback"] else None,
            }
            points.append(point)
            alerts += [{"time": point["time"], "version": version, "alert": a} for a in _alerts(point, b, s)]
        out[version] = points
    alerts.sort(key=lambda a: -a["time"])
    return {"bucket_seconds": width, "versions": out, "alerts": alerts[:20]}


def _empty() -> dict[str, Any]:
    return {"answers": 0, "probability_sum": 0.0, "abstained": 0, "low_confidence": 0, "labels": {}, "feedback": 0,
            "correct": 0}  # fmt: skip


def _label_psi(counts: dict[str, int], s: PageSettings) -> float | None:
    if not s.reference_counts or not counts:
        return None
    value = psi([s.reference_counts.get(n, 0) for n in s.names], [counts.get(n, 0) for n in s.names])
    return value if math.isfinite(value) else None


def _alerts(point: dict[str, Any], b: dict[str, Any], s: PageSettings) -> list[str]:
    """What a bucket's numbers say, by the thresholds the service's own alerts use."""
    found = []
    floor = None if s.validation_accuracy is None else s.validation_accuracy - s.alert_margin
    if b["answers"] >= s.min_bucket:
        if floor is not None and point["estimated_accuracy"] < floor:
            found.append(f"estimated accuracy {point['estimated_accuracy']:.3f} below {floor:.3f}")
        if point["label_psi"] is not None and point["label_psi"] > s.drift.psi_warning:
            found.append(f"label PSI {point['label_psi']:.3f} above {s.drift.psi_warning}")
        if point["low_confidence_share"] > s.drift.low_confidence_warning:
            found.append(
                f"low-confidence share {point['low_confidence_share']:.2f} above {s.drift.low_confidence_warning}"
            )
    if floor is not None and b["feedback"] >= s.min_bucket and point["live_accuracy"] < floor:
        found.append(f"live accuracy {point['live_accuracy']:.3f} below {floor:.3f}")
    return found
