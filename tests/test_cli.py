"""The command line end to end on tiny models: fit, then validate/test/predict rebuilt from the checkpoint alone."""

import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch
from conftest import TINY_CONFIGS, tokenizer_for
from transformers import AutoConfig, AutoModelForSequenceClassification

from lightning_cls.cli import main


def data_args(sample_dir, family):
    return [
        f"--data.path={sample_dir / 'abstracts.csv'}",
        f"--data.tokenizer={tokenizer_for(sample_dir, family)}",
        "--data.max_samples=null",
        "--data.max_length=64",
        "--data.batch_size=8",
    ]


def trainer_args(tmp_path):
    return [
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
    ]


def fit(tmp_path, sample_dir, family, *extra):
    return main(
        [
            "fit",
            *data_args(sample_dir, family),
            *trainer_args(tmp_path),
            "--model.model_name_or_path=tiny",
            f"--model.model_config={json.dumps(TINY_CONFIGS[family])}",
            "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=4",
            "--trainer.limit_val_batches=2",
            *extra,
        ]
    )


def test_fit_then_validate_test_predict_from_checkpoint(tmp_path, sample_dir, family):
    cli = fit(tmp_path, sample_dir, family)
    assert cli.trainer.global_step == 8
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.is_file() and len(list((tmp_path / "ckpt").glob("epoch*.ckpt"))) == 1
    assert any((tmp_path / "runs").rglob("events.out.tfevents*"))  # TensorBoard logs
    assert set(cli.trainer.callback_metrics) >= {"val/f1_macro", "val/acc", "val/loss", "train/f1_macro"}

    # The model arguments below are wrong on purpose: with --ckpt_path, the checkpoint's own ones are used.
    wrong_model = ["--model.model_name_or_path=not/a-model", "--model.model_config=null"]
    for sub in ("validate", "test", "predict"):
        run = main([sub, *data_args(sample_dir, family), *trainer_args(tmp_path), *wrong_model, f"--ckpt_path={last}"])
        assert run.model.label_names == cli.model.label_names
        if sub != "predict":
            assert f"{'val' if sub == 'validate' else 'test'}/f1_macro" in run.trainer.callback_metrics
    state = torch.load(last, weights_only=True)["state_dict"]
    torch.testing.assert_close(run.model.state_dict(), state)


def test_fit_stopped_by_max_steps_before_the_first_validation_finishes(tmp_path, sample_dir):
    """--trainer.max_steps below one epoch: training ends before any validation; early stopping (on by default, on
    val/f1_macro) waits for a validation instead of failing at the end of the cut epoch, and last.ckpt is written."""
    cli = fit(tmp_path, sample_dir, "distilbert", "--trainer.max_steps=3", "--trainer.limit_train_batches=null")
    assert cli.trainer.global_step == 3 and "val/f1_macro" not in cli.trainer.callback_metrics
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()


def test_fit_without_a_logger(tmp_path, sample_dir):
    """`--trainer.logger false` trains (the learning-rate monitor, on by default, has nothing to log to) and
    writes no TensorBoard files."""
    args = [a for a in trainer_args(tmp_path) if not a.startswith("--trainer.logger")]
    cli = main(
        [
            "fit",
            *data_args(sample_dir, "distilbert"),
            *args,
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path / 'root'}",
            "--model.model_name_or_path=tiny",
            f"--model.model_config={json.dumps(TINY_CONFIGS['distilbert'])}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
        ]
    )
    assert cli.trainer.global_step == 2 and not cli.trainer.loggers
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
    assert not any(tmp_path.rglob("events.out.tfevents*"))


