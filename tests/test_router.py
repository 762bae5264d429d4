"""Two models in one service: routing (canary, shadow), the shadow's thread, deployment changes and the swap
between batches (`serving.router`, `serving.deployment`, `serving.api`)."""

import json
import queue
import random
import shutil
import threading
import time

import pytest
from serving_helpers import fabricate_export

from lightning_cls.errors import InputError
from lightning_cls.serving.api import ClassifierAPI
from lightning_cls.serving.deployment import (
    Deployment,
    Slot,
    changed,
    check_compatible,
    history,
    latest,
    local_slot,
    record,
    start_deployment,
)
from lightning_cls.serving.router import ShadowJob, ShadowRunner, canary_routes, shadow_sample, sticky_fraction
from lightning_cls.serving.scorer import Scores
from lightning_cls.store.feedback_store import FeedbackStore


def slot(version: str) -> Slot:
    return Slot(f"/exports/{version}", version, f"/exports/{version}")


# ------------------------------------------------------------------------------------------------ routing
def test_a_canary_is_sticky_per_client_and_takes_its_share():
    rng = random.Random(0)
    clients = [f"client-{i}" for i in range(4000)]
    first = canary_routes(clients, 0.1, rng)
    assert canary_routes(clients, 0.1, random.Random(1)) == first  # the same client, the same side, whatever the rng
    assert 0.08 < sum(first) / len(first) < 0.12
    # a larger share keeps every client that was in the smaller one (widening a canary moves no one back)
    wider = canary_routes(clients, 0.5, rng)
    assert all(w for f, w in zip(first, wider, strict=True) if f)
    anonymous = canary_routes([None] * 4000, 0.25, rng)
    assert 0.22 < sum(anonymous) / 4000 < 0.28
    assert not any(canary_routes(clients, 0.0, rng)) and all(canary_routes(clients, 1.0, rng))
    assert 0 <= sticky_fraction("x") < 1 and sticky_fraction("x") == sticky_fraction("x")


def test_the_shadow_sample_takes_its_share():
    rng = random.Random(0)
    assert sum(shadow_sample(10_000, 0.1, rng)) in range(900, 1100)
    assert not any(shadow_sample(100, 0.0, rng)) and all(shadow_sample(100, 1.0, rng))


# ------------------------------------------------------------------------------------------------ the shadow thread
class FakeScorer:
    def __init__(self, label: int, delay: float = 0.0) -> None:
        self.label, self.delay, self.calls = label, delay, []

    def score(self, texts):
        self.calls.append(list(texts))
        time.sleep(self.delay)
        probs = [[0.1, 0.1, 0.1] for _ in texts]
        for p in probs:
            p[self.label] = 0.8
        order = [[self.label] + [j for j in range(3) if j != self.label] for _ in texts]
        return Scores(probs, order, [5] * len(texts), [1] * len(texts), [False] * len(texts), None)


def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_the_shadow_runs_only_while_the_worker_is_idle_and_reports_agreement():
    reports = []
    scorer = FakeScorer(label=1)
    runner = ShadowRunner(scorer.score, "v2", ["a", "b", "c"], lambda k, v: reports.append((k, v)), slice_size=2)
    runner.busy()  # a batch is being answered
    runner.submit(ShadowJob(["t1", "t2", "t3"], ["i1", "i2", "i3"], ["b", "a", "b"]))
    time.sleep(0.2)
    assert scorer.calls == []  # never beside the answer's forward pass
    runner.idle()
    wait_for(lambda: len(reports) == 2)  # two slices of at most 2 texts
    assert scorer.calls == [["t1", "t2"], ["t3"]]
    shadow = [v for k, v in reports if k == "shadow"]
    assert [a for s in shadow for a in s["agree"]] == [True, False, True]
    assert [i for s in shadow for i in s["ids"]] == ["i1", "i2", "i3"] and shadow[0]["version"] == "v2"
    runner.stop()
    runner.thread.join(2)
    assert not runner.thread.is_alive()


def test_the_shadow_waits_for_a_quiet_worker_and_back_to_back_batches_starve_it():
    reports = []
    scorer = FakeScorer(label=0)
    runner = ShadowRunner(scorer.score, "v2", ["a", "b", "c"], lambda k, v: reports.append((k, v)), quiet=0.1)
    runner.submit(ShadowJob(["t"], ["i"], ["a"]))
    for _ in range(20):  # batches 10 ms apart: never quiet for 100 ms
        runner.busy()
        time.sleep(0.005)
        runner.idle()
        time.sleep(0.01)
    assert scorer.calls == []
    wait_for(lambda: scorer.calls == [["t"]])  # quiet now
    runner.stop()


