"""The service's Prometheus metrics, and the logger process that records what the model answered.

Prometheus multiprocess mode: the service runs in several processes (HTTP server, inference worker, logger
process); each writes its metrics to files in one folder, and GET /metrics merges them (`gauges`). `HttpMetrics`
is recorded in the HTTP server process; `PredictionMetrics` (with the drift gauges) and `AccuracyMetrics`
(estimated and live accuracy) in the logger process (`MonitoringLogger`), fed one message per server batch by the
inference worker, and one per POST /feedback that stored labels by the HTTP server.

Why the live accuracy is computed in the logger process, not where the feedback arrives: the true labels are
written to the feedback database by the HTTP server process(es), but a gauge written by several processes is only
right if they never interleave, and the logger process already owns every other gauge of the predictions. So the
HTTP server only says "new feedback" on LitServe's logger queue, and the logger process reads the new rows from the
database (`FeedbackStore.feedback_since`: by their growing seq, so none is counted twice) into its `FeedbackWindow`.
It also looks at every batch, so a lost message only delays the gauges.

A multi-label model (its answers are label sets) has the same metrics read for sets (`predictions_total` counts
every label of each set, the label PSI compares the tags' mix, live accuracy is subset accuracy) and more, per label
and for the sets (`label_metrics.LabelSetMetrics`, from `lightning_cls.monitoring.label_set_drift`'s windows).

The metrics are not registered in prometheus-client's default registry (``registry=None``): in multiprocess mode
their values live in the files that `collect_metrics` reads, and unregistered metrics can be made again (tests).
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import litserve as ls

from lightning_cls.database import StoreError
from lightning_cls.monitoring.drift import (
    DEFAULT_THRESHOLDS,
    LABEL_RATE_SIGNAL,
    PSI_SIGNALS,
    DriftThresholds,
    DriftWindow,
    FeedbackWindow,
)
from lightning_cls.monitoring.label_set_drift import drift_window
from lightning_cls.serving.gauges import GAUGE, UNREGISTERED, exponential_buckets
from lightning_cls.serving.prediction_log import LogSettings, PredictionLog
from lightning_cls.serving.version_metrics import VersionMetrics
from lightning_cls.store.feedback_store import FeedbackStore, StoreSettings
from lightning_cls.task import SingleLabel, Task

log = logging.getLogger(__name__)

PRUNE_EVERY = 60.0  # seconds: the logger process applies the retention bound at least this often under traffic
# Seconds between two looks for feedback stored by other processes: another replica's POST /feedback on a shared store
# tells only its own logger, so an idle replica's live gauges would wait for its next request without this.
FEEDBACK_POLL = 1.0


# ------------------------------------------------------------------------------------------------ metrics
class HttpMetrics:
    """Requests, errors and latency, recorded where the HTTP requests arrive (the API server processes)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.requests = Counter(
            "lightning_cls_http_requests", "HTTP requests by path and status", ["path", "status"], **UNREGISTERED
        )
        self.errors = Counter(
            "lightning_cls_http_errors", "HTTP responses with status >= 400", ["path", "status"], **UNREGISTERED
        )
        self.latency = Histogram(
            "lightning_cls_http_request_duration_seconds",
            "Time from request arrival to response, by path",
            ["path"],
            buckets=exponential_buckets(0.001, 2, 30),
            **UNREGISTERED,
        )

    def observe(self, path: str, status: int, seconds: float) -> None:
        self.requests.labels(path, str(status)).inc()
        if status >= 400:
            self.errors.labels(path, str(status)).inc()
        self.latency.labels(path).observe(seconds)


