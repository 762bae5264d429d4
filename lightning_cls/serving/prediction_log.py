"""The prediction log: every served prediction reaches the database, or is counted and named in the log.

Why a module of its own: a prediction is answered before it is stored (storing is off the inference path), so a
busy or failing database must not drop what was already served. `PredictionLog` (in the logger process) hands each
batch's rows to a writer thread, which inserts them in one transaction per attempt. A failed attempt (the file
locked by another writer, a full disk) is retried with exponential backoff; meanwhile the rows wait in memory, and
once they have waited `LogSettings.spill_after` seconds or there are more than `memory_rows` of them they are
appended to a spill file beside the database (`<db>.spill.jsonl`, one JSON row per line, fsynced; for a PostgreSQL
database, in this machine's cache: `spill_path_for`), so that a crash of the logger process loses at most about a
second of rows. The spill file is written into the database first at
the next successful attempt, or on the next start (a kill -9 during an outage); inserts skip ids already stored, so
a file replayed twice stores each row once. Rows that neither the database nor the spill file (full: `max_spill_rows`,
or unwritable) can take are counted (`lightning_cls_prediction_log_dropped_total`) and their ids logged: never silent.

`IdIssuer` makes the prediction ids, so that POST /feedback can tell an id this database's servers issued (served,
maybe not stored yet: answer 503, retry) from one they never issued (404), without asking the logger process:
``8 hex digits of the issue time (Unix seconds) + 12 random + 12 of an HMAC-SHA256 tag`` of the first 20 under a
key kept in the database (`FeedbackStore.id_key`). Standard library only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_cls.database import StoreError, is_url, redacted
from lightning_cls.store.feedback_store import FeedbackStore

log = logging.getLogger(__name__)

_TIME, _RANDOM, _TAG = 8, 12, 12  # hex digits of a prediction id: 32 in all
SPILL_SUFFIX = ".spill.jsonl"


class IdIssuer:
    """Prediction ids that a server holding ``key`` recognises as its own (see the module's docstring)."""

    def __init__(self, key: bytes | None = None) -> None:
        self.key = key if key is not None else secrets.token_bytes(32)

    def new(self, now: float) -> str:
        head = f"{int(now) & 0xFFFFFFFF:08x}{secrets.token_hex(_RANDOM // 2)}"
        return head + self._tag(head)

    def _tag(self, head: str) -> str:
        return hmac.new(self.key, head.encode(), hashlib.sha256).hexdigest()[:_TAG]

    def issued(self, pid: str) -> bool:
        """Whether ``pid`` was made by `new` with this key (constant-time check of the tag)."""
        if len(pid) != _TIME + _RANDOM + _TAG or any(c not in "0123456789abcdef" for c in pid):
            return False
        head = pid[: _TIME + _RANDOM]
        return hmac.compare_digest(pid[_TIME + _RANDOM :], self._tag(head))

    @staticmethod
    def issued_at(pid: str) -> int:
        """The Unix second an id (of `new`) was issued."""
        return int(pid[:_TIME], 16)


@dataclass(frozen=True)
class LogSettings:
    """How the prediction log rides out a busy or failing database (pickled to the logger process).

    Args:
        memory_rows: Rows held in memory while writes fail; beyond, they go to the spill file.
        spill_after: Seconds a row may wait in memory before it goes to the spill file.
        max_spill_rows: Rows the spill file may hold; rows beyond are dropped, counted and logged with their ids.
        write_timeout: Seconds one write attempt waits for another writer's lock (SQLite's busy timeout,
            PostgreSQL's lock timeout).
        max_backoff: Longest pause between attempts (the pause doubles from 50 ms after each failure).
        stop_timeout: Seconds a stop gives the log to store what it holds; the rest goes to the spill file.
        spill_path: The spill file (default: `spill_path_for` the database).
    """

    memory_rows: int = 10_000
    spill_after: float = 1.0
    max_spill_rows: int = 1_000_000
    write_timeout: float = 1.0
    max_backoff: float = 2.0
    stop_timeout: float = 5.0
    spill_path: str | None = None


def spill_path_for(location: str | Path, replica: str = "") -> Path:
    """Where the rows wait while the database refuses them: beside a SQLite file (``<db>.spill.jsonl``); for a
    PostgreSQL URL, in this machine's cache (``$XDG_CACHE_HOME`` or ``~/.cache``, ``lightning_cls/spill/``), one file
    per database and ``replica`` (serve gives its port: two replicas on one machine must not share a file, since a
    replay deletes it). The name is the same at the next start, which replays what a crash left."""
    if not is_url(location):
        return Path(str(location) + SPILL_SUFFIX)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lightning_cls" / "spill"
    server = redacted(location).split("@")[-1]  # host:port/db, no user or password
    name = "".join(c if c.isalnum() or c in "-." else "_" for c in server) + (f"-{replica}" if replica else "")
    return cache / (name + SPILL_SUFFIX)


class PredictionLog:
    """Stores served predictions from a writer thread: memory, then the spill file, never dropped silently.

    ``metrics`` (optional) has counters ``stored``, ``spilled``, ``dropped``, ``failures`` and a gauge ``pending``
    (`metrics.LogMetrics`); ``after_write`` (optional) is called in the writer thread after each stored batch with
    the write connection's store (the retention bound is applied there, by the one writer of predictions).
    """

    def __init__(
        self,
        path: str | Path,
        settings: LogSettings = LogSettings(),
        metrics: Any = None,
        after_write: Any = None,
    ) -> None:
        self.settings, self.metrics, self.after_write = settings, metrics, after_write
        self.path = redacted(path)  # as shown in the log (a URL without its password)
        self.spill_path = Path(settings.spill_path) if settings.spill_path else spill_path_for(path)
        self.store = FeedbackStore(path, busy_timeout=settings.write_timeout, setup=False)
        self._rows: deque[tuple[float, list]] = deque()  # (time it arrived, row), oldest first
        self._cond = threading.Condition()
        self._stop = False
        self._spilled = self._count_spilled()
        if self._spilled:
            log.warning(f"Prediction log: {self._spilled} predictions in {self.spill_path} are stored first.")
        self._failing_since: float | None = None
        self._set_pending()
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------------------- the logger's side
    def add(self, rows: Sequence[Sequence[Any]]) -> None:
        """Queue rows (`FeedbackStore.rows_of`) for the writer thread; never blocks on the database."""
        now = time.monotonic()
        with self._cond:
            self._rows.extend((now, list(r)) for r in rows)
            self._cond.notify()
        self._set_pending()

    def pending(self) -> int:
        """Rows not stored yet: in memory and in the spill file."""
        with self._cond:
            return len(self._rows) + self._spilled

    def flush(self, timeout: float) -> bool:
        """Wait until every row given so far is stored (True), or ``timeout`` seconds (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.notify()
            while self._rows or self._spilled:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def close(self) -> int:
        """Store what is held (up to `stop_timeout` s), spill the rest, close the database; returns the rows left
        for the next start (in the spill file)."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(self.settings.stop_timeout + self.settings.write_timeout + 5)
        left = self.pending()
        if left:
            log.warning(f"Prediction log: {left} predictions wait in {self.spill_path} for the next start.")
        return left

    # ---------------------------------------------------------------------------------------- the writer thread
    def _run(self) -> None:
        backoff, deadline = 0.0, None
        while True:
            with self._cond:
                while not (self._rows or self._spilled or self._stop):
                    self._cond.wait()
                if self._stop and deadline is None:
                    deadline = time.monotonic() + self.settings.stop_timeout
            ok = self._write()
            with self._cond:
                done = not (self._rows or self._spilled)
                self._cond.notify_all()  # `flush` waits on it
            if deadline is not None and (done or time.monotonic() >= deadline):
                self._spill_if_due(force=True)  # what the stop could not store waits for the next start
                self.store.close()
                return
            if ok:
                backoff = 0.0
                continue
            backoff = min(max(2 * backoff, 0.05), self.settings.max_backoff)
            self._spill_if_due()
            until = time.monotonic() + (min(backoff, 0.2) if deadline is not None else backoff)
            with self._cond:  # new rows do not shorten the pause; a stop does
                while (left := until - time.monotonic()) > 0 and (deadline is not None or not self._stop):
                    self._cond.wait(left)

    def _write(self) -> bool:
        """One attempt: the spill file's rows, then those in memory, in one transaction."""
        with self._cond:
            taken = len(self._rows)
            rows = [r for _, r in self._rows]
            spilled = self._spilled
        if not rows and not spilled:
            return True
        try:
            with self.store.transaction():  # takes the write lock first: the spill file is read only when it can go
                new = self.store.insert_rows(self._read_spill()) if spilled else 0
                new += self.store.insert_rows(rows)
        except StoreError as err:
            self._failed(err.reason, taken + spilled)
            return False
        if spilled:
            self.spill_path.unlink(missing_ok=True)
        with self._cond:
            for _ in range(taken):
                self._rows.popleft()
            self._spilled -= spilled
        if self._failing_since is not None:
            log.warning(
                f"Prediction log: {self.path} takes writes again after {time.monotonic() - self._failing_since:.1f} "
                f"s; {taken + spilled} waiting predictions stored."
            )
            self._failing_since = None
        self._count("stored", new)
        self._set_pending()
        if self.after_write is not None:
            try:
                self.after_write(self.store, new)
            except StoreError as err:
                log.error(f"Prediction log: after a write to {err}")
        return True

    def _failed(self, err: str, waiting: int) -> None:
        self._count("failures", 1)
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.warning(
                f"Prediction log: could not store {waiting} predictions in {self.path} ({err}); retrying with "
                f"backoff, the rows kept in memory, then in {self.spill_path}."
            )

    def _spill_if_due(self, force: bool = False) -> None:
        """Move the rows in memory to the spill file when they are many or have waited long (or ``force``)."""
        s = self.settings
        with self._cond:
            if not self._rows:
                return
            due = force or len(self._rows) > s.memory_rows or time.monotonic() - self._rows[0][0] >= s.spill_after
            if not due:
                return
            rows = [r for _, r in self._rows]
            self._rows.clear()
        room = max(0, s.max_spill_rows - self._spilled)
        kept, dropped = rows[:room], rows[room:]
        if kept:
            try:
                self.spill_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.spill_path, "a", encoding="utf-8") as f:
                    f.write("".join(json.dumps(r) + "\n" for r in kept))
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as err:
                log.error(f"Prediction log: could not write {self.spill_path}: {err}")
                kept, dropped = [], rows
        with self._cond:
            self._spilled += len(kept)
        self._count("spilled", len(kept))
        if dropped:
            self._count("dropped", len(dropped))
            ids = [r[0] for r in dropped]
            log.error(
                f"Prediction log: {len(dropped)} predictions could not be stored in {self.path} nor kept in "
                f"{self.spill_path} (full at {s.max_spill_rows} rows, or unwritable); lost: {ids}"
            )
        self._set_pending()

    def _read_spill(self) -> list[list]:
        rows = []
        with open(self.spill_path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a crash mid-write: its row was never complete
                    log.error(f"Prediction log: {self.spill_path} line {number} is incomplete; skipped.")
                    self._count("dropped", 1)
        return rows

    def _count_spilled(self) -> int:
        try:
            with open(self.spill_path, "rb") as f:
                return sum(1 for line in f if line.strip())
        except FileNotFoundError:
            return 0

    def _count(self, name: str, n: int) -> None:
        if self.metrics is not None and n:
            getattr(self.metrics, name).inc(n)

    def _set_pending(self) -> None:
        if self.metrics is not None:
            self.metrics.pending.set(self.pending())
