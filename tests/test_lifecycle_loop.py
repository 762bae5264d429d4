"""The whole loop, end to end, on quickstart-style data (issue #25): a model trained on one part of the data serves
traffic from a shifted part, feedback is posted, a model is retrained with it, shadowed, compared and promoted, and
the new champion's live accuracy on the shifted traffic is higher than the old one's. Each step asserts what it
produced, so the test fails if one is skipped.

The shift: every subject is written with its own keywords; the first model learns texts that use the first half of
each subject's keyword list, the traffic uses the second half (words the tokenizer knows, the first model never saw
with a label). Only feedback teaches them.
"""

import json
import os
import subprocess
import sys
import time

import httpx
import numpy as np
import pandas as pd
import pytest
from conftest import TINY_DISTILBERT
from serving_helpers import ServerProcess, free_port
from test_serve import metric

from lightning_cls.cli import main
from lightning_cls.data.sample_data import DEFAULT_LABELS, FILLER, KEYWORDS
from lightning_cls.store.feedback_store import model_version

pytestmark = pytest.mark.slow
KEY = "loop-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def keyword_texts(rows_per_label: int, half: int, seed: int) -> tuple[list[str], list[str]]:
    """Texts of the ten subjects written with one half (0: first, 1: second) of each subject's keywords."""
    rng = np.random.default_rng(seed)
    labels = [label for label in sorted(DEFAULT_LABELS) for _ in range(rows_per_label)]
    rng.shuffle(labels)
    texts = []
    for label in labels:
        words = KEYWORDS[label].split()
        own = words[: len(words) // 2] if half == 0 else words[len(words) // 2 :]
        kinds = rng.random(int(rng.integers(15, 40))) < 0.35
        texts.append(" ".join(own[rng.integers(len(own))] if k else FILLER[rng.integers(len(FILLER))] for k in kinds))
    return texts, labels


def fit_and_export(tmp_path, name: str, csv, tokenizer, *extra: str):
    run = tmp_path / name
    main(
        [
            "fit",
            f"--data.path={csv}",
            f"--data.tokenizer={tokenizer}",
            "--data.max_samples=null",
            "--data.max_length=64",
            "--data.batch_size=16",
            "--model.model_name_or_path=tiny",
            f"--model.model_config={json.dumps(TINY_DISTILBERT)}",
            "--model.learning_rate=0.003",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.max_epochs=8",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.logger.init_args.save_dir={run / 'runs'}",
            f"--checkpoint.dirpath={run / 'ckpt'}",
            "--seed_everything=0",
            *extra,
        ]
    )
    main(["export", f"--ckpt_path={run / 'ckpt' / 'last.ckpt'}", f"--output_dir={run / 'export'}"])
    return run / "export"


def serve_texts(client: httpx.Client, texts: list[str]) -> list[dict]:
    """Send the texts, 8 per request; the answers in order."""
    answers = []
    for start in range(0, len(texts), 8):
        r = client.post("/predict", json={"texts": texts[start : start + 8]}, headers=AUTH)
        assert r.status_code == 200, r.text
        answers += r.json()["predictions"]
    return answers


def send_feedback(client: httpx.Client, answers: list[dict], truth: list[str]) -> None:
    items = [{"prediction_id": a["prediction_id"], "label": t} for a, t in zip(answers, truth, strict=True)]
    r = client.post("/feedback", json={"feedback": items}, headers=AUTH)
    assert r.status_code == 200 and r.json()["stored"] == len(items), r.text


def wait_metric(client: httpx.Client, name: str, at_least: float, timeout: float = 60, **labels: str) -> str:
    deadline = time.monotonic() + timeout
    while True:
        page = client.get("/metrics").text
        if metric(page, name, **labels) >= at_least:
            return page
        assert time.monotonic() < deadline, f"{name}{labels} stayed under {at_least}: {metric(page, name, **labels)}"
        time.sleep(0.3)


def deployment(url: str, *args: str) -> dict:
    env = {**os.environ, "LIGHTNING_CLS_API_KEY": KEY}
    command = [sys.executable, "-m", "lightning_cls", "deployment", *args, "--url", url]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_drift_feedback_retrain_shadow_promote(tmp_path, sample_dir, monkeypatch):
    tokenizer = sample_dir / "wordpiece"
    texts, labels = keyword_texts(40, half=0, seed=0)
    csv = tmp_path / "first_part.csv"
    pd.DataFrame({"text": texts, "label": labels}).to_csv(csv, index=False)
    old = fit_and_export(tmp_path, "v1", csv, tokenizer)
    v1 = model_version(old)

    db = tmp_path / "feedback.sqlite3"
    monkeypatch.setenv("LIGHTNING_CLS_API_KEY", KEY)
    port = free_port()
    args = ["-m", "lightning_cls", "serve", "--model_dir", str(old), "--port", str(port), "--feedback_db", str(db)]
    args += ["--keep_texts", "true", "--min_feedback", "20", "--feedback_window", "200", "--num_threads", "1"]
    args += ["--log_level", "warning"]
    with ServerProcess(args, port, tmp_path / "server.log") as server, httpx.Client(base_url=server.url) as client:
        # 1. Traffic from the shifted part, and its feedback: the champion's live accuracy is measured.
        shifted, truth = keyword_texts(20, half=1, seed=1)
        answers = serve_texts(client, shifted)
        assert {a["model_version"] for a in answers} == {v1}
        send_feedback(client, answers, truth)
        page = wait_metric(client, "lightning_cls_version_feedback_texts", 200, version=v1, role="champion")
        old_live = metric(page, "lightning_cls_version_live_accuracy", version=v1, role="champion")

        # 2. Retrain with the labelled feedback (the served texts were kept), export, compare with the champion.
        new = fit_and_export(tmp_path, "v2", csv, tokenizer, f"--data.feedback_db={db}")
        v2 = model_version(new)
        config = tmp_path / "v2" / "ckpt" / "config.yaml"
        config = config if config.exists() else next((tmp_path / "v2" / "runs").rglob("config.yaml"))
        report = main(
            [
                "compare",
                f"--champion={old}",
                f"--challenger={new}",
                f"--config={config}",
                f"--feedback_db={db}",
                f"--output_path={tmp_path / 'compare.json'}",
            ]
        )
        assert report["challenger"]["trained_on_feedback"]["added"] == 200
        recent = report["sets"]["recent_feedback"]
        assert recent["rows"] == 200 and recent["challenger"]["accuracy"] > recent["champion"]["accuracy"]

        # 3. The new model in shadow: it sees every request, its answers are stored and judged, never returned.
        shown = deployment(server.url, "set", "--challenger", str(new), "--mode", "shadow", "--share", "1.0")
        assert shown["deployment"]["challenger"]["version"] == v2
        wait_metric(client, "lightning_cls_model_role", 1, version=v2, role="challenger")
        fresh, fresh_truth = keyword_texts(10, half=1, seed=2)
        answers = []
        for start in range(0, len(fresh), 8):  # light traffic: the shadow answers each request before the next
            answers += serve_texts(client, fresh[start : start + 8])  # (a saturated worker drops its copies)
            wait_metric(client, "lightning_cls_shadow_texts_total", len(answers), version=v2)
        assert {a["model_version"] for a in answers} == {v1}  # the shadow's answers are never returned
        time.sleep(1.0)  # the shadow answers reach the database a moment after they are counted
        send_feedback(client, answers, fresh_truth)
        page = wait_metric(client, "lightning_cls_version_feedback_texts", len(fresh), version=v2, role="challenger")
        shadow_live = metric(page, "lightning_cls_version_live_accuracy", version=v2, role="challenger")
        champion_live = metric(page, "lightning_cls_version_live_accuracy", version=v1, role="champion")
        assert shadow_live > champion_live
        assert 0 <= metric(page, "lightning_cls_shadow_agreement", version=v2) < 1

        # 4. Promote: the new model answers, and its live accuracy on the shifted traffic beats the old one's.
        promoted = deployment(server.url, "promote", "--reason", "shadow: live accuracy higher")
        assert promoted["deployment"]["champion"]["version"] == v2
        deadline = time.monotonic() + 60
        while client.post("/predict", json={"text": "x"}, headers=AUTH).json()["predictions"][0]["model_version"] != v2:
            assert time.monotonic() < deadline
        last, last_truth = keyword_texts(10, half=1, seed=3)
        answers = serve_texts(client, last)
        assert {a["model_version"] for a in answers} == {v2}
        send_feedback(client, answers, last_truth)
        page = wait_metric(client, "lightning_cls_version_feedback_texts", 2 * len(fresh), version=v2, role="champion")
        new_live = metric(page, "lightning_cls_version_live_accuracy", version=v2, role="champion")
        assert new_live > old_live
        history = deployment(server.url, "show")["history"]
        assert [h["action"] for h in history] == ["start", "set", "promote"]
