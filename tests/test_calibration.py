"""Temperature scaling: the fit and the scores on synthetic logits, the temperature in checkpoints, `predict`, the
reports and the export, the fit at the end of each validation of `fit`, and the `calibrate` command."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_classifier, tokenizer_for
from matplotlib.image import imread
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_cli import data_args, trainer_args

from lightning_cls.cli import main
from lightning_cls.errors import CheckpointError, ConfigError, InputError
from lightning_cls.export.exporter import export
from lightning_cls.export.folder import read_export_metadata
from lightning_cls.model.calibration import (
    T_MAX,
    T_MIN,
    brier_score,
    calibrated_probabilities,
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_figure,
)
from lightning_cls.model.checkpoints import CALIBRATION_KEY, TEMPERATURE_KEY
from lightning_cls.model.classifier import TextClassifier


def synthetic(rows: int, seed: int, sharpen: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax is the true class distribution the labels are drawn from (perfectly calibrated),
    multiplied by `sharpen` (> 1: over-confident, like a fine-tuned network)."""
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(rows, 5, generator=g)  # (N, 5)
    labels = torch.multinomial(logits.softmax(-1), 1, generator=g).squeeze(1)  # (N,)
    return sharpen * logits, labels


# ------------------------------------------------------------------------------------------------ pure functions
def test_overconfident_logits_get_a_temperature_above_one_that_lowers_held_out_nll():
    logits, labels = synthetic(8000, seed=0, sharpen=3.0)
    fit_rows, held_out = slice(0, 4000), slice(4000, None)
    t = fit_temperature(logits[fit_rows], labels[fit_rows])
    assert 2.5 < t < 3.5  # the sharpening undone (3 exactly in the limit of many rows)
    before = negative_log_likelihood(calibrated_probabilities(logits[held_out], None), labels[held_out])
    after = negative_log_likelihood(calibrated_probabilities(logits[held_out], t), labels[held_out])
    assert after < before - 0.2
    # The minimum, as a fine grid finds it: LBFGS stopped at the optimum, not just somewhere better.
    grid = np.exp(np.linspace(np.log(2), np.log(4.5), 251))
    nll = [negative_log_likelihood(calibrated_probabilities(logits[fit_rows], g), labels[fit_rows]) for g in grid]
    assert t == pytest.approx(grid[int(np.argmin(nll))], rel=0.01)

    # Under-confident logits get T < 1; calibrated ones T close to 1.
    assert fit_temperature(*synthetic(4000, seed=1, sharpen=0.4)) < 0.5
    assert fit_temperature(*synthetic(4000, seed=2)) == pytest.approx(1.0, abs=0.1)


def test_temperature_stays_in_bounds_and_needs_rows():
    separable = torch.tensor([[3.0, 0.0], [0.0, 3.0]] * 5)  # always right: the NLL falls as T -> 0
    assert T_MIN <= fit_temperature(separable, torch.tensor([0, 1] * 5)) < 0.5
    constant = torch.zeros(6, 3)  # no information: any T is as good
    assert T_MIN <= fit_temperature(constant, torch.tensor([0, 1, 2, 0, 1, 2])) <= T_MAX
    with pytest.raises(ValueError, match="No rows"):
        fit_temperature(torch.empty(0, 3), torch.empty(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shapes \(4, 3\) and \(5,\)"):
        fit_temperature(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))


def test_ece_is_about_zero_when_calibrated_and_large_when_overconfident():
    logits, labels = synthetic(20000, seed=3)
    calibrated = expected_calibration_error(logits.softmax(-1), labels)
    overconfident = expected_calibration_error((3 * logits).softmax(-1), labels)
    assert calibrated < 0.015  # sampling noise only
    assert overconfident > 0.15
    report = calibration_report(3 * logits, labels, fit_temperature(3 * logits, labels))
    assert report["after"]["ece"] < 0.015 < 0.15 < report["before"]["ece"]
    assert report["after"]["nll"] < report["before"]["nll"] and report["after"]["brier"] < report["before"]["brier"]
    assert report["before"]["mean_confidence"] > report["accuracy"] + 0.15  # what over-confident means


def test_scores_by_hand():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    labels = np.array([0, 1, 1, 1])
    # 2 bins: (0, 0.5] is empty (the top probability of 2 classes is >= 0.5... exactly 0.5 would go there);
    # (0.5, 1] holds all four: mean confidence 0.75, accuracy 0.75 -> ECE 0.
    assert expected_calibration_error(probs, labels, bins=2) == pytest.approx(0.0)
    # 10 bins: 0.9 right, 0.6 wrong, 0.7 right, 0.8 right -> |1-0.9| + |0-0.6| + |1-0.7| + |1-0.8| over 4 rows.
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx((0.1 + 0.6 + 0.3 + 0.2) / 4)
    assert negative_log_likelihood(probs, labels) == pytest.approx(-np.log([0.9, 0.4, 0.7, 0.8]).mean())
    assert brier_score(probs, labels) == pytest.approx(np.mean([0.02, 0.72, 0.18, 0.08]))
    assert brier_score(np.array([[0.0, 1.0]]), np.array([0])) == pytest.approx(2.0)  # the worst possible


def test_calibrated_probabilities_for_tensors_and_arrays():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 3.0, 0.0]])
    torch.testing.assert_close(calibrated_probabilities(logits, None), logits.softmax(-1))
    scaled = calibrated_probabilities(logits, 2.0)
    torch.testing.assert_close(scaled, (logits / 2).softmax(-1))
    assert scaled.argmax(-1).tolist() == logits.argmax(-1).tolist()  # scaling never changes a label
    assert (scaled.max(-1).values < logits.softmax(-1).max(-1).values).all()  # T > 1: less confident
    array = calibrated_probabilities(logits.numpy(), 2.0)
    assert isinstance(array, np.ndarray) and np.allclose(array, scaled.numpy(), atol=1e-6)
    for bad in (0.0, -1.0, float("nan"), "2"):
        with pytest.raises(InputError, match=r"temperature=.*positive finite"):
            calibrated_probabilities(logits, bad)


