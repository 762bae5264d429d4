"""Monitoring a multi-label model: per-label rates and their drift against the reference, the expected micro-F1,
live scores of label sets (pure); the logger process's gauges on /metrics (in-process, multiprocess metrics); the
LitAPI's message; and one slow test on a real server (sets answered, fed back, refused, scored and exposed)."""

from __future__ import annotations

import json
import math
import re
import time

import httpx
import numpy as np
import pytest
from test_feedback import multiprocess_metrics  # noqa: F401 (a fixture)
from test_multilabel_feedback import NAMES, VERSION, set_batch

from lightning_cls.errors import InputError, UserError
from lightning_cls.monitoring.drift import DriftThresholds, FeedbackWindow, psi
from lightning_cls.monitoring.label_set_drift import LabelSetWindow, expected_micro_f1, rate_psi, reference_rates
from lightning_cls.serving.metrics import AccuracySettings, LoggerState
from lightning_cls.store.feedback_store import FeedbackStore, StoreSettings
from lightning_cls.task import task_for
from lightning_cls.task.scores import decide, multilabel_scores, set_matrix, set_scores

# 100 training texts: a in 50, b in 30, c in 20, d in 10 (sets: counts add up to more than the rows)
REFERENCE = {"rows": 100, "label_counts": {"a": 50, "b": 30, "c": 20, "d": 10}}


