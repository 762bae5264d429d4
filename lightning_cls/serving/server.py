"""The main process of the service: `ServeSettings`, `build_server` (the LitServer with its API, middlewares,
logger and /metrics) and the `python -m lightning_cls serve` command.

Endpoints: POST /predict, POST /feedback (true labels for served predictions), GET /health (LitServe's: 200 once
the model is loaded), GET /info (LitServe's, with the model's metadata and these settings), GET /metrics
(Prometheus, merged over all processes).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import signal
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import litserve as ls
import torch

from lightning_cls.arg_parser import run_command
from lightning_cls.data.tokenization import padded_width
from lightning_cls.data.windows import WindowSpec
from lightning_cls.database import absolute
from lightning_cls.errors import ConfigError, InputError
from lightning_cls.export.folder import ExportMetadata, export_temperature, read_export_metadata
from lightning_cls.export.runtime import (
    DEFAULT_AGREEMENT_GATE,
    DEFAULT_MAX_BATCH_TOKENS,
    DEFAULT_MAX_F1_DROP,
    DEFAULT_MAX_PADDING,
    Backend,
    Gate,
    InferenceSettings,
    Precision,
    choose,
)
from lightning_cls.hardware import detect_hardware
from lightning_cls.monitoring.drift import DriftThresholds
from lightning_cls.serving.api import ClassifierAPI
from lightning_cls.serving.deployment import (
    DEPLOYMENT_PATH,
    MODES,
    DeploymentEndpoint,
    check_compatible,
    resolve_slot,
    start_deployment,
)
from lightning_cls.serving.gauges import collect_metrics, enable_multiprocess_metrics
from lightning_cls.serving.http import (
    FEEDBACK_PATH,
    PREDICT_PATH,
    ApiKeyGuard,
    FeedbackEndpoint,
    MetricsMiddleware,
    RequestGuard,
)
from lightning_cls.serving.info import Resolved, RunSettings, service_info
from lightning_cls.serving.metrics import AccuracySettings, MonitoringLogger
from lightning_cls.serving.pages import KEYED_PATHS, build_pages
from lightning_cls.serving.prediction_log import LogSettings, spill_path_for
from lightning_cls.store.feedback_store import FeedbackStore, StoreSettings

log = logging.getLogger(__name__)


@dataclass
class ServeSettings:
    """Settings of the service; each field is a flag of `python -m lightning_cls serve` (the drift thresholds too,
    as --low_confidence, --psi_warning and --low_confidence_warning).

    Args:
        model_dir: Folder written by `python -m lightning_cls export` (HF model + tokenizer + lightning_cls.json), or
            a registered version: `models:/NAME@ALIAS` (e.g. models:/subjects@champion) or `models:/NAME/VERSION`
            (`lifecycle.registry`; downloaded once into runs/mlflow/cache). /info says which version serves.
        registry_uri: The MLflow registry of a `models:/` model_dir (default: $MLFLOW_TRACKING_URI, else the
            embedded sqlite:///runs/mlflow/mlflow.db).
        challenger: A second model beside the champion (--model_dir): an export folder or a registry reference, with
            the same labels. It answers --challenger_share of the requests as a canary, or sees a copy of that share
            in shadow (its answers stored and compared, never returned). POST /deployment changes both without a
            restart (promote, rollback, set); every answer says its model_version. See docs/lifecycle.md.
        challenger_mode: shadow or canary.
        challenger_share: Share of the requests the challenger sees (shadow) or answers (canary, sticky per
            "client_id" when a request gives one).
        keep_texts: Store each prediction's text in --feedback_db beside its answer (off by default: texts are
            never stored otherwise), so that labelled feedback can be trained on (`fit --data.feedback_db`).
        host: Interface to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
        port: TCP port.
        max_batch_size: Most requests the server batches into one forward pass (1: no batching).
        batch_timeout: Seconds the server waits for more requests to fill a batch (LitServe waits this long for
            every batch that is not full, so it is added to the latency of a lone request).
        max_texts: Most texts one request may carry in "texts"; more is a 422.
        max_body_bytes: Largest request body accepted; larger is a 413.
        top_k: Labels listed per text unless the request says "top_k".
        precision: auto (the fastest variant this hardware runs well that passes --gate, by the measurements
            recorded at export on the validation split; else fp32), fp32, bf16, fp16 (torch backend) or int8 (onnx
            backend: model.int8.onnx, from `export --format onnx --quantize int8`). /info says what runs and why.
        backend: auto (the default: with --precision auto, the fastest variant of either backend that passes --gate;
            with an explicit precision, the backend it runs on: int8 on onnx, the others on torch), torch (the
            folder's safetensors weights) or onnx (ONNX Runtime on model.opt.onnx or model.onnx, from `export
            --format onnx`).
        max_batch_tokens: Most tokens per forward pass, padding included (rows x padded length); sequences (texts,
            or windows of long texts) run longest first, and on a CPU a pass carries at most 24 padding tokens (a
            burst of short queries and long abstracts runs as two passes). Default: 4096 on a CPU, 32768 on a GPU.
        agreement_gate: Least share of labels identical to fp32's (measured at export) for `auto` to use a lower
            precision, with --gate agreement.
        gate: What `auto` judges a faster variant by: macro_f1 (validation macro-F1 recorded at export at most
            --max_f1_drop below fp32's) or agreement (--agreement_gate). /info shows each variant's verdict.
        max_f1_drop: With --gate macro_f1: most validation macro-F1 a faster variant may lose (0.005: half a point).
        max_windows: A text longer than the model's window is read as up to this many overlapping windows, and
            answered with their mean logits (1: truncated at the window; default: as the model was trained, from
            the export, else 1). Each answer says how many windows were read and whether the cap cut the text.
        window_stride: Text tokens between the starts of consecutive windows (default: the export's, else three
            quarters of a window).
        window_size: Predictions in the sliding window compared with the training reference (drift gauges).
        min_window: Predictions the window needs before the drift gauges are computed (NaN until then).
        accelerator: cpu, cuda, mps or auto (LitServe picks).
        workers_per_device: Inference worker processes per device.
        num_threads: Torch threads per inference worker (default: the cores divided by the workers).
        timeout: Seconds a request may wait for its answer before a 504.
        metrics_dir: Folder for the multiprocess Prometheus files (emptied at start; default: a temporary folder).
        log_level: Uvicorn log level (info logs every request; warning does not).
        use_temperature: Answer with calibrated probabilities, softmax(logits / T) or each label's
            sigmoid(logits / T), when the export has a temperature T (false: the plain softmax or sigmoids). Labels
            and label sets are the same either way.
        min_confidence: An answer whose probability is below this keeps its label and probabilities and says
            "abstained": true (counted in lightning_cls_abstentions_total); default: never abstain.
        feedback_db: SQLite file, or PostgreSQL URL (postgresql://user@host:port/db, for replicas that share one
            truth), where the predictions (never the texts), the true labels sent to POST /feedback and the
            deployments are kept, across restarts (created if needed). Default: a temporary SQLite file, deleted when
            the server stops.
        feedback_retention: Most predictions kept in --feedback_db; the oldest, with their feedback, are deleted.
        feedback_retention_days: Also delete predictions older than this many days (default: no age limit).
        feedback_window: Labelled predictions the live accuracy and macro-F1 are computed over (the last received).
        min_feedback: Labelled predictions needed before the live accuracy gauges are computed (NaN until then).
        feedback_wait: Seconds POST /feedback waits for prediction ids not stored yet (they are written by the
            logger process, a moment after the answer) before answering 404 for them.
        accuracy_alert_margin: The estimated or live accuracy this far below the export's validation accuracy is an
            alert (a warning in the log; the Prometheus rules read the same margin from /metrics).
        api_key_env: Name of the environment variable holding the API key. When that variable is set (and not
            empty), POST /predict and POST /feedback need `Authorization: Bearer <key>` (401 otherwise); /health
            stays open. The key itself is never a command-line value (command lines are visible to every user of
            the machine).
        metrics_need_key: With an API key, GET /metrics needs it too (a Prometheus scrape then sends it).
        drain_timeout: At a stop (SIGTERM or Ctrl+C), seconds the HTTP server waits for the requests in flight to be
            answered (it takes no new ones meanwhile); the prediction log then gets up to 5 s to store what it holds.
        drift: When a drift signal of the window is an alert (a warning in the log).
    """

    model_dir: str
    registry_uri: str | None = None
    challenger: str | None = None
    challenger_mode: str = "shadow"
    challenger_share: float = 0.1
    keep_texts: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 16
    batch_timeout: float = 0.002
    max_texts: int = 64
    max_body_bytes: int = 1_000_000
    top_k: int = 3
    precision: Precision = "auto"
    backend: Backend = "auto"
    max_batch_tokens: int | None = None
    agreement_gate: float = DEFAULT_AGREEMENT_GATE
    gate: Gate = "macro_f1"
    max_f1_drop: float = DEFAULT_MAX_F1_DROP
    max_windows: int | None = None
    window_stride: int | None = None
    window_size: int = 1000
    min_window: int = 100
    accelerator: str = "auto"
    workers_per_device: int = 1
    num_threads: int | None = None
    timeout: float = 30.0
    metrics_dir: str | None = None
    log_level: str = "info"
    use_temperature: bool = True
    min_confidence: float | None = None
    feedback_db: str | None = None
    feedback_retention: int = 1_000_000
    feedback_retention_days: float | None = None
    feedback_window: int = 1000
    min_feedback: int = 50
    feedback_wait: float = 2.0
    accuracy_alert_margin: float = 0.05
    api_key_env: str = "LIGHTNING_CLS_API_KEY"
    metrics_need_key: bool = False
    drain_timeout: float = 20.0
    drift: DriftThresholds = field(default_factory=DriftThresholds)


def default_threads(workers: int) -> int:
    """Torch threads per inference worker: the cores shared by the workers. On a model of realistic size the
    forward pass is the work: measured here (2 cores, MiniLM, real abstracts), one worker with 2 threads served
    1.2-1.4x the requests of one with a single thread (leaving a core to the HTTP server), at every concurrency.
    (On the tiny quickstart model, where a request's overhead outweighs its forward pass, 1 thread did better:
    `--num_threads` sets it.)"""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // workers)


def validation_accuracy(meta: ExportMetadata) -> float | None:
    """The export's accuracy on its validation split, the baseline of the accuracy alerts: recorded by calibration
    (`calibration.accuracy`, on the split the temperature was fitted on), else a top-level `validation_accuracy`;
    None when neither is there."""
    calibration = getattr(meta, "calibration", None) or meta.extra.get("calibration") or {}
    if calibration.get("split", "validation") == "validation" and calibration.get("accuracy") is not None:
        return float(calibration["accuracy"])
    value = meta.extra.get("validation_accuracy")
    return float(value) if value is not None else None


def validation_micro_f1(meta: ExportMetadata) -> float | None:
    """A multi-label export's micro-F1 on its validation split, the baseline of the micro-F1 alerts: a `micro_f1`
    recorded with the validation scores (`calibration`), else a top-level `validation_micro_f1`; None when neither."""
    calibration = getattr(meta, "calibration", None) or meta.extra.get("calibration") or {}
    if calibration.get("split", "validation") == "validation" and calibration.get("micro_f1") is not None:
        return float(calibration["micro_f1"])
    value = meta.extra.get("validation_micro_f1")
    return float(value) if value is not None else None


def check_settings(s: ServeSettings, num_labels: int) -> None:
    """Every bad setting at once, in one error naming the flags."""
    problems = []
    if not 1 <= s.top_k <= num_labels:
        problems.append(f"--top_k must be from 1 to the number of labels ({num_labels}), got {s.top_k}")
    if s.min_confidence is not None and not 0 < s.min_confidence <= 1:
        problems.append(f"--min_confidence must be in (0, 1], got {s.min_confidence}")
    if s.feedback_retention < 1:
        problems.append(f"--feedback_retention must be at least 1 prediction, got {s.feedback_retention}")
    if s.feedback_retention_days is not None and not s.feedback_retention_days > 0:
        problems.append(f"--feedback_retention_days must be positive, got {s.feedback_retention_days}")
    if not 1 <= s.min_feedback <= s.feedback_window:
        problems.append(
            f"--min_feedback must be from 1 to --feedback_window, got {s.min_feedback} and {s.feedback_window}"
        )
    if not s.drain_timeout > 0:
        problems.append(f"--drain_timeout must be positive, got {s.drain_timeout}")
    if not s.feedback_wait >= 0:
        problems.append(f"--feedback_wait must be at least 0 seconds, got {s.feedback_wait}")
    if not 0 <= s.accuracy_alert_margin <= 1:
        problems.append(f"--accuracy_alert_margin must be in [0, 1], got {s.accuracy_alert_margin}")
    if s.challenger_mode not in MODES:
        problems.append(f"--challenger_mode must be one of {list(MODES)}, got {s.challenger_mode!r}")
    if not 0 <= s.challenger_share <= 1:
        problems.append(f"--challenger_share must be from 0 to 1, got {s.challenger_share}")
    if problems:
        raise InputError("; ".join(problems) + ".")


def effective_batching(s: ServeSettings, device: str, max_length: int) -> dict[str, Any]:
    """The batching values the workers use, defaults resolved as `inference.Runner` resolves them (for /info)."""
    kind = "cuda" if device == "cuda" else "cpu"
    default = max(DEFAULT_MAX_BATCH_TOKENS[kind], padded_width(max_length, 8 if kind == "cuda" else 1))
    return {
        "max_batch_size": s.max_batch_size,  # requests per server batch
        "batch_timeout": s.batch_timeout,
        "max_batch_tokens": s.max_batch_tokens or default,  # tokens per forward pass, padding included
        "max_batch_tokens_from": "--max_batch_tokens" if s.max_batch_tokens else f"the {kind} default",
        "max_padding_tokens": DEFAULT_MAX_PADDING[kind],  # per forward pass (None: no bound)
    }


class Server(ls.LitServer):
    """A LitServer whose stop loses nothing served: in order, the HTTP servers stop taking requests and answer those in
    flight (up to ``drain_timeout`` s), the inference workers end, the logger process stores the predictions it
    holds (`prediction_log`) and exits, and only then does the multiprocessing manager (which holds the queues) go.

    LitServe 0.2.19's own stop ends the processes in another order and shuts the manager down under its monitoring
    thread (a `BrokenPipeError` traceback one stop in two) and under the logger process (which lost its queue).
    """

    def __init__(self, *args: Any, drain_timeout: float = 20.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.uvicorn_graceful_timeout = drain_timeout  # uvicorn's timeout_graceful_shutdown
        self.monitor_internal = 0.5  # how often LitServe's monitoring thread looks: it must end before the manager
        self._stop_lock, self._stopped = threading.Lock(), False
        self._monitoring: threading.Thread | None = None
        self._loggers: list = []

    def _init_manager(self, num_api_servers: int) -> Any:
        # LitServe starts the manager and its logger process here without keeping the latter: find it.
        before = set(mp.active_children())
        manager = super()._init_manager(num_api_servers)
        self._loggers = [p for p in mp.active_children() if p not in before and p is not manager._process]
        return manager

    def _start_worker_monitoring(self, manager: Any, uvicorn_workers: dict) -> None:
        super()._start_worker_monitoring(manager, uvicorn_workers)
        self._monitoring = next((t for t in threading.enumerate() if t.name == "litserve-monitoring"), None)

    def _perform_graceful_shutdown(self, manager: Any, uvicorn_workers: dict, shutdown_reason: str = "normal") -> None:
        with self._stop_lock:  # the monitoring thread may call it too (a worker died)
            if self._stopped:
                return
            self._stopped = True
            log.info(f"Stopping ({shutdown_reason}): answering the requests in flight, then storing the predictions.")
            # The main thread's connection to the manager may have been cut mid-call by the signal: set the event
            # from a fresh thread (a connection of its own), so the monitoring thread ends its loop.
            setter = threading.Thread(target=self._shutdown_event.set, daemon=True)
            setter.start()
            setter.join(2)
            if self._monitoring is not None and self._monitoring is not threading.current_thread():
                self._monitoring.join(self.monitor_internal + 2)
            for worker in uvicorn_workers.values():  # SIGTERM: uvicorn closes its socket, answers what is in flight
                if worker.is_alive():
                    worker.terminate()
            for worker in uvicorn_workers.values():
                _end(worker, self.uvicorn_graceful_timeout + 5, "HTTP server")
            for worker in self.inference_workers:  # idle now: every request was answered or timed out
                if worker.is_alive():
                    worker.terminate()
                _end(worker, 5, "inference worker")
            self._stop_logger()
            self._transport.close(send_sentinel=False)
            manager.shutdown()

    def _stop_logger(self) -> None:
        """Every batch's message is on the logger queue by now (a worker sends it before the answers): "stop" goes
        after them, and the logger process stores what it holds before it exits."""
        loggers = [p for p in self._loggers if p.is_alive()]
        if not loggers or self.logger_queue is None:
            return
        try:
            self.logger_queue.put(("stop", None))
        except Exception as err:  # the manager is gone: nothing more can reach the logger process
            log.error(f"Could not tell the logger process to stop: {err}")
        for process in loggers:
            _end(process, LogSettings().stop_timeout + LogSettings().write_timeout + 10, "logger process")


def _end(process: Any, timeout: float, what: str) -> None:
    """Join a process; kill it if it is still there after ``timeout`` s (logged: it was told to stop and did not)."""
    process.join(timeout)
    if process.is_alive():
        log.warning(f"The {what} (PID {process.pid}) did not stop within {timeout:.0f} s: killed.")
        process.kill()
        process.join(5)


def build_server(settings: ServeSettings, temporary_db: bool = False) -> ls.LitServer:
    """The LitServer for an exported model folder; call `.run()` to serve (`serve` does, with host and port).
    ``settings.feedback_db`` must be set (`serve` picks a temporary file when the flag is not given, and says so
    with ``temporary_db``)."""
    s = settings
    if s.feedback_db is None:
        raise ConfigError("build_server needs settings.feedback_db (serve() picks a temporary file without one).")
    # A folder, or a registered version: its export, downloaded (once) from the registry.
    champion = resolve_slot(s.model_dir, s.registry_uri)
    registered = champion.registry
    if registered:
        log.info(f"{s.model_dir}: version {registered['version']} of {registered['name']!r}, from {champion.model_dir}")
    s = dataclasses.replace(s, model_dir=champion.model_dir)
    meta = read_export_metadata(s.model_dir)
    names, max_length = meta.labels, int(meta.max_length)
    reference = meta.reference.to_dict() if meta.reference is not None else None
    check_settings(s, len(names))
    exported_temperature = export_temperature(meta)
    temperature = exported_temperature if s.use_temperature else None
    valid_accuracy = validation_accuracy(meta)
    task = meta.task(s.use_temperature)  # one label or a label set: how feedback is read and scored
    multi_label = task.multi_label
    version = champion.version
    challenger = None
    if s.challenger is not None:
        challenger = resolve_slot(s.challenger, s.registry_uri)
        check_compatible(names, multi_label, challenger)
    # Create or check the database now (a bad path fails here, not in a process), record the models and the
    # deployment the workers start from, and read the key of the prediction ids (`prediction_log.IdIssuer`): the
    # worker tags ids with it, POST /feedback checks them.
    db = FeedbackStore(s.feedback_db)
    try:
        for slot in (champion, challenger):
            if slot is not None:
                db.register_model(slot.version, names, slot.model_dir)
        id_key = db.id_key()
    finally:
        db.close()
    start_deployment(s.feedback_db, champion, challenger, s.challenger_mode, s.challenger_share)
    num_threads = s.num_threads or default_threads(s.workers_per_device)
    inference = InferenceSettings(s.precision, s.backend, s.max_batch_tokens, s.agreement_gate, s.gate, s.max_f1_drop)
    inference.check(s.model_dir, max_length)  # one line naming every bad flag, before any worker starts
    device = "cuda" if s.accelerator == "cuda" or (s.accelerator == "auto" and torch.cuda.is_available()) else "cpu"
    choice = choose(inference, detect_hardware(device), meta.inference, s.model_dir, students=True)  # as the workers
    windows = WindowSpec(
        max_length,
        s.max_windows if s.max_windows is not None else meta.max_windows,
        s.window_stride if s.window_stride is not None else meta.window_stride,
    )
    api = ClassifierAPI(
        s.model_dir,
        s.max_batch_size,
        s.batch_timeout,
        inference,
        num_threads,
        windows.max_windows,
        windows.stride,
        min_confidence=s.min_confidence,
        id_key=id_key,
        use_temperature=s.use_temperature,
        deployment_db=absolute(s.feedback_db),
        keep_texts=s.keep_texts,
    )
    paths = [PREDICT_PATH, FEEDBACK_PATH, DEPLOYMENT_PATH, "/health", "/info", "/metrics"]
    guard = {
        "max_body_bytes": s.max_body_bytes,
        "max_texts": s.max_texts,
        "num_labels": len(names),
        "default_top_k": s.top_k,
        "path": PREDICT_PATH,
    }
    key = os.environ.get(s.api_key_env) or None  # read here, in the main process; never logged nor shown
    # /feedback changes state: it needs the key whenever there is one.
    protected = [PREDICT_PATH, FEEDBACK_PATH, DEPLOYMENT_PATH] + (["/metrics"] if s.metrics_need_key else [])
    protected += KEYED_PATHS  # the pages' JSON that shows texts or the store (the pages themselves stay open)
    # Added in order, each around the previous: the key is checked before the body is read, and the metrics see
    # both kinds of rejection.
    middlewares = [(RequestGuard, guard)] + ([(ApiKeyGuard, {"key": key, "paths": protected})] if key else [])
    middlewares += [(MetricsMiddleware, {"paths": paths})]
    drift = {"window_size": s.window_size, "min_window": s.min_window, **asdict(s.drift)}
    accuracy = AccuracySettings(
        valid_accuracy,
        s.accuracy_alert_margin,
        s.feedback_window,
        s.min_feedback,
        validation_micro_f1(meta) if multi_label else None,
    )
    store = StoreSettings(
        absolute(s.feedback_db),
        version,
        s.feedback_retention,
        s.feedback_retention_days,
        temperature,
        str(Path(s.model_dir).resolve()),
    )
    if temperature is None:
        why = "--use_temperature false" if exported_temperature is not None else "the export has no temperature"
        log.warning(
            f"Probabilities are not calibrated ({why}): lightning_cls_estimated_accuracy, their mean, is likely "
            "above the real accuracy. `python -m lightning_cls calibrate` fits a temperature."
        )
    batching = effective_batching(s, device, max_length)
    info = service_info(
        s,
        meta,
        Resolved(
            settings.model_dir, registered, champion.version, challenger, windows, temperature, exported_temperature
        ),
        RunSettings(accuracy, store, batching, num_threads, choice, inference, protected if key else None, drift),
        temporary_db,
    )
    server = Server(
        api,
        drain_timeout=s.drain_timeout,
        accelerator=s.accelerator,
        workers_per_device=s.workers_per_device,
        timeout=s.timeout,
        model_metadata=info,
        middlewares=middlewares,
        loggers=MonitoringLogger(
            names,
            reference,
            s.max_batch_size,
            max_length * windows.max_windows,
            s.window_size,
            s.min_window,
            s.drift,
            store=store,
            accuracy=accuracy,
            prediction_log=LogSettings(spill_path=str(spill_path_for(s.feedback_db, str(s.port)))),
            task=task,
        ),
    )

    def feedback_arrived(count: int) -> None:
        # Called in the HTTP server process (forked after `run` made the queue): the logger process owns the gauges.
        if server.logger_queue is not None:
            server.logger_queue.put(("feedback", count))

    feedback = FeedbackEndpoint(store.path, task, s.max_body_bytes, s.feedback_wait, feedback_arrived, id_key)
    server.app.add_api_route(FEEDBACK_PATH, feedback.handle, methods=["POST"], response_model=None)
    deployment = DeploymentEndpoint(store.path, names, multi_label, s.registry_uri, keyed=key is not None)
    server.app.add_api_route(DEPLOYMENT_PATH, deployment.handle_get, methods=["GET"], response_model=None)
    server.app.add_api_route(DEPLOYMENT_PATH, deployment.handle_post, methods=["POST"], response_model=None)
    limits = {"max_texts": s.max_texts, "default_top_k": s.top_k}
    page_settings = {"alert_margin": s.accuracy_alert_margin, "drift": s.drift, "keyed": key is not None}
    page_settings["window"] = (s.window_size, s.min_window)  # the review's drift reason reads the drift gauges' window
    pages = build_pages(meta, store.path, s.keep_texts, valid_accuracy, limits=limits, **page_settings)
    pages.install(server.app)  # Tag, Review and Model at /, /review, /model (`serving.pages`)

    @server.app.get("/metrics")
    def metrics() -> Any:
        from fastapi import Response

        body, content_type = collect_metrics()
        return Response(body, media_type=content_type)

    return server


def serve(settings: ServeSettings) -> None:
    """Serve an exported model: POST /predict, POST /feedback, GET /health, /info and /metrics (Prometheus)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    temporary = None if settings.metrics_dir else tempfile.TemporaryDirectory(prefix="lightning_cls_metrics_")
    scratch = None if settings.feedback_db else tempfile.TemporaryDirectory(prefix="lightning_cls_feedback_")
    try:
        enable_multiprocess_metrics(settings.metrics_dir or temporary.name)
        if scratch is not None:
            settings = dataclasses.replace(settings, feedback_db=str(Path(scratch.name) / "feedback.sqlite3"))
            log.warning(
                f"No --feedback_db: predictions and feedback go to {settings.feedback_db}, deleted when the server "
                "stops. Give --feedback_db PATH to keep them across restarts."
            )
        server = build_server(settings, temporary_db=scratch is not None)
        # SIGTERM (kill, docker stop) takes the graceful path of Ctrl+C (`Server`'s stop); a second signal while it
        # runs is ignored (it would interrupt the stop halfway, with a traceback).
        main_pid, stopping = os.getpid(), []

        def interrupt(signum: int, frame: Any) -> None:
            if os.getpid() != main_pid:  # a forked HTTP server inherited this handler: end as by default
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)
                return
            if not stopping:
                stopping.append(signum)
                raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, interrupt)
        signal.signal(signal.SIGINT, interrupt)
        server.run(host=settings.host, port=settings.port, log_level=settings.log_level, generate_client_file=False)
    finally:
        for folder in (temporary, scratch):
            if folder is not None:
                folder.cleanup()


def main(argv: list[str]) -> None:
    """`python -m lightning_cls serve --model_dir DIR [--port 8000] ...`: flat flags, as users type them
    (--psi_warning, not --drift.psi_warning)."""
    run_command(serve, argv, "serve", config_file=True)
