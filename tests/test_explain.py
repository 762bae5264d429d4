"""The evidence of an answer (`export/explain.py`): the lexical expert's shares are exact, the network's occlusion is
what reading each variant alone gives, spans cover only what the model reads."""

from __future__ import annotations

import json
import queue

import numpy as np
import pytest
import torch
from pages_helpers import NAMES, WEIGHT, fused_export

from lightning_cls.data.sample_data import KEYWORDS
from lightning_cls.export.answer import ExportedModel
from lightning_cls.export.explain import (
    KINDS,
    ExplainSettings,
    explain,
    occlusion_evidence,
    read_chars,
    word_spans,
)
from lightning_cls.export.runtime import InferenceSettings
from lightning_cls.model.lexical_evidence import lexical_shares
from lightning_cls.serving.api import ClassifierAPI
from lightning_cls.serving.http import RequestError, parse_predict_body


@pytest.fixture(scope="module")
def fused_folder(sample_dir, tmp_path_factory):
    return fused_export(sample_dir / "wordpiece", tmp_path_factory.mktemp("explain"))


@pytest.fixture(scope="module")
def fused_model(fused_folder) -> ExportedModel:
    """A tiny exported network (a little trained) that fuses a lexical expert, loaded as serve loads it."""
    return ExportedModel.load(fused_folder)


