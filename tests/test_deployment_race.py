"""Two replicas changing the deployment at the same moment, on each engine (a SQLite file, a real PostgreSQL): the
record is a compare-and-set on the newest seq, so a change computed from a state that another change replaced is
computed again, never recorded over it."""

from __future__ import annotations

import threading

import pytest

from lightning_cls.errors import InputError
from lightning_cls.serving import deployment as dep
from lightning_cls.serving.deployment import Deployment, DeploymentEndpoint, Slot, latest, record, start_deployment
from lightning_cls.store import deployment_history
from lightning_cls.store.feedback_store import FeedbackStore


def slot(version: str) -> Slot:
    return Slot(f"/exports/{version}", version, f"/exports/{version}")


def actions(db: str) -> list[str]:
    store = FeedbackStore(db, setup=False)
    try:
        return [row["action"] for row in dep.history(store)]
    finally:
        store.close()


def test_a_record_computed_from_a_replaced_state_is_refused(db_location):
    FeedbackStore(db_location).close()
    first = record(db_location, Deployment(slot("v1")), "start")
    record(db_location, Deployment(slot("v2"), previous=slot("v1")), "set", after=first)
    with pytest.raises(deployment_history.Superseded, match=f"seq {first + 1}, not {first}"):
        record(db_location, Deployment(slot("v3"), previous=slot("v1")), "set", after=first)
    assert actions(db_location) == ["start", "set"]


def test_two_writers_from_the_same_state_one_records(db_location):
    FeedbackStore(db_location).close()
    seq = record(db_location, Deployment(slot("v1")), "start")
    barrier, outcomes = threading.Barrier(2), []

    def write(version: str) -> None:
        barrier.wait()  # both computed from `seq`: only one may build on it
        try:
            outcomes.append(record(db_location, Deployment(slot(version), previous=slot("v1")), "set", after=seq))
        except deployment_history.Superseded:
            outcomes.append("superseded")

    threads = [threading.Thread(target=write, args=(v,)) for v in ("v2", "v3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes, key=str) == [seq + 1, "superseded"]


def test_two_replicas_promoting_at_once_promote_once(db_location, monkeypatch):
    """Two endpoints (two replicas: their in-process locks do not see each other) both read the state with a
    challenger before either records: one promotes, the other computes again from the promoted state and finds no
    challenger (422), instead of recording a second promote built on the old state."""
    FeedbackStore(db_location).close()
    record(db_location, Deployment(slot("v1"), slot("v2"), "shadow", 0.5), "start")
    barrier, real_changed = threading.Barrier(2, timeout=10), dep.changed
    first_pass = threading.local()

    def changed_together(*args, **kwargs):
        if not getattr(first_pass, "done", False):
            first_pass.done = True
            barrier.wait()  # both replicas have read the state with the challenger
        return real_changed(*args, **kwargs)

    monkeypatch.setattr(dep, "changed", changed_together)
    endpoints = [DeploymentEndpoint(db_location, ["a", "b"], False, None, keyed=True) for _ in range(2)]
    outcomes = []

    def promote(endpoint: DeploymentEndpoint) -> None:
        try:
            outcomes.append(endpoint.change({"action": "promote"}).champion.version)
        except InputError as err:
            outcomes.append(str(err))

    threads = [threading.Thread(target=promote, args=(e,)) for e in endpoints]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["promote: there is no challenger to promote.", "v2"]
    assert actions(db_location) == ["start", "promote"]
    store = FeedbackStore(db_location, setup=False)
    _, now = latest(store)
    store.close()
    assert (now.champion.version, now.challenger, now.previous.version) == ("v2", None, "v1")


def test_replicas_starting_together_record_one_start(db_location):
    FeedbackStore(db_location).close()
    barrier, seqs = threading.Barrier(3), []

    def start() -> None:
        barrier.wait()
        seqs.append(start_deployment(db_location, slot("v1"), slot("v2"), "shadow", 0.2))

    threads = [threading.Thread(target=start) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seqs)) == 1 and actions(db_location) == ["start"]