def test_reliability_figure_shows_both_sides_with_counts(tmp_path):
    logits, labels = synthetic(500, seed=4, sharpen=3.0)
    t = fit_temperature(logits, labels)
    fig = reliability_figure(logits, labels, t, title="val")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("before scaling (T = 1)\nECE ") and titles[1].startswith(f"after scaling (T = {t:.3f})")
    for count_axes in fig.axes[2:]:  # the bin counts under each diagram sum to the rows
        assert sum(int(text.get_text()) for text in count_axes.texts) == 500
    fig.savefig(tmp_path / "reliability.png")
    assert imread(tmp_path / "reliability.png").shape[1] > 500


# ------------------------------------------------------------------------------------------------ the model
def test_predict_step_divides_by_the_temperature_unless_switched_off(sample_dir):
    model = tiny_classifier(tokenizer_for(sample_dir, "distilbert"), {"model_type": "distilbert", "n_layers": 1})
    batch = {
        "input_ids": torch.tensor([[2, 50, 60, 3], [2, 70, 3, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        "row_id": torch.tensor([0, 1]),
    }
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"])
        raw = model.predict_step(batch, 0)["probs"]
        torch.testing.assert_close(raw, logits.softmax(-1))  # never calibrated: T = 1
        model.temperature = 4.0
        out = model.predict_step(batch, 0)
        torch.testing.assert_close(out["probs"], (logits / 4).softmax(-1))
        # Raw: the writer averages a text's windows' logits, then the task scales them (mean(z) / T = mean(z / T)).
        torch.testing.assert_close(out["logits"], logits)
        assert out["label"] == model.predict_step(batch, 0)["label"]
        model.use_temperature = False
        torch.testing.assert_close(model.predict_step(batch, 0)["probs"], raw)


def test_temperature_is_saved_in_the_checkpoint_and_old_checkpoints_load_with_none(tmp_path, trained, sample_dir):
    ckpt = trained("distilbert") / "ckpt" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    model = TextClassifier.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    assert model.temperature == checkpoint[TEMPERATURE_KEY] > 0
    assert model.calibration == checkpoint[CALIBRATION_KEY]
    assert "use_temperature" not in checkpoint["hyper_parameters"]  # an inference switch, so --ckpt_path keeps it
    assert not TextClassifier.load_from_checkpoint(ckpt, map_location="cpu", use_temperature=False).use_temperature

    # A checkpoint from before calibration: loads, T = 1 (the raw softmax), and says so in the test report.
    del checkpoint[TEMPERATURE_KEY], checkpoint[CALIBRATION_KEY]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    assert TextClassifier.load_from_checkpoint(old, map_location="cpu", weights_only=True).temperature is None
    run = main(["test", *data_args(sample_dir, "distilbert"), *trainer_args(tmp_path), f"--ckpt_path={old}"])
    report = json.loads((Path(run.trainer.log_dir) / "test_report.json").read_text())["calibration"]
    assert report["temperature"] is None and report["temperature_source"] == "the checkpoint has none"
    assert report["before"] == report["after"]


def test_fit_stores_the_temperature_of_each_validation_in_its_checkpoints(trained):
    run_dir = trained("distilbert")
    last = torch.load(run_dir / "ckpt" / "last.ckpt", weights_only=True)
    (best_path,) = (run_dir / "ckpt").glob("epoch*.ckpt")
    best = torch.load(best_path, weights_only=True)
    for checkpoint in (last, best):
        calibration = checkpoint[CALIBRATION_KEY]
        assert calibration["temperature"] == checkpoint[TEMPERATURE_KEY] > 0
        assert calibration["split"] == "validation" and calibration["rows"] == 30  # the whole split: 2 batches of 16
        assert calibration["global_step"] == checkpoint["global_step"]  # fitted on these very weights
        assert calibration["after"]["nll"] <= calibration["before"]["nll"] + 1e-9  # fitted there: never worse
    # The report of the fit's validation, with its reliability diagram, in the log folder and in TensorBoard.
    log_dir = next((run_dir / "runs").rglob("val_report.json")).parent
    report = json.loads((log_dir / "val_report.json").read_text())["calibration"]
    assert report["temperature"] == last[TEMPERATURE_KEY] and report["temperature_source"] == "fitted on this split"
    assert "after scaling" in (log_dir / "val_report.txt").read_text()
    assert imread(log_dir / "val_reliability.png").ndim == 3
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    events.Reload()
    assert "val/reliability" in events.Tags()["images"]


def test_fit_with_calibrate_off_stores_no_temperature(trained):
    checkpoint = torch.load(trained("gpt2", "--model.calibrate=false") / "ckpt" / "last.ckpt", weights_only=True)
    assert TEMPERATURE_KEY not in checkpoint and checkpoint["hyper_parameters"]["calibrate"] is False


def test_export_records_the_temperature(tmp_path, trained):
    ckpt = trained("distilbert") / "ckpt" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    out = export(str(ckpt), str(tmp_path / "export"))
    metadata = read_export_metadata(out)
    assert metadata.temperature == checkpoint[TEMPERATURE_KEY]
    assert metadata.calibration["after"] == checkpoint[CALIBRATION_KEY]["after"]
    assert set(metadata.calibration["before"]) == {"ece", "nll", "brier", "mean_confidence"}
    assert not metadata.extra  # known fields, not kept as unknown keys


# ------------------------------------------------------------------------------------------------ `calibrate`
def test_calibrate_fits_the_temperature_of_a_checkpoint_that_has_none(tmp_path, trained, sample_dir, capsys):
    fitted = torch.load(trained("distilbert") / "ckpt" / "last.ckpt", weights_only=True)
    before = {k: v for k, v in fitted.items() if k not in (TEMPERATURE_KEY, CALIBRATION_KEY)}
    original = tmp_path / "ckpt" / "last.ckpt"  # as a checkpoint from before calibration, or of calibrate false
    original.parent.mkdir()
    torch.save(before, original)
    args = [*data_args(sample_dir, "distilbert"), *trainer_args(tmp_path), f"--ckpt_path={original}"]

    out = main(["calibrate", *args])
    assert out == original.with_name("calibrated-last.ckpt")
    assert f"wrote {out}" in capsys.readouterr().out
    written = torch.load(out, weights_only=True)
    calibration = written[CALIBRATION_KEY]
    # The validation split and the weights of the fit's last validation: the temperature that fit stored.
    assert calibration["rows"] == 30 and calibration["global_step"] == before["global_step"]
    assert written[TEMPERATURE_KEY] == calibration["temperature"] == pytest.approx(fitted[TEMPERATURE_KEY], rel=1e-4)
    torch.testing.assert_close(written["state_dict"], before["state_dict"])  # only the two keys are added
    assert set(written) == {*before, TEMPERATURE_KEY, CALIBRATION_KEY} and written["optimizer_states"]
    assert TEMPERATURE_KEY not in torch.load(original, weights_only=True)  # the given file is left as it was
    # Its validation report (the numbers printed and stored) is in the run's log folder, like `validate`'s.
    log_dir = next((tmp_path / "runs").rglob("val_report.json")).parent
    report = json.loads((log_dir / "val_report.json").read_text())["calibration"]
    assert report["temperature_source"] == "fitted on this split" and report["after"] == calibration["after"]

    # In place, when asked: the same path, replaced atomically (no temporary file left).
    main(["calibrate", *args, f"--output_path={original}"])
    assert torch.load(original, weights_only=True)[TEMPERATURE_KEY] == pytest.approx(written[TEMPERATURE_KEY])
    assert sorted(p.name for p in original.parent.iterdir()) == ["calibrated-last.ckpt", "last.ckpt"]


def test_calibrate_names_a_missing_checkpoint(tmp_path, sample_dir):
    args = [*data_args(sample_dir, "distilbert"), *trainer_args(tmp_path)]
    with pytest.raises(CheckpointError, match=r"Checkpoint .*nope\.ckpt does not exist"):
        main(["calibrate", *args, f"--ckpt_path={tmp_path / 'nope.ckpt'}"])
    with pytest.raises(ConfigError, match="calibrate needs --ckpt_path"):
        main(["calibrate", *args])
    assert not list(tmp_path.rglob("*.ckpt"))
