"""The store's guarantees on both engines: each test runs on a SQLite file and on a fresh database of a real
PostgreSQL server (`db_location`, conftest.py). Two `FeedbackStore` objects on one database stand for two replicas
(or two processes of one service): each has its own connections, as each process has."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import sqlalchemy as sa
from store_helpers import query
from test_feedback import NAMES, VERSION, batch

from lightning_cls.data.feedback import read_feedback
from lightning_cls.database import StoreError, redacted
from lightning_cls.errors import DataError, InputError
from lightning_cls.serving.deployment import Deployment, DeploymentWatch, Slot, record
from lightning_cls.serving.prediction_log import IdIssuer, LogSettings, PredictionLog, spill_path_for
from lightning_cls.store.feedback_store import FeedbackStore
from lightning_cls.store.schema import SCHEMA_VERSION
from lightning_cls.store.transfer import copy


def stored(location: str, *batches: dict) -> FeedbackStore:
    store = FeedbackStore(location)
    for b in batches:
        store.insert_batch(b, VERSION, None)
    return store


def test_batches_are_stored_once_and_the_id_key_is_the_databases(db_location, tmp_path):
    b = batch(5)
    store = stored(db_location, b)
    assert store.insert_batch(b, VERSION, None) == 0  # a batch replayed (the spill file) stores each row once
    assert store.counts() == {"predictions": 5, "feedback": 0}
    replica = FeedbackStore(db_location, setup=False)
    assert replica.id_key() == store.id_key()  # every replica tags its ids with the database's key
    pid = IdIssuer(store.id_key()).new(time.time())
    assert IdIssuer(replica.id_key()).issued(pid)
    other = FeedbackStore(tmp_path / "other.sqlite3")
    assert not IdIssuer(other.id_key()).issued(pid)  # another database's servers did not issue it
    for s in (store, replica, other):
        s.close()


def test_feedback_lands_on_a_prediction_another_replica_stored(db_location):
    b = batch(4)
    answering = stored(db_location, b)  # replica A answered and stored these predictions
    receiving = FeedbackStore(db_location, setup=False)  # replica B receives their feedback
    assert receiving.record_feedback([(b["ids"][0], "a"), (b["ids"][1], "c")]).stored == 2
    again = receiving.record_feedback([(b["ids"][0], "a")])
    assert (again.stored, again.repeated) == (0, 1)  # the same label twice counts once
    assert receiving.record_feedback([(b["ids"][1], "b")]).conflicts == [(b["ids"][1], "c", "b")]
    # Replica A's logger reads every replica's feedback, oldest first, each row once.
    answers, seq = answering.answers_since(0, limit=10)
    assert [(a.predicted, a.true) for a in answers] == [("a", "a"), ("b", "c")]
    assert answering.answers_since(seq, limit=10) == ([], seq)
    assert query(answering, "SELECT count(*) FROM feedback") == [(2,)]


def test_replicas_sending_the_same_feedback_at_once_store_it_once(db_location):
    b = batch(50)
    stored(db_location, b).close()
    replicas = [FeedbackStore(db_location, setup=False) for _ in range(4)]
    items = [(pid, NAMES[i % 3]) for i, pid in enumerate(b["ids"])]
    results, errors = [], []

    def send(store: FeedbackStore) -> None:
        try:
            for start in range(0, len(items), 10):
                results.append(store.record_feedback(items[start : start + 10]))
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=send, args=(r,)) for r in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(r.stored for r in results) == 50 and sum(r.repeated for r in results) == 150
    assert replicas[0].counts()["feedback"] == 50


def test_a_reader_following_the_feedback_seq_misses_no_row_written_concurrently(db_location):
    """Writers on several connections while a logger reads "after the last seq": every row is read exactly once
    (on PostgreSQL, writers of feedback take turns, so a row never commits after a higher seq was read)."""
    batches = [batch(20) for _ in range(4)]
    stored(db_location, *batches).close()
    reader = FeedbackStore(db_location, setup=False)
    seen, seq = [], 0

    def write(b: dict) -> None:
        store = FeedbackStore(db_location, setup=False)
        for pid in b["ids"]:
            store.record_feedback([(pid, "a")])
        store.close()

    threads = [threading.Thread(target=write, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        answers, seq = reader.answers_since(seq, limit=1000)
        seen += answers
    seen += reader.answers_since(seq, limit=1000)[0]  # what the last writes left
    assert len(seen) == 80


def test_retention_deletes_the_oldest_with_their_feedback(db_location):
    old, new = batch(5), batch(5)
    old["time"] = time.time() - 3 * 86400
    store = stored(db_location, old, new)
    store.record_feedback([(old["ids"][0], "a"), (new["ids"][4], "c")])
    assert store.prune(max_rows=7) == 3
    assert store.counts() == {"predictions": 7, "feedback": 1}
    assert store.prune(max_rows=100, max_days=1) == 2
    assert store.known_ids(old["ids"] + new["ids"]) == set(new["ids"])
    assert store.oldest_time() == pytest.approx(new["time"])


def slot(version: str) -> Slot:
    return Slot(f"/models/{version}", version, version)


def test_a_deployment_recorded_through_one_replica_is_answered_by_another_within_a_second(db_location):
    FeedbackStore(db_location).close()
    record(db_location, Deployment(slot("v1")), "start")
    switched: list[tuple[int, str]] = []
    watch = DeploymentWatch(
        db_location, load=lambda d: d.champion.version, switch=lambda s, d, m: switched.append((s, m))
    )
    assert watch.first()[2] == "v1"
    watch.start()
    try:
        started = time.monotonic()
        seq = record(db_location, Deployment(slot("v2"), previous=slot("v1")), "set")  # through another replica
        while not switched and time.monotonic() - started < 3:
            time.sleep(0.02)
        assert switched == [(seq, "v2")] and time.monotonic() - started < 1.0
    finally:
        watch.stop()


def test_the_schema_is_versioned_and_a_newer_one_is_refused(db_location):
    store = FeedbackStore(db_location)
    with store.transaction() as conn:
        assert store.db.schema_version(conn) == SCHEMA_VERSION
        store.db.set_schema_version(conn, 99)
    store.close()
    with pytest.raises(InputError, match="has schema version 99, newer than this lightning_cls writes"):
        FeedbackStore(db_location)


def test_the_prediction_log_retries_spills_and_replays_while_the_database_refuses(db_location, tmp_path):
    """Another writer holds the predictions table: the log keeps the rows, spills them after a while, and stores
    them once the table is free, each once."""
    FeedbackStore(db_location).close()
    holder = FeedbackStore(db_location, setup=False)
    settings = LogSettings(spill_after=0.2, write_timeout=0.2, max_backoff=0.2, spill_path=str(tmp_path / "s.jsonl"))
    b = batch(6)
    # On SQLite the write transaction (BEGIN IMMEDIATE) already holds the one write lock.
    lock = "LOCK TABLE predictions IN ACCESS EXCLUSIVE MODE" if holder.db.postgres else "SELECT 1"
    with holder.transaction() as conn:
        conn.execute(sa.text(lock))
        log = PredictionLog(db_location, settings)
        log.add(FeedbackStore.rows_of(b, VERSION, None))
        deadline = time.monotonic() + 10
        spilled = tmp_path / "s.jsonl"
        while not (spilled.exists() and log.pending() == 6) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert spilled.exists() and log.pending() == 6 and len(spilled.read_text().splitlines()) == 6
    assert log.flush(10) and not (tmp_path / "s.jsonl").exists()
    assert holder.known_ids(b["ids"]) == set(b["ids"])
    log.close()


def test_the_training_reader_reads_either_engine(db_location):
    b = batch(3)
    b["texts"] = ["one text", "two texts", "three texts"]
    store = stored(db_location, b)
    store.record_feedback([(b["ids"][0], "b"), (b["ids"][2], "c")])
    raw = read_feedback(db_location)
    assert raw["text"].tolist() == ["one text", "three texts"] and raw["true_label"].tolist() == ["b", "c"]
    assert read_feedback(db_location, after=time.time() + 60).empty


def test_a_url_is_never_shown_with_its_password(postgres):
    url = f"postgresql://someone:s3cret@127.0.0.1:{postgres.port}/nowhere_{uuid.uuid4().hex[:6]}"
    assert redacted(url) == url.replace("s3cret", "***")
    with pytest.raises(InputError) as err:
        FeedbackStore(url)
    assert "s3cret" not in str(err.value) and "cannot be used as a PostgreSQL database" in str(err.value)
    with pytest.raises(DataError) as read_err:
        read_feedback(url)
    assert "s3cret" not in str(read_err.value)
    assert redacted("/data/f.sqlite3") == "/data/f.sqlite3"
    assert spill_path_for(url, "8000").name.endswith("-8000.spill.jsonl") and "s3cret" not in str(spill_path_for(url))
    assert issubclass(StoreError, Exception)


def test_a_sqlite_store_moves_to_postgres_and_carries_on_there(tmp_path, postgres):
    """`store copy`: rows, seq numbers and the id key move; ids issued before the move are still this store's,
    feedback lands on the old predictions, new rows number on from the copied ones; a non-empty target is refused."""
    from lightning_cls.cli import main as cli

    source = str(tmp_path / "f.sqlite3")
    old = batch(4)
    b_old = stored(source, old)
    b_old.record_feedback([(old["ids"][0], "a")])
    record(source, Deployment(slot("v1")), "start")
    key = b_old.id_key()
    b_old.close()
    target = postgres.new_database()
    cli(["store", "copy", "--source", source, "--target", target])
    moved = FeedbackStore(target)
    assert moved.id_key() == key and moved.counts() == {"predictions": 4, "feedback": 1}
    assert moved.record_feedback([(old["ids"][1], "b")]).stored == 1
    new = batch(2)
    moved.insert_batch(new, VERSION, None)
    assert query(moved, "SELECT max(seq) FROM predictions") == [(6,)]
    assert query(moved, "SELECT seq, action FROM deployments") == [(1, "start")]
    assert record(target, Deployment(slot("v2"), previous=slot("v1")), "set") == 2
    moved.close()
    with pytest.raises(InputError, match="is not empty"):
        copy(source, target)
