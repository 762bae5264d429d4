"""The HTTP service: request checks (pure), then a real server process on a free loopback port, talked to with httpx."""

from __future__ import annotations

import json
import queue
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from conftest import TINY_CONFIGS, tokenizer_for
from hypothesis import given, settings
from hypothesis import strategies as st
from serving_helpers import MAX_LENGTH, ServerProcess, fabricate_export, free_port
from transformers import AutoModelForSequenceClassification

from lightning_cls.data.labels import DEFAULT_LABELS
from lightning_cls.data.sample_data import KEYWORDS, generate_texts
from lightning_cls.data.tokenization import load_tokenizer
from lightning_cls.export.runtime import InferenceSettings
from lightning_cls.monitoring.drift import PSI_WARNING
from lightning_cls.serving.api import ClassifierAPI
from lightning_cls.serving.http import RequestError, parse_predict_body
from lightning_cls.serving.pages import KEYED_PATHS

MAX_TEXTS, MAX_BODY, NUM_LABELS = 8, 20_000, 10
WINDOW = 100


def parse(body: bytes | str, max_texts: int = MAX_TEXTS) -> tuple[list[str], int]:
    return parse_predict_body(body.encode() if isinstance(body, str) else body, max_texts, NUM_LABELS, 3)[:2]


# ------------------------------------------------------------------------------------------------ request checks
def test_parse_accepts_one_text_or_a_list_and_top_k():
    assert parse('{"text": "a galaxy"}') == (["a galaxy"], 3)
    assert parse('{"texts": ["a", "b c"], "top_k": 5}') == (["a", "b c"], 5)


BAD_BODIES = [
    ('{"text": ', 400, "Malformed JSON"),
    (b"\xff\xfe\x00", 400, "not UTF-8"),
    ("[" * 100_000, 400, "Malformed JSON"),
    ('"just a string"', 422, "got a string"),
    ("{}", 422, 'exactly one of "text"'),
    ('{"text": "a", "texts": ["b"]}', 422, 'exactly one of "text"'),
    ('{"txt": "a"}', 422, "Unknown field(s) ['txt']"),
    ('{"text": 3}', 422, "text must be a string, got a number"),
    ('{"text": null}', 422, "text must be a string, got null"),
    ('{"texts": "a"}', 422, '"texts" must be a list of strings, got a string'),
    ('{"texts": []}', 422, '"texts" is empty'),
    ('{"texts": ["a", ["b"]]}', 422, "texts[1] must be a string, got a list"),
    ('{"text": " \\n\\t "}', 422, "text is empty or only whitespace"),
    ('{"texts": ["a", ""]}', 422, "texts[1] is empty or only whitespace"),
    ('{"text": "\\ud800"}', 422, "lone surrogate"),
    (json.dumps({"texts": ["a"] * (MAX_TEXTS + 1)}), 422, f"has {MAX_TEXTS + 1} texts; this server takes at most"),
    ('{"text": "a", "top_k": 0}', 422, '"top_k" must be an integer from 1 to 10'),
    ('{"text": "a", "top_k": 11}', 422, '"top_k" must be an integer from 1 to 10'),
    ('{"text": "a", "top_k": true}', 422, '"top_k" must be an integer'),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_BODIES, ids=[f"{s}-{m[:30]}" for _, s, m in BAD_BODIES])