def test_a_saturated_worker_drops_shadow_copies_instead_of_queueing_them():
    reports = []
    scorer = FakeScorer(label=0)
    runner = ShadowRunner(scorer.score, "v2", ["a", "b", "c"], lambda k, v: reports.append((k, v)), max_jobs=2)
    runner.busy()  # saturated: never idle
    for i in range(10):
        runner.submit(ShadowJob([f"t{i}"], [f"i{i}"], ["a"]))  # never blocks
    assert runner.jobs.qsize() == 2
    dropped = sum(v["texts"] for k, v in reports if k == "shadow_dropped")
    assert dropped == 8  # the oldest went; the newest two wait
    runner.idle()
    wait_for(lambda: len([1 for k, _ in reports if k == "shadow"]) == 2)
    assert [c[0] for c in scorer.calls] == ["t8", "t9"]
    runner.stop()


# ------------------------------------------------------------------------------------------------ deployment changes
def test_set_promote_and_rollback():
    start = Deployment(slot("v1"))
    resolve = {"/exports/v2": slot("v2"), "/exports/v3": slot("v3")}.__getitem__
    shadowed = changed(start, "set", resolve, {"challenger": "/exports/v2", "mode": "shadow", "share": 0.2})
    assert (shadowed.champion.version, shadowed.challenger.version, shadowed.mode, shadowed.share) == (
        "v1",
        "v2",
        "shadow",
        0.2,
    )
    promoted = changed(shadowed, "promote", resolve, {})
    assert promoted.champion.version == "v2" and promoted.challenger is None and promoted.previous.version == "v1"
    back = changed(promoted, "rollback", resolve, {})
    assert back.champion.version == "v1" and back.previous.version == "v2"
    assert changed(back, "rollback", resolve, {}).champion.version == "v2"  # a second rollback undoes the first
    with pytest.raises(InputError, match="no challenger to promote"):
        changed(promoted, "promote", resolve, {})
    with pytest.raises(InputError, match="no previous champion"):
        changed(start, "rollback", resolve, {})
    with pytest.raises(InputError, match="mode must be one of"):
        changed(start, "set", resolve, {"challenger": "/exports/v2", "mode": "half"})
    with pytest.raises(InputError, match="share must be"):
        changed(start, "set", resolve, {"challenger": "/exports/v2", "mode": "canary", "share": 2})
    with pytest.raises(InputError, match="the challenger is the champion"):
        changed(shadowed, "set", resolve, {"champion": "/exports/v2"})
    with pytest.raises(InputError, match="action must be"):
        changed(start, "swap", resolve, {})


def test_the_history_is_kept_and_a_restart_of_the_same_deployment_adds_no_row(tmp_path):
    db = str(tmp_path / "f.sqlite3")
    FeedbackStore(db).close()
    a = start_deployment(db, slot("v1"), slot("v2"), "canary", 0.3)
    assert start_deployment(db, slot("v1"), slot("v2"), "canary", 0.3) == a  # the same: no new row
    record(db, Deployment(slot("v2"), previous=slot("v1")), "promote", "better on live feedback")
    b = start_deployment(db, slot("v3"), None, "shadow", 0.1)  # restarted with another model
    store = FeedbackStore(db, setup=False)
    seq, now = latest(store)
    rows = history(store)
    store.close()
    assert seq == b and now.champion.version == "v3" and now.previous.version == "v2" and now.challenger is None
    assert [r["action"] for r in rows] == ["start", "promote", "start"]
    assert rows[1]["reason"] == "better on live feedback" and rows[0]["challenger"]["version"] == "v2"