def test_lexical_shares_sum_exactly_to_the_experts_part_of_the_fused_logit(fused_model):
    text = "We measure the redshift of a distant galaxy and its dark halo with a telescope."
    expert = fused_model.fusion.expert
    _, _, shares = lexical_shares(expert, fused_model.fusion.weight, text)
    expected = WEIGHT * expert.scores([text])[0]
    np.testing.assert_allclose(shares.sum(1) + WEIGHT * expert.intercept, expected, rtol=1e-5, atol=1e-5)
    # ... and the expert's part is what the one answer path adds to the network's logits.
    network, _ = fused_model.network_logits([text])
    fused = fused_model.answer([text]).logits
    np.testing.assert_allclose((fused - network)[0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_the_lexical_evidence_of_a_subject_is_its_own_words(fused_model):
    text = "A new " + KEYWORDS["astrophysics"] + " survey."
    label = NAMES.index("astrophysics")
    [evidence] = explain(fused_model, [text], [[label]], {"lexical"})
    phrases = evidence["astrophysics"]["lexical"]
    assert phrases and len(phrases) <= ExplainSettings().top_n
    assert "network" not in evidence["astrophysics"]  # not asked for: no forward pass
    weights = [p["weight"] for p in phrases]
    assert weights == sorted(weights, reverse=True) and min(weights) > 0
    assert any(word in phrases[0]["text"].split() for word in KEYWORDS["astrophysics"].split())
    assert phrases[0]["weight"] == pytest.approx(WEIGHT * phrases[0]["tfidf"] * phrases[0]["coefficient"], abs=2e-4)


def test_occlusion_weights_are_the_drop_in_log_probability_reading_each_variant_alone(fused_model):
    texts = ["Entanglement of two superconducting qubits in a lattice.", "A fast algorithm for sparse graphs."]
    labels = [[0, 3], [2]]
    settings = ExplainSettings(top_n=100)
    batched = occlusion_evidence(fused_model, texts, labels, settings)
    for text, found, wanted in zip(texts, batched, labels, strict=True):
        spans = word_spans(text, len(text), settings.span_words, settings.max_spans)
        for c in wanted:
            whole = fused_model.task.probabilities(fused_model.network_logits([text])[0])[0, c].log()
            expected = {}
            for a, b in spans:
                rest = (text[:a] + " " + text[b:]).strip()
                alone = fused_model.task.probabilities(fused_model.network_logits([rest])[0])[0, c].log()
                expected[text[a:b]] = float(whole - alone)
            for phrase in found[c]:
                assert text[phrase["start"] : phrase["end"]] == phrase["text"]
                assert phrase["weight"] == pytest.approx(expected[phrase["text"]], abs=1e-3)
            shown = {p["text"] for p in found[c]}
            assert {t for t, w in expected.items() if w > 1e-3} <= shown  # every span that pushed it up


def test_spans_cover_the_words_read_and_widen_on_long_texts():
    text = " ".join(f"w{i}" for i in range(100))
    spans = word_spans(text, len(text), span_words=3, max_spans=10)
    assert len(spans) == 10 and spans[0] == (0, text.index("w10") - 1)
    assert word_spans(text, len(text), 3, 64)[1] == (text.index("w3"), text.index("w5") + 2)  # 3 words a span
    assert word_spans("dark matter halo", 16, 3, 32) == [(0, 4), (5, 11), (12, 16)]  # a short query: word by word
    assert word_spans("   ", 3, 3, 32) == []
    cut = word_spans(text, text.index("w20"), 3, 64)  # the model reads up to w19
    assert text[cut[-1][0] : cut[-1][1]].split()[-1] == "w19"


def test_only_what_the_windows_read_is_occluded(fused_model):
    long = " ".join(["galaxy redshift"] * 200)
    limit = read_chars(fused_model, long)
    assert 0 < limit < len(long)
    assert read_chars(fused_model, "a short text") == len("a short text")
    [found] = occlusion_evidence(fused_model, [long], [[0]], ExplainSettings(top_n=1000))
    assert all(p["end"] <= limit for p in found[0])


def test_a_network_without_an_expert_gives_network_evidence_only(fused_model):
    alone = ExportedModel(fused_model.model_dir, fused_model.runner, fused_model.task, fused_model.windows, None)
    [evidence] = explain(alone, ["A fast graph algorithm."], [[2]], {"lexical", "network"})
    assert set(evidence[NAMES[2]]) == {"network"}
    torch.testing.assert_close(alone.network_logits(["x y"])[0], fused_model.network_logits(["x y"])[0])


# ------------------------------------------------------------------------------------------------ POST /predict
@pytest.mark.parametrize(
    ("value", "kinds"),
    [(None, ()), (False, ()), (True, KINDS), ("network", ("network",)), (["network", "lexical"], KINDS)],
)
def test_the_explain_option_reads_a_boolean_a_kind_or_a_list(value, kinds):
    body = {"text": "a galaxy", **({"explain": value} if value is not None else {})}
    assert parse_predict_body(json.dumps(body).encode(), 8, 10, 3)[3] == kinds


@pytest.mark.parametrize("value", ["why", ["lexical", "why"], 3, {"lexical": True}])
def test_a_bad_explain_is_a_422_naming_the_field_and_the_choices(value):
    with pytest.raises(RequestError) as err:
        parse_predict_body(json.dumps({"text": "a", "explain": value}).encode(), 8, 10, 3)
    assert err.value.status == 422 and '"explain" must be' in err.value.message and "network" in err.value.message


def test_the_worker_adds_evidence_only_to_the_answers_that_ask(fused_folder, fused_model):
    api = ClassifierAPI(str(fused_folder), inference=InferenceSettings(backend="torch", precision="fp32"))
    api.set_logger_queue(queue.Queue())
    api.setup("cpu")
    text = "A new " + KEYWORDS["astrophysics"] + " survey."
    requests = [([text], 2, None, ()), ([text, "A fast graph algorithm."], 3, None, ("lexical", "network"))]
    plain, asked = api.unbatch(api.predict(api.batch(requests)))
    assert "evidence" not in plain[0]
    for answer, given in zip(asked, [text, "A fast graph algorithm."], strict=True):
        shown = [a["label"] for a in answer["top_k"]]
        assert list(answer["evidence"]) == shown  # every label shown, in the answer's order
        expected = explain(fused_model, [given], [[NAMES.index(n) for n in shown]], KINDS)[0]
        assert answer["evidence"] == expected  # the same evidence as the answering model's, through the worker
    assert {"lexical", "network"} == set(asked[0]["evidence"][asked[0]["label"]])
    assert plain[0]["probability"] == asked[0]["probability"]  # asking changes nothing of the answer
