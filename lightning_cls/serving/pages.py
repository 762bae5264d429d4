"""The pages for the people who tag papers, served by the HTTP process beside the API: Tag (``/``), Review
(``/review``) and Model (``/model``), one HTML page and a small script (`web/`, package data: nothing is fetched
from elsewhere at run time), and the JSON they read besides the API's own endpoints.

- The page is the API's client: it POSTs /predict (with ``"explain"``) and /feedback like any other, so a bad input
  gets the API's one-line error and a label from a reviewer moves the live accuracy gauges as any feedback does.
- Texts are shown as text: the script builds every element with ``textContent``, never ``innerHTML``, and every
  page response carries a Content-Security-Policy that allows only this server's own script and style (no inline
  script, no other origin), so an abstract holding ``<script>`` or HTML is shown, never run.
- The API key: the page asks for it and keeps it in the tab's ``sessionStorage``, sending it as an ``Authorization``
  header, never in a URL (so never in an access log or a Referer: ``Referrer-Policy: no-referrer`` besides). The
  JSON here that reveals texts or the store (history, the review queue) needs the key like /predict does.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from dataclasses import dataclass
from importlib import resources
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lightning_cls.serving.model_page import PageSettings, series
from lightning_cls.serving.review import ReviewDesk
from lightning_cls.store import deployment_history
from lightning_cls.store.feedback_store import FeedbackStore
from lightning_cls.store.history import recent_answers, recent_feedback

PAGE_PATHS = ("/", "/review", "/model")
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
INFO_PATH, HISTORY_PATH = "/pages/info", "/pages/history"
REVIEW_NEXT_PATH, REVIEW_SKIP_PATH = "/pages/review/next", "/pages/review/skip"
KEYED_PATHS = [HISTORY_PATH, REVIEW_NEXT_PATH, REVIEW_SKIP_PATH]  # need the API key when there is one
HISTORY_ROWS = 20_000  # newest answers (and labels) the model page plots
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
REVIEWER = re.compile(r"[A-Za-z0-9_-]{8,64}")


def asset(name: str) -> bytes:
    return (resources.files("lightning_cls.serving") / "web" / name).read_bytes()


@dataclass
class Pages:
    """The pages of one service: what the page shows about the model (``info``: labels, thresholds, the expert),
    the store at ``db_path``, and how the model page judges its series."""

    info: dict[str, Any]
    db_path: str
    settings: PageSettings
    window: tuple[int, int] = (1000, 100)  # the drift window's size and the answers it needs (`serve`'s)

    def __post_init__(self) -> None:
        self.index = asset("index.html")
        self.desk = ReviewDesk(self.db_path, self.settings.drift, *self.window)
        self._store: FeedbackStore | None = None
        self._lock = threading.Lock()

    def install(self, app: Any) -> None:
        # LitServe answers GET / with a line of its own: the Tag page takes its place.
        app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in PAGE_PATHS]
        for path in PAGE_PATHS:
            app.add_api_route(path, self.page, methods=["GET"], response_model=None, include_in_schema=False)
        app.add_api_route("/static/{name}", self.static, methods=["GET"], response_model=None, include_in_schema=False)
        app.add_api_route(INFO_PATH, self.page_info, methods=["GET"], response_model=None)
        app.add_api_route(HISTORY_PATH, self.history, methods=["GET"], response_model=None)
        app.add_api_route(REVIEW_NEXT_PATH, self.review_next, methods=["GET"], response_model=None)
        app.add_api_route(REVIEW_SKIP_PATH, self.review_skip, methods=["POST"], response_model=None)

    # -------------------------------------------------------------------------------------------- the page
    async def page(self) -> Response:
        return Response(self.index, media_type="text/html; charset=utf-8", headers=HEADERS)

    async def static(self, name: str) -> Response:
        if name not in ASSETS:  # a fixed list: no path from the URL ever reaches the file system
            return _error(404, f"No asset {name!r}.")
        return Response(asset(name), media_type=ASSETS[name], headers=HEADERS)

    async def page_info(self) -> JSONResponse:
        return JSONResponse(self.info, headers=HEADERS)

    # -------------------------------------------------------------------------------------------- the store
    def _read(self, method: Any, *args: Any) -> Any:
        with self._lock:
            if self._store is None:
                self._store = FeedbackStore(self.db_path, setup=False)
            return method(self._store, *args)

    async def history(self) -> JSONResponse:
        try:
            answers = await asyncio.to_thread(self._read, recent_answers, HISTORY_ROWS)
            feedback = await asyncio.to_thread(self._read, recent_feedback, HISTORY_ROWS)
            changes = await asyncio.to_thread(self._read, deployment_history.history, 20)
        except Exception as err:  # the store unreachable or locked: the page says so in one line
            return _error(503, f"The store is unavailable ({err}); try again.")
        body = series(answers, feedback, self.settings)
        body["deployments"] = [
            {"seq": seq, "time": t, "action": action, "reason": reason, "state": json.loads(state)}
            for seq, t, action, reason, state in changes
        ]
        return JSONResponse(body, headers=HEADERS)

    # -------------------------------------------------------------------------------------------- the review queue
    async def review_next(self, request: Request) -> JSONResponse:
        reviewer = request.query_params.get("reviewer", "")
        if not REVIEWER.fullmatch(reviewer):
            return _error(422, '"reviewer" must be 8 to 64 letters, digits, "-" or "_" (the page makes one per tab).')
        if not self.info.get("keep_texts"):
            return _error(409, "This service keeps no texts (serve --keep_texts): there is nothing to review.")
        try:
            item = await asyncio.to_thread(self.desk.next_item, reviewer)
        except Exception as err:
            return _error(503, f"The review queue is unavailable ({err}); try again.")
        return JSONResponse({"item": item}, headers=HEADERS)

    async def review_skip(self, request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body())
            pid, reviewer = body["prediction_id"], body["reviewer"]
            if not isinstance(pid, str) or not isinstance(reviewer, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return _error(422, 'Expected {"prediction_id": "...", "reviewer": "..."}.')
        skipped = await asyncio.to_thread(self.desk.skip, pid, reviewer)
        return JSONResponse({"skipped": skipped}, headers=HEADERS)


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=HEADERS)


def build_pages(
    meta: Any,
    db_path: str,
    keep_texts: bool,
    validation_accuracy: float | None,
    *,
    alert_margin: float,
    drift: Any,
    keyed: bool,
    limits: dict[str, Any],
    window: tuple[int, int] = (1000, 100),
) -> Pages:
    """The pages of a service on the export ``meta`` describes (`serve` calls it with its settings)."""
    names = list(meta.labels)
    reference = meta.reference.label_counts if meta.reference is not None else None
    info = {
        "labels": names,
        "problem_type": "multi_label" if meta.multi_label else "single_label",
        "thresholds": dict(zip(names, meta.thresholds, strict=True)) if meta.thresholds else None,
        "lexical": {"weight": meta.lexical.get("weight")} if meta.lexical else None,
        "keep_texts": keep_texts,
        "validation_accuracy": validation_accuracy,
        "api_key": keyed,  # whether the API needs one (never the key)
        "limits": limits,
    }
    settings = PageSettings(names, reference, validation_accuracy, alert_margin, drift)
    return Pages(info, db_path, settings, window)