# ------------------------------------------------------------------------------------------------ the worker
@pytest.fixture(scope="module")
def two_exports(sample_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    tok = sample_dir / "wordpiece"
    return fabricate_export(tok, root / "v1", seed=1), fabricate_export(tok, root / "v2", seed=2)


def worker(db: str, model_dir, watching: bool = False) -> ClassifierAPI:
    """A worker's API on the deployment in ``db``; without ``watching`` its watch thread is stopped and the tests
    look for a new deployment themselves (`poll_once`)."""
    api = ClassifierAPI(str(model_dir), max_batch_size=8, deployment_db=db)
    api.set_logger_queue(queue.Queue())
    api.setup("cpu")
    if not watching:
        api.watch.stop()
        api.watch._thread.join(5)
    return api


def deploy(tmp_path, exports, mode="shadow", share=0.0, challenger=False, watching=False):
    """A feedback database whose deployment is the first export (and the second as challenger), and a worker on it:
    (db, v1, v2, api)."""
    db = str(tmp_path / "f.sqlite3")
    FeedbackStore(db).close()
    v1, v2 = local_slot(exports[0]), local_slot(exports[1])
    start_deployment(db, v1, v2 if challenger else None, mode, share)
    return db, v1, v2, worker(db, exports[0], watching)


def messages(api: ClassifierAPI) -> list:
    q = api._logger_queue
    return [q.get_nowait() for _ in range(q.qsize())]


def test_a_model_of_another_label_set_cannot_join(two_exports, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(two_exports[1], other)
    meta = json.loads((other / "lightning_cls.json").read_text())
    meta["labels"] = [*meta["labels"][:-1], "zoology"]
    (other / "lightning_cls.json").write_text(json.dumps(meta))
    labels = json.loads((two_exports[0] / "lightning_cls.json").read_text())["labels"]
    with pytest.raises(InputError, match="cannot join this service: its labels"):
        check_compatible(labels, False, local_slot(other))
    with pytest.raises(InputError, match="a multi-label model"):
        check_compatible(labels, True, local_slot(two_exports[1]))


def test_a_canary_answers_its_share_and_every_answer_names_its_version(two_exports, tmp_path):
    _, v1, v2, api = deploy(tmp_path, two_exports, "canary", 0.5, challenger=True)
    requests = [(["a galaxy far away"], 1, f"client-{i}") for i in range(16)]
    answers = api.predict(api.batch(requests))
    versions = [a[0]["model_version"] for a in answers]
    assert set(versions) == {v1.version, v2.version}
    # sticky: the same clients get the same models again
    assert [a[0]["model_version"] for a in api.predict(api.batch(requests))] == versions
    batch = next(v for k, v in messages(api) if k == "batch")
    assert batch["versions"] == versions and set(batch["seconds"]) == {v1.version, v2.version}


def test_a_new_deployment_takes_over_between_batches_and_a_batch_keeps_its_models(two_exports, tmp_path):
    db, v1, v2, api = deploy(tmp_path, two_exports)
    one = (["quantum spin chains"], 1, None)
    assert api.predict(api.batch([one]))[0][0]["model_version"] == v1.version
    assert not api.watch.poll_once()  # nothing new
    record(db, Deployment(v2, previous=v1), "set", "test")
    assert api.watch.poll_once()  # loaded and switched
    assert api.predict(api.batch([one]))[0][0]["model_version"] == v2.version
    deployed = [v for k, v in messages(api) if k == "deployed"]
    assert deployed[-1]["roles"] == {v2.version: "champion"}
    # A swap while a batch is being answered: that batch keeps the models it began with, the next has the new ones.
    record(db, Deployment(v1, previous=v2), "rollback", "test")
    champion = api.models.champion
    answer = champion.score

    def swap_midway(texts):
        assert api.watch.poll_once()  # the rollback's models take over while this batch runs
        return answer(texts)

    champion.score = swap_midway
    answers = api.predict(api.batch([one, one]))
    champion.score = answer
    assert {a[0]["model_version"] for a in answers} == {v2.version}
    assert api.predict(api.batch([one]))[0][0]["model_version"] == v1.version


def test_a_shadow_sees_its_share_and_its_answers_are_never_returned(two_exports, tmp_path):
    db, v1, v2, api = deploy(tmp_path, two_exports, "shadow", 1.0, challenger=True)
    answers = api.predict(api.batch([(["stars and galaxies", "a proof of a lemma"], 2, None)]))
    assert {a["model_version"] for a in answers[0]} == {v1.version}
    wait_for(lambda: api._logger_queue.qsize() >= 4)  # start, deployed, batch, shadow
    got = messages(api)
    batch = next(v for k, v in got if k == "batch")
    shadow = next(v for k, v in got if k == "shadow")
    assert shadow["ids"] == batch["ids"] and shadow["version"] == v2.version and len(shadow["agree"]) == 2
    # stored beside the answers they shadow
    store = FeedbackStore(db)
    store.insert_batch(batch, v1.version, None)
    with store.transaction():
        store.insert_rows(FeedbackStore.shadow_rows_of(shadow))
    store.record_feedback([(batch["ids"][0], batch["labels"][0])])
    answers_seen, _ = store.answers_since(0, 10)
    store.close()
    assert {(a.version, a.answered) for a in answers_seen} == {(v1.version, True), (v2.version, False)}


def test_a_deployment_that_fails_to_load_leaves_the_models_serving(two_exports, tmp_path):
    db, v1, _, api = deploy(tmp_path, two_exports)
    broken = Slot(str(tmp_path / "gone"), "deadbeef0000", "gone")
    record(db, Deployment(broken, previous=v1), "set", "a folder deleted since")
    one = (["a lemma"], 1, None)
    assert not api.watch.poll_once()  # logged, skipped
    assert api.predict(api.batch([one]))[0][0]["model_version"] == v1.version
    assert api.watch.seq == latest(FeedbackStore(db, setup=False))[0]  # not retried at every look


def test_predict_in_flight_during_a_swap_from_another_thread_fails_nothing(two_exports, tmp_path):
    """Requests answered back to back (as the worker does) while the watch thread switches the deployment under
    them: every answer comes, from one of the two versions, and both answer in turn."""
    db, v1, v2, api = deploy(tmp_path, two_exports, watching=True)  # its own thread switches, as in the service
    got, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            got.append(api.predict(api.batch([(["a theorem on graphs"], 1, None)]))[0][0]["model_version"])

    thread = threading.Thread(target=serve)
    thread.start()
    for i in range(4):
        record(db, Deployment(v2 if i % 2 == 0 else v1, previous=v1 if i % 2 == 0 else v2), "set", "flip")
        time.sleep(0.5)
    stop.set()
    thread.join(10)
    assert got and set(got) <= {v1.version, v2.version} and v2.version in got
