"""One error family, handled in one place: from the command line, every subcommand (Trainer ones and extra ones)
reports a user error in one `error: ...` line and exits with status 1; called from Python, the error is raised."""

import json
import sys
import warnings

import pandas as pd
import pytest
import torch
from conftest import TINY_CONFIGS
from serving_helpers import fabricate_export
from test_cli import data_args, fit, trainer_args

from lightning_cls.cli import main
from lightning_cls.data.labels import select_labels
from lightning_cls.errors import ConfigError, DataError, UserError


def command_line_error(monkeypatch, args: list[str]) -> str:
    """The message that `python -m lightning_cls ARGS` exits with (one line, status 1 as for any string)."""
    monkeypatch.setattr(sys, "argv", ["lightning_cls", *args])
    with pytest.raises(SystemExit) as exit_info, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main()
    # LightningCLI reads sys.argv itself: given them as `args` too, it warns of "both args and command line arguments"
    assert not [w for w in caught if "command line arguments" in str(w.message)]
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


def test_every_error_class_is_a_user_error_and_a_value_error():
    from lightning_cls import errors

    for name in ("ConfigError", "CheckpointError", "DataError", "InputError", "ExportError"):
        assert issubclass(getattr(errors, name), UserError) and issubclass(getattr(errors, name), ValueError)


def test_export_names_a_tokenizer_that_cannot_be_loaded(tmp_path, trained, monkeypatch):
    """A checkpoint whose tokenizer folder is broken: one line naming the option, not a traceback."""
    broken = tmp_path / "broken-tokenizer"
    broken.mkdir()  # exists, holds no tokenizer
    checkpoint = torch.load(trained("distilbert") / "ckpt" / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["tokenizer"] = str(broken)
    ckpt = tmp_path / "moved.ckpt"
    torch.save(checkpoint, ckpt)
    args = ["export", f"--ckpt_path={ckpt}", f"--output_dir={tmp_path / 'out'}"]
    message = command_line_error(monkeypatch, args)
    assert "data.tokenizer" in message and str(broken) in message and "cannot be loaded" in message
    with pytest.raises(ConfigError):
        main(args)
    assert not (tmp_path / "out").exists()


def test_monitor_names_a_tokenizer_that_cannot_be_loaded(tmp_path, sample_dir, monkeypatch):
    model_dir = fabricate_export(sample_dir / "wordpiece", tmp_path / "exported")
    (model_dir / "tokenizer.json").write_text('{"version": "1.0", "trunc')  # cut short (a failed copy)
    predictions = tmp_path / "predictions.csv"
    pd.DataFrame({"label": ["physics", "statistics"], "probability": [0.9, 0.8], "text": ["a b", "c"]}).to_csv(
        predictions, index=False
    )
    args = ["monitor", "--predictions", str(predictions), "--model_dir", str(model_dir)]
    message = command_line_error(monkeypatch, args)
    assert "data.tokenizer" in message and str(model_dir) in message
    with pytest.raises(ConfigError):
        main(args)


def test_select_labels_raises_data_and_config_errors():
    with pytest.raises(DataError, match=r"\['zeta'\] not found in data.csv"):
        select_labels(["a", "b"], names=["a", "zeta"], source="data.csv")
    with pytest.raises(DataError, match="No label in x has at least 10 rows"):
        select_labels(["a", "b"], min_count=10, source="x")
    with pytest.raises(ConfigError, match="more than once"):
        select_labels(["a", "b"], names=["a", "a"])
    with pytest.raises(ConfigError, match="exactly one"):
        select_labels(["a"], names=["a"], min_count=1)


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ('--data.labels=["physics", "no such subject"]', r"['no such subject'] not found in"),
        ("--data.min_count=1000", "has at least 1000 rows"),
    ],
)
def test_fit_with_labels_the_data_lacks_exits_in_one_line(tmp_path, sample_dir, monkeypatch, option, expected):
    model = ["--model.model_name_or_path=tiny", f"--model.model_config={json.dumps(TINY_CONFIGS['distilbert'])}"]
    args = ["fit", *data_args(sample_dir, "distilbert"), *trainer_args(tmp_path), *model, option]
    message = command_line_error(monkeypatch, args)
    assert expected in message and str(sample_dir / "abstracts.csv") in message


def test_resume_with_max_epochs_below_the_checkpoints_epoch_exits_in_one_line(tmp_path, sample_dir, monkeypatch):
    fit(tmp_path, sample_dir, "distilbert")  # two epochs
    last = tmp_path / "ckpt" / "last.ckpt"
    before = last.read_bytes()
    args = [
        "fit",
        *data_args(sample_dir, "distilbert"),
        *trainer_args(tmp_path),
        "--model.model_name_or_path=tiny",
        f"--model.model_config={json.dumps(TINY_CONFIGS['distilbert'])}",
        "--trainer.max_epochs=1",
        f"--ckpt_path={last}",
    ]
    message = command_line_error(monkeypatch, args)
    assert "--trainer.max_epochs=1" in message and "2 epochs" in message and str(last) in message
    with pytest.raises(ConfigError):
        main(args)
    assert last.read_bytes() == before  # nothing was trained or written


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--data.max_length=1000"], "data.max_length=1000 is more than the model's"),
        (['--data.labels=["physics"]', "--data.min_count=3"], "Set either `data.labels` or `data.min_count`"),
        (["--model.train_last_n_blocks=5"], "model.train_last_n_blocks=5, but the model has 2"),
    ],
)
def test_fit_with_settings_that_cannot_work_exits_in_one_line(tmp_path, sample_dir, monkeypatch, options, expected):
    model = ["--model.model_name_or_path=tiny", f"--model.model_config={json.dumps(TINY_CONFIGS['gpt2'])}"]
    args = ["fit", *data_args(sample_dir, "gpt2"), *trainer_args(tmp_path), *model, *options]
    assert expected in command_line_error(monkeypatch, args)