def test_parse_rejects_bad_bodies_with_a_status_and_a_message_naming_the_problem(body, status, message):
    with pytest.raises(RequestError) as err:
        parse(body)
    assert err.value.status == status
    assert message in err.value.message


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | st.recursive(st.none() | st.booleans() | st.integers() | st.text(), st.lists))
def test_parse_raises_nothing_but_request_errors(body):
    """Whatever arrives, the answer is texts or a 4xx, never an unexpected exception (which would be a 500)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        texts, top_k = parse(raw)
    except RequestError as e:
        assert 400 <= e.status < 500
    else:
        assert texts and all(isinstance(t, str) and t.strip() for t in texts) and 1 <= top_k <= NUM_LABELS


# ------------------------------------------------------------------------------------------------ the LitAPI alone
def test_batched_answers_equal_single_text_answers(sample_dir, tmp_path, family):
    """Texts of several requests batched together (and padded to the longest) get the answers they get alone."""
    tokenizer = tokenizer_for(sample_dir, family)
    model_dir = fabricate_export(tokenizer, tmp_path / "model", model_config=TINY_CONFIGS[family])
    api = ClassifierAPI(str(model_dir), max_batch_size=4, inference=InferenceSettings(max_batch_tokens=3 * MAX_LENGTH))
    api.set_logger_queue(queue.Queue())
    api.setup("cpu")
    texts, _ = generate_texts(rows_per_label=1, seed=11, rare_rows=0)
    requests = [(texts[:1], 2), (texts[1:6], 3), (texts[6:], 1)]
    batched = api.unbatch(api.predict(api.batch([api.decode_request({"texts": t, "top_k": k}) for t, k in requests])))
    alone = [api.predict(([text], 3))[0] for text in texts]
    flat = [answer for answers in batched for answer in answers]
    assert [len(a) for a in batched] == [1, 5, 4]
    assert [len(a["top_k"]) for a in flat] == [2] + [3] * 5 + [1] * 4
    for got, want in zip(flat, alone, strict=True):
        assert got["label"] == want["label"] and got["num_tokens"] == want["num_tokens"]
        assert got["probability"] == pytest.approx(want["probability"], abs=1e-5)
    # one monitoring message per batch, with one entry per text
    messages = [api._logger_queue.get_nowait() for _ in range(api._logger_queue.qsize())]
    key, first = next(m for m in messages if m[0] == "batch")  # after "start" and "deployed" from setup
    assert key == "batch" and first["requests"] == 3 and first["labels"] == [a["label"] for a in flat]


# ------------------------------------------------------------------------------------------------ a real server
@pytest.fixture(scope="module")
def model_dir(sample_dir, tmp_path_factory):
    # Trained a little, so that its predictions follow the texts' subjects (the drift test needs that).
    return fabricate_export(sample_dir / "wordpiece", tmp_path_factory.mktemp("exported"), train_steps=150)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    port = free_port()
    args = ["-m", "lightning_cls", "serve", "--model_dir", str(model_dir), "--port", str(port)]
    args += ["--max_texts", str(MAX_TEXTS), "--max_body_bytes", str(MAX_BODY), "--max_batch_size", "8"]
    args += ["--window_size", str(WINDOW), "--min_window", str(WINDOW), "--num_threads", "1", "--log_level", "warning"]
    with ServerProcess(args, port, tmp_path_factory.mktemp("server") / "server.log") as process:
        yield process


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (0 when absent)."""
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if match and match[1] == name:
            found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match[2] or ""))
            if found == labels:
                return float(match[3])
    return 0.0


