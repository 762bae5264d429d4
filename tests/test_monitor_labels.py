"""The offline `monitor` with accuracy: the estimated accuracy of any predictions file, and with `--labels` the
realized accuracy, macro-F1 and ECE of the labelled predictions; errors naming unknown ids and labels."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from serving_helpers import fabricate_export

from lightning_cls.cli import main as cli_main
from lightning_cls.errors import UserError
from lightning_cls.monitoring.drift import DriftWindow, drift_report, top_label_ece
from lightning_cls.task.scores import label_scores


@pytest.fixture(scope="module")
def model_dir(sample_dir, tmp_path_factory):
    return fabricate_export(sample_dir / "wordpiece", tmp_path_factory.mktemp("exported"))


def test_the_drift_report_and_its_window_estimate_the_accuracy():
    report = drift_report(None, ["a", "b"], ["a", "b", "a"], [0.9, 0.6, 0.75], None)
    assert report["estimated_accuracy"] == pytest.approx(0.75)
    window = DriftWindow(["a", "b"], None, size=4, min_texts=3)
    window.add(["a", "b"], [0.9, 0.5], [3, 4])
    assert window.report()["estimated_accuracy"] is None  # too few yet
    window.add(["a", "a", "b"], [0.2, 0.4, 0.6], [3, 4, 5])  # the 0.9 slides out
    assert window.report()["estimated_accuracy"] == pytest.approx((0.5 + 0.2 + 0.4 + 0.6) / 4)


def write_predictions(path, ids, labels, probabilities):
    # as the service's predictions would be exported: hex ids that pandas would otherwise read as numbers
    pd.DataFrame({"id": ids, "label": labels, "probability": probabilities}).to_csv(path, index=False)


def test_monitor_reports_the_realized_accuracy_of_the_labelled_predictions(model_dir, tmp_path, capsys):
    names = json.loads((model_dir / "lightning_cls.json").read_text())["labels"]
    ids = ["1e5", "007", *(f"p{i}" for i in range(8))]
    predicted = [names[i % 3] for i in range(10)]
    probabilities = [0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.55, 0.5, 0.45, 0.4]
    predictions = tmp_path / "predictions.csv"
    write_predictions(predictions, ids, predicted, probabilities)
    # true labels for eight of them (in another order), two wrong
    truth = {ids[i]: predicted[i] for i in range(8)}
    truth[ids[2]], truth[ids[5]] = names[9], names[8]
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"id": k, "label": v}) + "\n" for k, v in reversed(truth.items())))

    cli_main(["monitor", "--predictions", str(predictions), "--model_dir", str(model_dir), "--labels", str(labels)])
    report = json.loads((tmp_path / "predictions.drift.json").read_text())
    assert report["estimated_accuracy"] == pytest.approx(sum(probabilities) / 10)
    realized = report["realized"]
    assert (realized["rows"], realized["of_predictions"]) == (8, 10)
    assert realized["accuracy"] == pytest.approx(6 / 8)
    true = [truth[i] for i in ids[:8]]
    assert realized["macro_f1"] == pytest.approx(label_scores(true, predicted[:8], names)["macro_f1"])
    assert realized["estimated_accuracy"] == pytest.approx(sum(probabilities[:8]) / 8)
    correct = [p == t for p, t in zip(predicted[:8], true, strict=True)]
    assert realized["ece"] == pytest.approx(top_label_ece(probabilities[:8], correct))
    out = capsys.readouterr().out
    assert "on the 8 labelled: accuracy 0.750" in out and "estimated accuracy 0.670" in out


def test_monitor_without_labels_still_estimates(model_dir, tmp_path):
    predictions = tmp_path / "p.csv"
    write_predictions(predictions, [1, 2], ["physics", "statistics"], [0.8, 0.6])
    cli_main(["monitor", "--predictions", str(predictions), "--model_dir", str(model_dir)])
    report = json.loads((tmp_path / "p.drift.json").read_text())
    assert report["estimated_accuracy"] == pytest.approx(0.7) and report["realized"] is None


@pytest.mark.parametrize(
    ("labels_csv", "message"),
    [
        ("id,label\n1,physics\n9,physics\n8,statistics\n", r"2 id\(s\) not in the predictions file: \['9', '8'\]"),
        ("id,label\n1,physics\n2,zebra\n", r"label\(s\) \['zebra'\] are not among the model's labels"),
        ("id,label\n1,physics\n1,physics\n", r"ids given more than once: \['1'\]"),
        ("id,label\n1,\n", r"empty label at rows \[0\]"),
        ("id,truth\n1,physics\n", r"has no column \['label'\]"),
    ],
    ids=["unknown ids", "unknown label", "id twice", "empty label", "no label column"],
)
def test_monitor_names_bad_labels(model_dir, tmp_path, labels_csv, message):
    predictions = tmp_path / "p.csv"
    write_predictions(predictions, [1, 2, 3], ["physics"] * 3, [0.8] * 3)
    labels = tmp_path / "labels.csv"
    labels.write_text(labels_csv)
    args = ["monitor", "--predictions", str(predictions), "--model_dir", str(model_dir), "--labels", str(labels)]
    with pytest.raises(UserError, match=message):
        cli_main(args)


def test_monitor_with_labels_needs_ids_in_the_predictions(model_dir, tmp_path):
    predictions = tmp_path / "p.csv"
    pd.DataFrame({"label": ["physics"], "probability": [0.8]}).to_csv(predictions, index=False)
    labels = tmp_path / "labels.csv"
    labels.write_text("id,label\n1,physics\n")
    args = ["monitor", "--predictions", str(predictions), "--model_dir", str(model_dir), "--labels", str(labels)]
    with pytest.raises(UserError, match="--labels needs an `id` column in the predictions file"):
        cli_main(args)
