"""`python -m lightning_cls serve --model_dir DIR`: an HTTP service for an exported classifier, on LitServe.

Processes (LitServe's): the main process; the HTTP server(s) (uvicorn, forked); the inference worker(s) (spawned,
they load the model); a logger process (spawned, holds the monitoring metrics and the drift window).

- Requests are checked in the HTTP process, by `RequestGuard`, before they reach LitServe. This is not only for
  speed: LitServe runs `decode_request` in the inference worker over a whole dynamic batch, and an exception there
  fails every request of that batch, so one bad request would take well-formed ones down with it.
- Dynamic batching: the worker collects up to `max_batch_size` requests within `batch_timeout` seconds; `batch`
  flattens their texts, `predict` runs them longest-first in chunks of `forward_batch_size`, `unbatch` gives each
  request its answers back.
- Endpoints: POST /predict, GET /health (LitServe's: 200 once the model is loaded), GET /info (LitServe's, with the
  model's metadata), GET /metrics (Prometheus, merged over all processes).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import litserve as ls
import torch
from transformers import AutoModelForSequenceClassification

from lightning_cls import __version__
from lightning_cls.monitoring import (
    LOW_CONFIDENCE,
    LOW_CONFIDENCE_WARNING,
    PSI_WARNING,
    DriftWindow,
    HttpMetrics,
    InputError,
    PredictionMetrics,
    collect_metrics,
    enable_multiprocess_metrics,
    read_export_metadata,
)
from lightning_cls.monitoring import log as monitoring_log
from lightning_cls.tokenization import load_tokenizer

log = logging.getLogger(__name__)

PREDICT_PATH = "/predict"


# ------------------------------------------------------------------------------------------------ request checks
class RequestError(Exception):
    """A bad request: its HTTP status and a message saying what is wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def parse_predict_body(body: bytes, max_texts: int, num_labels: int, default_top_k: int) -> tuple[list[str], int]:
    """The texts and top-k of a /predict body, ``{"text": str}`` or ``{"texts": [str, ...]}`` with an optional
    ``"top_k": int``; anything else raises `RequestError` (400 for malformed JSON, 422 for a bad payload)."""
    try:
        payload = json.loads(body)
    except UnicodeDecodeError as e:
        raise RequestError(400, f"The body is not UTF-8 text: {e.reason} at byte {e.start}.") from None
    except json.JSONDecodeError as e:
        raise RequestError(400, f"Malformed JSON: {e.msg} (line {e.lineno}, column {e.colno}).") from None
    except (ValueError, RecursionError) as e:  # too deeply nested, or an integer too long to convert
        raise RequestError(400, f"Malformed JSON: {str(e) or type(e).__name__}.") from None
    if not isinstance(payload, dict):
        raise RequestError(422, f'Expected a JSON object {{"text": ...}} or {{"texts": [...]}}, got {_kind(payload)}.')
    unknown = sorted(set(payload) - {"text", "texts", "top_k"})
    if unknown:
        raise RequestError(422, f'Unknown field(s) {unknown}: expected "text" or "texts", and optionally "top_k".')
    if ("text" in payload) == ("texts" in payload):
        raise RequestError(422, 'Give exactly one of "text" (a string) or "texts" (a list of strings).')
    if "text" in payload:
        texts, names = [payload["text"]], ["text"]
    else:
        texts = payload["texts"]
        if not isinstance(texts, list):
            raise RequestError(422, f'"texts" must be a list of strings, got {_kind(texts)}.')
        if not texts:
            raise RequestError(422, '"texts" is empty: give at least one text.')
        if len(texts) > max_texts:
            raise RequestError(422, f'"texts" has {len(texts)} texts; this server takes at most {max_texts}.')
        names = [f"texts[{i}]" for i in range(len(texts))]
    for name, text in zip(names, texts, strict=True):
        if not isinstance(text, str):
            raise RequestError(422, f"{name} must be a string, got {_kind(text)}.")
        if not text.strip():
            raise RequestError(422, f"{name} is empty or only whitespace.")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate such as "\ud800": the tokenizer could not take it
            raise RequestError(422, f"{name} is not valid Unicode (it contains a lone surrogate).") from None
    top_k = payload.get("top_k", default_top_k)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_labels:
        raise RequestError(422, f'"top_k" must be an integer from 1 to {num_labels}, got {top_k!r}.')
    return texts, top_k


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else type(value).__name__)


