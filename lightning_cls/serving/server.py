"""The main process of the service: `ServeSettings`, `build_server` (the LitServer with its API, middlewares,
logger and /metrics) and the `python -m lightning_cls serve` command.

Endpoints: POST /predict, GET /health (LitServe's: 200 once the model is loaded), GET /info (LitServe's, with the
model's metadata and these settings), GET /metrics (Prometheus, merged over all processes).
"""

from __future__ import annotations

import inspect
import os
import signal
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import litserve as ls

from lightning_cls import __version__
from lightning_cls.drift import DriftThresholds
from lightning_cls.errors import InputError
from lightning_cls.export_format import read_export_metadata
from lightning_cls.serving.api import ClassifierAPI
from lightning_cls.serving.http import PREDICT_PATH, ApiKeyGuard, MetricsMiddleware, RequestGuard
from lightning_cls.serving.metrics import MonitoringLogger, StopMonitoring, collect_metrics, enable_multiprocess_metrics

PROG = "python -m lightning_cls serve"


@dataclass
class ServeSettings:
    """Settings of the service; each field is a flag of `python -m lightning_cls serve` (the drift thresholds too,
    as --low_confidence, --psi_warning and --low_confidence_warning).

    Args:
        model_dir: Folder written by `python -m lightning_cls export` (HF model + tokenizer + lightning_cls.json).
        host: Interface to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
        port: TCP port.
        max_batch_size: Most requests the server batches into one forward pass (1: no batching).
        batch_timeout: Seconds the server waits for more requests to fill a batch (LitServe waits this long for
            every batch that is not full, so it is added to the latency of a lone request).
        max_texts: Most texts one request may carry in "texts"; more is a 422.
        max_body_bytes: Largest request body accepted; larger is a 413.
        top_k: Labels listed per text unless the request says "top_k".
        forward_batch_size: Most texts per forward pass (a large batch of requests is cut into chunks).
        window_size: Predictions in the sliding window compared with the training reference (drift gauges).
        min_window: Predictions the window needs before the drift gauges are computed (NaN until then).
        accelerator: cpu, cuda, mps or auto (LitServe picks).
        workers_per_device: Inference worker processes per device.
        num_threads: Torch threads per inference worker (default: the cores divided by workers + 1).
        timeout: Seconds a request may wait for its answer before a 504.
        metrics_dir: Folder for the multiprocess Prometheus files (emptied at start; default: a temporary folder).
        log_level: Uvicorn log level (info logs every request; warning does not).
        api_key_env: Name of the environment variable holding the API key. When that variable is set (and not
            empty), POST /predict needs `Authorization: Bearer <key>` (401 otherwise); /health stays open. The key
            itself is never a command-line value (command lines are visible to every user of the machine).
        metrics_need_key: With an API key, GET /metrics needs it too (a Prometheus scrape then sends it).
        drift: When a drift signal of the window is an alert (a warning in the log).
    """

    model_dir: str
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 16
    batch_timeout: float = 0.002
    max_texts: int = 64
    max_body_bytes: int = 1_000_000
    top_k: int = 3
    forward_batch_size: int = 64
    window_size: int = 1000
    min_window: int = 100
    accelerator: str = "auto"
    workers_per_device: int = 1
    num_threads: int | None = None
    timeout: float = 30.0
    metrics_dir: str | None = None
    log_level: str = "info"
    api_key_env: str = "LIGHTNING_CLS_API_KEY"
    metrics_need_key: bool = False
    drift: DriftThresholds = field(default_factory=DriftThresholds)


