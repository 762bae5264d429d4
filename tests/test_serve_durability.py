"""Nothing served is lost (issue #21), on real servers (slow): a locked database under traffic, a kill -9 during a
lock (the spill file replayed at the next start), a SIGTERM under load, and /info's batching values.
The long version of each, measured: benchmarks/durability_check.py and experiments/serving_durability/."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time

import httpx
import pytest
from serving_helpers import ServerProcess, fabricate_export, free_port

from lightning_cls.serving.prediction_log import SPILL_SUFFIX

pytestmark = pytest.mark.slow
TEXTS = ["We measure the redshift of distant galaxy clusters.", "Entanglement of two superconducting qubits."]


@pytest.fixture(scope="module")
def model_dir(sample_dir, tmp_path_factory):
    return fabricate_export(sample_dir / "wordpiece", tmp_path_factory.mktemp("durable_model"))


def start(model_dir, db, tmp_path, name: str, *extra: str) -> ServerProcess:
    port = free_port()
    args = ["-m", "lightning_cls", "serve", "--model_dir", str(model_dir), "--port", str(port)]
    args += ["--feedback_db", str(db), "--num_threads", "1", "--log_level", "warning", *extra]
    return ServerProcess(args, port, tmp_path / f"{name}.log")


class Load:
    """``clients`` threads sending /predict until stopped; each outcome is (sent, status, ids)."""

    def __init__(self, url: str, clients: int = 4) -> None:
        self.url, self.results, self._stop = url, [], threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def _client(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    r = client.post("/predict", json={"texts": TEXTS})
                    ids = [p["prediction_id"] for p in r.json()["predictions"]] if r.status_code == 200 else []
                    self.results.append((sent, r.status_code, ids))
                except httpx.HTTPError as err:
                    self.results.append((sent, type(err).__name__, []))
                    time.sleep(0.05)

    def ids(self, after: float = 0.0) -> list[str]:
        return [pid for sent, status, ids in self.results if sent >= after and status == 200 for pid in ids]


def stored(db, ids) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {r[0] for r in conn.execute("SELECT id FROM predictions") if r[0] in set(ids)}


def wait_stored(db, ids, timeout: float = 30.0) -> set[str]:
    deadline = time.monotonic() + timeout
    while (missing := set(ids) - stored(db, ids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return missing


@pytest.fixture
def lock(tmp_path):
    """Hold a database's write lock from another connection, as another writer would."""
    held = []

    def take(db) -> sqlite3.Connection:
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        held.append(conn)
        return conn

    yield take
    for conn in held:
        conn.close()


def test_a_locked_database_loses_no_prediction_and_feedback_is_503_then_200(model_dir, tmp_path, lock):
    db = tmp_path / "f.sqlite3"
    with start(model_dir, db, tmp_path, "lock", "--feedback_wait", "0.5") as server:
        client = httpx.Client(base_url=server.url, timeout=60)
        batching = client.get("/info").json()["model"]["batching"]
        assert batching["max_batch_tokens"] == 4096 and batching["max_batch_tokens_from"] == "the cpu default"
        assert batching["max_batch_size"] == 16 and batching["max_padding_tokens"] == 24
        with Load(server.url) as load:
            time.sleep(1)
            conn = lock(db)
            locked_at = time.monotonic()
            time.sleep(3)
            during = load.ids(after=locked_at)
            assert during and stored(db, during) == set()  # served, not stored: the lock holds them back
            items = [{"prediction_id": pid, "label": "physics"} for pid in during[:5]]
            pending = client.post("/feedback", json={"feedback": items})
            assert pending.status_code == 503 and pending.headers["Retry-After"] == "2", pending.text
            assert set(pending.json()["pending_ids"]) == {i["prediction_id"] for i in items}
            forged = client.post("/feedback", json={"prediction_id": "0" * 32, "label": "physics"})
            assert forged.status_code == 404 and "never issued" in forged.json()["detail"]
            metrics = client.get("/metrics").text
            assert "lightning_cls_prediction_log_write_failures_total" in metrics
            conn.execute("COMMIT")
            time.sleep(1)
        served = load.ids()
        assert all(status == 200 for _, status, _ in load.results)  # no 5xx while the database was locked
        assert wait_stored(db, served) == set()  # every id served before, during and after the lock
        for _ in range(20):  # the client retries as told
            labelled = client.post("/feedback", json={"feedback": items})
            if labelled.status_code != 503:
                break
            time.sleep(0.5)
        assert labelled.status_code == 200 and labelled.json()["stored"] == 5
        client.close()
    assert not (tmp_path / ("f.sqlite3" + SPILL_SUFFIX)).exists()


def test_a_kill_9_during_a_lock_keeps_the_spilled_predictions_for_the_next_start(model_dir, tmp_path, lock):
    db = tmp_path / "f.sqlite3"
    spill = tmp_path / ("f.sqlite3" + SPILL_SUFFIX)
    with start(model_dir, db, tmp_path, "killed") as server:
        conn = lock(db)
        with httpx.Client(base_url=server.url, timeout=60) as client:
            served = [
                p["prediction_id"] for _ in range(5) for p in client.post("/predict", json={"texts": TEXTS}).json()[
                    "predictions"]
            ]  # fmt: skip
        deadline = time.monotonic() + 15  # rows go to the spill file once they have waited a second
        while not (spill.exists() and len(spill.read_text().splitlines()) == len(served)):
            assert time.monotonic() < deadline, "the predictions did not reach the spill file"
            time.sleep(0.1)
        os.killpg(server.process.pid, signal.SIGKILL)  # no stop, no flush: the spill file is all there is
        server.process.wait(10)
    conn.execute("COMMIT")
    assert stored(db, served) == set()
    with start(model_dir, db, tmp_path, "restarted") as server, httpx.Client(base_url=server.url) as client:
        assert wait_stored(db, served) == set()  # replayed at the start
        assert not spill.exists()
        answer = client.post("/feedback", json={"prediction_id": served[0], "label": "physics"})
        assert answer.status_code == 200


def test_sigterm_under_load_answers_what_was_sent_and_exits_0_with_no_traceback(model_dir, tmp_path):
    db = tmp_path / "f.sqlite3"
    server = start(model_dir, db, tmp_path, "stopped")
    with server, Load(server.url) as load:
        time.sleep(1.5)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) == 0
    log = server.log_path.read_text()
    before = [status for sent, status, _ in load.results if sent < signalled]
    assert before and all(status == 200 for status in before), before
    for bad in ("Traceback", "leaked semaphore", "Error"):
        assert bad not in log, log
    served = load.ids()
    assert wait_stored(db, served, timeout=1) == set()  # stored before the exit