class PredictionMetrics:
    """What the model saw and answered (batch sizes, labels, confidence, token lengths) and the drift gauges; with
    ``label_sets`` (a multi-label model, whose ``window`` is a `LabelSetWindow`), the per-label gauges too."""

    def __init__(
        self,
        names: Sequence[str],
        max_batch_size: int,
        max_length: int,
        window: DriftWindow,
        label_sets: Any = None,
    ) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.window, self.label_sets = window, label_sets  # label_sets: a `label_metrics.LabelSetMetrics`
        self.batch_requests = Histogram(
            "lightning_cls_batch_requests",
            "Requests per server-side batch",
            buckets=exponential_buckets(1, 2, max_batch_size),
            **UNREGISTERED,
        )
        self.batch_texts = Histogram(
            "lightning_cls_batch_texts",
            "Texts per server-side batch",
            buckets=exponential_buckets(1, 2, 1024),
            **UNREGISTERED,
        )
        self.predictions = Counter(
            "lightning_cls_predictions",
            "Predicted labels (label sets: each of their labels)",
            ["label"],
            **UNREGISTERED,
        )
        for name in names:  # every label shows from the start, at 0
            self.predictions.labels(name)
        self.confidence = Histogram(
            "lightning_cls_prediction_confidence",
            "Probability of the predicted label",
            buckets=[round(0.1 * i, 1) for i in range(1, 10)] + [0.95, 0.99, 1.0],
            **UNREGISTERED,
        )
        self.tokens = Histogram(
            "lightning_cls_input_tokens",
            "Tokens per text as the model saw it (after truncation)",
            buckets=exponential_buckets(4, 2, max_length),
            **UNREGISTERED,
        )
        self.truncated = Counter(
            "lightning_cls_truncated_texts",
            "Texts not read to the end (max_length, or the window cap with windows)",
            **UNREGISTERED,
        )
        self.windows = Histogram(
            "lightning_cls_windows_per_text",
            "Windows read per text (1: a text read whole or truncated)",
            buckets=exponential_buckets(1, 2, 64),
            **UNREGISTERED,
        )
        self.abstentions = Counter(
            "lightning_cls_abstentions",
            "Texts answered with abstained: true (top probability below serve --min_confidence)",
            **UNREGISTERED,
        )
        gauge = GAUGE
        self.window_texts = Gauge("lightning_cls_drift_window_texts", "Predictions in the drift window", **gauge)
        self.label_psi = Gauge(
            "lightning_cls_drift_label_psi", "PSI of predicted labels vs the training labels", **gauge
        )
        self.length_psi = Gauge(
            "lightning_cls_drift_length_psi", "PSI of binned token lengths vs the training lengths", **gauge
        )
        self.window_psi = Gauge(
            "lightning_cls_drift_window_psi", "PSI of windows read per text vs the training texts", **gauge
        )
        self.low_confidence = Gauge(
            "lightning_cls_drift_low_confidence_share", "Share of the window below the confidence threshold", **gauge
        )
        self.alert = Gauge(
            "lightning_cls_drift_alert", "1 when a drift signal is over its threshold", ["signal"], **gauge
        )
        self.psi_threshold = Gauge("lightning_cls_drift_psi_threshold", "PSI warning threshold", **gauge)
        self.estimated_accuracy = Gauge(
            "lightning_cls_estimated_accuracy",
            "Mean probability of the predicted label over the drift window (calibrated with the export's "
            "temperature): the accuracy expected without labels; NaN under --min_window",
            **gauge,
        )
        self.psi_threshold.set(window.thresholds.psi_warning)
        self.window_texts.set(0)
        for gauge in (self.label_psi, self.length_psi, self.window_psi, self.low_confidence, self.estimated_accuracy):
            gauge.set(math.nan)  # not computed yet (too few predictions, or no reference)
        self._alerts: set[str] = set()

    def observe(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Record one server batch (keys requests, labels, probabilities, lengths, windows, truncated, abstained);
        returns the drift report of the window."""
        windows = batch.get("windows") or [1] * len(batch["labels"])
        sets = batch.get("label_sets")  # a multi-label model's answers (else each answer is its one label)
        for i, (p, n, w) in enumerate(zip(batch["probabilities"], batch["lengths"], windows, strict=True)):
            for label in sets[i] if sets is not None else [batch["labels"][i]]:
                self.predictions.labels(label).inc()
            self.confidence.observe(p)
            self.tokens.observe(n)
            self.windows.observe(w)
        self.truncated.inc(sum(batch["truncated"]))
        self.abstentions.inc(sum(batch.get("abstained") or []))
        sets_of = {"label_sets": sets, "all_probabilities": batch["all_probabilities"]} if sets is not None else {}
        self.window.add(batch["labels"], batch["probabilities"], batch["lengths"], windows, **sets_of)
        report = self.window.report()
        self.window_texts.set(report["texts"])
        for key, gauge in (
            ("label_psi", self.label_psi),
            ("length_psi", self.length_psi),
            ("window_psi", self.window_psi),
            ("low_confidence_share", self.low_confidence),
            ("estimated_accuracy", self.estimated_accuracy),
        ):
            gauge.set(math.nan if report[key] is None else report[key])
        if self.label_sets is not None:
            self.label_sets.observe(report)
        self._log_alert_changes(report)
        # Counted last: once a batch shows in these counts, every metric it updates is updated (the drift alert
        # gauges included), so a scrape or a test waiting on them never sees half a batch.
        self.batch_requests.observe(batch["requests"])
        self.batch_texts.observe(len(batch["labels"]))
        return report

    def _log_alert_changes(self, report: dict[str, Any]) -> None:
        # Logged when a signal crosses its threshold, not on every batch it stays over it.
        alerts = set(report["alerts"])
        per_label = (LABEL_RATE_SIGNAL,) if LABEL_RATE_SIGNAL in report else ()  # a multi-label window's
        for signal_name in (*PSI_SIGNALS, "low_confidence_share", *per_label):
            self.alert.labels(signal_name).set(float(signal_name in alerts))
        for signal_name in sorted(alerts - self._alerts):
            threshold = report["thresholds"]["psi" if "psi" in signal_name else "low_confidence_share"]
            which = f" (labels {report['label_rate_alerts']})" if signal_name == LABEL_RATE_SIGNAL else ""
            log.warning(
                f"Drift: {signal_name} = {report[signal_name]:.3f}{which} over the last {report['texts']} predictions "
                f"is above its threshold ({threshold})."
            )
        for signal_name in sorted(self._alerts - alerts):
            log.warning(f"Drift: {signal_name} = {report[signal_name]:.3f} is back under its threshold.")
        self._alerts = alerts


@dataclass(frozen=True)
class AccuracySettings:
    """Accuracy monitoring of the service (pickled to the logger process).

    Args:
        validation_accuracy: The export's validation accuracy, the baseline of the accuracy alerts (None: not
            recorded; the gauge is NaN and nothing is compared).
        margin: A drop of the estimated or live accuracy below the validation accuracy larger than this is an alert.
        window: Labelled predictions (POST /feedback) the live accuracy is computed over: the last ones received.
        min_labels: Labelled predictions the window needs before the live gauges are computed (NaN until then).
        validation_micro_f1: A multi-label export's validation micro-F1, the baseline of the micro-F1 alerts (None:
            not recorded, or a single-label model).
    """

    validation_accuracy: float | None = None
    margin: float = 0.05
    window: int = 1000
    min_labels: int = 50
    validation_micro_f1: float | None = None


DEFAULT_ACCURACY = AccuracySettings()


class AccuracyMetrics:
    """Accuracy without labels (estimated from the confidence) and with them (live, from POST /feedback), the
    export's validation accuracy they are compared with and the alert margin; logs when a drop crosses the margin."""

    def __init__(self, settings: AccuracySettings) -> None:
        from prometheus_client import Counter, Gauge

        self.settings = settings
        self.validation = Gauge(
            "lightning_cls_validation_accuracy",
            "Accuracy of the exported model on its validation split, from the export (NaN: not recorded)",
            **GAUGE,
        )
        self.margin = Gauge(
            "lightning_cls_estimated_accuracy_alert_margin",
            "serve --accuracy_alert_margin: an accuracy this far below the validation accuracy is an alert",
            **GAUGE,
        )
        self.live_accuracy = Gauge(
            "lightning_cls_live_accuracy",
            "Accuracy over the last --feedback_window labelled predictions (POST /feedback); NaN under --min_feedback",
            **GAUGE,
        )
        self.live_macro_f1 = Gauge(
            "lightning_cls_live_macro_f1",
            "Macro-F1 over the last --feedback_window labelled predictions; NaN under --min_feedback",
            **GAUGE,
        )
        self.window_texts = Gauge(
            "lightning_cls_feedback_window_texts", "Labelled predictions in the live accuracy window", **GAUGE
        )
        self.labels = Counter(
            "lightning_cls_feedback_labels", "True labels received for this model's predictions", **UNREGISTERED
        )
        valid = settings.validation_accuracy
        self.validation.set(math.nan if valid is None else valid)
        self.margin.set(settings.margin)
        self._dropped: dict[str, bool] = {}
        self.set_live({"rows": 0, "accuracy": None, "macro_f1": None})

    def set_live(self, report: dict[str, Any]) -> None:
        """The live gauges from a `FeedbackWindow` report."""
        self.window_texts.set(report["rows"])
        for key, gauge in (("accuracy", self.live_accuracy), ("macro_f1", self.live_macro_f1)):
            gauge.set(math.nan if report[key] is None else report[key])
        self.check("live", report["accuracy"], f"over the last {report['rows']} labelled predictions")

    def check(self, kind: str, accuracy: float | None, over: str, metric: str = "accuracy") -> None:
        """Log when the ``kind`` (estimated or live) ``metric`` (accuracy, or a multi-label model's micro-F1) drops
        below its validation value by more than the margin, and when it comes back (the alerts of
        deploy/prometheus/rules.yml, for those who read the log)."""
        s = self.settings
        valid, margin = s.validation_micro_f1 if metric == "micro-F1" else s.validation_accuracy, s.margin
        if valid is None or accuracy is None:
            return
        dropped, was = valid - accuracy > margin, self._dropped.get(f"{kind} {metric}", False)
        if dropped and not was:
            log.warning(
                f"Accuracy: {kind} {metric} {accuracy:.3f} {over} is {valid - accuracy:.3f} below the validation "
                f"{metric} {valid:.3f}, more than the margin {margin:g} (serve --accuracy_alert_margin)."
            )
        elif was and not dropped:
            log.warning(
                f"Accuracy: {kind} {metric} {accuracy:.3f} is back within {margin:g} of the validation {metric} "
                f"{valid:.3f}."
            )
        self._dropped[f"{kind} {metric}"] = dropped


