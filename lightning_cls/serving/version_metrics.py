"""The metrics of two models in one service, by version (and role), kept in the logger process.

- ``lightning_cls_model_role{version, role}``: 1 for the version in each role now (champion, challenger), 0 for a
  pair no longer deployed; ``lightning_cls_deployment_share`` and ``lightning_cls_deployment_mode{mode}`` (1 for the
  current mode: none, shadow, canary). The workers report what they loaded, so these say what really answers.
- ``lightning_cls_version_answers_total{version}``, ``lightning_cls_version_confidence{version}`` (top probability
  of each answer), ``lightning_cls_version_inference_seconds{version}`` (the model's forward time per batch: the
  latency a version adds).
- ``lightning_cls_version_estimated_accuracy{version, role}``: mean top probability over the last answers (the
  shadow's answers count for the challenger in shadow).
- ``lightning_cls_version_live_accuracy{version, role}`` and ``..._feedback_texts``: accuracy (a multi-label
  model's: subset accuracy) over the last labelled answers of that version, returned or shadow (the feedback on a
  request judges both models' answers to it); NaN under --min_feedback.
- ``lightning_cls_shadow_texts_total{version}``, ``lightning_cls_shadow_dropped_total{version}`` (copies the
  saturated worker dropped) and ``lightning_cls_shadow_agreement{version}``: the share of shadow answers equal to
  the champion's (the same label, or the same set), over the last window.

Drift gauges stay over all answered traffic (`metrics.PredictionMetrics`): the texts are the same whoever answers.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

from lightning_cls.monitoring.drift import FeedbackWindow
from lightning_cls.store.feedback_store import LabelledAnswer
from lightning_cls.task import Task

MODE_LABELS = ("none", "shadow", "canary")


def _nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


class VersionMetrics:
    def __init__(self, task: Task, window: int, min_labels: int) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        from lightning_cls.serving.gauges import GAUGE, UNREGISTERED, exponential_buckets

        self.task, self.window, self.min_labels = task, window, min_labels
        by_version, by_role = ["version"], ["version", "role"]
        self.role = Gauge("lightning_cls_model_role", "1: the version answers in this role now", by_role, **GAUGE)
        self.share = Gauge(
            "lightning_cls_deployment_share", "Share of requests the challenger sees (shadow) or answers", **GAUGE
        )
        self.mode = Gauge("lightning_cls_deployment_mode", "1: the challenger's mode now", ["mode"], **GAUGE)
        self.answers = Counter(
            "lightning_cls_version_answers",
            "Answers returned, by the version that made them",
            by_version,
            **UNREGISTERED,
        )
        self.confidence = Histogram(
            "lightning_cls_version_confidence",
            "Top probability of each returned answer, by version",
            by_version,
            buckets=[i / 20 for i in range(1, 21)],
            **UNREGISTERED,
        )
        self.seconds = Histogram(
            "lightning_cls_version_inference_seconds",
            "Forward time of a version's share of a batch",
            by_version,
            buckets=exponential_buckets(0.001, 2, 30),
            **UNREGISTERED,
        )
        self.estimated = Gauge(
            "lightning_cls_version_estimated_accuracy",
            "Mean top probability over the version's last answers (returned or shadow)",
            by_role,
            **GAUGE,
        )
        self.live = Gauge(
            "lightning_cls_version_live_accuracy",
            "Accuracy over the version's last labelled answers (returned or shadow); NaN under --min_feedback",
            by_role,
            **GAUGE,
        )
        self.feedback_texts = Gauge(
            "lightning_cls_version_feedback_texts", "Labelled answers in the version's live window", by_role, **GAUGE
        )
        self.shadow_texts = Counter(
            "lightning_cls_shadow_texts", "Texts the shadow answered (never returned)", by_version, **UNREGISTERED
        )
        self.dropped = Counter(
            "lightning_cls_shadow_dropped",
            "Texts copied to the shadow and dropped because the worker was saturated",
            by_version,
            **UNREGISTERED,
        )
        self.agreement = Gauge(
            "lightning_cls_shadow_agreement",
            "Share of the shadow's last answers equal to the champion's answer to the same text",
            by_version,
            **GAUGE,
        )
        self.roles: dict[str, str] = {}  # version -> role now
        self._confidences: dict[str, deque[float]] = {}
        self._agree: dict[str, deque[bool]] = {}
        self._live: dict[str, Any] = {}
        for mode in MODE_LABELS:
            self.mode.labels(mode).set(0)

    # ------------------------------------------------------------------------------------------ messages
    def deployed(self, value: dict[str, Any]) -> None:
        """A worker loaded a deployment: the role gauges follow it (pairs no longer deployed go to 0, NaN)."""
        roles: dict[str, str] = value["roles"]
        for version, role in self.roles.items():
            if roles.get(version) != role:
                self.role.labels(version, role).set(0)
                for gauge in (self.estimated, self.live, self.feedback_texts):
                    gauge.labels(version, role).set(math.nan)
        self.roles = dict(roles)
        for version, role in roles.items():
            self.role.labels(version, role).set(1)
            self._set_estimated(version)
            self._set_live(version)
        self.share.set(value.get("share") or 0.0)
        for mode in MODE_LABELS:
            self.mode.labels(mode).set(1 if (value.get("mode") or "none") == mode else 0)

    def batch(self, batch: dict[str, Any]) -> None:
        versions = batch.get("versions")
        if not versions:
            return
        for version, p in zip(versions, batch["probabilities"], strict=True):
            self.answers.labels(version).inc()
            self.confidence.labels(version).observe(p)
            self._confidences.setdefault(version, deque(maxlen=self.window)).append(p)
        for version, seconds in (batch.get("seconds") or {}).items():
            self.seconds.labels(version).observe(seconds)
        for version in set(versions):
            self._set_estimated(version)

    def shadow(self, value: dict[str, Any]) -> None:
        version = value["version"]
        self.shadow_texts.labels(version).inc(len(value["ids"]))
        self._agree.setdefault(version, deque(maxlen=self.window)).extend(value["agree"])
        self._confidences.setdefault(version, deque(maxlen=self.window)).extend(value["probabilities"])
        agree = self._agree[version]
        self.agreement.labels(version).set(sum(agree) / len(agree) if agree else math.nan)
        self._set_estimated(version)

    def shadow_dropped(self, value: dict[str, Any]) -> None:
        self.dropped.labels(value["version"]).inc(value["texts"])

    def feedback(self, answers: Sequence[LabelledAnswer]) -> None:
        """Labelled answers of every version, returned or shadow, each into its version's window."""
        touched = set()
        for a in answers:
            window = self._live.get(a.version)
            if window is None:
                window = self._live[a.version] = FeedbackWindow(self.task, self.window, self.min_labels)
            window.add([(a.predicted, a.true)])
            touched.add(a.version)
        for version in touched:
            self._set_live(version)

    def live_report(self, version: str) -> dict[str, Any] | None:
        window = self._live.get(version)
        return window.report() if window is not None else None

    # ------------------------------------------------------------------------------------------ gauges
    def _set_estimated(self, version: str) -> None:
        role = self.roles.get(version)
        values = self._confidences.get(version)
        if role is not None and values:
            self.estimated.labels(version, role).set(sum(values) / len(values))

    def _set_live(self, version: str) -> None:
        role = self.roles.get(version)
        report = self.live_report(version)
        if role is None or report is None:
            return
        self.live.labels(version, role).set(_nan(report.get("accuracy")))
        self.feedback_texts.labels(version, role).set(report["rows"])
