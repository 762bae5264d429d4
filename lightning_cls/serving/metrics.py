"""The service's Prometheus metrics, and the logger process that records what the model answered.

Prometheus multiprocess mode: the service runs in several processes (HTTP server, inference worker, logger
process); each writes its metrics to files in one folder (`enable_multiprocess_metrics`), and GET /metrics merges
them (`collect_metrics`). `HttpMetrics` is recorded in the HTTP server process, `PredictionMetrics` (with the drift
gauges) in the logger process (`MonitoringLogger`), fed one message per server batch by the inference worker.
"""

from __future__ import annotations

import logging
import math
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import litserve as ls

from lightning_cls.drift import DEFAULT_THRESHOLDS, DriftThresholds, DriftWindow

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


# ------------------------------------------------------------------------------------------------ Prometheus wiring
def enable_multiprocess_metrics(folder: str | Path) -> Path:
    """Point prometheus-client at ``folder`` (emptied) for this process and every process it starts."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):  # files of an earlier run would be merged into this one's metrics
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(folder)
    # prometheus-client picks its value class when first imported; switch it in case it was imported already.
    from prometheus_client import values

    values.ValueClass = values.MultiProcessValue()
    return folder


def collect_metrics() -> tuple[bytes, str]:
    """The merged metrics of every process of the service, in the Prometheus text format, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def exponential_buckets(start: float, factor: float, stop: float) -> list[float]:
    """Histogram buckets start, start*factor, ... up to and including the first one >= stop."""
    buckets = [start]
    while buckets[-1] < stop:
        buckets.append(buckets[-1] * factor)
    return buckets


# ------------------------------------------------------------------------------------------------ metrics
class HttpMetrics:
    """Requests, errors and latency, recorded where the HTTP requests arrive (the API server processes)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.requests = Counter("lightning_cls_http_requests", "HTTP requests by path and status", ["path", "status"])
        self.errors = Counter("lightning_cls_http_errors", "HTTP responses with status >= 400", ["path", "status"])
        self.latency = Histogram(
            "lightning_cls_http_request_duration_seconds",
            "Time from request arrival to response, by path",
            ["path"],
            buckets=exponential_buckets(0.001, 2, 30),
        )

    def observe(self, path: str, status: int, seconds: float) -> None:
        self.requests.labels(path, str(status)).inc()
        if status >= 400:
            self.errors.labels(path, str(status)).inc()
        self.latency.labels(path).observe(seconds)


class PredictionMetrics:
    """What the model saw and answered (batch sizes, labels, confidence, token lengths) and the drift gauges."""

    def __init__(self, names: Sequence[str], max_batch_size: int, max_length: int, window: DriftWindow) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.window = window
        self.batch_requests = Histogram(
            "lightning_cls_batch_requests",
            "Requests per server-side batch",
            buckets=exponential_buckets(1, 2, max_batch_size),
        )
        self.batch_texts = Histogram(
            "lightning_cls_batch_texts", "Texts per server-side batch", buckets=exponential_buckets(1, 2, 1024)
        )
        self.predictions = Counter("lightning_cls_predictions", "Predicted labels", ["label"])
        for name in names:  # every label shows from the start, at 0
            self.predictions.labels(name)
        self.confidence = Histogram(
            "lightning_cls_prediction_confidence",
            "Probability of the predicted label",
            buckets=[round(0.1 * i, 1) for i in range(1, 10)] + [0.95, 0.99, 1.0],
        )
        self.tokens = Histogram(
            "lightning_cls_input_tokens",
            "Tokens per text as the model saw it (after truncation)",
            buckets=exponential_buckets(4, 2, max_length),
        )
        self.truncated = Counter("lightning_cls_truncated_texts", "Texts truncated at the model's max_length")
        gauge = {"multiprocess_mode": "mostrecent"}  # one process (the logger) writes them
        self.window_texts = Gauge("lightning_cls_drift_window_texts", "Predictions in the drift window", **gauge)
        self.label_psi = Gauge(
            "lightning_cls_drift_label_psi", "PSI of predicted labels vs the training labels", **gauge
        )
        self.length_psi = Gauge(
            "lightning_cls_drift_length_psi", "PSI of binned token lengths vs the training lengths", **gauge
        )
        self.low_confidence = Gauge(
            "lightning_cls_drift_low_confidence_share", "Share of the window below the confidence threshold", **gauge
        )
        self.alert = Gauge(
            "lightning_cls_drift_alert", "1 when a drift signal is over its threshold", ["signal"], **gauge
        )
        self.psi_threshold = Gauge("lightning_cls_drift_psi_threshold", "PSI warning threshold", **gauge)
        self.psi_threshold.set(window.thresholds.psi_warning)
        self.window_texts.set(0)
        for gauge in (self.label_psi, self.length_psi, self.low_confidence):
            gauge.set(math.nan)  # not computed yet (too few predictions, or no reference)
        self._alerts: set[str] = set()

    def observe(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Record one server batch (keys requests, labels, probabilities, lengths, truncated); returns the drift."""
        self.batch_requests.observe(batch["requests"])
        self.batch_texts.observe(len(batch["labels"]))
        for label, p, n in zip(batch["labels"], batch["probabilities"], batch["lengths"], strict=True):
            self.predictions.labels(label).inc()
            self.confidence.observe(p)
            self.tokens.observe(n)
        self.truncated.inc(sum(batch["truncated"]))
        self.window.add(batch["labels"], batch["probabilities"], batch["lengths"])
        report = self.window.report()
        self.window_texts.set(report["texts"])
        for key, gauge in (
            ("label_psi", self.label_psi),
            ("length_psi", self.length_psi),
            ("low_confidence_share", self.low_confidence),
        ):
            gauge.set(math.nan if report[key] is None else report[key])
        self._log_alert_changes(report)
        return report

    def _log_alert_changes(self, report: dict[str, Any]) -> None:
        # Logged when a signal crosses its threshold, not on every batch it stays over it.
        alerts = set(report["alerts"])
        for signal_name in ("label_psi", "length_psi", "low_confidence_share"):
            self.alert.labels(signal_name).set(float(signal_name in alerts))
        for signal_name in sorted(alerts - self._alerts):
            threshold = report["thresholds"]["psi" if "psi" in signal_name else "low_confidence_share"]
            log.warning(
                f"Drift: {signal_name} = {report[signal_name]:.3f} over the last {report['texts']} predictions is "
                f"above its threshold ({threshold})."
            )
        for signal_name in sorted(self._alerts - alerts):
            log.warning(f"Drift: {signal_name} = {report[signal_name]:.3f} is back under its threshold.")
        self._alerts = alerts


