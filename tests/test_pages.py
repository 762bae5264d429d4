"""The pages' parts without a browser: the review queue's queries and claims on the store (each on a SQLite file and
on a real PostgreSQL: `db_location`, conftest.py), its drift reason, the model page's series and alerts, the page's
headers (CSP) and the rule that the script never writes HTML."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from pages_helpers import NAMES, fused_export

from lightning_cls.export.folder import read_export_metadata
from lightning_cls.monitoring.drift import DriftThresholds
from lightning_cls.serving.model_page import PageSettings, series
from lightning_cls.serving.pages import CSP, KEYED_PATHS, asset, build_pages
from lightning_cls.serving.review import ReviewDesk, network_part
from lightning_cls.serving.review_drift import DriftedBins, drift_reason, drifted_bins
from lightning_cls.store import review_queue as queue
from lightning_cls.store.feedback_store import FeedbackStore


def add_answers(
    store: FeedbackStore,
    rows: list[tuple[str, str, float, str | None]],
    version: str = "v1",
    lengths: list[int] | None = None,
) -> None:
    """Stored answers: (id, label, probability, kept text or None), of ``lengths`` tokens (default 10 each)."""
    probs = [[p if n == label else (1 - p) / (len(NAMES) - 1) for n in NAMES] for _, label, p, _ in rows]
    batch = {
        "time": time.time(),
        "ids": [r[0] for r in rows],
        "labels": [r[1] for r in rows],
        "probabilities": [r[2] for r in rows],
        "all_probabilities": probs,
        "lengths": lengths or [10] * len(rows),
        "windows": [1] * len(rows),
        "truncated": [False] * len(rows),
        "abstained": [r[2] < 0.3 for r in rows],
        "texts": [r[3] for r in rows],
    }
    store.insert_batch(batch, version, None)


@pytest.fixture
def store(db_location, tmp_path):
    store = FeedbackStore(db_location)
    store.register_model("v1", NAMES, str(tmp_path / "no-such-folder"))
    add_answers(
        store,
        [
            ("sure", NAMES[0], 0.95, "a text we are sure of"),
            ("unsure", NAMES[1], 0.35, "a text we are unsure of"),
            ("abstained", NAMES[2], 0.2, "a text abstained on"),
            ("no-text", NAMES[3], 0.1, None),
        ],
    )
    yield store
    store.close()


def test_the_queue_holds_kept_unlabelled_texts_and_a_claim_keeps_others_off(store):
    now = time.time()
    ids = {c.id for c in queue.candidates(store, "reviewer-a", now)}
    assert ids == {"sure", "unsure", "abstained"}  # never one without a kept text
    assert queue.claim(store, "unsure", "reviewer-a", now)
    assert not queue.claim(store, "unsure", "reviewer-b", now)  # held
    assert "unsure" not in {c.id for c in queue.candidates(store, "reviewer-b", now)}
    assert "unsure" in {c.id for c in queue.candidates(store, "reviewer-a", now)}  # its claimant still sees it
    assert queue.claim(store, "unsure", "reviewer-b", now + queue.HOLD_SECONDS + 1)  # a lapsed claim is taken over
    assert queue.remaining(store, "reviewer-a", now + queue.HOLD_SECONDS + 1) == 2

    store.record_feedback([("sure", NAMES[0])])  # a label takes an item out of the queue
    assert not queue.claim(store, "sure", "reviewer-a", now)
    assert queue.skip(store, "abstained", "reviewer-a") is False  # only a claimant skips
    assert queue.claim(store, "abstained", "reviewer-a", now) and queue.skip(store, "abstained", "reviewer-a")
    assert {c.id for c in queue.candidates(store, "reviewer-a", now + 10_000)} == {"unsure"}


def test_the_desk_shows_the_least_certain_first_and_never_one_item_to_two_reviewers(store, tmp_path):
    desk = ReviewDesk(store.path)
    first = desk.next_item("reviewer-a")
    second = desk.next_item("reviewer-b")
    assert first["prediction_id"] == "abstained" and "abstained" in first["reasons"]
    assert second["prediction_id"] == "unsure"
    assert first["text"] == "a text abstained on" and first["top_k"] == []  # no loadable folder: no evidence
    assert desk.next_item("reviewer-c")["prediction_id"] == "sure"
    assert desk.next_item("reviewer-d") is None


@pytest.fixture(scope="module")
def fused_folder(sample_dir, tmp_path_factory):
    return fused_export(sample_dir / "wordpiece", tmp_path_factory.mktemp("pages"))


def test_an_item_of_a_fused_model_says_where_its_experts_disagree_and_shows_evidence(fused_folder, db_location):
    store = FeedbackStore(db_location)
    store.register_model("v1", NAMES, str(fused_folder))
    # The stored answer says "statistics" for a text full of astrophysics words: the expert says otherwise.
    add_answers(store, [("x", "statistics", 0.9, "galaxy redshift telescope supernova luminosity stellar")])
    item = ReviewDesk(store.path).next_item("reviewer-a")
    assert any("lexical expert astrophysics" in r for r in item["reasons"]), item["reasons"]
    shown = [t["label"] for t in item["top_k"]]
    assert shown[0] == "statistics" and set(item["evidence"]) == set(shown)
    assert all("lexical" in e for e in item["evidence"].values())
    store.close()


@pytest.mark.parametrize("multi_label", [False, True])
def test_the_network_part_of_a_stored_fused_answer_is_recovered_under_its_temperature(multi_label):
    import torch

    from lightning_cls.task import task_for

    z, s, w, t = np.array([2.0, -1.0, 0.5]), np.array([-0.5, 1.5, 0.2]), 0.8, 1.9
    task = task_for(["a", "b", "c"], [0.5] * 3 if multi_label else None, temperature=t)
    stored = task.probabilities(torch.tensor([z + w * s])).double()[0].tolist()  # as the service stores it
    got = network_part(stored, t, multi_label, w, s)
    shift = 0.0 if multi_label else got[0] - z[0]  # a softmax keeps the logits up to a constant per text
    np.testing.assert_allclose(got - shift, z, atol=1e-4)
    wrong = network_part(stored, None, multi_label, w, s)  # the temperature ignored: another network
    assert np.abs(wrong - (0.0 if multi_label else wrong[0] - z[0]) - z).max() > 0.1


def test_drifted_labels_and_length_bins_are_the_causes_of_a_psi_alert():
    names = ["a", "b", "c", "d"]
    reference = {
        "label_counts": dict.fromkeys(names, 25),
        "token_length": {"bin_edges": [10, 20], "bin_counts": [30, 40, 30]},
    }
    steady = [(n, None, length) for n in names for length in (5, 15, 15, 25)] * 10  # as in training: no alert
    found = drifted_bins(steady, names, reference, psi_warning=0.2, min_texts=100)
    assert found.labels == {} and found.bins == {} and found.label_psi < 0.2
    assert drift_reason(found, ["a"], 15) is None
    # "a" is half the traffic (a quarter in training), texts over 20 tokens two thirds of it (30% in training) and
    # none of 10-20 tokens (40% in training: most of the length PSI, but a bin no answer is in).
    drifted = [("a", None, 30)] * 90 + [(n, None, 30) for n in "bcd"] * 10 + [(n, None, 5) for n in "bcd"] * 20
    found = drifted_bins(drifted, names, reference, psi_warning=0.2, min_texts=100)
    assert set(found.labels) == {"a"} and found.label_psi > 0.2 and set(found.bins) == {2}
    reason = drift_reason(found, ["b", "a"], 25)  # a label set with a drifted label
    assert reason.startswith("drift: a is 50% of recent answers against 25% in training (label PSI")
    assert "its length (25 tokens) is in a bin of 67% of recent answers against 30% in training" in reason
    assert drift_reason(found, ["b"], 12) is None  # neither its label nor its length bin drifted
    # Too few answers for a signal, as the drift gauges wait: nothing is flagged.
    assert drifted_bins(drifted[:50], names, reference, 0.2, min_texts=100) == DriftedBins()
    assert drifted_bins(drifted, names, None, 0.2, min_texts=100) == DriftedBins()  # no reference


def test_the_desk_flags_answers_where_the_versions_recent_traffic_drifted(fused_folder, db_location):
    store = FeedbackStore(db_location)
    store.register_model("v1", NAMES, str(fused_folder))
    reference = read_export_metadata(fused_folder).reference.to_dict()
    # Lengths as in training: a length of each bin (`length_histogram`: an edge opens its bin) as often as there.
    edges, counts = reference["token_length"]["bin_edges"], reference["token_length"]["bin_counts"]
    typical = [length for length, n in zip([edges[0] - 1, *edges], counts, strict=True) for _ in range(n)][::2]
    labels = ["astrophysics"] * 60 + [n for n in NAMES if n != "astrophysics"] * 10  # astrophysics 40%, 10% in training
    add_answers(store, [(f"old-{i}", n, 0.9, None) for i, n in enumerate(labels)],
                lengths=[typical[i * 7 % len(typical)] for i in range(len(labels))])  # fmt: skip
    add_answers(store, [("astro", "astrophysics", 0.9, "galaxy redshift telescope supernova luminosity stellar"),
                        ("stats", "statistics", 0.9, "regression bayesian estimator variance inference sampling")],
                lengths=[edges[3], edges[3]])  # fmt: skip
    desk = ReviewDesk(store.path, DriftThresholds(), window=1000, min_window=100)
    drifted = desk.drifted("v1", time.time())
    assert set(drifted.labels) == {"astrophysics"} and drifted.bins == {}, drifted  # the labels drifted, not lengths
    reasons = {c.id: desk.reasons(c, time.time()) for c in queue.candidates(store, "reviewer-a", time.time())}
    assert any(r.startswith("drift: astrophysics is 40% of recent answers") for r in reasons["astro"]), reasons
    assert not any(r.startswith("drift") for r in reasons["stats"]), reasons
    item = desk.next_item("reviewer-a")  # the drifted one has a reason more: it comes first
    assert item["prediction_id"] == "astro"
    assert not any(
        "drift" in r
        for r in ReviewDesk(store.path, min_window=1000).reasons(item_candidate(store, "astro"), time.time())
    )
    store.close()


def item_candidate(store: FeedbackStore, prediction_id: str) -> queue.Candidate:
    return next(c for c in queue.candidates(store, "reviewer-z", time.time() + 10_000) if c.id == prediction_id)


def test_series_bucket_answers_and_labels_and_raise_the_services_alerts():
    names = ["a", "b"]
    settings = PageSettings(names, {"a": 50, "b": 50}, validation_accuracy=0.9, alert_margin=0.05, min_bucket=5)
    answers = [(1000.0 + i, "v1", "a", None, 0.6, 0) for i in range(10)]  # all "a": label PSI up, confidence down
    feedback = [(1005.0 + i, "v1", "a", None, "b" if i % 2 else "a", None) for i in range(6)]
    out = series(answers, feedback, settings)
    [point] = out["versions"]["v1"]
    assert out["bucket_seconds"] == 60 and point["answers"] == 10 and point["feedback"] == 6
    assert point["estimated_accuracy"] == pytest.approx(0.6) and point["live_accuracy"] == pytest.approx(0.5)
    assert point["label_psi"] > DriftThresholds().psi_warning
    alerts = " | ".join(a["alert"] for a in out["alerts"])
    assert "estimated accuracy 0.600 below 0.850" in alerts and "live accuracy 0.500" in alerts
    assert "label PSI" in alerts
    assert series([], [], settings) == {"bucket_seconds": None, "versions": {}, "alerts": []}


def test_the_script_never_writes_html_and_loads_nothing_from_elsewhere():
    script, page = asset("app.js").decode(), asset("index.html").decode()
    script = re.sub(r"^\s*//.*$", "", script, flags=re.M)  # the comments may name what the code never does
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(|new Function", script)
    assert not re.search(r"https?://", page) and "<script>" not in page  # no inline script, no other origin
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", script)


def test_the_pages_are_served_with_a_content_security_policy(fused_folder, tmp_path):
    app = FastAPI()
    pages = build_pages(read_export_metadata(fused_folder), str(tmp_path / "db"), False, 0.9, alert_margin=0.05,
                        drift=DriftThresholds(), keyed=True, limits={})  # fmt: skip
    pages.install(app)

    async def get(path: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await c.get(path)

    for path in ("/", "/review", "/model"):
        response = asyncio.run(get(path))
        assert response.status_code == 200 and response.headers["content-security-policy"] == CSP
        assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP
        assert response.headers["x-content-type-options"] == "nosniff" and "<html" in response.text
    js = asyncio.run(get("/static/app.js"))
    assert js.headers["content-type"].startswith("text/javascript") and "textContent" in js.text
    assert asyncio.run(get("/static/..%2Fpages.py")).status_code == 404
    info = asyncio.run(get("/pages/info")).json()
    assert info["lexical"] == {"weight": 0.7} and info["api_key"] is True and info["labels"] == NAMES
    assert "/pages/history" in KEYED_PATHS and "/pages/review/next" in KEYED_PATHS
