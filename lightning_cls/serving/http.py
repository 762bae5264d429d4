"""The HTTP layer, run in the HTTP server process(es): request checks, the ASGI middlewares around LitServe, and the
POST /feedback endpoint.

Requests are checked here, by `RequestGuard`, before they reach LitServe. This is not only for speed: LitServe runs
`decode_request` in the inference worker over a whole dynamic batch, and an exception there fails every request of
that batch, so one bad request would take well-formed ones down with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from lightning_cls.database import StoreError
from lightning_cls.errors import kind_of, short
from lightning_cls.serving.evidence import parse_explain
from lightning_cls.serving.metrics import HttpMetrics
from lightning_cls.serving.prediction_log import IdIssuer
from lightning_cls.store.feedback_store import FeedbackResult, FeedbackStore, Truth
from lightning_cls.task import Task

PREDICT_PATH = "/predict"
FEEDBACK_PATH = "/feedback"
MAX_FEEDBACK_ITEMS = 1000  # true labels per POST /feedback
FEEDBACK_POLL = 0.05  # seconds between looks for ids still on their way to the database
PENDING_RETRY_AFTER = 2  # seconds: the Retry-After of a 503 for ids served but not stored yet


MAX_CLIENT_ID = 256  # characters of a /predict body's "client_id"


class PendingIds(Exception):
    """Prediction ids this database's servers issued that are not stored yet: a 503 the client retries."""

    def __init__(self, ids: list[str]) -> None:
        super().__init__(f"{len(ids)} prediction ids not stored yet")
        self.ids = ids


