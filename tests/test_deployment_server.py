"""A running service with two models: a canary, a promotion under concurrent requests, feedback for a retired
version, bad changes refused with one clear line while the model keeps serving, rollback, and the version on the
metrics (`serving.deployment`, `serving.router`)."""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
import pytest
from serving_helpers import ServerProcess, fabricate_export, free_port
from test_serve import metric

from lightning_cls.store.feedback_store import model_version

KEY = "deploy-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exports(sample_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    tok = sample_dir / "wordpiece"
    return fabricate_export(tok, root / "v1", seed=1), fabricate_export(tok, root / "v2", seed=2)


def deployment_cli(url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LIGHTNING_CLS_API_KEY": KEY}
    command = [sys.executable, "-m", "lightning_cls", "deployment", *args, "--url", url]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def test_promote_under_load_feedback_for_a_retired_version_refusals_and_rollback(exports, tmp_path, monkeypatch):
    v1, v2 = (model_version(e) for e in exports)
    db = tmp_path / "feedback.sqlite3"
    monkeypatch.setenv("LIGHTNING_CLS_API_KEY", KEY)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the unreachable registry fails at once
    port = free_port()
    args = ["-m", "lightning_cls", "serve", "--model_dir", str(exports[0]), "--port", str(port)]
    args += ["--challenger", str(exports[1]), "--challenger_mode", "canary", "--challenger_share", "0.5"]
    args += ["--feedback_db", str(db), "--num_threads", "1", "--log_level", "warning", "--registry_uri"]
    args += ["http://127.0.0.1:9"]  # an MLflow server that is not there
    with ServerProcess(args, port, tmp_path / "server.log") as server, httpx.Client(base_url=server.url) as client:
        # A canary: sticky per client, both versions answer, every answer says which.
        first = {}
        for i in range(12):
            body = {"text": "spin chains and qubits", "client_id": f"c{i}"}
            first[i] = client.post("/predict", json=body, headers=AUTH).json()["predictions"][0]["model_version"]
        assert set(first.values()) == {v1, v2}
        again = client.post("/predict", json={"text": "a lemma", "client_id": "c0"}, headers=AUTH).json()
        assert again["predictions"][0]["model_version"] == first[0]
        old = client.post(
            "/predict",
            json={"text": "a galaxy", "client_id": next(f"c{i}" for i in first if first[i] == v1)},
            headers=AUTH,
        )
        old_answer = old.json()["predictions"][0]
        assert old_answer["model_version"] == v1

        # Promote (through the command) while 8 clients send requests: none fails, each is answered by v1 or v2.
        results, stop = [], threading.Event()

        def load() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as c:
                while not stop.is_set():
                    r = c.post("/predict", json={"texts": ["stars", "graphs"]}, headers=AUTH)
                    results.append((r.status_code, [p["model_version"] for p in r.json().get("predictions", [])]))

        threads = [threading.Thread(target=load) for _ in range(8)]
        for t in threads:
            t.start()
        try:
            promoted = deployment_cli(server.url, "promote", "--reason", "better on live feedback")
            assert promoted.returncode == 0, promoted.stderr
            assert json.loads(promoted.stdout)["deployment"]["champion"]["version"] == v2
            deadline = time.monotonic() + 60
            while not results or set(results[-1][1]) != {v2}:
                assert time.monotonic() < deadline, "the promotion never took over"
                time.sleep(0.1)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert results and all(status == 200 for status, _ in results)
        assert {v for _, vs in results for v in vs} <= {v1, v2}
        after = client.post("/predict", json={"text": "a lemma", "client_id": "c0"}, headers=AUTH).json()
        assert after["predictions"][0]["model_version"] == v2  # no challenger now: the new champion answers all

        # Feedback for an answer of the retired version still lands, against that version.
        sent = client.post(
            "/feedback", json={"prediction_id": old_answer["prediction_id"], "label": old_answer["label"]}, headers=AUTH
        )
        assert sent.status_code == 200 and sent.json()["stored"] == 1
        with sqlite3.connect(db) as conn:
            row = conn.execute(
                "SELECT p.model_version FROM feedback f JOIN predictions p ON p.id = f.prediction_id"
            ).fetchone()
        assert row == (v1,)

        # Bad changes: one clear line each, nothing changes, the service keeps serving.
        assert client.post("/deployment", json={"action": "promote"}).status_code == 401  # no key
        nothing = client.post("/deployment", json={"action": "promote"}, headers=AUTH)
        assert nothing.status_code == 422 and "no challenger to promote" in nothing.json()["detail"]
        other = tmp_path / "other"
        shutil.copytree(exports[1], other)
        meta = json.loads((other / "lightning_cls.json").read_text())
        meta["labels"] = [*meta["labels"][:-1], "zoology"]
        (other / "lightning_cls.json").write_text(json.dumps(meta))
        refused = client.post("/deployment", json={"challenger": str(other), "mode": "shadow"}, headers=AUTH)
        assert refused.status_code == 422 and "cannot join this service: its labels" in refused.json()["detail"]
        unreachable = deployment_cli(
            server.url, "set", "--challenger", "models:/subjects@challenger", "--mode", "shadow"
        )
        assert unreachable.returncode != 0 and "unreachable" in unreachable.stderr
        assert len(unreachable.stderr.strip().splitlines()) == 1
        nowhere = client.post("/deployment", json={"champion": str(tmp_path / "missing")}, headers=AUTH)
        assert nowhere.status_code == 422 and "not an exported model folder" in nowhere.json()["detail"]
        still = client.post("/predict", json={"text": "a lemma"}, headers=AUTH).json()["predictions"][0]
        assert still["model_version"] == v2

        # The metrics say which version answers in which role; the history has every change.
        page = client.get("/metrics").text
        assert metric(page, "lightning_cls_model_role", version=v2, role="champion") == 1
        assert metric(page, "lightning_cls_model_role", version=v2, role="challenger") == 0
        assert metric(page, "lightning_cls_version_answers_total", version=v1) > 0
        shown = deployment_cli(server.url, "show")
        assert [h["action"] for h in json.loads(shown.stdout)["history"]] == ["start", "promote"]

        # Rollback: the previous champion answers again.
        back = client.post("/deployment", json={"action": "rollback", "reason": "test"}, headers=AUTH)
        assert back.status_code == 200 and back.json()["deployment"]["champion"]["version"] == v1
        deadline = time.monotonic() + 60
        while client.post("/predict", json={"text": "x"}, headers=AUTH).json()["predictions"][0]["model_version"] != v1:
            assert time.monotonic() < deadline
