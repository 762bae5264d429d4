"""The parts of the LightningModule's epoch end and checkpoint hooks, without Lightning: what is logged under which
name, what is written where, what a checkpoint keeps, and the lexical fusion's steps."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lightning_cls.errors import ConfigError
from lightning_cls.model.checkpoints import CALIBRATION_KEY, THRESHOLDS_KEY, read_fitted, write_fitted
from lightning_cls.model.epoch_reports import (
    Epoch,
    label_set_report,
    label_set_scores,
    single_label_scores,
    write_label_set_report,
)
from lightning_cls.model.lexical_fusion import LexicalFusion
from lightning_cls.task import LabelSet

NAMES = ["a", "b", "c"]


def sure(multi_hot):
    """Logits whose sigmoids are ~0.98 where `multi_hot` is 1 and ~0.02 elsewhere."""
    return torch.tensor(multi_hot * 8.0 - 4.0)


def epoch(log_dir=None, fit=False, sanity=False):
    return Epoch("val", fit, sanity, True, 0, 7, None, log_dir, broadcast=lambda value: value)


def model(**fitted):
    state = {"data_reference": None, "temperature": None, "calibration": None, "thresholds": None} | fitted
    return SimpleNamespace(label_names=NAMES, lexical_fusion=LexicalFusion(None), **state)


def test_fitted_state_survives_a_checkpoint_and_an_old_one_changes_nothing():
    checkpoint = {"hyper_parameters": {"label_names": NAMES}}
    write_fitted(checkpoint, model(thresholds=(0.3, 0.5, 0.7), calibration={"micro_f1": 0.8}))
    assert checkpoint[THRESHOLDS_KEY] == [0.3, 0.5, 0.7] and checkpoint[CALIBRATION_KEY] == {"micro_f1": 0.8}
    loaded = model(temperature=2.0)
    read_fitted(checkpoint, loaded)
    assert loaded.thresholds == [0.3, 0.5, 0.7] and loaded.temperature == 2.0  # absent key: kept as it was
    with pytest.raises(ConfigError, match=r"labels \['c', 'b', 'a'\].*data.labels"):
        read_fitted({"hyper_parameters": {"label_names": NAMES[::-1]}}, model())


def test_scores_are_logged_under_the_stage_and_each_part_of_a_fusion():
    logits, labels = torch.eye(3)[[0, 1, 2, 0]], torch.tensor([0, 1, 2, 1])
    parts = {"neural": {"macro_f1": 0.5, "micro_f1": 0.4}, "lexical": {"macro_f1": 0.25, "micro_f1": 0.2}}
    scores = single_label_scores("val", logits, labels, 3, parts)
    assert set(scores) == {"val/acc", "val/f1_macro", "val/f1_macro_neural", "val/f1_macro_lexical"}
    assert float(scores["val/acc"]) == 0.75
    task = LabelSet(tuple(NAMES), (0.5,) * 3)
    report = label_set_report(task, sure(np.eye(3)), np.eye(3, dtype=int)[[0, 1, 1]], None)
    scores = label_set_scores("test", report, None)
    assert set(scores) == {
        "test/f1_micro", "test/f1_macro", "test/subset_acc", "test/hamming_loss", "test/precision_micro",
        "test/recall_micro", "test/top_in_set",
    }  # fmt: skip
    assert float(scores["test/top_in_set"]) == pytest.approx(2 / 3)  # the third text: its top label is not its own


def test_label_set_report_is_written_by_rank_zero_outside_the_sanity_check(tmp_path):
    report = label_set_report(LabelSet(tuple(NAMES), (0.5,) * 3), sure(np.eye(3)), np.eye(3, dtype=int), None)
    write_label_set_report(epoch(tmp_path, sanity=True), report)
    write_label_set_report(epoch(None), report)  # another rank
    assert not list(tmp_path.iterdir())
    write_label_set_report(epoch(tmp_path), report)
    written = json.loads((tmp_path / "val_report.json").read_text())
    assert written["stage"] == "val" and written["global_step"] == 7 and written["micro_f1"] == 1.0
    assert (tmp_path / "val_report.txt").read_text().startswith("val: multi-label")


def test_label_set_report_scores_the_probabilities_under_the_temperature():
    # Over-confident logits: a label's sigmoid says ~0.98 or ~0.02, and it is right 3 times in 4. Halving them
    # (T = 2) brings each probability nearer the truth: the report's ECE is the scaled one, the plain one beside.
    y = np.array([[1, 0], [1, 0], [1, 0], [0, 1]] * 5)
    logits = sure(np.array([[1, 0]] * 20))
    plain = label_set_report(LabelSet(("a", "b"), (0.5, 0.5)), logits, y, None)
    scaled = label_set_report(LabelSet(("a", "b"), (0.5, 0.5), 4.0), logits, y, None)
    assert plain["temperature"] is None and plain["mean_label_ece_uncalibrated"] == plain["mean_label_ece"]
    assert scaled["temperature"] == 4.0 and scaled["mean_label_ece_uncalibrated"] == plain["mean_label_ece"]
    assert scaled["mean_label_ece"] < plain["mean_label_ece"] - 0.1
    assert scaled["micro_f1"] == plain["micro_f1"]  # thresholds at 0.5: the same decisions on either scale


def test_lexical_fusion_fits_its_weight_on_the_rows_to_fit_on():
    logits, labels, row_ids = torch.randn(40, 3), torch.arange(40) % 3, torch.arange(40)
    texts = SimpleNamespace(split_texts=lambda stage: (np.arange(40)[::-1], [str(i) for i in range(40)][::-1], None))
    fusion = LexicalFusion(None)
    out, parts = fusion.fuse_epoch(epoch(), logits, labels, row_ids, texts)
    assert out is logits and parts is None  # no expert: the logits as they are
    fusion.expert = SimpleNamespace(scores=lambda texts: 4 * np.eye(3)[[int(t) % 3 for t in texts]])
    out, parts = fusion.fuse_epoch(epoch(sanity=True), logits, labels, row_ids, texts)
    assert out is logits and parts is None  # no weight yet, in the sanity check: not fused, no error
    with pytest.raises(ConfigError, match="no fusion weight: run `calibrate`"):
        fusion.fuse_epoch(epoch(), logits, labels, row_ids, texts)
    fused, parts = fusion.fuse_epoch(epoch(fit=True), logits, labels, row_ids, texts)
    assert fusion.weight > 0 and parts["lexical_weight"] == fusion.weight
    assert parts["fused"]["accuracy"] == 1.0 and (fused.argmax(-1) == labels).all()
