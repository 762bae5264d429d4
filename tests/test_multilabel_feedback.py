"""Feedback with label sets (a multi-label model): the store keeps true sets (schema 2, and a version-1 file migrated
in place), the request body takes "labels": [...] and refuses what does not fit the model, and the endpoint stores,
repeats and refuses sets as it does single labels. ASGI level and SQLite only: no server, no model."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid

import pytest
from fastapi import FastAPI
from store_helpers import query
from test_feedback import post

from lightning_cls.serving.http import FEEDBACK_PATH, FeedbackEndpoint, RequestError, parse_feedback_body
from lightning_cls.store.feedback_store import SCHEMA_VERSION, FeedbackStore
from lightning_cls.task import task_for

NAMES = ["a", "b", "c", "d"]
VERSION = "v-ml"


def set_batch(sets: list[list[str]], probability: float = 0.8) -> dict:
    """A logger message of a multi-label model, as `ClassifierAPI.predict` sends it (the set's first label is its
    most probable)."""
    n = len(sets)
    return {
        "time": time.time(),
        "requests": 1,
        "ids": [uuid.uuid4().hex for _ in range(n)],
        "labels": [s[0] for s in sets],
        "probabilities": [probability] * n,
        "all_probabilities": [[probability if name in s else 0.1 for name in NAMES] for s in sets],
        "lengths": [12] * n,
        "windows": [1] * n,
        "truncated": [False] * n,
        "abstained": [False] * n,
        "label_sets": sets,
    }


# ------------------------------------------------------------------------------------------------ the store
def test_the_store_keeps_predicted_and_true_label_sets(tmp_path):
    b = set_batch([["a", "b"], ["c"], ["d", "a"]])
    store = FeedbackStore(tmp_path / "f.sqlite3")
    store.insert_batch(b, VERSION, None)
    ids = b["ids"]
    assert store.record_feedback([(ids[0], ("a", "b")), (ids[1], ("c", "d"))]).stored == 2
    # the same set in another order is the same set: repeated, not a conflict
    again = store.record_feedback([(ids[0], ("b", "a"))])
    assert (again.stored, again.repeated) == (0, 1)
    conflict = store.record_feedback([(ids[1], ("c",)), (ids[2], ("a",))])
    assert conflict.conflicts == [(ids[1], ("c", "d"), ("c",))] and store.counts()["feedback"] == 2
    row = query(store, "SELECT label, labels FROM feedback WHERE prediction_id = :id", id=ids[0])[0]
    assert row == ("a; b", '["a", "b"]')  # readable as one column; exact as JSON
    stored = query(store, "SELECT label, labels FROM predictions WHERE id = :id", id=ids[2])[0]
    assert stored == ("d", '["d", "a"]')  # the answer's set, most probable first
    seen, _ = store.feedback_since(0, VERSION, limit=10)
    assert seen == [(("a", "b"), ("a", "b")), (("c",), ("c", "d"))]  # (predicted, true) sets


V1_SCHEMA = """
CREATE TABLE models (model_version TEXT PRIMARY KEY, labels TEXT NOT NULL, model_dir TEXT, first_served REAL NOT NULL);
CREATE TABLE predictions (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, time REAL NOT NULL,
    label TEXT NOT NULL, probability REAL NOT NULL, probabilities TEXT NOT NULL, num_tokens INTEGER NOT NULL,
    windows INTEGER NOT NULL, truncated INTEGER NOT NULL, abstained INTEGER NOT NULL, temperature REAL,
    model_version TEXT NOT NULL);
