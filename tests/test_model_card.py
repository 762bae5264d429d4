"""The model card asks the task what the model answers: one label, or a label set with its thresholds."""

from __future__ import annotations

import yaml

from lightning_cls.export.folder import ExportMetadata
from lightning_cls.export.model_card import model_card

NAMES = ["astrophysics", "mathematics", "statistics"]


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


def test_a_label_set_card_scores_sets_and_shows_the_thresholds():
    meta = ExportMetadata(labels=NAMES, max_length=64, thresholds=[0.3, 0.45, 0.6])
    report = {
        "rows": 40,
        "micro_f1": 0.81,
        "macro_f1": 0.77,
        "subset_accuracy": 0.6,
        "per_label": {n: {"precision": 0.8, "recall": 0.7, "f1": 0.75, "support": 10} for n in NAMES},
    }
    card = model_card(meta, {"model_name_or_path": "tiny"}, report)
    metrics = front_matter(card)["model-index"][0]["results"][0]["metrics"]
    assert [(m["name"], m["value"]) for m in metrics] == [
        ("micro-F1 (test)", 0.81),
        ("macro-F1 (test)", 0.77),
        ("subset accuracy (test)", 0.6),
    ]
    assert "a set of the 3 labels" in card and "statistics 0.60" in card
    assert "| mathematics | 0.8000 | 0.7000 | 0.7500 | 10 |" in card
    assert "plain softmax" not in card  # a label-set model has thresholds, not a temperature


def test_a_single_label_card_scores_labels_and_shows_the_temperature():
    calibration = {"before": {"ece": 0.05, "nll": 0.6}, "after": {"ece": 0.02, "nll": 0.5}}
    meta = ExportMetadata(labels=NAMES, max_length=64, temperature=1.5, calibration=calibration)
    report = {"rows": 40, "accuracy": 0.9, "macro_f1": 0.88, "weighted_f1": 0.89, "per_class": {}}
    card = model_card(meta, {"model_name_or_path": "tiny"}, report)
    metrics = front_matter(card)["model-index"][0]["results"][0]["metrics"]
    assert [m["name"] for m in metrics] == ["macro-F1 (test)", "accuracy (test)"]
    assert "one of 3 labels" in card and "T = 1.5000" in card and "weighted F1 0.8900" in card