async def _send_json(send: Any, status: int, content: dict) -> None:
    body = json.dumps(content).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI middleware: size-limits and checks POST /predict bodies, then hands LitServe a canonical
    ``{"texts": [...], "top_k": k}`` JSON body (so `curl -d` without a content type works too)."""

    def __init__(
        self, app: Any, max_body_bytes: int, max_texts: int, num_labels: int, default_top_k: int, path: str
    ) -> None:
        self.app, self.path = app, path
        self.max_body_bytes, self.max_texts = max_body_bytes, max_texts
        self.num_labels, self.default_top_k = num_labels, default_top_k

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        too_large = RequestError(413, f"The body is over this server's limit of {self.max_body_bytes} bytes.")
        try:
            declared = dict(scope["headers"]).get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                raise too_large
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > self.max_body_bytes:
                    raise too_large
                if not message.get("more_body", False):
                    break
            texts, top_k = parse_predict_body(b"".join(chunks), self.max_texts, self.num_labels, self.default_top_k)
        except RequestError as e:
            return await _send_json(send, e.status, {"detail": e.message})
        body = json.dumps({"texts": texts, "top_k": top_k}).encode()
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app({**scope, "headers": headers}, replay, send)


class MetricsMiddleware:
    """ASGI middleware: counts every HTTP response by path and status, and times it."""

    def __init__(self, app: Any, paths: list[str]) -> None:
        self.app, self.paths = app, set(paths)
        self.metrics: HttpMetrics | None = None  # built in the HTTP server process, on its first request

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.metrics is None:
            self.metrics = HttpMetrics()
        start, status = time.perf_counter(), None

        async def send_and_record(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        except BaseException:
            status = status or 500  # what the server's error handler answers, unless a response had started
            raise
        finally:
            status = status or 499  # no response sent: the client went away first (nginx's code for it)
            # Unknown paths are pooled, so that scanning the server cannot create unbounded label values.
            path = scope["path"] if scope["path"] in self.paths else "other"
            self.metrics.observe(path, status, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------ monitoring
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
        low_confidence: float = LOW_CONFIDENCE,
        psi_warning: float = PSI_WARNING,
        low_confidence_warning: float = LOW_CONFIDENCE_WARNING,
    ) -> None:
        super().__init__()
        window = {"size": window_size, "min_texts": min_window, "low_confidence": low_confidence}
        window |= {"psi_warning": psi_warning, "low_confidence_warning": low_confidence_warning}
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
            if not monitoring_log.handlers:  # a spawned process: make the drift warnings visible on stderr
                handler = logging.StreamHandler()
                handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
                monitoring_log.addHandler(handler)
                monitoring_log.setLevel(logging.INFO)
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


# ------------------------------------------------------------------------------------------------ the LitAPI
@dataclass
class TextBatch:
    """The texts of several requests, flattened, and how to give each request its answers back."""

    texts: list[str]
    sizes: list[int]  # texts per request
    top_ks: list[int]  # top-k per request


class ClassifierAPI(ls.LitAPI):
    """Tokenizes, runs the exported Hugging Face classifier in fp32 under `torch.inference_mode`, answers top-k."""

    def __init__(
        self,
        model_dir: str,
        max_length: int,
        max_batch_size: int = 16,
        batch_timeout: float = 0.002,
        forward_batch_size: int = 64,
        num_threads: int | None = None,
    ) -> None:
        with warnings.catch_warnings():  # LitServe warns when batch/unbatch exist but max_batch_size is 1: fine here
            warnings.simplefilter("ignore", UserWarning)
            super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=PREDICT_PATH)
        self.model_dir, self.max_length = str(model_dir), max_length
        self.forward_batch_size, self.num_threads = forward_batch_size, num_threads

    def setup(self, device: str) -> None:
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        self.device_name = device
        self.tokenizer = load_tokenizer(self.model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(self.model_dir, dtype=torch.float32)
        self.model.to(device).eval()
        self.names = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self._probabilities(self._tokenize(["warm up"])[0])  # the first forward pass is slow: not a user's
        self.log("start", None)  # the monitoring process makes its metrics now, so /metrics lists them from the start

    def decode_request(self, request: dict) -> tuple[list[str], int]:
        # Already checked and made canonical by RequestGuard in the HTTP process.
        return request["texts"], request["top_k"]

    def batch(self, inputs: list[tuple[list[str], int]]) -> TextBatch:
        return TextBatch(
            texts=[t for texts, _ in inputs for t in texts],
            sizes=[len(texts) for texts, _ in inputs],
            top_ks=[k for _, k in inputs],
        )

    def predict(self, x: TextBatch | tuple[list[str], int]) -> list[list[dict]] | list[dict]:
        """Answers per request (a list per request when batched; one request's list when `max_batch_size` is 1)."""
        batched = isinstance(x, TextBatch)
        batch = x if batched else self.batch([x])
        ids, truncated = self._tokenize(batch.texts)
        probs = self._probabilities(ids)  # (N, num_labels)
        order = probs.argsort(dim=-1, descending=True).tolist()
        probs = probs.tolist()
        answers, start = [], 0
        for size, k in zip(batch.sizes, batch.top_ks, strict=True):
            answers.append(
                [self._answer(probs[i], order[i], k, len(ids[i]), truncated[i]) for i in range(start, start + size)]
            )
            start += size
        self.log(
            "batch",
            {
                "requests": len(batch.sizes),
                "labels": [self.names[o[0]] for o in order],
                "probabilities": [p[o[0]] for p, o in zip(probs, order, strict=True)],
                "lengths": [len(i) for i in ids],
                "truncated": truncated,
            },
        )
        return answers if batched else answers[0]

    def _tokenize(self, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids truncated at max_length, and whether each text was longer than that."""
        n = self.max_length
        ids = self.tokenizer(texts, truncation=True, max_length=n, return_attention_mask=False)["input_ids"]
        # Only a text that fills max_length exactly may have been cut: tokenizing it to n + 1 tells.
        full = [i for i, x in enumerate(ids) if len(x) >= n]
        truncated = [False] * len(texts)
        if full:
            longer = self.tokenizer([texts[i] for i in full], truncation=True, max_length=n + 1)["input_ids"]
            for i, x in zip(full, longer, strict=True):
                truncated[i] = len(x) > n
        return ids, truncated

    def _probabilities(self, ids: list[list[int]]) -> torch.Tensor:
        probs = torch.empty(len(ids), len(self.names))
        # Longest first, in chunks: texts of similar length share a chunk, so little compute goes to padding.
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        with torch.inference_mode():
            for start in range(0, len(order), self.forward_batch_size):
                rows = order[start : start + self.forward_batch_size]
                inputs = self.tokenizer.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt")
                inputs = {k: v.to(self.device_name) for k, v in inputs.items()}
                logits = self.model(**inputs).logits  # (B, num_labels)
                probs[rows] = logits.float().softmax(-1).cpu()
        return probs

    def _answer(self, probs: list[float], order: list[int], k: int, tokens: int, truncated: bool) -> dict:
        return {
            "label": self.names[order[0]],
            "probability": probs[order[0]],
            "top_k": [{"label": self.names[j], "probability": probs[j]} for j in order[:k]],
            "num_tokens": tokens,
            "truncated": truncated,
        }

    def unbatch(self, output: list[list[dict]]) -> list[list[dict]]:
        return output  # predict already answers per request

    def encode_response(self, output: list[dict]) -> dict:
        return {"predictions": output}


# ------------------------------------------------------------------------------------------------ the server
def default_threads(workers: int) -> int:
    """Torch threads per inference worker: the cores shared by the workers plus one share for the HTTP server,
    the monitoring process and the queues (torch's own default, every core per worker, oversubscribes the CPU:
    measured here with 2 cores, it cut the throughput at 8 concurrent requests several times over)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // (workers + 1))


def build_server(
    model_dir: str,
    max_batch_size: int = 16,
    batch_timeout: float = 0.002,
    max_texts: int = 64,
    max_body_bytes: int = 1_000_000,
    top_k: int = 3,
    forward_batch_size: int = 64,
    window_size: int = 1000,
    min_window: int = 100,
    low_confidence: float = LOW_CONFIDENCE,
    psi_warning: float = PSI_WARNING,
    low_confidence_warning: float = LOW_CONFIDENCE_WARNING,
    accelerator: str = "auto",
    workers_per_device: int = 1,
    num_threads: int | None = None,
    timeout: float = 30.0,
) -> ls.LitServer:
    """The LitServer for an exported model folder (see `serve` for the arguments); call `.run()` to serve."""
    meta = read_export_metadata(model_dir).to_dict()
    names, max_length, reference = meta["labels"], int(meta["max_length"]), meta.get("reference")
    if not 1 <= top_k <= len(names):
        raise InputError(f"--top_k must be from 1 to the number of labels ({len(names)}), got {top_k}.")
    num_threads = num_threads or default_threads(workers_per_device)
    api = ClassifierAPI(model_dir, max_length, max_batch_size, batch_timeout, forward_batch_size, num_threads)
    paths = [PREDICT_PATH, "/health", "/info", "/metrics"]
    guard = {
        "max_body_bytes": max_body_bytes,
        "max_texts": max_texts,
        "num_labels": len(names),
        "default_top_k": top_k,
        "path": PREDICT_PATH,
    }
    drift = {"window_size": window_size, "min_window": min_window, "psi_warning": psi_warning}
    drift |= {"low_confidence": low_confidence, "low_confidence_warning": low_confidence_warning}
    info = {
        "model_dir": str(Path(model_dir).resolve()),
        "model_name_or_path": meta.get("model_name_or_path"),
        "labels": names,
        "max_length": max_length,
        "exported_at": meta.get("exported_at"),
        "exported_with": meta.get("lightning_cls_version"),
        "version": __version__,
        "reference": reference is not None,
        "drift": drift if reference is not None else "no reference in the export: drift gauges are not computed",
        "limits": {"max_texts": max_texts, "max_body_bytes": max_body_bytes, "default_top_k": top_k},
        "batching": {"max_batch_size": max_batch_size, "batch_timeout": batch_timeout},
        "workers": {"per_device": workers_per_device, "torch_threads": num_threads},
    }
    server = ls.LitServer(
        api,
        accelerator=accelerator,
        workers_per_device=workers_per_device,
        timeout=timeout,
        model_metadata=info,
        # Added in order, each around the previous: the metrics see the guard's rejections too.
        middlewares=[(RequestGuard, guard), (MetricsMiddleware, {"paths": paths})],
        loggers=MonitoringLogger(names, reference, max_batch_size, max_length, **drift),
        callbacks=[StopMonitoring()],
    )

    @server.app.get("/metrics")
    def metrics() -> Any:
        from fastapi import Response

        body, content_type = collect_metrics()
        return Response(body, media_type=content_type)

    return server


def serve(
    model_dir: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 16,
    batch_timeout: float = 0.002,
    max_texts: int = 64,
    max_body_bytes: int = 1_000_000,
    top_k: int = 3,
    forward_batch_size: int = 64,
    window_size: int = 1000,
    min_window: int = 100,
    low_confidence: float = LOW_CONFIDENCE,
    psi_warning: float = PSI_WARNING,
    low_confidence_warning: float = LOW_CONFIDENCE_WARNING,
    accelerator: str = "auto",
    workers_per_device: int = 1,
    num_threads: int | None = None,
    timeout: float = 30.0,
    metrics_dir: str | None = None,
    log_level: str = "info",
) -> None:
    """Serve an exported model: POST /predict, GET /health, /info and /metrics (Prometheus).

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
        low_confidence: A prediction whose probability is below this counts as low-confidence.
        psi_warning: Population stability index above which a drift warning is logged.
        low_confidence_warning: Low-confidence share of the window above which a warning is logged.
        accelerator: cpu, cuda, mps or auto (LitServe picks).
        workers_per_device: Inference worker processes per device.
        num_threads: Torch threads per inference worker (default: the cores divided by workers + 1).
        timeout: Seconds a request may wait for its answer before a 504.
        metrics_dir: Folder for the multiprocess Prometheus files (emptied at start; default: a temporary folder).
        log_level: Uvicorn log level (info logs every request; warning does not).
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    temporary = None if metrics_dir else tempfile.TemporaryDirectory(prefix="lightning_cls_metrics_")
    try:
        enable_multiprocess_metrics(metrics_dir or temporary.name)
        server = build_server(
            model_dir,
            max_batch_size,
            batch_timeout,
            max_texts,
            max_body_bytes,
            top_k,
            forward_batch_size,
            window_size,
            min_window,
            low_confidence,
            psi_warning,
            low_confidence_warning,
            accelerator,
            workers_per_device,
            num_threads,
            timeout,
        )
        # SIGTERM (kill, docker stop) takes the graceful path of Ctrl+C: LitServe then stops its worker processes.
        main_pid = os.getpid()

        def interrupt(signum: int, frame: Any) -> None:
            if os.getpid() == main_pid:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)  # a forked HTTP server inherited this handler: end as by default
            signal.raise_signal(signum)

        signal.signal(signal.SIGTERM, interrupt)
        server.run(host=host, port=port, log_level=log_level, generate_client_file=False)
    finally:
        if temporary is not None:
            temporary.cleanup()


def main(argv: list[str]) -> None:
    """`python -m lightning_cls serve --model_dir DIR [--port 8000] ...`."""
    from jsonargparse import CLI

    try:
        CLI(serve, args=argv, as_positional=False, prog="python -m lightning_cls serve")
    except InputError as err:
        raise SystemExit(f"serve: {err}") from None