def default_threads(workers: int) -> int:
    """Torch threads per inference worker: the cores shared by the workers plus one share for the HTTP server,
    the monitoring process and the queues (torch's own default, every core per worker, oversubscribes the CPU:
    measured here with 2 cores, it cut the throughput at 8 concurrent requests several times over)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // (workers + 1))


def build_server(settings: ServeSettings) -> ls.LitServer:
    """The LitServer for an exported model folder; call `.run()` to serve (`serve` does, with host and port)."""
    s = settings
    meta = read_export_metadata(s.model_dir)
    names, max_length = meta.labels, int(meta.max_length)
    reference = meta.reference.to_dict() if meta.reference is not None else None
    if not 1 <= s.top_k <= len(names):
        raise InputError(f"--top_k must be from 1 to the number of labels ({len(names)}), got {s.top_k}.")
    num_threads = s.num_threads or default_threads(s.workers_per_device)
    api = ClassifierAPI(s.model_dir, max_length, s.max_batch_size, s.batch_timeout, s.forward_batch_size, num_threads)
    paths = [PREDICT_PATH, "/health", "/info", "/metrics"]
    guard = {
        "max_body_bytes": s.max_body_bytes,
        "max_texts": s.max_texts,
        "num_labels": len(names),
        "default_top_k": s.top_k,
        "path": PREDICT_PATH,
    }
    key = os.environ.get(s.api_key_env) or None  # read here, in the main process; never logged nor shown
    protected = [PREDICT_PATH] + (["/metrics"] if s.metrics_need_key else [])
    # Added in order, each around the previous: the key is checked before the body is read, and the metrics see
    # both kinds of rejection.
    middlewares = [(RequestGuard, guard)] + ([(ApiKeyGuard, {"key": key, "paths": protected})] if key else [])
    middlewares += [(MetricsMiddleware, {"paths": paths})]
    drift = {"window_size": s.window_size, "min_window": s.min_window, **asdict(s.drift)}
    info = {
        "model_dir": str(Path(s.model_dir).resolve()),
        "model_name_or_path": meta.model_name_or_path,
        "labels": names,
        "max_length": max_length,
        "exported_at": meta.exported_at,
        "exported_with": meta.lightning_cls_version,
        "version": __version__,
        "reference": reference is not None,
        "drift": drift if reference is not None else "no reference in the export: drift gauges are not computed",
        "limits": {"max_texts": s.max_texts, "max_body_bytes": s.max_body_bytes, "default_top_k": s.top_k},
        "batching": {"max_batch_size": s.max_batch_size, "batch_timeout": s.batch_timeout},
        "workers": {"per_device": s.workers_per_device, "torch_threads": num_threads},
        "api_key": {"required_for": protected} if key else None,
    }
    server = ls.LitServer(
        api,
        accelerator=s.accelerator,
        workers_per_device=s.workers_per_device,
        timeout=s.timeout,
        model_metadata=info,
        middlewares=middlewares,
        loggers=MonitoringLogger(names, reference, s.max_batch_size, max_length, s.window_size, s.min_window, s.drift),
        callbacks=[StopMonitoring()],
    )

    @server.app.get("/metrics")
    def metrics() -> Any:
        from fastapi import Response

        body, content_type = collect_metrics()
        return Response(body, media_type=content_type)

    return server


def serve(settings: ServeSettings) -> None:
    """Serve an exported model: POST /predict, GET /health, /info and /metrics (Prometheus)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    temporary = None if settings.metrics_dir else tempfile.TemporaryDirectory(prefix="lightning_cls_metrics_")
    try:
        enable_multiprocess_metrics(settings.metrics_dir or temporary.name)
        server = build_server(settings)
        # SIGTERM (kill, docker stop) takes the graceful path of Ctrl+C: LitServe then stops its worker processes.
        main_pid = os.getpid()

        def interrupt(signum: int, frame: Any) -> None:
            if os.getpid() == main_pid:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)  # a forked HTTP server inherited this handler: end as by default
            signal.raise_signal(signum)

        signal.signal(signal.SIGTERM, interrupt)
        server.run(host=settings.host, port=settings.port, log_level=settings.log_level, generate_client_file=False)
    finally:
        if temporary is not None:
            temporary.cleanup()


def main(argv: list[str]) -> None:
    """`python -m lightning_cls serve --model_dir DIR [--port 8000] ...`."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=PROG, description=inspect.getdoc(serve))
    parser.add_argument("--config", action=ActionConfigFile, help="Path to a configuration file.")
    # Flat flags, as users type them: --psi_warning, not --drift.psi_warning.
    parser.add_class_arguments(ServeSettings, as_group=False, skip={"drift"})
    parser.add_class_arguments(DriftThresholds, as_group=False)
    values = parser.parse_args(argv).as_dict()
    fields = [name for name in ServeSettings.__dataclass_fields__ if name != "drift"]
    settings = ServeSettings(**{name: values[name] for name in fields}, drift=DriftThresholds.pick(values))
    try:
        serve(settings)
    except InputError as err:
        raise SystemExit(f"serve: {err}") from None
