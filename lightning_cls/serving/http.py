"""The HTTP layer, run in the HTTP server process(es): request checks and the ASGI middlewares around LitServe.

Requests are checked here, by `RequestGuard`, before they reach LitServe. This is not only for speed: LitServe runs
`decode_request` in the inference worker over a whole dynamic batch, and an exception there fails every request of
that batch, so one bad request would take well-formed ones down with it.
"""

from __future__ import annotations

import hmac
import json
import time
from typing import Any

from lightning_cls.serving.metrics import HttpMetrics

PREDICT_PATH = "/predict"


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
