"""The prediction log (`serving/prediction_log.py`): nothing served is lost when the database is locked, the spill
file, its replay, what is counted when it cannot be kept; and POST /feedback for ids served but not stored yet (503,
then 200), never issued (404) or deleted by retention (404). In process: a second connection holds the lock."""

from __future__ import annotations

import logging
import sqlite3
import time
from contextlib import contextmanager

from fastapi import FastAPI
from test_feedback import NAMES, VERSION, batch, post

from lightning_cls.serving.http import FEEDBACK_PATH, FeedbackEndpoint
from lightning_cls.serving.prediction_log import SPILL_SUFFIX, IdIssuer, LogSettings, PredictionLog
from lightning_cls.store.feedback_store import FeedbackStore
from lightning_cls.task import task_for

FAST = LogSettings(spill_after=0.2, write_timeout=0.05, max_backoff=0.1, stop_timeout=0.5)


class Count:
    def __init__(self) -> None:
        self.value = 0

    def inc(self, n: float = 1) -> None:
        self.value += n

    def set(self, v: float) -> None:
        self.value = v


class Metrics:
    def __init__(self) -> None:
        for name in ("stored", "failures", "spilled", "dropped", "pending"):
            setattr(self, name, Count())


@contextmanager
def locked(db):
    """Another writer holding the database's write lock (as `sqlite3 db 'BEGIN IMMEDIATE'` would)."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        conn.execute("COMMIT")
        conn.close()


def rows(n: int, issuer: IdIssuer | None = None) -> list[tuple]:
    b = batch(n)
    if issuer is not None:
        b["ids"] = [issuer.new(b["time"]) for _ in range(n)]
    return FeedbackStore.rows_of(b, VERSION, None)


def stored_ids(db) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {r[0] for r in conn.execute("SELECT id FROM predictions")}


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_ids_are_recognised_only_with_their_key_and_carry_their_time():
    issuer, other = IdIssuer(b"k" * 32), IdIssuer(b"j" * 32)
    pid = issuer.new(1_700_000_000.7)
    assert len(pid) == 32 and int(pid, 16) >= 0
    assert issuer.issued(pid) and not other.issued(pid)
    assert IdIssuer.issued_at(pid) == 1_700_000_000
    tampered = pid[:-1] + ("0" if pid[-1] != "0" else "1")
    later = f"{1_800_000_000:08x}" + pid[8:]  # another time under the same tag
    for bad in (tampered, later, "f00d", pid.upper(), "z" * 32, "0" * 32):
        assert not issuer.issued(bad), bad
    assert len({issuer.new(0) for _ in range(1000)}) == 1000


def test_a_locked_database_loses_nothing_rows_wait_in_memory_then_in_the_spill_file(tmp_path):
    db = tmp_path / "f.sqlite3"
    FeedbackStore(db).close()
    metrics = Metrics()
    plog = PredictionLog(db, FAST, metrics)
    spill = tmp_path / ("f.sqlite3" + SPILL_SUFFIX)
    with locked(db):
        first = rows(3)
        plog.add(first)
        wait_until(lambda: spill.exists())  # waited spill_after: on disk, fsynced
        plog.add(rows(2))  # more while locked
        time.sleep(0.4)
        assert stored_ids(db) == set() and plog.pending() == 5 and metrics.pending.value == 5
        assert metrics.failures.value >= 2  # retried
        assert len(spill.read_text().splitlines()) == 5 and metrics.spilled.value == 5
    assert plog.flush(10)  # the lock is gone: the spill file first, then memory
    assert len(stored_ids(db)) == 5 and {r[0] for r in first} <= stored_ids(db)
    assert not spill.exists() and plog.pending() == 0 and metrics.pending.value == 0
    assert metrics.stored.value == 5 and metrics.dropped.value == 0
    plog.close()


def test_a_full_spill_file_drops_rows_counted_and_named_in_the_log(tmp_path, caplog):
    db = tmp_path / "f.sqlite3"
    FeedbackStore(db).close()
    metrics = Metrics()
    plog = PredictionLog(
        db, LogSettings(spill_after=0.1, write_timeout=0.05, max_backoff=0.1, max_spill_rows=3), metrics
    )
    many = rows(5)
    with caplog.at_level(logging.ERROR, logger="lightning_cls.serving.prediction_log"), locked(db):
        plog.add(many)
        wait_until(lambda: metrics.dropped.value == 2)
    assert metrics.spilled.value == 3
    assert many[3][0] in caplog.text and many[4][0] in caplog.text and "lost" in caplog.text
    assert plog.flush(10)
    assert stored_ids(db) == {r[0] for r in many[:3]}
    plog.close()


def test_a_stop_during_a_lock_spills_and_the_next_start_replays_the_file_once(tmp_path, caplog):
    db = tmp_path / "f.sqlite3"
    FeedbackStore(db).close()
    spill = tmp_path / ("f.sqlite3" + SPILL_SUFFIX)
    held = rows(4)
    with locked(db):
        plog = PredictionLog(db, LogSettings(spill_after=30, write_timeout=0.05, max_backoff=0.1, stop_timeout=0.3))
        plog.add(held)
        started = time.monotonic()
        assert plog.close() == 4  # bounded: it gave up after stop_timeout and kept the rows for the next start
        assert time.monotonic() - started < 3
    assert len(spill.read_text().splitlines()) == 4 and stored_ids(db) == set()
    # a crash after a commit but before the file was removed: a row both stored and spilled; and a torn last line
    with sqlite3.connect(db) as conn:
        conn.execute(
            "INSERT INTO predictions (id, time, label, probability, probabilities, num_tokens, windows, truncated, "
            "abstained, temperature, model_version, labels, text) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            held[0],
        )
    with spill.open("a") as f:
        f.write('["cut short", 1.0, "a"')
    metrics = Metrics()
    with caplog.at_level(logging.WARNING, logger="lightning_cls.serving.prediction_log"):
        restarted = PredictionLog(db, FAST, metrics)
        assert restarted.flush(10)
    assert stored_ids(db) == {r[0] for r in held}  # each once
    assert not spill.exists() and metrics.stored.value == 3 and metrics.dropped.value == 1
    assert "5 predictions in" in caplog.text and "line 5 is incomplete" in caplog.text
    restarted.close()


def test_a_stop_stores_what_is_held_when_the_database_is_free(tmp_path):
    db = tmp_path / "f.sqlite3"
    FeedbackStore(db).close()
    plog = PredictionLog(db, FAST)
    sent = [rows(3) for _ in range(20)]
    for r in sent:
        plog.add(r)
    assert plog.close() == 0
    assert len(stored_ids(db)) == 60


# ------------------------------------------------------------------------------------------------ POST /feedback
def test_feedback_for_ids_served_but_not_stored_is_a_503_then_a_200_once_they_are(db_location):
    db = db_location  # a SQLite file, then a database on a real PostgreSQL server: the same answers
    store = FeedbackStore(db)
    key = store.id_key()
    assert FeedbackStore(db).id_key() == key  # kept: ids stay recognisable after a restart
    issuer = IdIssuer(key)
    old, late = rows(1, issuer), rows(2, issuer)
    with store.transaction():
        store.insert_rows(old)
    app = FastAPI()
    endpoint = FeedbackEndpoint(str(db), task_for(NAMES), 10_000, 0.2, None, key)
    app.add_api_route(FEEDBACK_PATH, endpoint.handle, methods=["POST"], response_model=None)
    body = {"feedback": [{"prediction_id": old[0][0], "label": "a"}, {"prediction_id": late[0][0], "label": "b"}]}
    pending = post(app, body)
    assert pending.status_code == 503 and pending.headers["Retry-After"] == "2"
    assert pending.json()["pending_ids"] == [late[0][0]] and "not stored yet" in pending.json()["detail"]
    assert store.counts()["feedback"] == 0  # all or nothing
    never = post(app, {"prediction_id": IdIssuer().new(time.time()), "label": "a"})  # another database's id
    assert never.status_code == 404 and "never issued" in never.json()["detail"]
    with store.transaction():
        store.insert_rows(late)
    assert post(app, body).json() == {"stored": 2, "already_stored": 0}
    # an id of ours older than the oldest stored prediction was deleted by the retention bound: 404, not 503
    gone = issuer.new(time.time() - 3600)
    assert post(app, {"prediction_id": gone, "label": "a"}).status_code == 404