CREATE INDEX predictions_time ON predictions (time);
CREATE TABLE secrets (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE feedback (seq INTEGER PRIMARY KEY AUTOINCREMENT, prediction_id TEXT NOT NULL UNIQUE
    REFERENCES predictions (id) ON DELETE CASCADE, label TEXT NOT NULL, time REAL NOT NULL);
PRAGMA user_version = 1;
"""


def test_a_version_1_database_is_migrated_in_place_and_keeps_its_rows(tmp_path):
    """A file written before label sets (schema 1): opening it adds the columns; its rows read as before, a row
    spilled by that version (11 values) is still stored, and sets can be stored beside the old single labels."""
    db = tmp_path / "old.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.executescript(V1_SCHEMA)
        conn.execute(
            "INSERT INTO predictions VALUES (1, 'p1', 0, 'a', 0.9, '[0.9, 0.1, 0, 0]', 5, 1, 0, 0, NULL, ?)", (VERSION,)
        )
        conn.execute("INSERT INTO feedback VALUES (1, 'p1', 'a', 0)")
    conn.close()
    store = FeedbackStore(db)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        for table in ("predictions", "feedback"):
            assert "labels" in {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}, table
    conn.close()
    assert store.feedback_since(0, VERSION, limit=10) == ([("a", "a")], 1)  # single labels read as before
    old_spilled = ["p2", time.time(), "b", 0.7, "[0.1, 0.7, 0.1, 0.1]", 6, 1, 0, 0, None, VERSION]
    with store.transaction():
        assert store.insert_rows([old_spilled]) == 1
    assert store.record_feedback([("p2", ("b", "c"))]).stored == 1
    # the label sent as one name before sets were taken equals its one-name set
    assert store.record_feedback([("p1", ("a",))]).repeated == 1
    store.close()
    FeedbackStore(db).close()  # opening a migrated file again changes nothing


# ------------------------------------------------------------------------------------------------ the request body
def parse(body: object, multi_label: bool = True, max_items: int = 1000):
    task = task_for(NAMES, [0.5] * len(NAMES)) if multi_label else task_for(NAMES)
    return parse_feedback_body(json.dumps(body).encode(), task, max_items=max_items)


def test_a_multi_label_body_takes_label_sets_of_one_or_more_names():
    assert parse({"feedback": [{"prediction_id": "x", "labels": ["c", "a"]}]}) == [("x", ("a", "c"))]  # model order
    assert parse({"prediction_id": "x", "labels": ["b"]}) == [("x", ("b",))]  # a set of one label
    assert parse([{"prediction_id": "x", "labels": ["b", "b", "a"]}]) == [("x", ("a", "b"))]  # repeats dropped
    same_twice = [{"prediction_id": "x", "labels": ["a", "b"]}, {"prediction_id": "x", "labels": ["b", "a"]}]
    assert parse(same_twice) == [("x", ("a", "b"))]
    # a single-label model keeps its own form
    assert parse({"prediction_id": "x", "label": "a"}, multi_label=False) == [("x", "a")]


BAD_SETS = [
    # (body, multi_label, message): each names the item, the field and what was sent
    (
        {"prediction_id": "x", "label": "a"},
        True,
        'feedback[0]: this model answers label sets: send the true labels as "labels": ["a"] (a list of label '
        'names, one or more), not "label" (got "label": "a")',
    ),
    ({"prediction_id": "x", "labels": []}, True, 'feedback[0]: "labels" is empty'),
    (
        {"prediction_id": "x", "labels": "a, b"},
        True,
        'feedback[0]: "labels" must be a list of label names, got a string',
    ),
    ({"prediction_id": "x"}, True, 'feedback[0]: "labels" must be a list of label names, got null'),
    ({"prediction_id": "x", "labels": ["a", 3]}, True, "feedback[0].labels[1] must be a string, got a number"),
    ({"prediction_id": "x", "label": "a", "labels": ["a"]}, True, 'not "label"'),
    (
        [{"prediction_id": "x", "labels": ["a"]}, {"prediction_id": "y", "labels": ["b", "zebra"]}],
        True,
        "Unknown label(s) ['zebra']: the model's labels are ['a', 'b', 'c', 'd'] (sent in feedback[1].labels[1]).",
    ),
    (
        [{"prediction_id": "x", "labels": ["a"]}, {"prediction_id": "x", "labels": ["a", "b"]}],
        True,
        "prediction_id(s) ['x'] are given twice with different label sets",
    ),
    (
        {"prediction_id": "x", "labels": ["a"]},
        False,
        'feedback[0]: this model answers one label per text: send "label": "..." (a string), not "labels" (got ["a"])',
    ),
    ({"id": "x", "labels": ["a"]}, True, "feedback[0] has unknown field(s) ['id'] (an answer's id is sent as"),
    ({"feedback": "a"}, True, '{"feedback": [{"prediction_id": "...", "labels": ["...", ...]}, ...]}'),
]


@pytest.mark.parametrize(("body", "multi_label", "message"), BAD_SETS, ids=[m[:40] for _, _, m in BAD_SETS])
def test_bad_label_set_bodies_are_a_422_naming_the_field_and_value(body, multi_label, message):
    with pytest.raises(RequestError) as err:
        parse(body, multi_label=multi_label)
    assert err.value.status == 422
    assert message in err.value.message


# ------------------------------------------------------------------------------------------------ the endpoint
def set_app(db, notified: list | None = None) -> FastAPI:
    app = FastAPI()
    task = task_for(NAMES, [0.5] * len(NAMES))
    endpoint = FeedbackEndpoint(str(db), task, 10_000, 0.2, notified.append if notified is not None else None)
    app.add_api_route(FEEDBACK_PATH, endpoint.handle, methods=["POST"], response_model=None)
    return app


def test_the_endpoint_stores_label_sets_refuses_bad_ones_and_keeps_answering(tmp_path):
    b = set_batch([["a", "b"], ["c"], ["d"]])
    store = FeedbackStore(tmp_path / "f.sqlite3")
    store.insert_batch(b, VERSION, None)
    ids, notified = b["ids"], []
    app = set_app(tmp_path / "f.sqlite3", notified)
    bad = [
        {"prediction_id": ids[0], "label": "a"},  # a single label where a set is needed
        {"prediction_id": ids[0], "labels": []},
        {"prediction_id": ids[0], "labels": ["zebra"]},
        {"feedback": [{"prediction_id": ids[0], "labels": ["a"]}, {"prediction_id": ids[1], "labels": None}]},
    ]
    for body in bad:
        response = post(app, body)
        assert response.status_code == 422, body
        assert "feedback[" in response.json()["detail"], response.json()
    assert store.counts()["feedback"] == 0  # nothing of a refused request is stored, not even its good items

    good = {"feedback": [{"prediction_id": ids[0], "labels": ["b", "a"]}, {"prediction_id": ids[1], "labels": ["c"]}]}
    response = post(app, good)
    assert response.status_code == 200 and response.json() == {"stored": 2, "already_stored": 0}
    assert notified == [2]
    assert post(app, good).json() == {"stored": 0, "already_stored": 2}
    conflict = post(app, {"prediction_id": ids[1], "labels": ["c", "d"]})
    assert conflict.status_code == 409
    assert f"{ids[1]!r} has ['c'] (sent ['c', 'd'])" in conflict.json()["detail"]
    assert conflict.json()["conflicts"] == [{"prediction_id": ids[1], "stored": ["c"], "sent": ["c", "d"]}]
    assert post(app, {"prediction_id": "f00d", "labels": ["a"]}).status_code == 404
    assert store.feedback_since(0, VERSION, limit=10)[0] == [(("a", "b"), ("a", "b")), (("c",), ("c",))]