# ------------------------------------------------------------------------------------------------ the logger process
class MonitoringLogger(ls.Logger):
    """LitServe logger: runs in its own process, fed one message per server batch by the inference worker.

    Keeping the metrics and the drift window here keeps them off the inference path, and gives one window for all
    inference workers. The instance is pickled to that process: it holds only plain settings, and builds its
    metrics there on the first message (the worker sends "start" once its model is loaded).
    """

    def __init__(
        self,
        names: Sequence[str],
        reference: dict | None,
        max_batch_size: int,
        max_length: int,
        window_size: int = 1000,
        min_window: int = 100,
        thresholds: DriftThresholds = DEFAULT_THRESHOLDS,
    ) -> None:
        super().__init__()
        window = {"size": window_size, "min_texts": min_window, "thresholds": thresholds}
        DriftWindow(names, reference, **window)  # check the settings here, not in the other process
        self.settings = {
            "names": list(names),
            "reference": reference,
            "max_batch_size": max_batch_size,
            "max_length": max_length,
            "window": window,
        }
        self._metrics: PredictionMetrics | None = None

    def process(self, key: str, value: Any) -> None:
        if key == "stop":  # sent at shutdown by `StopMonitoring`: exit before LitServe closes the queue under us
            os._exit(0)
        if self._metrics is None:
            # Ctrl+C reaches every process of the terminal; this one stops when the server tells it to.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            if not log.handlers:  # a spawned process: make the drift warnings visible on stderr
                handler = logging.StreamHandler()
                handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
                log.addHandler(handler)
                log.setLevel(logging.INFO)
            s = self.settings
            window = DriftWindow(s["names"], s["reference"], **s["window"])
            self._metrics = PredictionMetrics(s["names"], s["max_batch_size"], s["max_length"], window)
        if key == "batch":
            self._metrics.observe(value)


class StopMonitoring(ls.Callback):
    """Tells the logger process to exit when the HTTP server stops (LitServe would otherwise leave it to die on a
    closed queue, with a traceback)."""

    def on_server_end(self, litserver: Any = None, **kwargs: Any) -> None:
        queue = getattr(litserver, "logger_queue", None)
        if queue is not None:
            queue.put(("stop", None))