def sample(page: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus page (NaN read as NaN); absent is a failure, not 0."""
    for line in page.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if match and match[1] == name and dict(re.findall(r'(\w+)="([^"]*)"', match[2] or "")) == labels:
            return float(match[3])
    raise AssertionError(f"{name}{labels} is not on the page")


# ------------------------------------------------------------------------------------------------ pure
def test_set_scores_agree_with_the_evaluation_metrics_and_leave_undefined_labels_out():
    rng = np.random.default_rng(0)
    probs = rng.random((200, 4))
    truth = rng.random((200, 4)) < 0.4
    truth[np.arange(200), rng.integers(0, 4, 200)] = True  # every text has a label
    predicted = decide(probs, 0.5)
    ours = set_scores(sets_of(truth), sets_of(predicted), NAMES)
    reference = multilabel_scores(predicted, truth, NAMES)  # the evaluation reports' scores
    assert ours["micro_f1"] == pytest.approx(reference["micro_f1"])
    assert ours["accuracy"] == pytest.approx(reference["subset_accuracy"])
    assert ours["macro_f1"] == pytest.approx(reference["macro_f1"])  # every label present: the same mean
    for name in NAMES:
        for key in ("precision", "recall", "f1"):
            assert ours["per_label"][name][key] == pytest.approx(reference["per_label"][name][key])
    # a label neither sent nor predicted has no score, and does not pull the macro-F1 down
    few = set_scores([["a"], ["a", "b"]], [["a"], ["a"]], NAMES)
    assert few["per_label"]["d"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert few["per_label"]["b"]["precision"] is None and few["per_label"]["b"]["recall"] == 0
    assert few["macro_f1"] == pytest.approx((1 + 0) / 2) and few["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 1))
    # The first predicted label is the most probable: right for the first text, not for the second.
    assert set_scores([["a"], ["b"]], [["a", "c"], ["c", "b"]], NAMES)["top_label_in_set"] == 0.5
    with pytest.raises(InputError, match=r"\['zebra'\] are not among"):
        set_matrix([["zebra"]], NAMES)


def sets_of(matrix: np.ndarray) -> list[list[str]]:
    return [[NAMES[j] for j in np.flatnonzero(row)] for row in matrix]


def test_each_labels_rate_is_compared_with_its_reference_rate():
    np.testing.assert_allclose(reference_rates(REFERENCE, NAMES), [0.5, 0.3, 0.2, 0.1])
    assert reference_rates(None, NAMES) is None
    np.testing.assert_allclose(rate_psi(np.array([0.3]), np.array([0.6])), [psi([0.3, 0.7], [0.6, 0.4])])
    assert rate_psi(np.array([0.3]), np.array([0.3]))[0] == pytest.approx(0)


def test_the_expected_micro_f1_is_what_labels_drawn_from_the_probabilities_score():
    rng = np.random.default_rng(1)
    probs = rng.beta(0.5, 0.5, size=(400, 4))  # sure and unsure labels
    tagged = decide(probs, 0.5)
    expected = expected_micro_f1(probs, tagged)
    # truths drawn with those probabilities: the micro-F1 they give, on average
    drawn = [multilabel_scores(tagged, rng.random(probs.shape) < probs, NAMES)["micro_f1"] for _ in range(200)]
    assert expected == pytest.approx(np.mean(drawn), abs=0.01)
    sure = np.array([[1.0, 0.0, 0.0, 1.0]])
    assert expected_micro_f1(sure, sure > 0.5) == 1.0 and expected_micro_f1(np.zeros((0, 4)), sure[:0]) is None


def test_the_label_set_window_flags_the_labels_that_drifted():
    window = LabelSetWindow(NAMES, REFERENCE, size=100, min_texts=20)
    # ten answers with the training rates: a in 5, b in 3, c in 2, d in 1
    like_training = [["a", "d"], ["a"], ["a"], ["a"], ["a"], ["b"], ["b"], ["b"], ["c"], ["c"]]
    window.add(*columns(like_training))
    assert window.report()["per_label"] is None and window.report()["alerts"] == []  # too few yet
    window.add(*columns(like_training * 9))
    report = window.report()
    assert report["per_label"]["b"] == {"rate": pytest.approx(0.3), "reference_rate": 0.3, "psi": pytest.approx(0)}
    assert report["label_rate_psi"] == pytest.approx(0) and report["label_psi"] == pytest.approx(0)
    assert report["alerts"] == []
    # d (10% of the training texts) is in most answers now: its rate drifted most
    window.add(*columns([["d", "a"]] * 60))
    report = window.report()
    assert report["per_label"]["d"]["rate"] == pytest.approx(0.64)  # 60 + 4 of the 40 left of the others
    assert "d" in report["label_rate_alerts"] and "label_rate_psi" in report["alerts"]
    assert report["label_rate_psi"] == pytest.approx(report["per_label"]["d"]["psi"])
    # the label PSI counts every tag: d's share of the tags is up too
    assert report["labels"]["live"][NAMES.index("d")] > 60 and report["label_psi"] > 0.2
    assert 0 < report["estimated_micro_f1"] < 1


def columns(sets: list[list[str]]) -> tuple:
    """`LabelSetWindow.add`'s arguments for these answers (top label, its probability, length, windows, sets,
    every label's probability)."""
    probs = [[0.9 if name in s else 0.2 for name in NAMES] for s in sets]
    return [s[0] for s in sets], [0.9] * len(sets), [10] * len(sets), [1] * len(sets), sets, probs


def test_the_set_feedback_window_keeps_the_last_sets_and_waits_for_enough():
    window = FeedbackWindow(task_for(NAMES, [0.5] * len(NAMES)), size=3, min_labels=2)
    window.add([(("a",), ("a", "b"))])
    assert window.report()["micro_f1"] is None and window.report()["rows"] == 1
    window.add([(("a", "b"), ("a", "b")), (("c",), ("c",)), (("d",), ("d",))])  # the first pair slides out
    report = window.report()
    assert report["rows"] == 3 and report["micro_f1"] == 1.0 and report["accuracy"] == 1.0


# ------------------------------------------------------------------------------------------------ the gauges
def ml_settings(db, validation_micro_f1: float | None = 0.95) -> dict:
    return {
        "task": task_for(NAMES, [0.5] * len(NAMES)),
        "reference": REFERENCE,
        "max_batch_size": 8,
        "max_length": 32,
        "window": {"size": 40, "min_texts": 10, "thresholds": DriftThresholds()},
        "store": StoreSettings(str(db), VERSION, max_rows=1000),
        "accuracy": AccuracySettings(
            None, margin=0.05, window=20, min_labels=4, validation_micro_f1=validation_micro_f1
        ),
    }


def served(monitor: LoggerState, sets: list[list[str]]) -> dict:
    b = set_batch(sets)
    monitor.on_batch(b)
    assert monitor.log.flush(10)
    return b


def test_per_label_gauges_and_live_micro_f1_on_metrics(tmp_path, multiprocess_metrics, caplog):  # noqa: F811
    db = tmp_path / "f.sqlite3"
    FeedbackStore(db).close()
    monitor = LoggerState(ml_settings(db))
    page = multiprocess_metrics()
    assert sample(page, "lightning_cls_label_reference_rate", label="b") == pytest.approx(0.3)
    for name in ("lightning_cls_live_micro_f1", "lightning_cls_estimated_micro_f1"):
        assert math.isnan(sample(page, name)), name
    assert math.isnan(sample(page, "lightning_cls_label_rate", label="a"))
    assert sample(page, "lightning_cls_validation_micro_f1") == 0.95

    sets = [["a", "b"], ["a"], ["c"], ["a", "d"]] * 3  # a in 9 of 12, b in 3, c in 3, d in 3
    b = served(monitor, sets)
    page = multiprocess_metrics()
    assert sample(page, "lightning_cls_predictions_total", label="a") == 9  # every label of each set counted
    assert sample(page, "lightning_cls_label_rate", label="a") == pytest.approx(9 / 12)
    assert sample(page, "lightning_cls_label_rate", label="d") == pytest.approx(3 / 12)
    assert sample(page, "lightning_cls_drift_label_rate_psi", label="d") == pytest.approx(psi([0.1, 0.9], [0.25, 0.75]))
    assert sample(page, "lightning_cls_drift_alert", signal="label_rate_psi") in (0, 1)
    assert 0 < sample(page, "lightning_cls_estimated_micro_f1") < 1

    # True sets, the predicted ones for the first 8: every label right
    http = FeedbackStore(db)
    assert http.record_feedback([(pid, tuple(s)) for pid, s in zip(b["ids"][:8], sets[:8], strict=True)]).stored == 8
    with caplog.at_level("WARNING", logger="lightning_cls.serving.metrics"):
        monitor.refresh_feedback()
        page = multiprocess_metrics()
        assert sample(page, "lightning_cls_feedback_window_texts") == 8
        assert sample(page, "lightning_cls_live_micro_f1") == 1.0 and sample(page, "lightning_cls_live_accuracy") == 1
        assert sample(page, "lightning_cls_live_label_precision", label="a") == 1.0
        assert "live micro-F1" not in caplog.text
        # wrong sets for the last four: b tagged once where it is not and missed once, c tagged where d is, d once
        # tagged where it is not
        wrong = [("a",), ("a", "b"), ("d",), ("a",)]
        assert http.record_feedback(list(zip(b["ids"][8:], wrong, strict=True))).stored == 4
        monitor.refresh_feedback()
        page = multiprocess_metrics()
    true = [tuple(s) for s in sets[:8]] + wrong
    expected = set_scores(true, sets, NAMES)
    assert expected["micro_f1"] == pytest.approx(2 * 15 / (2 * 15 + 3 + 2))  # 15 right tags, 3 wrong, 2 missed
    assert sample(page, "lightning_cls_live_micro_f1") == pytest.approx(expected["micro_f1"])  # lower than 1.0
    assert sample(page, "lightning_cls_live_accuracy") == pytest.approx(expected["accuracy"])  # subset accuracy
    assert sample(page, "lightning_cls_live_label_recall", label="d") == pytest.approx(2 / 3)  # missed once in 3
    assert sample(page, "lightning_cls_live_label_precision", label="c") == pytest.approx(2 / 3)  # 1 wrong of 3
    assert sample(page, "lightning_cls_live_label_f1", label="b") == pytest.approx(expected["per_label"]["b"]["f1"])
    assert f"Accuracy: live micro-F1 {expected['micro_f1']:.3f} over the last 12 labelled predictions" in caplog.text

    # a restart reads the stored sets back
    monitor.close()
    restarted = LoggerState(ml_settings(db))
    assert sample(multiprocess_metrics(), "lightning_cls_live_micro_f1") == pytest.approx(expected["micro_f1"])
    restarted.close()


def test_a_single_label_on_a_multi_label_models_prediction_counts_as_its_set(tmp_path, multiprocess_metrics):  # noqa: F811
    """Feedback stored as one name (before sets were taken) scores as the set of that name."""
    db = tmp_path / "f.sqlite3"
    FeedbackStore(db).close()
    settings = {**ml_settings(db), "accuracy": AccuracySettings(None, window=20, min_labels=1)}
    monitor = LoggerState(settings)
    b = served(monitor, [["a", "b"], ["c"]])
    FeedbackStore(db).record_feedback([(b["ids"][0], "a"), (b["ids"][1], "c")])
    monitor.refresh_feedback()
    assert sample(multiprocess_metrics(), "lightning_cls_live_micro_f1") == pytest.approx(2 * 2 / (2 * 2 + 1))
    monitor.close()


# ------------------------------------------------------------------------------------------------ the LitAPI
def fabricate_multilabel_export(tokenizer_dir, out):
    """`serving_helpers.fabricate_export`'s tiny model as a multi-label export: per-label thresholds (the service
    then answers sets of sigmoids)."""
    from serving_helpers import fabricate_export

    folder = fabricate_export(tokenizer_dir, out)
    meta = json.loads((folder / "lightning_cls.json").read_text())
    meta.update(format_version=2, thresholds=[0.5] * len(meta["labels"]), validation_micro_f1=0.75)
    (folder / "lightning_cls.json").write_text(json.dumps(meta, indent=2))
    return folder


@pytest.fixture(scope="module")
def ml_export(sample_dir, tmp_path_factory):
    return fabricate_multilabel_export(sample_dir / "wordpiece", tmp_path_factory.mktemp("ml-export"))


def test_the_api_sends_each_answers_label_set_to_the_logger_process(ml_export):
    import queue

    from lightning_cls.data.sample_data import generate_texts
    from lightning_cls.serving.api import ClassifierAPI

    api = ClassifierAPI(str(ml_export), max_batch_size=4)
    api.set_logger_queue(queue.Queue())
    api.setup("cpu")
    texts, _ = generate_texts(rows_per_label=1, seed=3, rare_rows=0)
    answers = api.predict((texts, 3))
    messages = [api._logger_queue.get_nowait() for _ in range(api._logger_queue.qsize())]
    key, sent = messages[-1]
    assert key == "batch" and sent["label_sets"] == [a["labels"] for a in answers]
    assert sent["labels"] == [a["label"] for a in answers]  # each set's most probable label
    rows = FeedbackStore.rows_of(sent, VERSION, None)
    assert [json.loads(r[11]) for r in rows] == sent["label_sets"]  # the labels column (the text, not kept, last)


# ------------------------------------------------------------------------------------------------ a real server
def other_set(labels: list[str], names: list[str]) -> list[str]:
    """A wrong true set for an answer: a label it does not have (or its set less its first label)."""
    return [n for n in names if n not in labels][:1] or labels[1:]


@pytest.mark.slow  # a server start: ~20 s here
def test_a_multi_label_server_takes_label_set_feedback_and_exposes_per_label_metrics(ml_export, tmp_path):
    from serving_helpers import ServerProcess, free_port
    from test_prometheus import MULTI_LABEL_ONLY, names_in_rules, promtool

    from lightning_cls.data.sample_data import generate_texts

    port = free_port()
    args = ["-m", "lightning_cls", "serve", "--model_dir", str(ml_export), "--port", str(port), "--num_threads", "1"]
    args += ["--feedback_db", str(tmp_path / "f.sqlite3"), "--window_size", "20", "--min_window", "10"]
    args += ["--min_feedback", "4", "--log_level", "warning"]
    texts, _ = generate_texts(rows_per_label=2, seed=7, rare_rows=0)
    with (
        ServerProcess(args, port, tmp_path / "server.log") as server,
        httpx.Client(base_url=server.url, timeout=60) as c,
    ):
        info = c.get("/info").json()["model"]
        assert info["problem_type"] == "multi_label" and info["accuracy"]["validation_micro_f1"] == 0.75
        answers = c.post("/predict", json={"texts": texts}).json()["predictions"]
        assert all(a["labels"] for a in answers)
        ids = [a["prediction_id"] for a in answers]
        # bad bodies: 4xx naming the culprit, nothing stored, and the server goes on answering
        for body, status in [
            ({"prediction_id": ids[0], "label": answers[0]["label"]}, 422),
            ({"prediction_id": ids[0], "labels": []}, 422),
            ({"prediction_id": ids[0], "labels": ["zebra"]}, 422),
            ('{"prediction_id": ', 400),
        ]:
            response = c.post("/feedback", json=body) if isinstance(body, dict) else c.post("/feedback", content=body)
            assert response.status_code == status, response.text
        # the true sets: the predicted ones for half of the texts, another one for the rest
        truth = [a["labels"] if i % 2 else other_set(a["labels"], info["labels"]) for i, a in enumerate(answers)]
        items = [{"prediction_id": pid, "labels": t} for pid, t in zip(ids, truth, strict=True)]
        assert c.post("/feedback", json={"feedback": items}).json() == {"stored": len(ids), "already_stored": 0}
        assert c.post("/predict", json={"text": texts[0]}).status_code == 200
        deadline = time.monotonic() + 30
        while sample(page := c.get("/metrics").text, "lightning_cls_feedback_window_texts") < len(ids):
            assert time.monotonic() < deadline, "the feedback was not counted within 30 s"
            time.sleep(0.2)
    expected = set_scores([tuple(t) for t in truth], [tuple(a["labels"]) for a in answers], info["labels"])
    assert sample(page, "lightning_cls_live_micro_f1") == pytest.approx(expected["micro_f1"], abs=1e-6)
    assert 0 < expected["micro_f1"] < 1
    tagged = sum(info["labels"][0] in a["labels"] for a in answers)
    assert sample(page, "lightning_cls_predictions_total", label=info["labels"][0]) >= tagged
    for name in info["labels"]:
        assert 0 <= sample(page, "lightning_cls_label_rate", label=name) <= 1
        assert sample(page, "lightning_cls_drift_label_rate_psi", label=name) >= 0
        assert sample(page, "lightning_cls_label_reference_rate", label=name) == pytest.approx(0.1)
    assert sample(page, "lightning_cls_http_requests_total", path="/feedback", status="422") == 3
    result = promtool("check", "metrics", stdin=page)
    assert result.returncode == 0, result.stdout + result.stderr
    exposed = {line.split("{")[0].split(" ")[0] for line in page.splitlines() if line and not line.startswith("#")}
    assert not MULTI_LABEL_ONLY - names_in_rules() and not MULTI_LABEL_ONLY - exposed, MULTI_LABEL_ONLY - exposed


# ------------------------------------------------------------------------------------------------ offline monitor
def test_monitor_reads_the_services_label_sets_and_scores_the_true_ones(ml_export, tmp_path, capsys):
    """The documented recipe: the service's database as two CSV files (predicted sets as JSON text, true sets as
    names joined by "; "), then `monitor --labels`: per-label drift and the realized micro-F1."""
    import sqlite3

    import pandas as pd

    from lightning_cls.cli import main as cli_main

    names = json.loads((ml_export / "lightning_cls.json").read_text())["labels"]
    physics, stats = "physics", "statistics"
    sets = [[physics], [physics, stats], [stats]] * 20 + [[n] for n in names] * 4  # physics in 40 of 100
    batch = {**set_batch([[NAMES[0]]] * len(sets)), "labels": [s[0] for s in sets], "label_sets": sets}
    batch["all_probabilities"] = [[0.9 if n in s else 0.1 for n in names] for s in sets]
    store = FeedbackStore(tmp_path / "f.sqlite3")
    store.insert_batch(batch, VERSION, None)
    truth = [(pid, tuple(s)) for pid, s in zip(batch["ids"][:30], sets[:30], strict=True)]
    truth[0] = (truth[0][0], (stats,))  # one wrong: physics predicted, statistics true
    store.record_feedback(truth)
    with sqlite3.connect(tmp_path / "f.sqlite3") as conn:
        query = "SELECT id, label, probability, labels, num_tokens AS token_length FROM predictions"
        pd.read_sql_query(query, conn).to_csv(tmp_path / "predictions.csv", index=False)
        pd.read_sql_query("SELECT prediction_id AS id, label FROM feedback", conn).to_csv(
            tmp_path / "labels.csv", index=False
        )
    args = ["monitor", "--predictions", str(tmp_path / "predictions.csv"), "--model_dir", str(ml_export)]
    report = cli_main([*args, "--labels", str(tmp_path / "labels.csv")])
    assert report["per_label"][physics]["rate"] == pytest.approx(0.44)  # 40 + its 4 single rows, of 100
    assert report["per_label"][physics]["reference_rate"] == pytest.approx(0.1)
    assert physics in report["label_rate_alerts"] and "label_rate_psi" in report["alerts"]
    assert report["estimated_micro_f1"] is None  # the CSV has no probability of every label
    expected = set_scores([t for _, t in truth], sets[:30], names)
    assert report["realized"]["rows"] == 30 and report["realized"]["micro_f1"] == pytest.approx(expected["micro_f1"])
    assert report["realized"]["micro_f1"] < 1
    assert "micro-F1" in capsys.readouterr().out

    unknown = tmp_path / "unknown.csv"
    pd.DataFrame({"id": [batch["ids"][0]], "label": [f"{physics}; biology"]}).to_csv(unknown, index=False)
    with pytest.raises(UserError, match=r"label\(s\) \['biology'\] are not among the model's labels"):
        cli_main([*args, "--labels", str(unknown)])
    no_sets = tmp_path / "no_sets.csv"
    pd.read_csv(tmp_path / "predictions.csv").drop(columns="labels").to_csv(no_sets, index=False)
    with pytest.raises(UserError, match="needs the predicted label sets"):
        cli_main(["monitor", "--predictions", str(no_sets), "--model_dir", str(ml_export), "--labels", str(unknown)])
