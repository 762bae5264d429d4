"""Evaluation reports: per-class scores from the confusion matrix, the text/JSON report and the figure, end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_cli import data_args, trainer_args
from torchmetrics.classification import (
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from lightning_cls.cli import main
from lightning_cls.model.evaluation import (
    classification_report,
    confusion_figure,
    format_class_report,
    write_evaluation,
)

LONG = "electrical engineering and systems science"


@pytest.mark.parametrize("absent_class", [False, True])
def test_report_agrees_with_torchmetrics(absent_class):
    rng = np.random.default_rng(0)
    n = 5
    target = torch.from_numpy(rng.integers(0, n, 300))
    preds = torch.where(torch.rand(300) < 0.6, target, torch.from_numpy(rng.integers(0, n, 300)))
    if absent_class:  # class 4 is neither in the data nor predicted: macro averages leave it out, like torchmetrics
        keep = (target != 4) & (preds != 4)
        target, preds = target[keep], preds[keep]
    confmat = MulticlassConfusionMatrix(n)(preds, target).numpy()
    report = classification_report(confmat, [f"c{i}" for i in range(n)])

    assert report["macro_f1"] == pytest.approx(MulticlassF1Score(n, average="macro")(preds, target).item(), abs=1e-6)
    assert report["accuracy"] == pytest.approx((preds == target).float().mean().item())
    per_class_f1 = MulticlassF1Score(n, average="none")(preds, target)
    precision = MulticlassPrecision(n, average="none")(preds, target)
    recall = MulticlassRecall(n, average="none")(preds, target)
    for i in range(n):
        scores = report["per_class"][f"c{i}"]
        assert scores["f1"] == pytest.approx(per_class_f1[i].item(), abs=1e-6)
        assert scores["precision"] == pytest.approx(precision[i].item(), abs=1e-6)
        assert scores["recall"] == pytest.approx(recall[i].item(), abs=1e-6)
        assert scores["support"] == int((target == i).sum())
    assert report["rows"] == len(target)


def test_report_rejects_a_matrix_of_the_wrong_size():
    with pytest.raises(ValueError, match="does not match 3 labels"):
        classification_report(np.eye(2), ["a", "b", "c"])


def test_text_table_lists_every_class_in_full():
    report = classification_report(np.array([[3, 1, 0], [0, 2, 0], [1, 0, 5]]), ["a", LONG, "c"])
    table = format_class_report(report)
    lines = table.splitlines()
    assert lines[0].split() == ["precision", "recall", "f1", "support"]
    assert any(line.startswith(LONG + "  ") and line.split()[-1] == "2" for line in lines)
    assert "macro avg" in table and f"{report['macro_f1']:.4f}" in table
    assert len({len(line) for line in lines if line}) == 1  # a fixed-width table: columns line up


def test_figure_grows_with_the_labels_and_shows_their_names(tmp_path):
    small = confusion_figure(np.eye(3, dtype=int), ["a", "b", LONG])
    large = confusion_figure(np.eye(12, dtype=int), [f"label {i}" for i in range(12)])
    assert large.get_size_inches()[0] > small.get_size_inches()[0]
    panels = {ax.get_title(): ax for ax in small.axes if ax.get_title()}  # the colour bars have no title
    counts, rates = panels["counts"], panels["row-normalised (recall on the diagonal)"]
    names = [t.get_text().replace("\n", " ") for t in counts.get_yticklabels()]
    assert names == ["a", "b", LONG]  # long names are wrapped, not cut
    assert [t.get_text() for t in counts.texts] == ["1", "1", "1"]
    assert [t.get_text() for t in rates.texts] == ["1.00", "1.00", "1.00"]

    report, _, paths = write_evaluation(np.array([[4, 1], [2, 3]]), ["x", "y"], "val", tmp_path, {"epoch": 2})
    assert json.loads(paths["json"].read_text()) == report
    assert report["epoch"] == 2 and report["stage"] == "val"
    image = imread(paths["figure"])
    assert image.shape[0] > 200 and image.shape[1] > 400  # a real picture, two panels side by side


def test_test_and_validate_write_reports_from_the_checkpoint(tmp_path, sample_dir, family, trained):
    run_dir = trained(family)
    ckpt = run_dir / "ckpt" / "last.ckpt"
    fit_logs = next((run_dir / "runs").rglob("val_report.json")).parent
    assert json.loads((fit_logs / "val_report.json").read_text())["epoch"] == 0  # written after each validation

    run = main(["test", *data_args(sample_dir, family), *trainer_args(tmp_path), f"--ckpt_path={ckpt}"])
    log_dir = Path(run.trainer.log_dir)
    report = json.loads((log_dir / "test_report.json").read_text())
    assert report["stage"] == "test" and report["checkpoint"] == str(ckpt)
    assert report["rows"] == 30  # the whole test split (10% of 300 rows), not one batch
    assert report["macro_f1"] == pytest.approx(run.trainer.callback_metrics["test/f1_macro"].item(), abs=1e-5)
    assert report["accuracy"] == pytest.approx(run.trainer.callback_metrics["test/acc"].item(), abs=1e-5)
    assert list(report["per_class"]) == run.model.label_names
    assert sum(c["support"] for c in report["per_class"].values()) == 30
    text = (log_dir / "test_report.txt").read_text()
    assert all(name in text for name in run.model.label_names)
    assert imread(log_dir / "test_confusion_matrix.png").ndim == 3
    # Calibration on the test split: scored with the temperature fitted on validation, never refitted on test.
    temperature = torch.load(ckpt, weights_only=True)["lightning_cls_temperature"]
    calibration = report["calibration"]
    assert calibration["temperature"] == temperature and calibration["temperature_source"] == "from the checkpoint"
    assert calibration["rows"] == 30 and set(calibration["before"]) == set(calibration["after"]) >= {"ece", "nll"}
    assert "before scaling" in text and "after scaling" in text
    assert imread(log_dir / "test_reliability.png").ndim == 3

    events = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    events.Reload()
    assert {"test/confusion_matrix", "test/reliability"} <= set(events.Tags()["images"])

    run = main(["validate", *data_args(sample_dir, family), *trainer_args(tmp_path), f"--ckpt_path={ckpt}"])
    report = json.loads((Path(run.trainer.log_dir) / "val_report.json").read_text())
    assert report["rows"] == 30 and report["macro_f1"] == pytest.approx(
        run.trainer.callback_metrics["val/f1_macro"].item(), abs=1e-5
    )
    # `validate` reports with the checkpoint's temperature; only `fit` and `calibrate` fit one.
    assert report["calibration"]["temperature_source"] == "from the checkpoint"
    assert run.model.temperature == temperature