class LogMetrics:
    """The prediction log's counts (`prediction_log.PredictionLog`): what was stored, what waits, what was lost."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge

        def counter(name: str, doc: str) -> Any:
            return Counter(f"lightning_cls_prediction_log_{name}", doc, **UNREGISTERED)

        self.stored = counter("stored", "Predictions stored in --feedback_db")
        self.failures = counter("write_failures", "Write attempts that failed (database locked or unwritable)")
        self.spilled = counter("spilled", "Predictions written to the spill file while the database refused writes")
        self.dropped = counter(
            "dropped", "Predictions neither stored nor kept in the spill file (full or unwritable): lost, ids logged"
        )
        self.pending = Gauge(
            "lightning_cls_prediction_log_pending", "Served predictions not stored yet (memory and spill file)", **GAUGE
        )


class LoggerState:
    """What the logger process holds: the prediction and accuracy metrics, the drift and feedback windows, and the
    prediction log (`PredictionLog`: a writer thread that stores every prediction, retrying when the database is
    busy). The logger process's own connection only reads (the new feedback)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        s = settings
        self.task = s["task"]  # what the answers are (one label or a label set), how feedback on them is scored
        self.accuracy_settings: AccuracySettings = s["accuracy"]
        a = self.accuracy_settings
        self.label_sets = None
        if self.task.multi_label:  # per-label gauges beside the common ones
            from lightning_cls.serving.label_metrics import LabelSetMetrics

            self.label_sets = LabelSetMetrics(self.task.names, s["reference"], a.validation_micro_f1)
        window = drift_window(self.task, s["reference"], **s["window"])
        self.predictions = PredictionMetrics(
            self.task.names, s["max_batch_size"], s["max_length"], window, self.label_sets
        )
        self.accuracy = AccuracyMetrics(a)
        self.feedback = FeedbackWindow(self.task, a.window, a.min_labels)
        # By version and role, for two models in one service (`version_metrics`).
        self.versions = VersionMetrics(self.task, a.window, a.min_labels)
        self.store_settings: StoreSettings | None = s["store"]
        self.store: FeedbackStore | None = None
        self.log: PredictionLog | None = None
        self._feedback_seq = 0  # the last feedback row read from the database
        # The logger's messages and the feedback poll (`FEEDBACK_POLL`) take turns on the windows and gauges.
        self.lock = threading.RLock()
        self._since_prune, self._last_prune = 0, -math.inf  # the first write applies the bound
        # The version whose answers the unlabelled live gauges read: the flags' at start, then as workers report.
        self.champion = self.store_settings.model_version if self.store_settings is not None else None
        if self.store_settings is not None:
            st = self.store_settings
            self.store = FeedbackStore(st.path, setup=False)  # reads only; `serve` made the tables
            self.log = PredictionLog(st.path, s.get("log") or LogSettings(), LogMetrics(), self._after_write)
            self.refresh_feedback(count=False)  # after a restart: the stored feedback on this model's predictions
        self._stop = threading.Event()
        if self.store is not None and s.get("feedback_poll"):
            poll = threading.Thread(target=self._poll_feedback, args=(s["feedback_poll"],), daemon=True)
            poll.start()

    def _poll_feedback(self, every: float) -> None:
        while not self._stop.wait(every):
            self.refresh_feedback()

    def on_batch(self, batch: dict[str, Any]) -> None:
        with self.lock:
            self._on_batch(batch)

    def _on_batch(self, batch: dict[str, Any]) -> None:
        if self.log is not None:  # first: POST /feedback may be waiting for these ids
            st = self.store_settings
            self.log.add(FeedbackStore.rows_of(batch, st.model_version, st.temperature))
        report = self.predictions.observe(batch)
        self.versions.batch(batch)
        over = f"over the last {report['texts']} predictions"
        self.accuracy.check("estimated", report["estimated_accuracy"], over)
        if self.label_sets is not None:
            self.accuracy.check("estimated", report["estimated_micro_f1"], over, metric="micro-F1")
        self.refresh_feedback()

    def on_shadow(self, value: dict[str, Any]) -> None:
        """A shadow's answers (`router.ShadowRunner`): stored beside the answers they shadow, and compared."""
        with self.lock:
            if self.log is not None:
                self.log.add(FeedbackStore.shadow_rows_of(value))
            self.versions.shadow(value)

    def deployed(self, value: dict[str, Any]) -> None:
        """A worker switched models (`serving.deployment`): the roles, and the champion the live gauges read."""
        with self.lock:
            self.versions.deployed(value)
            self.champion = next(v for v, role in value["roles"].items() if role == "champion")

    def close(self) -> None:
        """At a stop: the prediction log stores what it holds (or spills it for the next start)."""
        self._stop.set()
        if self.log is not None:
            self.log.close()
        if self.store is not None:
            self.store.close()

    def refresh_feedback(self, count: bool = True) -> None:
        """Read the feedback rows stored since the last look (an indexed range: cheap when there are none). The
        unlabelled live gauges read the answers returned by the champion (`champion`: the version the workers
        report; at start the flags'); the by-version gauges every version's, shadow answers included."""
        if self.store is None:
            return
        with self.lock:
            self._refresh_feedback(count)

    def _refresh_feedback(self, count: bool) -> None:
        try:
            answers, self._feedback_seq = self.store.answers_since(self._feedback_seq, self.accuracy_settings.window)
        except StoreError as err:
            log.error(f"Could not read the feedback from {err}")
            return
        self.versions.feedback(answers)
        pairs = [(a.predicted, a.true) for a in answers if a.answered and a.version == self.champion]
        if pairs or not count:
            self.feedback.add(pairs)
            if count:
                self.accuracy.labels.inc(len(pairs))
            report = self.feedback.report()
            self.accuracy.set_live(report)
            if self.label_sets is not None:
                self.label_sets.set_live(report)
                over = f"over the last {report['rows']} labelled predictions"
                self.accuracy.check("live", report["micro_f1"], over, metric="micro-F1")

    def _after_write(self, store: FeedbackStore, stored: int) -> None:
        """In the prediction log's writer thread, after each write: the retention bound, every 1% of it (the table
        may exceed it by that much between prunes) and at least every minute, and only when nothing waits (a
        prediction waiting to be stored must not be older than the retention front, see `http.FeedbackEndpoint`)."""
        st = self.store_settings
        self._since_prune += stored
        due = self._since_prune >= max(1, st.max_rows // 100) or time.monotonic() - self._last_prune >= PRUNE_EVERY
        if not due or self.log.pending():
            return
        deleted = store.prune(st.max_rows, st.max_days)
        if deleted:
            log.info(f"Feedback database: deleted the {deleted} oldest predictions (retention bound).")
        self._since_prune, self._last_prune = 0, time.monotonic()


# ------------------------------------------------------------------------------------------------ the logger process
class MonitoringLogger(ls.Logger):
    """LitServe logger: runs in its own process, fed one message per server batch by the inference worker, and one
    per POST /feedback that stored labels by the HTTP server.

    Keeping the metrics, the drift window and the database writes here keeps them off the inference path, and gives
    one window for all inference workers. The instance is pickled to that process: it holds only plain settings,
    and builds its `LoggerState` there on the first message (the worker sends "start" once its model is loaded).
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
        store: StoreSettings | None = None,
        accuracy: AccuracySettings = DEFAULT_ACCURACY,
        prediction_log: LogSettings | None = None,
        task: Task | None = None,
    ) -> None:
        super().__init__()
        window = {"size": window_size, "min_texts": min_window, "thresholds": thresholds}
        # check the settings here, not in the other process
        task = task or SingleLabel(tuple(names))
        DriftWindow(names, reference, **window)
        FeedbackWindow(task, accuracy.window, accuracy.min_labels)
        self.settings = {
            "task": task,
            "reference": reference,
            "max_batch_size": max_batch_size,
            "max_length": max_length,
            "window": window,
            "store": store,
            "accuracy": accuracy,
            "log": prediction_log,
            "feedback_poll": FEEDBACK_POLL,
        }
        self._monitor: LoggerState | None = None

    def process(self, key: str, value: Any) -> None:
        if key == "stop":  # sent by the main process at a stop, after the last batch (`server.Server`)
            if self._monitor is not None:
                self._monitor.close()  # the prediction log stores what it holds
            sys.exit(0)  # out of LitServe's loop (it catches Exception only): exit status 0, no traceback
        if self._monitor is None:
            # Ctrl+C reaches every process of the terminal, and some supervisors send SIGTERM to every process of
            # the service: this one stops when the main process tells it to, after the last batch (its prediction
            # log must be flushed), or is killed by it.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            parent = logging.getLogger("lightning_cls.serving")
            if not parent.handlers:  # a spawned process: make the drift and prediction log warnings visible
                handler = logging.StreamHandler()
                handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
                parent.addHandler(handler)
                parent.setLevel(logging.INFO)
            self._monitor = LoggerState(self.settings)
        if key == "batch":
            self._monitor.on_batch(value)
        elif key == "feedback":
            self._monitor.refresh_feedback()
        elif key == "shadow":
            self._monitor.on_shadow(value)
        elif key == "shadow_dropped":
            self._monitor.versions.shadow_dropped(value)
        elif key == "deployed":  # a worker switched models (`serving.deployment`)
            self._monitor.deployed(value)