def wait_for_texts(client: httpx.Client, total: float, timeout: float = 30.0) -> str:
    """/metrics once the monitoring process has counted ``total`` texts (it is fed asynchronously)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        text = client.get("/metrics").text
        if metric(text, "lightning_cls_batch_texts_sum") >= total or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


@pytest.mark.slow
def test_health_and_info(client, model_dir):
    assert client.get("/health").status_code == 200
    info = client.get("/info").json()["model"]
    assert info["labels"] == sorted(DEFAULT_LABELS)
    assert info["max_length"] == MAX_LENGTH
    assert info["reference"] is True
    assert info["limits"]["max_texts"] == MAX_TEXTS
    assert info["version"] == "0.1.0"


@pytest.mark.slow
def test_predictions_match_the_model_run_directly(client, model_dir):
    texts, _ = generate_texts(rows_per_label=1, seed=7, rare_rows=0)
    texts = texts[: MAX_TEXTS - 1]
    texts.append(" ".join(["galaxy redshift"] * 60))  # longer than max_length: truncated
    response = client.post("/predict", json={"texts": texts, "top_k": 4})
    assert response.status_code == 200, response.text
    answers = response.json()["predictions"]
    single = client.post("/predict", json={"text": texts[0]}).json()["predictions"]

    tokenizer = load_tokenizer(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    for text, answer in zip(texts, answers, strict=True):
        with torch.inference_mode():
            inputs = tokenizer(text, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
            probs = model(**inputs).logits.softmax(-1)[0]
        top = probs.topk(4)
        assert answer["label"] == model.config.id2label[int(top.indices[0])]
        assert answer["probability"] == pytest.approx(float(top.values[0]), abs=1e-5)
        assert [t["label"] for t in answer["top_k"]] == [model.config.id2label[int(i)] for i in top.indices]
        assert answer["num_tokens"] == inputs["input_ids"].shape[1]
        assert answer["truncated"] == (len(tokenizer(text)["input_ids"]) > MAX_LENGTH)
    assert answers[-1]["truncated"] and answers[-1]["num_tokens"] == MAX_LENGTH
    assert not all(a["truncated"] for a in answers)
    assert single[0]["label"] == answers[0]["label"] and len(single[0]["top_k"]) == 3


@pytest.mark.slow
def test_bad_requests_get_4xx_with_a_message_and_the_server_keeps_serving(client):
    cases = [(b, s, m) for b, s, m in BAD_BODIES if len(b) < MAX_BODY]  # the deep nesting one is over the limit
    cases += [("[" * 100_000, 413, "over this server's limit"), ("x" * (MAX_BODY + 1), 413, "over this server's")]
    for body, status, message in cases:
        raw = body if isinstance(body, bytes) else body.encode()
        response = client.post("/predict", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == status, (body[:50], response.text)
        assert message in response.json()["detail"]
    # A body streamed without a length (chunked) is limited too.
    chunked = client.post("/predict", content=iter([b'{"text": "', b"a" * MAX_BODY, b'"}']))
    assert chunked.status_code == 413
    assert client.get("/predict").status_code == 405
    assert client.get("/no/such/path").status_code == 404
    # `curl -d` sends a form content type: the JSON body is still read.
    form_type = {"content-type": "application/x-www-form-urlencoded"}
    form = client.post("/predict", content=b'{"text": "qubit"}', headers=form_type)
    assert form.status_code == 200
    assert client.post("/predict", json={"text": "a galaxy"}).status_code == 200


@pytest.mark.slow
def test_metrics_count_requests_errors_and_predictions(client):
    before = wait_for_texts(client, 0)
    assert client.post("/predict", json={"texts": ["qubit entanglement", "lattice phonon"]}).status_code == 200
    assert client.post("/predict", json={"texts": []}).status_code == 422
    after = wait_for_texts(client, metric(before, "lightning_cls_batch_texts_sum") + 2)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("lightning_cls_http_requests_total", path="/predict", status="200") == 1
    assert delta("lightning_cls_http_errors_total", path="/predict", status="422") == 1
    assert delta("lightning_cls_http_request_duration_seconds_count", path="/predict") == 2
    assert sum(delta("lightning_cls_predictions_total", label=name) for name in DEFAULT_LABELS) == 2
    assert delta("lightning_cls_prediction_confidence_count") == 2
    assert delta("lightning_cls_input_tokens_count") == 2
    assert delta("lightning_cls_batch_requests_count") >= 1
    for name in ("lightning_cls_drift_label_psi", "lightning_cls_drift_length_psi", "lightning_cls_drift_alert"):
        assert f"# TYPE {name} gauge" in after


def send_texts(client: httpx.Client, texts: list[str]) -> None:
    for start in range(0, len(texts), MAX_TEXTS):
        assert client.post("/predict", json={"texts": texts[start : start + MAX_TEXTS]}).status_code == 200


@pytest.mark.slow
def test_drift_gauges_move_when_traffic_is_skewed_to_one_label(client):
    # Balanced traffic (as many texts of each subject) fills the window first, then texts of one subject only.
    balanced, _ = generate_texts(rows_per_label=WINDOW // 10, seed=3, rare_rows=0)
    texts, labels = generate_texts(rows_per_label=WINDOW, seed=4, rare_rows=0)
    skewed = [t for t, label in zip(texts, labels, strict=True) if label == "astrophysics"][:WINDOW]
    assert len(balanced) == len(skewed) == WINDOW
    start = metric(client.get("/metrics").text, "lightning_cls_batch_texts_sum")
    send_texts(client, balanced)
    after_balanced = wait_for_texts(client, start + WINDOW)
    send_texts(client, skewed)
    after_skewed = wait_for_texts(client, start + 2 * WINDOW)

    balanced_psi = metric(after_balanced, "lightning_cls_drift_label_psi")
    skewed_psi = metric(after_skewed, "lightning_cls_drift_label_psi")
    assert metric(after_skewed, "lightning_cls_drift_window_texts") == WINDOW
    # How low the balanced PSI is depends on the tiny model's accuracy; one subject only is far above either.
    assert skewed_psi > max(PSI_WARNING, 3 * balanced_psi), (balanced_psi, skewed_psi)
    assert metric(after_skewed, "lightning_cls_drift_alert", signal="label_psi") == 1
    # The texts' lengths did not change: the length signal stays below the label signal.
    assert metric(after_skewed, "lightning_cls_drift_length_psi") < skewed_psi


@pytest.mark.slow
def test_a_burst_of_concurrent_requests_is_answered_in_full_and_batched(client, server):
    texts = [f"{' '.join(words.split()[: i % 5 + 2])} sample {i}" for i, words in enumerate(KEYWORDS.values())] * 6
    before = wait_for_texts(client, 0)

    def one(text: str) -> tuple[int, dict]:
        response = httpx.post(f"{server.url}/predict", json={"text": text}, timeout=60)
        return response.status_code, response.json()

    with ThreadPoolExecutor(max_workers=len(texts)) as pool:
        results = list(pool.map(one, texts))
    assert [status for status, _ in results] == [200] * len(texts)
    # Each answer is its own text's: the same text answered alone gives the same label and token count.
    for text, (_, answer) in list(zip(texts, results, strict=True))[:10]:
        alone = client.post("/predict", json={"text": text}).json()["predictions"][0]
        burst = answer["predictions"][0]
        assert (alone["label"], alone["num_tokens"]) == (burst["label"], burst["num_tokens"])
    after = wait_for_texts(client, metric(before, "lightning_cls_batch_texts_sum") + len(texts) + 10)
    batches = metric(after, "lightning_cls_batch_requests_count") - metric(before, "lightning_cls_batch_requests_count")
    assert batches < len(texts) + 10  # some requests shared a forward pass: the server batched them
    assert client.get("/health").status_code == 200


@pytest.mark.slow
def test_a_server_with_an_api_key(model_dir, tmp_path, monkeypatch):
    """The key comes from the environment (never the command line): /predict needs it, /health does not."""
    monkeypatch.setenv("MY_KEY", "k3y")
    port = free_port()
    args = ["-m", "lightning_cls", "serve", "--model_dir", str(model_dir), "--port", str(port)]
    args += ["--api_key_env", "MY_KEY", "--metrics_need_key", "true", "--num_threads", "1", "--log_level", "warning"]
    with ServerProcess(args, port, tmp_path / "server.log") as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/health").status_code == 200
        assert client.post("/predict", json={"text": "galaxy"}).status_code == 401
        assert client.get("/metrics").status_code == 401
        answer = client.post("/predict", json={"text": "galaxy"}, headers={"Authorization": "Bearer k3y"})
        assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] in DEFAULT_LABELS
        metrics = client.get("/metrics", headers={"Authorization": "Bearer k3y"}).text
        assert metric(metrics, "lightning_cls_http_requests_total", path="/predict", status="401") == 1
        info = client.get("/info").json()["model"]
        keyed = ["/predict", "/feedback", "/deployment", "/metrics", *KEYED_PATHS]  # the pages' JSON shows texts
        assert info["api_key"] == {"required_for": keyed}
        assert client.get(KEYED_PATHS[0]).status_code == 401
        assert "k3y" not in json.dumps(info)