def test_pretrained_local_folder_is_not_needed_after_training(tmp_path, sample_dir):
    """validate --ckpt_path rebuilds a model fine-tuned from pretrained weights without those weights."""
    pretrained = tmp_path / "pretrained"
    config = AutoConfig.for_model(**TINY_CONFIGS["distilbert"], vocab_size=400)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(pretrained)
    main(
        [
            "fit",
            *data_args(sample_dir, "distilbert"),
            *trainer_args(tmp_path),
            f"--model.model_name_or_path={pretrained}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
        ]
    )
    shutil.rmtree(pretrained)
    run = main(
        [
            "validate",
            *data_args(sample_dir, "distilbert"),
            *trainer_args(tmp_path),
            f"--model.model_name_or_path={pretrained}",
            f"--ckpt_path={tmp_path / 'ckpt' / 'last.ckpt'}",
        ]
    )
    assert "val/f1_macro" in run.trainer.callback_metrics


def test_help_reads_as_documentation(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(sub in out for sub in ("fit", "validate", "test", "predict", "Fine-tune DistilBERT"))
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # help is wrapped to the terminal's width
    for text in ("Label names to keep", "Train the head and only the last N", "--data.path", "--checkpoint.monitor"):
        assert text in out


@pytest.mark.slow
def test_ddp_fit_on_two_cpu_processes(tmp_path, sample_dir):
    cmd = [
        sys.executable,
        "-m",
        "lightning_cls",
        "fit",
        *data_args(sample_dir, "distilbert"),
        *trainer_args(tmp_path),
        "--model.model_name_or_path=tiny",
        f"--model.model_config={json.dumps(TINY_CONFIGS['distilbert'])}",
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.max_epochs=1",
        "--trainer.limit_val_batches=2",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    # 240 training rows, batch 8 per device, 2 devices: each rank takes half the rows, 15 optimizer steps.
    assert ckpt["global_step"] == 15
    # The temperature was fitted on the logits of both ranks (15 validation rows each), gathered.
    assert ckpt["lightning_cls_calibration"]["rows"] == 30 and ckpt["lightning_cls_temperature"] > 0


def test_checkpoint_records_the_training_data_reference(tmp_path, sample_dir):
    fit(tmp_path, sample_dir, "distilbert")
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    reference = ckpt["lightning_cls_data_reference"]
    assert reference["max_length"] == 64
    assert sum(reference["train"]["label_counts"].values()) == reference["train"]["rows"] == 240
    lengths = reference["train"]["token_length"]
    assert sum(lengths["bin_counts"]) == 240 and len(lengths["bin_counts"]) == len(lengths["bin_edges"]) + 1


@pytest.mark.slow
@pytest.mark.parametrize("config", ["quickstart", "distilbert", "gpt2"])
def test_every_config_runs_with_fast_dev_run(tmp_path, sample_dir, config):
    """The shipped configs, pointed at tiny local data and a tiny model (with workers and bf16 where they set it)."""
    family = "gpt2" if config == "gpt2" else "distilbert"
    main(
        [
            "fit",
            "--config",
            f"configs/{config}.yaml",
            *data_args(sample_dir, family),
            *trainer_args(tmp_path),
            "--trainer.devices=1",
            f"--model.model_config={json.dumps(TINY_CONFIGS[family])}",
            "--trainer.fast_dev_run=2",
        ]
    )


def test_checkpoint_labels_must_match_the_data_labels(tmp_path, sample_dir):
    """Ten labels in training, ten other names at test time: refused, not silently mislabelled."""
    fit(tmp_path, sample_dir, "distilbert")
    frame = pd.read_csv(sample_dir / "abstracts.csv")
    frame["label"] = "x " + frame["label"]
    renamed = tmp_path / "renamed.csv"
    frame.to_csv(renamed, index=False)
    args = [arg for arg in data_args(sample_dir, "distilbert") if not arg.startswith("--data.path")]
    with pytest.raises(ValueError, match="trained on the labels"):
        main(
            [
                "test",
                *args,
                f"--data.path={renamed}",
                "--data.min_count=20",
                *trainer_args(tmp_path),
                f"--ckpt_path={tmp_path / 'ckpt' / 'last.ckpt'}",
            ]
        )
