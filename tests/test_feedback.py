"""Ground truth for the service: the SQLite store of predictions and feedback, the /feedback endpoint (ASGI level,
no server), abstention and calibrated probabilities in the LitAPI, the accuracy gauges of the logger process, and
one slow test on real servers (feedback end to end, then a restart on the same database)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import queue
import sqlite3
import threading
import time
import uuid

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from store_helpers import query

from lightning_cls.errors import InputError
from lightning_cls.monitoring.drift import ECE_BINS, FeedbackWindow, top_label_ece
from lightning_cls.serving.gauges import collect_metrics, enable_multiprocess_metrics
from lightning_cls.serving.http import FEEDBACK_PATH, ApiKeyGuard, FeedbackEndpoint, RequestError, parse_feedback_body
from lightning_cls.serving.metrics import AccuracySettings, LoggerState
from lightning_cls.store.feedback_store import FeedbackStore, StoreSettings
from lightning_cls.task import task_for
from lightning_cls.task.scores import label_scores

NAMES = ["a", "b", "c"]
TASK = task_for(NAMES)
VERSION = "v1"
KEY = "k3y"


def batch(n: int, labels: list[str] | None = None, probability: float = 0.9, abstained: bool = False) -> dict:
    """A logger message for ``n`` texts, as `ClassifierAPI.predict` sends it."""
    labels = labels or [NAMES[i % 3] for i in range(n)]
    return {
        "time": time.time(),
        "requests": 1,
        "ids": [uuid.uuid4().hex for _ in range(n)],
        "labels": labels,
        "probabilities": [probability] * n,
        "all_probabilities": [
            [probability if name == label else (1 - probability) / 2 for name in NAMES] for label in labels
        ],
        "lengths": [12] * n,
        "windows": [1] * n,
        "truncated": [False] * n,
        "abstained": [abstained] * n,
    }


def store_with(tmp_path, *batches: dict, name: str = "f.sqlite3") -> FeedbackStore:
    store = FeedbackStore(tmp_path / name)
    for b in batches:
        store.insert_batch(b, VERSION, None)
    return store


# ------------------------------------------------------------------------------------------------ the store
def test_the_store_keeps_predictions_and_feedback_across_a_reopen(tmp_path):
    first = batch(4)
    store = store_with(tmp_path, first)
    pairs = [(first["ids"][0], "a"), (first["ids"][1], "c")]
    assert store.record_feedback(pairs).stored == 2
    store.close()  # a restart: a new connection (a new process) on the same file

    store = FeedbackStore(tmp_path / "f.sqlite3")
    assert store.counts() == {"predictions": 4, "feedback": 2}
    with sqlite3.connect(tmp_path / "f.sqlite3") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    seen, seq = store.feedback_since(0, VERSION, limit=10)
    assert seen == [("a", "a"), ("b", "c")] and seq == 2  # (predicted, true), oldest first
    assert store.feedback_since(seq, VERSION, limit=10) == ([], 2)
    assert store.feedback_since(0, "another model", limit=10) == ([], 2)  # another model's feedback is not counted
    row = query(store, "SELECT label, probability, probabilities, abstained FROM predictions LIMIT 1")[0]
    assert row == ("a", 0.9, json.dumps([0.9, 0.05, 0.05]), 0)


def test_feedback_is_all_or_nothing_idempotent_and_write_once(tmp_path):
    b = batch(3)
    store = store_with(tmp_path, b)
    ids = b["ids"]
    bad = store.record_feedback([(ids[0], "a"), ("nope", "b")])  # one unknown id: nothing stored
    assert bad.unknown == ["nope"] and not bad.ok and store.counts()["feedback"] == 0
    assert store.record_feedback([(ids[0], "a"), (ids[1], "b")]).stored == 2
    again = store.record_feedback([(ids[0], "a"), (ids[2], "c")])  # ids[0] again, same label: counted once
    assert (again.stored, again.repeated) == (1, 1) and store.counts()["feedback"] == 3
    conflict = store.record_feedback([(ids[1], "c")])
    assert conflict.conflicts == [(ids[1], "b", "c")] and store.counts()["feedback"] == 3
    assert query(store, "SELECT label FROM feedback WHERE prediction_id = :id", id=ids[1]) == [("b",)]


def test_retention_deletes_the_oldest_predictions_with_their_feedback(tmp_path):
    old, new = batch(5), batch(5)
    old["time"] = time.time() - 3 * 86400
    store = store_with(tmp_path, old, new)
    store.record_feedback([(old["ids"][0], "a"), (new["ids"][4], "c")])
    assert store.prune(max_rows=7) == 3  # the three oldest
    assert store.counts() == {"predictions": 7, "feedback": 1}  # the feedback of a deleted prediction went with it
    assert store.known_ids(old["ids"]) == set(old["ids"][3:])
    assert store.prune(max_rows=100, max_days=1) == 2  # the rest of the three-day-old batch
    assert store.known_ids(old["ids"] + new["ids"]) == set(new["ids"])
    assert store.prune(max_rows=100, max_days=1) == 0


def test_a_newer_schema_or_a_file_that_is_not_a_database_is_refused_naming_it(tmp_path):
    store = store_with(tmp_path)
    store.close()
    with sqlite3.connect(tmp_path / "f.sqlite3") as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(InputError, match=r"f\.sqlite3 has schema version 99, newer"):
        FeedbackStore(tmp_path / "f.sqlite3")
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(InputError, match=r"--feedback_db .*junk\.sqlite3 cannot be used as a SQLite database"):
        FeedbackStore(junk)


def test_feedback_writers_and_the_prediction_writer_run_concurrently(tmp_path):
    """The logger process inserts batches while HTTP server threads (each its own connection, as each process has)
    write feedback, some for predictions still on their way: nothing fails on a lock, nothing is lost."""
    writer = store_with(tmp_path)
    batches = [batch(20) for _ in range(30)]
    errors: list[BaseException] = []

    def insert() -> None:
        try:
            for b in batches:
                writer.insert_batch(b, VERSION, None)
        except BaseException as e:  # reported by the assertion below
            errors.append(e)

    def label(part: int) -> None:
        try:
            store = FeedbackStore(tmp_path / "f.sqlite3")
            for b in batches[part::4]:
                items = [(pid, NAMES[i % 3]) for i, pid in enumerate(b["ids"][:10])]
                while not store.known_ids([pid for pid, _ in items]) >= {pid for pid, _ in items}:
                    time.sleep(0.005)  # as the endpoint does: wait for ids not stored yet
                assert store.record_feedback(items).stored == 10
            store.close()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=insert)] + [threading.Thread(target=label, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert writer.counts() == {"predictions": 600, "feedback": 300}
    seen, _ = writer.feedback_since(0, VERSION, limit=1000)
    assert len(seen) == 300


# ------------------------------------------------------------------------------------------------ the request body
def test_parse_feedback_accepts_a_list_one_object_or_the_object_alone():
    one = {"prediction_id": "x1", "label": "a"}
    assert parse_feedback_body(json.dumps({"feedback": [one, {**one, "prediction_id": "x2"}]}).encode(), TASK) == [
        ("x1", "a"),
        ("x2", "a"),
    ]
    assert parse_feedback_body(json.dumps({"feedback": one}).encode(), TASK) == [("x1", "a")]
    assert parse_feedback_body(json.dumps(one).encode(), TASK) == [("x1", "a")]
    assert parse_feedback_body(json.dumps([one, one]).encode(), TASK) == [("x1", "a")]  # the same twice: once


BAD_FEEDBACK = [
    ('{"feedback": ', 400, "Malformed JSON"),
    ('"x"', 422, "got a string"),
    ('{"feedback": []}', 422, '"feedback" is empty'),
    ('{"feedback": [], "more": 1}', 422, "Unknown field(s) ['more']"),
    ('{"feedback": [3]}', 422, "feedback[0] must be an object, got a number"),
    ('{"feedback": [{"label": "a"}]}', 422, 'feedback[0]: "prediction_id" must be a non-empty string, got null'),
    ('{"feedback": [{"prediction_id": "x", "label": 1}]}', 422, 'feedback[0]: "label" must be a string'),
    ('{"prediction_id": "x", "label": "a", "why": "?"}', 422, "feedback[0] has unknown field(s) ['why']"),
    (
        '{"feedback": [{"prediction_id": "x", "label": "zebra"}, {"prediction_id": "y", "label": "yak"}]}',
        422,
        "Unknown label(s) ['yak', 'zebra']: the model's labels are ['a', 'b', 'c']",
    ),
    ('[{"prediction_id": "x", "label": "a"}, {"prediction_id": "x", "label": "b"}]', 422, "['x'] are given twice"),
    (json.dumps([{"prediction_id": str(i), "label": "a"} for i in range(4)]), 422, "this server takes at most 3"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_FEEDBACK, ids=[m[:30] for _, _, m in BAD_FEEDBACK])
def test_parse_feedback_rejects_bad_bodies_naming_the_culprit(body, status, message):
    with pytest.raises(RequestError) as err:
        parse_feedback_body(body.encode(), TASK, max_items=3)
    assert err.value.status == status
    assert message in err.value.message


# ------------------------------------------------------------------------------------------------ the endpoint
def feedback_app(db, wait: float = 0.2, notified: list | None = None, key: str | None = None):
    app = FastAPI()
    endpoint = FeedbackEndpoint(str(db), TASK, 10_000, wait, notified.append if notified is not None else None)
    app.add_api_route(FEEDBACK_PATH, endpoint.handle, methods=["POST"], response_model=None)
    return ApiKeyGuard(app, key=key, paths=[FEEDBACK_PATH]) if key else app


def post(app, body, headers: dict | None = None) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.post(FEEDBACK_PATH, json=body, headers=headers or {})

    return asyncio.run(go())


def test_the_endpoint_stores_labels_and_names_unknown_ids_and_conflicts(tmp_path):
    b = batch(3)
    store = store_with(tmp_path, b)
    ids, notified = b["ids"], []
    app = feedback_app(tmp_path / "f.sqlite3", notified=notified)
    good = {"feedback": [{"prediction_id": ids[0], "label": "a"}, {"prediction_id": ids[1], "label": "b"}]}
    response = post(app, good)
    assert response.status_code == 200 and response.json() == {"stored": 2, "already_stored": 0}
    assert post(app, good).json() == {"stored": 0, "already_stored": 2}  # idempotent
    assert notified == [2]  # the logger process is told only when something new is stored

    started = time.monotonic()
    unknown = post(app, [{"prediction_id": ids[2], "label": "c"}, {"prediction_id": "f00d", "label": "a"}])
    assert unknown.status_code == 404 and time.monotonic() - started >= 0.2  # it waited for the id first
    assert "Unknown prediction_id(s) ['f00d']" in unknown.json()["detail"] and unknown.json()["unknown_ids"] == ["f00d"]
    conflict = post(app, {"prediction_id": ids[1], "label": "c"})
    assert conflict.status_code == 409
    assert f"{ids[1]!r} has 'b' (sent 'c')" in conflict.json()["detail"]
    assert post(app, {"prediction_id": ids[2], "label": "zebra"}).status_code == 422
    assert store.counts()["feedback"] == 2  # none of the refused requests stored anything


def test_feedback_for_a_prediction_still_on_its_way_waits_for_it(tmp_path):
    """The answer reaches the client before the logger process stores its prediction: the endpoint waits."""
    store = store_with(tmp_path)
    late = batch(1)
    app = feedback_app(tmp_path / "f.sqlite3", wait=5.0)
    timer = threading.Timer(0.3, store.insert_batch, args=(late, VERSION, None))
    timer.start()
    response = post(app, {"prediction_id": late["ids"][0], "label": "b"})
    timer.join()
    assert response.status_code == 200 and response.json()["stored"] == 1


def test_the_endpoint_needs_the_api_key_when_there_is_one(tmp_path):
    b = batch(1)
    store_with(tmp_path, b)
    app = feedback_app(tmp_path / "f.sqlite3", key=KEY)
    body = {"prediction_id": b["ids"][0], "label": "a"}
    assert post(app, body).status_code == 401
    assert post(app, body, {"Authorization": "Bearer wrong"}).status_code == 401
    assert post(app, body, {"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_a_body_over_the_limit_is_a_413(tmp_path):
    store_with(tmp_path)
    app = FastAPI()
    endpoint = FeedbackEndpoint(str(tmp_path / "f.sqlite3"), TASK, max_body_bytes=100)
    app.add_api_route(FEEDBACK_PATH, endpoint.handle, methods=["POST"], response_model=None)
    response = post(app, [{"prediction_id": "x" * 200, "label": "a"}])
    assert response.status_code == 413 and "limit of 100 bytes" in response.json()["detail"]


# ------------------------------------------------------------------------------------------------ scores, pure
def test_label_scores_agree_with_the_evaluation_report():
    from lightning_cls.model.evaluation import classification_report

    rng = np.random.default_rng(0)
    names = [f"l{i}" for i in range(6)]
    true = rng.integers(0, 4, 300)  # two classes never present...
    predicted = np.where(rng.random(300) < 0.7, true, rng.integers(0, 5, 300))  # ...and one of them predicted
    confmat = np.zeros((6, 6), dtype=np.int64)
    np.add.at(confmat, (true, predicted), 1)
    report = classification_report(confmat, names)
    scores = label_scores([names[i] for i in true], [names[i] for i in predicted], names)
    assert scores["accuracy"] == pytest.approx(report["accuracy"])
    assert scores["macro_f1"] == pytest.approx(report["macro_f1"])
    with pytest.raises(InputError, match=r"\['zebra'\] are not among"):
        label_scores(["zebra"], ["l0"], names)


def test_top_label_ece_equals_the_calibration_modules_ece():
    from lightning_cls.model.calibration import ECE_BINS as CALIBRATION_BINS
    from lightning_cls.model.calibration import expected_calibration_error

    assert ECE_BINS == CALIBRATION_BINS
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(500, 4)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 4, 500)
    ece = top_label_ece(probs.max(1), probs.argmax(1) == labels)
    assert ece == pytest.approx(expected_calibration_error(probs, labels))
    assert top_label_ece([], []) is None


def test_the_feedback_window_keeps_the_last_labels_and_waits_for_enough():
    window = FeedbackWindow(TASK, size=4, min_labels=3)
    window.add([("a", "a"), ("b", "c")])
    assert window.report() == {"rows": 2, "accuracy": None, "macro_f1": None}
    window.add([("c", "c"), ("a", "a"), ("b", "b")])  # the first pair slides out
    assert window.report()["rows"] == 4 and window.report()["accuracy"] == pytest.approx(3 / 4)
    with pytest.raises(InputError, match="--min_feedback <= --feedback_window"):
        FeedbackWindow(TASK, size=2, min_labels=3)


# ------------------------------------------------------------------------------------------------ the gauges
@pytest.fixture
def multiprocess_metrics(tmp_path):
    from prometheus_client import values

    old_class = values.ValueClass
    enable_multiprocess_metrics(tmp_path / "metrics")
    try:
        yield lambda: collect_metrics()[0].decode()
    finally:
        values.ValueClass = old_class
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)


def value(page: str, name: str) -> float:
    """The value of an unlabelled sample (NaN read as NaN); absent is a failure, not 0."""
    for line in page.splitlines():
        if line.split(" ")[0] == name:
            return float(line.split(" ")[1])
    raise AssertionError(f"{name} is not on the page")


def monitor_settings(db, validation: float | None = 0.9, version: str = VERSION) -> dict:
    return {
        "task": TASK,
        "reference": None,
        "max_batch_size": 8,
        "max_length": 32,
        "window": {"size": 20, "min_texts": 10},
        "store": StoreSettings(str(db), version, max_rows=1000),
        "accuracy": AccuracySettings(validation, margin=0.05, window=10, min_labels=4),
    }


def test_the_gauges_move_with_predictions_then_feedback_and_survive_a_restart(tmp_path, multiprocess_metrics, caplog):
    db = tmp_path / "f.sqlite3"
    FeedbackStore(db).close()  # `serve` makes the tables before the logger process starts
    monitor = LoggerState(monitor_settings(db))
    page = multiprocess_metrics()
    assert value(page, "lightning_cls_validation_accuracy") == 0.9
    assert value(page, "lightning_cls_estimated_accuracy_alert_margin") == 0.05
    for name in ("lightning_cls_live_accuracy", "lightning_cls_live_macro_f1", "lightning_cls_estimated_accuracy"):
        assert math.isnan(value(page, name)), name
    assert value(page, "lightning_cls_feedback_window_texts") == 0
    assert value(page, "lightning_cls_abstentions_total") == 0

    sure, unsure = batch(6, probability=0.95), batch(6, probability=0.4, abstained=True)
    with caplog.at_level(logging.WARNING, logger="lightning_cls.serving.metrics"):
        monitor.on_batch(sure)
        monitor.on_batch(unsure)
        assert monitor.log.flush(10)  # stored by the prediction log's writer thread
        page = multiprocess_metrics()
        assert value(page, "lightning_cls_prediction_log_stored_total") == 12
        assert value(page, "lightning_cls_prediction_log_pending") == 0
        assert value(page, "lightning_cls_abstentions_total") == 6
        assert value(page, "lightning_cls_estimated_accuracy") == pytest.approx((6 * 0.95 + 6 * 0.4) / 12)
        assert "Accuracy: estimated accuracy 0.675 over the last 12 predictions" in caplog.text

        # Feedback arrives in the HTTP process (its own connection), then the message "feedback" to this process.
        http = FeedbackStore(db)
        labels = ["a", "b", "c", "a", "a", "a"]  # the predictions were a, b, c, a, b, c: four right
        assert http.record_feedback(list(zip(sure["ids"], labels, strict=True))).stored == 6
        monitor.refresh_feedback()
        page = multiprocess_metrics()
        assert value(page, "lightning_cls_feedback_window_texts") == 6
        assert value(page, "lightning_cls_live_accuracy") == pytest.approx(4 / 6)
        assert value(page, "lightning_cls_live_macro_f1") == pytest.approx(
            label_scores(labels, sure["labels"], NAMES)["macro_f1"]
        )
        assert value(page, "lightning_cls_feedback_labels_total") == 6
        assert "Accuracy: live accuracy 0.667 over the last 6 labelled predictions is 0.233 below" in caplog.text

    # A restart: the new logger process reads this model's stored feedback back; the stored predictions stay.
    monitor.close()
    restarted = LoggerState(monitor_settings(db))
    restarted.refresh_feedback(count=False)
    page = multiprocess_metrics()
    assert value(page, "lightning_cls_feedback_window_texts") == 6
    assert value(page, "lightning_cls_live_accuracy") == pytest.approx(4 / 6)
    assert http.counts() == {"predictions": 12, "feedback": 6}
    # Another model (another export) on the same database starts with an empty window.
    LoggerState(monitor_settings(db, version="v2"))
    assert value(multiprocess_metrics(), "lightning_cls_feedback_window_texts") == 0


def test_feedback_another_process_stored_reaches_an_idle_logger_by_its_poll(tmp_path, multiprocess_metrics):
    """Another replica's POST /feedback tells only its own logger: this one finds the rows by looking every
    `feedback_poll` seconds, without a batch or a message of its own."""
    db = tmp_path / "f.sqlite3"
    FeedbackStore(db).close()
    monitor = LoggerState({**monitor_settings(db), "feedback_poll": 0.05})
    try:
        sure = batch(6, probability=0.95)
        monitor.on_batch(sure)
        assert monitor.log.flush(10)
        other = FeedbackStore(db)  # another replica's connection
        assert other.record_feedback(list(zip(sure["ids"], sure["labels"], strict=True))).stored == 6
        other.close()
        deadline = time.monotonic() + 5
        while len(monitor.feedback) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(monitor.feedback) == 6
        assert value(multiprocess_metrics(), "lightning_cls_live_accuracy") == 1.0
    finally:
        monitor.close()


def test_without_a_validation_accuracy_the_gauge_is_nan_and_nothing_is_compared(tmp_path, multiprocess_metrics, caplog):
    FeedbackStore(tmp_path / "f.sqlite3").close()
    monitor = LoggerState(monitor_settings(tmp_path / "f.sqlite3", validation=None))
    with caplog.at_level(logging.WARNING, logger="lightning_cls.serving.metrics"):
        monitor.on_batch(batch(12, probability=0.2))
    assert math.isnan(value(multiprocess_metrics(), "lightning_cls_validation_accuracy"))
    assert "Accuracy:" not in caplog.text


# ------------------------------------------------------------------------------------------------ the LitAPI
@pytest.fixture(scope="module")
def exported(sample_dir, tmp_path_factory):
    from serving_helpers import fabricate_export

    return fabricate_export(sample_dir / "wordpiece", tmp_path_factory.mktemp("exported"))


def api_for(model_dir, **kwargs):

    from lightning_cls.serving.api import ClassifierAPI

    api = ClassifierAPI(str(model_dir), max_batch_size=4, **kwargs)
    api.set_logger_queue(queue.Queue())
    api.setup("cpu")
    return api


def test_the_api_answers_calibrated_probabilities_abstains_and_ids_each_answer(exported):
    import torch

    from lightning_cls.data.sample_data import generate_texts
    from lightning_cls.model.calibration import calibrated_probabilities

    texts, _ = generate_texts(rows_per_label=1, seed=3, rare_rows=0)
    plain = api_for(exported).predict((texts, 3))
    hot = api_for(exported, temperature=0.25, min_confidence=0.5)
    answers = hot.predict((texts, 3))
    ids = [a["prediction_id"] for a in answers]
    assert len(set(ids)) == len(texts) and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    # dividing by T keeps every label and sharpens (T < 1) every probability
    assert [a["label"] for a in answers] == [a["label"] for a in plain]
    assert all(h["probability"] >= p["probability"] for h, p in zip(answers, plain, strict=True))
    assert [a["abstained"] for a in answers] == [a["probability"] < 0.5 for a in answers]
    assert not any(a["abstained"] for a in plain)
    # the same maths as the calibration module
    logits = torch.randn(5, 10)
    hot_probs = hot.probabilities(logits)
    torch.testing.assert_close(hot_probs, calibrated_probabilities(logits, 0.25))
    # the logger process gets the ids, every probability and the abstentions
    messages = [hot._logger_queue.get_nowait() for _ in range(hot._logger_queue.qsize())]
    key, sent = messages[-1]
    assert key == "batch" and sent["ids"] == ids and sent["abstained"] == [a["abstained"] for a in answers]
    assert len(sent["all_probabilities"][0]) == 10 and sum(sent["all_probabilities"][0]) == pytest.approx(1)


def test_serve_reads_the_temperature_and_validation_accuracy_defensively(exported, tmp_path):
    from lightning_cls.export.folder import export_temperature, read_export_metadata
    from lightning_cls.serving.server import ServeSettings, build_server, validation_accuracy

    meta = read_export_metadata(exported)
    assert export_temperature(meta) is None and validation_accuracy(meta) is None
    meta.temperature, meta.calibration = 1.5, {"split": "validation", "accuracy": 0.81, "rows": 300}
    assert export_temperature(meta) == 1.5 and validation_accuracy(meta) == 0.81
    meta.temperature, meta.calibration = None, None
    meta.extra.update(temperature=2.0, validation_accuracy=0.7)  # as an older ExportMetadata would read them
    assert export_temperature(meta) == 2.0 and validation_accuracy(meta) == 0.7
    meta.temperature = -1.0
    with pytest.raises(InputError, match=r"temperature -1\.0 must be a positive finite number"):
        export_temperature(meta)
    # every bad setting in one error naming the flags
    bad = ServeSettings(
        str(exported), feedback_db=str(tmp_path / "f.sqlite3"), min_confidence=1.5, min_feedback=5, feedback_window=2
    )
    with pytest.raises(InputError, match=r"--min_confidence must be in \(0, 1\], got 1.5; --min_feedback must be"):
        build_server(bad)


# ------------------------------------------------------------------------------------------------ real servers
@pytest.mark.slow
def test_feedback_end_to_end_then_a_restart_on_the_same_database(exported, tmp_path, monkeypatch):
    """Predictions, feedback (good, unknown, conflicting), the gauges on /metrics, abstentions; then the server is
    stopped and started again on the same --feedback_db: the labels are still there and counted."""
    from serving_helpers import ServerProcess, free_port
    from test_serve import metric

    from lightning_cls.data.sample_data import generate_texts

    monkeypatch.setenv("FEEDBACK_TEST_KEY", KEY)
    db = tmp_path / "feedback.sqlite3"
    auth = {"Authorization": f"Bearer {KEY}"}

    def start(log_name: str) -> ServerProcess:
        port = free_port()
        args = ["-m", "lightning_cls", "serve", "--model_dir", str(exported), "--port", str(port)]
        args += ["--feedback_db", str(db), "--min_feedback", "4", "--min_confidence", "0.5", "--num_threads", "1"]
        args += ["--api_key_env", "FEEDBACK_TEST_KEY", "--log_level", "warning"]
        return ServerProcess(args, port, tmp_path / log_name)

    def wait_for(client: httpx.Client, name: str, target: float) -> str:
        deadline = time.monotonic() + 30
        while True:
            page = client.get("/metrics").text
            if metric(page, name) >= target or time.monotonic() > deadline:
                return page
            time.sleep(0.1)

    texts, _ = generate_texts(rows_per_label=1, seed=9, rare_rows=0)
    with start("first.log") as server, httpx.Client(base_url=server.url, timeout=60) as client:
        answers = client.post("/predict", json={"texts": texts}, headers=auth).json()["predictions"]
        assert all({"prediction_id", "abstained"} <= set(a) for a in answers)
        # the untrained model is unsure of everything: every answer abstains but keeps its label
        assert all(a["abstained"] and a["label"] for a in answers)
        items = [{"prediction_id": a["prediction_id"], "label": a["label"]} for a in answers[:6]]
        assert client.post(FEEDBACK_PATH, json={"feedback": items}).status_code == 401
        stored = client.post(FEEDBACK_PATH, json={"feedback": items}, headers=auth)  # at once: it waits if needed
        assert stored.status_code == 200 and stored.json() == {"stored": 6, "already_stored": 0}
        unknown = client.post(FEEDBACK_PATH, json={"prediction_id": "f00d", "label": answers[0]["label"]}, headers=auth)
        assert unknown.status_code == 404 and "['f00d']" in unknown.json()["detail"]
        page = wait_for(client, "lightning_cls_feedback_window_texts", 6)
        assert metric(page, "lightning_cls_live_accuracy") == 1.0  # the labels sent were the predicted ones
        assert metric(page, "lightning_cls_abstentions_total") == len(texts)
        assert metric(page, "lightning_cls_http_requests_total", path=FEEDBACK_PATH, status="404") == 1
        info = client.get("/info").json()["model"]
        assert info["feedback"]["db"] == str(db) and info["feedback"]["kept_after_stop"] is True
        assert info["temperature"]["in_use"] is None and FEEDBACK_PATH in info["api_key"]["required_for"]

    with start("second.log") as server, httpx.Client(base_url=server.url, timeout=60) as client:
        page = wait_for(client, "lightning_cls_feedback_window_texts", 6)
        assert metric(page, "lightning_cls_feedback_window_texts") == 6  # read back from the database
        again = client.post(FEEDBACK_PATH, json={"feedback": items}, headers=auth)
        assert again.json() == {"stored": 0, "already_stored": 6}
        changed = {
            "prediction_id": items[0]["prediction_id"],
            "label": "statistics" if items[0]["label"] != "statistics" else "physics",
        }
        assert client.post(FEEDBACK_PATH, json=changed, headers=auth).status_code == 409
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM predictions").fetchone()[0] == len(texts)
        assert conn.execute("SELECT count(*) FROM feedback").fetchone()[0] == 6