class RequestError(Exception):
    """A bad request: its HTTP status and a message saying what is wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def parse_predict_body(
    body: bytes, max_texts: int, num_labels: int, default_top_k: int
) -> tuple[list[str], int, str | None, tuple[str, ...]]:
    """The texts, top-k, client id and evidence kinds of a /predict body, ``{"text": str}`` or ``{"texts": [str,
    ...]}`` with an optional ``"top_k": int``, ``"client_id": str`` (a canary answers a client from one model:
    `router`) and ``"explain"`` (`serving.evidence.parse_explain`); anything else raises `RequestError` (400 for
    malformed JSON, 422 for a bad payload)."""
    payload = _json(body)
    if not isinstance(payload, dict):
        raise RequestError(
            422, f'Expected a JSON object {{"text": ...}} or {{"texts": [...]}}, got {kind_of(payload)}.'
        )
    unknown = sorted(set(payload) - {"text", "texts", "top_k", "client_id", "explain"})
    if unknown:
        raise RequestError(
            422,
            f'Unknown field(s) {unknown}: expected "text" or "texts", and optionally "top_k", "client_id" and '
            '"explain".',
        )
    if ("text" in payload) == ("texts" in payload):
        raise RequestError(422, 'Give exactly one of "text" (a string) or "texts" (a list of strings).')
    if "text" in payload:
        texts, names = [payload["text"]], ["text"]
    else:
        texts = payload["texts"]
        if not isinstance(texts, list):
            raise RequestError(422, f'"texts" must be a list of strings, got {kind_of(texts)}.')
        if not texts:
            raise RequestError(422, '"texts" is empty: give at least one text.')
        if len(texts) > max_texts:
            raise RequestError(422, f'"texts" has {len(texts)} texts; this server takes at most {max_texts}.')
        names = [f"texts[{i}]" for i in range(len(texts))]
    for name, text in zip(names, texts, strict=True):
        if not isinstance(text, str):
            raise RequestError(422, f"{name} must be a string, got {kind_of(text)}.")
        if not text.strip():
            raise RequestError(422, f"{name} is empty or only whitespace.")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate such as "\ud800": the tokenizer could not take it
            raise RequestError(422, f"{name} is not valid Unicode (it contains a lone surrogate).") from None
    top_k = payload.get("top_k", default_top_k)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_labels:
        raise RequestError(422, f'"top_k" must be an integer from 1 to {num_labels}, got {top_k!r}.')
    client = payload.get("client_id")
    if client is not None and (not isinstance(client, str) or not 0 < len(client) <= MAX_CLIENT_ID):
        raise RequestError(422, f'"client_id" must be a string of 1 to {MAX_CLIENT_ID} characters: {short(client)}.')
    try:
        explain = parse_explain(payload.get("explain"))  # the evidence asked for (`serving.evidence`)
    except ValueError as e:
        raise RequestError(422, str(e)) from None
    return texts, top_k, client, explain


def parse_feedback_body(body: bytes, task: Task, max_items: int = MAX_FEEDBACK_ITEMS) -> list[tuple[str, Truth]]:
    """The (prediction id, true label) pairs of a /feedback body: ``{"feedback": [{"prediction_id": ..., "label":
    ...}, ...]}`` (or one such object instead of the list, or the object alone). The true label is read as the
    ``task`` reads it (`Task.truth_from`): one name in ``"label"``, or for a label-set model a set in ``"labels"``
    (a tuple in the model's label order, repeats dropped); the other field is refused. Anything else raises
    `RequestError`: 400 for malformed JSON, 422 naming every bad item and every label not among the task's names.
    An id given twice with the same label (or set) counts once; with two different ones it is a 422."""
    payload = _json(body)
    field_name = task.truth_field
    if isinstance(payload, dict) and "feedback" in payload:
        unknown = sorted(set(payload) - {"feedback"})
        if unknown:
            raise RequestError(422, f'Unknown field(s) {unknown} beside "feedback".')
        payload = payload["feedback"]
    items = [payload] if isinstance(payload, dict) else payload
    if not isinstance(items, list):
        raise RequestError(
            422,
            f'Expected {{"feedback": [{{"prediction_id": "...", {task.truth_example}}}, ...]}} or one '
            f'{{"prediction_id": ..., "{field_name}": ...}} object, got {kind_of(items)}.',
        )
    if not items:
        raise RequestError(422, f'"feedback" is empty: give at least one {{"prediction_id", "{field_name}"}} object.')
    if len(items) > max_items:
        raise RequestError(422, f'"feedback" has {len(items)} items; this server takes at most {max_items}.')
    problems, pairs, sent_in = [], [], {}  # sent_in: label name -> where it was sent (for unknown labels)
    for i, item in enumerate(items):
        where = f"feedback[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{where} must be an object, got {kind_of(item)}")
            continue
        extra = sorted(set(item) - {"prediction_id", "label", "labels"})
        pid = item.get("prediction_id")
        if extra:
            hint = ' (an answer\'s id is sent as "prediction_id")' if "id" in extra else ""
            problems.append(f"{where} has unknown field(s) {extra}{hint}")
        elif not isinstance(pid, str) or not pid.strip():
            problems.append(f'{where}: "prediction_id" must be a non-empty string, got {kind_of(pid)}')
        else:
            try:
                truth = task.truth_from(item, where)
            except ValueError as err:
                problems.extend(err.args)
                continue
            pairs.append((pid, truth))
            for j, name in enumerate([truth] if isinstance(truth, str) else truth):
                sent_in.setdefault(name, f"{where}.{field_name}" + ("" if isinstance(truth, str) else f"[{j}]"))
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise RequestError(422, "; ".join(problems[:10]) + more + ".")
    bad_labels = sorted(name for name in sent_in if name not in task.names)
    if bad_labels:
        raise RequestError(
            422,
            f"Unknown label(s) {bad_labels}: the model's labels are {list(task.names)} "
            f"(sent in {', '.join(sent_in[name] for name in bad_labels[:10])}).",
        )
    pairs = [(pid, task.canonical(truth)) for pid, truth in pairs]  # the same set is the same tuple
    first: dict[str, Truth] = {}
    twice = sorted({pid for pid, truth in pairs if first.setdefault(pid, truth) != truth})
    if twice:
        raise RequestError(422, f"prediction_id(s) {_few(twice)} are given twice with different {task.truth_noun}.")
    return list(first.items())


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except UnicodeDecodeError as e:
        raise RequestError(400, f"The body is not UTF-8 text: {e.reason} at byte {e.start}.") from None
    except json.JSONDecodeError as e:
        raise RequestError(400, f"Malformed JSON: {e.msg} (line {e.lineno}, column {e.colno}).") from None
    except (ValueError, RecursionError) as e:  # too deeply nested, or an integer too long to convert
        raise RequestError(400, f"Malformed JSON: {str(e) or type(e).__name__}.") from None


def _few(items: Sequence[Any], limit: int = 20) -> str:
    """A list for a message: all of it, or its first ``limit`` and how many more."""
    shown = repr(list(items[:limit]))
    return shown if len(items) <= limit else f"{shown} (and {len(items) - limit} more)"


async def _send_json(send: Any, status: int, content: dict, extra_headers: list | None = None) -> None:
    body = json.dumps(content).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += extra_headers or []
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
            texts, top_k, client, explain = parse_predict_body(
                b"".join(chunks), self.max_texts, self.num_labels, self.default_top_k
            )
        except RequestError as e:
            return await _send_json(send, e.status, {"detail": e.message})
        canonical = {"texts": texts, "top_k": top_k, "client_id": client, **({"explain": explain} if explain else {})}
        body = json.dumps(canonical).encode()
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


class ApiKeyGuard:
    """ASGI middleware: the protected paths need `Authorization: Bearer <key>`; anything else is a 401.

    The key is compared in constant time (hmac.compare_digest), so response times do not tell how much of a guess
    was right. Other paths (/health, and /info, /metrics unless protected) stay open.
    """

    def __init__(self, app: Any, key: str, paths: list[str]) -> None:
        if not key:
            raise ValueError("ApiKeyGuard needs a non-empty key.")
        self.app, self.expected, self.paths = app, b"Bearer " + key.encode(), set(paths)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            detail = "Missing or wrong API key: send the header `Authorization: Bearer <key>`."
            return await _send_json(send, 401, {"detail": detail}, [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


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


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused with a 413 as soon as it is over ``limit`` bytes (declared or streamed)."""
    too_large = RequestError(413, f"The body is over this server's limit of {limit} bytes.")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


class FeedbackEndpoint:
    """POST /feedback: true labels for served predictions, written to the feedback database (`feedback.py`) from
    this HTTP server process, all or nothing.

    The true labels are read as the model's ``task`` reads them: one label, or for a label-set model the true set of
    each prediction, ``"labels": [...]`` (see `parse_feedback_body`).

    Answers: 200 ``{"stored": n, "already_stored": m}`` (an id sent again with the label it has counts once); 400
    malformed JSON; 413 a body over the limit; 422 a bad body or a label not among the model's; 404 prediction ids
    the database does not hold (never served, or deleted by the retention bound); 409 ids that already have another
    label (true labels are kept as first sent); 503 (with Retry-After) ids served but not stored yet, or the
    database stayed locked. Only a 200 stores anything.

    The race: an answer reaches its client before the logger process has stored its prediction (the worker sends it
    the batch on a queue, and a busy database may hold it back for as long as it is busy: `prediction_log`), so
    feedback can arrive for an id not stored yet. Ids not found are looked for again every 50 ms for up to ``wait``
    seconds (awaited: the server keeps serving meanwhile). Then an id still missing is told apart without asking the
    logger process: one whose tag shows a server on this database issued it (`prediction_log.IdIssuer`, with
    ``id_key``) and whose issue time is not older than the oldest stored prediction (the retention front: the
    retention bound is only applied when nothing waits to be stored) is on its way, a 503 to retry; any other is a
    404.
    """

    def __init__(
        self,
        db_path: str,
        task: Task,
        max_body_bytes: int,
        wait: float = 2.0,
        notify: Callable[[int], None] | None = None,
        id_key: bytes | None = None,
    ) -> None:
        self.db_path, self.task, self.max_body_bytes, self.wait = db_path, task, max_body_bytes, wait
        self.issuer = IdIssuer(id_key) if id_key is not None else None  # None: every missing id is a 404
        self.notify = notify  # tells the logger process that new feedback is stored (it owns the live gauges)
        self._store: FeedbackStore | None = None  # opened in the HTTP server process, on first use
        self._lock = threading.Lock()  # one connection, used from the event loop's worker threads in turn

    def _run(self, method: Callable[..., Any], *args: Any) -> Any:
        with self._lock:
            if self._store is None:
                self._store = FeedbackStore(self.db_path, setup=False)  # `serve` made the tables; never a write
            return method(self._store, *args)

    async def _db(self, method: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(self._run, method, *args)  # SQLite blocks: not on the event loop

    async def record(self, pairs: list[tuple[str, Truth]]) -> FeedbackResult:
        """Wait (up to ``wait`` s) for ids still on their way to the database, then write, all or nothing."""
        ids = [pid for pid, _ in pairs]
        deadline = time.monotonic() + self.wait
        missing = set(ids) - await self._db(FeedbackStore.known_ids, ids)
        while missing and time.monotonic() < deadline:
            await asyncio.sleep(FEEDBACK_POLL)
            missing -= await self._db(FeedbackStore.known_ids, sorted(missing))
        ours = [pid for pid in ids if pid in missing and self.issuer is not None and self.issuer.issued(pid)]
        pending = []
        if ours:
            front = await self._db(FeedbackStore.oldest_time)
            pending = [pid for pid in ours if front is None or IdIssuer.issued_at(pid) >= int(front) - 1]
        unknown = [pid for pid in ids if pid in missing and pid not in pending]
        if unknown:  # nothing would be stored: answered without waiting for the write lock
            return FeedbackResult(unknown=unknown)
        if pending:
            raise PendingIds(pending)
        return await self._db(FeedbackStore.record_feedback, pairs)

    async def handle(self, request: Request) -> JSONResponse:
        try:
            body = await read_body(request, self.max_body_bytes)
            pairs = parse_feedback_body(body, self.task)
            result = await self.record(pairs)
        except RequestError as e:
            return JSONResponse({"detail": e.message}, status_code=e.status)
        except PendingIds as e:
            detail = (
                f"prediction_id(s) {_few(e.ids)} were served but are not stored yet (the database is busy; they wait "
                f"in the prediction log). Nothing was stored: send the request again after {PENDING_RETRY_AFTER} s."
            )
            headers = {"Retry-After": str(PENDING_RETRY_AFTER)}
            return JSONResponse({"detail": detail, "pending_ids": e.ids}, status_code=503, headers=headers)
        except (StoreError, ValueError) as e:  # locked past the timeout, unreachable; the database unusable
            detail = f"The feedback database is unavailable ({e}); nothing was stored: try again."
            return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "1"})
        if result.unknown:
            detail = (
                f"Unknown prediction_id(s) {_few(result.unknown)}: never issued by a server on this database, or "
                "deleted by its retention bound (serve --feedback_retention). Nothing was stored."
            )
            return JSONResponse({"detail": detail, "unknown_ids": result.unknown}, status_code=404)
        if result.conflicts:
            shown = ", ".join(
                f"{pid!r} has {_listed(old)!r} (sent {_listed(new)!r})" for pid, old, new in result.conflicts[:20]
            )
            detail = (
                f"prediction_id(s) already labelled differently: {shown}. A true label is kept as first sent; "
                "nothing was stored."
            )
            conflicts = [{"prediction_id": p, "stored": _listed(o), "sent": _listed(n)} for p, o, n in result.conflicts]
            return JSONResponse({"detail": detail, "conflicts": conflicts}, status_code=409)
        if result.stored and self.notify is not None:
            # The queue may be gone (shutting down): the logger process also looks for feedback at every batch.
            with contextlib.suppress(Exception):
                self.notify(result.stored)
        return JSONResponse({"stored": result.stored, "already_stored": result.repeated})


def _listed(truth: Truth) -> str | list[str]:
    """A label as sent (a name), a label set as a list."""
    return truth if isinstance(truth, str) else list(truth)
