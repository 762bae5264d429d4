"""Two `serve` replicas behind a real HAProxy on one PostgreSQL store, started and stopped by deploy/run_replicas.py
(the script an operator runs): answers through the balancer, feedback on each answer sent to the other replica and
stored once, the live window of each replica counting both replicas' feedback, and a promotion made through one
replica answered by both within a second."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from postgres_server import binary, missing

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "run_replicas.py"
KEY = "replica-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ANSWERS = 24


@pytest.fixture(scope="module")
def exports(sample_dir, tmp_path_factory):
    from serving_helpers import fabricate_export

    root = tmp_path_factory.mktemp("replica-exports")
    tokenizer = sample_dir / "wordpiece"
    return fabricate_export(tokenizer, root / "v1", seed=1), fabricate_export(tokenizer, root / "v2", seed=2)


def script(*args: str) -> dict:
    env = {**os.environ, "LIGHTNING_CLS_API_KEY": KEY, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{") :])


def answered_version(url: str) -> str:
    response = httpx.post(f"{url}/predict", json={"text": "a short probe"}, headers=AUTH, timeout=30)
    response.raise_for_status()
    return response.json()["predictions"][0]["model_version"]


def send_feedback(url: str, items: list[dict]) -> dict:
    """POST /feedback, waiting out 503s (an id not stored yet: Retry-After)."""
    deadline = time.monotonic() + 20
    while True:
        response = httpx.post(f"{url}/feedback", json={"feedback": items}, headers=AUTH, timeout=30)
        if response.status_code != 503 or time.monotonic() > deadline:
            assert response.status_code == 200, response.text
            return response.json()
        time.sleep(float(response.headers.get("Retry-After", "0.5")))


def window_texts(url: str) -> float:
    page = httpx.get(f"{url}/metrics", timeout=10).text
    lines = [line for line in page.splitlines() if line.startswith("lightning_cls_feedback_window_texts ")]
    return float(lines[0].split()[1]) if lines else -1.0


def test_two_replicas_share_feedback_and_deployment_through_haproxy(exports, tmp_path):
    if binary("initdb") is None:
        missing("PostgreSQL's initdb and pg_ctl were not found (Debian: apt-get install postgresql)")
    if shutil.which("haproxy") is None:
        missing("haproxy is not installed (Debian: apt-get install haproxy)")
    v1, v2 = exports
    state_file = tmp_path / "state.json"
    serve_args = f"--num_threads 1 --challenger {v2} --challenger_mode shadow --challenger_share 0 --min_feedback 1"
    state = script("start", "--model_dir", str(v1), "--replicas", "2", "--state", str(state_file),
                   "--serve_args", serve_args)  # fmt: skip
    try:
        replicas = {r["name"]: r["url"] for r in state["replicas"]}
        balancer = state["balancer"]["url"]
        other = {"r1": replicas["r2"], "r2": replicas["r1"]}

        # Answers through the balancer: round robin over both, each naming its replica.
        answers = []
        with httpx.Client(headers=AUTH, timeout=30) as client:
            for i in range(ANSWERS):
                response = client.post(f"{balancer}/predict", json={"text": f"stars and galaxies number {i}"})
                assert response.status_code == 200, response.text
                answers.append((response.json()["predictions"][0], response.headers["X-Replica"]))
        assert {replica for _, replica in answers} == {"r1", "r2"}

        # Feedback on each answer through the replica that did not answer it: stored once, on that prediction.
        for prediction, replica in answers:
            item = {"prediction_id": prediction["prediction_id"], "label": prediction["label"]}
            assert send_feedback(other[replica], [item]) == {"stored": 1, "already_stored": 0}
        # ... and sent again through the one that did: already stored, never twice.
        items = [{"prediction_id": p["prediction_id"], "label": p["label"]} for p, _ in answers]
        assert send_feedback(balancer, items) == {"stored": 0, "already_stored": ANSWERS}

        from lightning_cls.store.feedback_store import FeedbackStore

        store = FeedbackStore(state["db"], setup=False)
        try:
            assert store.counts()["feedback"] == ANSWERS
            assert store.known_ids([p["prediction_id"] for p, _ in answers]) == {p["prediction_id"] for p, _ in answers}
        finally:
            store.close()

        # Each replica's live window reads every replica's feedback (the shared store), not only its own: its logger
        # looks for new feedback every second (`metrics.FEEDBACK_POLL`), so an idle replica catches up too.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(window_texts(u) != ANSWERS for u in replicas.values()):
            time.sleep(0.3)
        assert {name: window_texts(url) for name, url in replicas.items()} == {"r1": ANSWERS, "r2": ANSWERS}

        # A promotion through r1: both replicas answer with the new champion within a second. Each replica's workers
        # switch at their next look at the store (`DeploymentWatch`, every 0.5 s), r1's as well as r2's.
        old = answered_version(replicas["r2"])
        response = httpx.post(f"{replicas['r1']}/deployment", json={"action": "promote"}, headers=AUTH, timeout=60)
        assert response.status_code == 200, response.text
        new = response.json()["deployment"]["champion"]["version"]
        assert new != old
        promoted = time.monotonic()
        for name in ("r2", "r1"):
            while answered_version(replicas[name]) != new:
                assert time.monotonic() - promoted < 1.0, f"{name} still answers with the old champion after 1 s"
                time.sleep(0.05)
    finally:
        stopped = script("stop", "--state", str(state_file))
    assert stopped == {"haproxy": True, "r1": True, "r2": True, "postgres": True}
    for pid in [r["pid"] for r in state["replicas"]] + [state["balancer"]["pid"]]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
