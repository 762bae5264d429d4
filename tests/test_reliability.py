"""Preemption and resume: a run stopped by a signal and resumed ends bit-identical to one never stopped; bad
checkpoints and config typos give one clear line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIGS
from jsonargparse import Namespace
from test_cli import data_args, trainer_args

from lightning_cls.cli import main
from lightning_cls.data.samplers import LengthGroupedSampler
from lightning_cls.errors import CheckpointError, ConfigError
from lightning_cls.model.checkpoints import load_checkpoint
from lightning_cls.model.predictions import write_rows
from lightning_cls.model.resume import (
    Interruption,
    ResumableDataLoader,
    batch_seed,
    find_last_checkpoint,
    interruption_message,
)
from lightning_cls.trainer_cli import resolve_ckpt_path

TESTS = Path(__file__).parent
THREADS = 1  # the same in the subprocesses and in-process, so that results can be compared bit for bit
EPOCHS, BATCHES, EVERY = 2, 6, 4  # 12 steps; last.ckpt every 4 steps: steps 4 and 8 fall mid-epoch


def fit_args(run: Path, sample_dir: Path, *extra: str) -> list[str]:
    return [
        "fit",
        *data_args(sample_dir, "distilbert"),
        *trainer_args(run),
        f"--data.cache_dir={run.parent / 'cache'}",  # shared by every run of the module: tokenized once
        "--model.model_name_or_path=tiny",
        f"--model.model_config={json.dumps(TINY_CONFIGS['distilbert'])}",
        "--seed_everything=42",
        f"--trainer.max_epochs={EPOCHS}",
        f"--trainer.limit_train_batches={BATCHES}",
        "--trainer.limit_val_batches=2",
        f"--checkpoint.every_n_train_steps={EVERY}",
        *extra,
    ]


def in_process(args: list[str]):
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return main(args)
    finally:
        torch.set_num_threads(threads)


def start(run: Path, sample_dir: Path, validation_seconds: float = 0.0) -> subprocess.Popen:
    """`python -m lightning_cls fit` slowed to 0.3 s per training batch, so that a signal finds it training."""
    throttle = {
        "class_path": "reliability_helpers.Throttle",
        "init_args": {"seconds": 0.3, "validation_seconds": validation_seconds, "marker": str(run / "validating")},
    }
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": str(THREADS),
    }
    args = fit_args(run, sample_dir, f"--trainer.callbacks+={json.dumps(throttle)}")
    return subprocess.Popen(
        [sys.executable, "-m", "lightning_cls", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {path.name} appeared:\n{process.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(sample_dir, tmp_path_factory) -> dict:
    """The last.ckpt of a run never stopped."""
    run = tmp_path_factory.mktemp("resume") / "reference"
    cli = in_process(fit_args(run, sample_dir))
    assert cli.trainer.global_step == EPOCHS * BATCHES
    return torch.load(run / "ckpt" / "last.ckpt", weights_only=True)


def assert_same_run(resumed: dict, reference: dict) -> None:
    assert resumed["global_step"] == reference["global_step"] == EPOCHS * BATCHES
    assert resumed["epoch"] == reference["epoch"]
    assert resumed["state_dict"].keys() == reference["state_dict"].keys()
    different = [k for k, v in reference["state_dict"].items() if not torch.equal(resumed["state_dict"][k], v)]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    moments = [ckpt["optimizer_states"][0]["state"].values() for ckpt in (resumed, reference)]
    for a, b in zip(*moments, strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])

    def callback(ckpt: dict, name: str) -> dict:
        return next(v for k, v in ckpt["callbacks"].items() if k.startswith(name))

    for key in ("wait_count", "best_score"):
        assert callback(resumed, "EarlyStopping")[key] == callback(reference, "EarlyStopping")[key]
    assert (
        callback(resumed, "ResumableCheckpoint")["best_model_score"]
        == callback(reference, "ResumableCheckpoint")["best_model_score"]
    )


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_resumed_run_is_bit_identical(tmp_path, sample_dir, reference):
    run = tmp_path / "run"
    process = start(run, sample_dir)
    wait_for(run / "ckpt" / "last.ckpt", process)  # written at step 4, mid-epoch
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Interrupted by SIGTERM" in stderr and f"saved {run / 'ckpt' / 'last.ckpt'}" in stderr
    stopped = torch.load(run / "ckpt" / "last.ckpt", weights_only=True)
    assert EVERY <= stopped["global_step"] < EPOCHS * BATCHES  # it stopped early, after the checkpoint

    cli = in_process(fit_args(run, sample_dir, "--ckpt_path=last"))
    assert cli.trainer.global_step == EPOCHS * BATCHES
    assert_same_run(torch.load(run / "ckpt" / "last.ckpt", weights_only=True), reference)


@pytest.mark.slow
def test_ctrl_c_during_validation_waits_for_the_end_of_the_epoch(tmp_path, sample_dir, reference):
    """Stopping mid-validation, or between the epoch-end validation and the epoch-end hooks, would resume into
    EarlyStopping without its metric: the stop waits until the epoch is complete."""
    run = tmp_path / "run"
    process = start(run, sample_dir, validation_seconds=1.0)
    wait_for(run / "validating", process)  # the first epoch-end validation has started
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "Interrupted by SIGINT" in stderr
    assert torch.load(run / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == BATCHES  # after epoch 0

    in_process(fit_args(run, sample_dir, "--ckpt_path=last"))
    assert_same_run(torch.load(run / "ckpt" / "last.ckpt", weights_only=True), reference)


@pytest.mark.slow
def test_sigkill_resumes_from_the_last_periodic_checkpoint(tmp_path, sample_dir, reference):
    run = tmp_path / "run"
    process = start(run, sample_dir)
    wait_for(run / "ckpt" / "last.ckpt", process)
    process.kill()  # SIGKILL: no handler runs, nothing more is saved
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert torch.load(run / "ckpt" / "last.ckpt", weights_only=True)["global_step"] < EPOCHS * BATCHES

    in_process(fit_args(run, sample_dir, "--ckpt_path=last"))
    assert_same_run(torch.load(run / "ckpt" / "last.ckpt", weights_only=True), reference)


@pytest.mark.slow
def test_last_ckpt_is_the_latest_state_not_a_copy_of_the_best(reference):
    """Lightning 2.6 writes last.ckpt only beside a new top-k checkpoint; the tiny model's F1 stops improving early,
    so there last.ckpt would stop at that step."""
    assert reference["global_step"] == EPOCHS * BATCHES
    state = next(v for k, v in reference["callbacks"].items() if k.startswith("ResumableCheckpoint"))
    assert Path(state["last_model_path"]).name == "last.ckpt"
    assert state["best_model_path"] and Path(state["best_model_path"]).is_file()


# ------------------------------------------------------------------------------------------------ fast, in-process
def test_best_checkpoints_hold_the_weights_their_score_was_measured_on(tmp_path, sample_dir):
    """With `every_n_train_steps`, top-k files are saved at validations (here every 3 steps), each under the score
    of its own weights; not every 4 steps under an older validation's score (Lightning's own behaviour, which files
    the weights of step 4 under step 3's score and never saves step 3's). last.ckpt still follows every 4 steps."""
    run = tmp_path / "run"
    in_process(fit_args(run, sample_dir, "--trainer.val_check_interval=3", "--checkpoint.save_top_k=-1"))
    files = {torch.load(f, weights_only=True)["global_step"]: f for f in (run / "ckpt").glob("epoch*.ckpt")}
    assert sorted(files) == [3, 6, 9, 12]
    # The score in a file's name is what validating that file gives.
    step, path = max(files.items(), key=lambda item: float(item[1].stem.rsplit("-f1", 1)[1]))
    validated = in_process(["validate", *fit_args(run, sample_dir)[1:], f"--ckpt_path={path}"])
    validated = validated.trainer.callback_metrics["val/f1_macro"].item()
    assert f"{validated:.4f}" == path.stem.rsplit("-f1", 1)[1], (step, path.name)


def test_resumable_loader_skips_what_the_interrupted_epoch_used():
    lengths = np.random.default_rng(0).integers(5, 50, size=37)

    def loader(epoch: int) -> ResumableDataLoader:
        sampler = LengthGroupedSampler(lengths, batch_size=4, seed=1)
        sampler.set_epoch(epoch)
        return ResumableDataLoader(list(range(37)), batch_size=4, sampler=sampler)

    full = [b.tolist() for b in loader(2)]
    first = loader(2)
    batches = iter(first)
    seen = [next(batches).tolist() for _ in range(3)]
    second = loader(2)
    second.load_state_dict(first.state_dict())
    it = iter(second)
    seen += [next(it).tolist() for _ in range(2)]
    third = loader(2)
    third.load_state_dict(second.state_dict())  # a second stop in the same epoch
    assert seen + [b.tolist() for b in third] == full
    assert third.state_dict() == {"epoch": 2, "batches": len(full)}

    # A state saved at the end of epoch 2 does not skip anything of epoch 3.
    fourth = loader(3)
    fourth.load_state_dict(third.state_dict())
    assert len(list(fourth)) == len(full)


def test_batch_seeds_depend_on_the_position_only():
    assert batch_seed(42, 1, 5) == batch_seed(42, 1, 5)
    seeds = {batch_seed(42, e, b, r) for e in range(3) for b in range(50) for r in range(2)}
    assert len(seeds) == 300 and all(0 <= s < 2**63 for s in seeds)


def test_interruption_message_and_exit_status():
    message, status = interruption_message(Interruption(signal.SIGTERM, epoch=1, step=7, checkpoint="ck/last.ckpt"))
    assert status == 143 and "SIGTERM" in message and "global step 7" in message and "ck/last.ckpt" in message
    assert "--ckpt_path last" in message
    assert interruption_message(Interruption(signal.SIGINT))[1] == 130


def save_checkpoint(path: Path, step: int = 3) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": step}, path)
    return path


def logger_config(save_dir: Path, dirpath: str | None = None, ckpt_path: str | None = "last") -> Namespace:
    logger = Namespace(
        class_path="TensorBoardLogger", init_args=Namespace(save_dir=str(save_dir), name="x", version=None)
    )
    return Namespace(
        ckpt_path=ckpt_path, weights_only=None, checkpoint=Namespace(dirpath=dirpath), trainer=Namespace(logger=logger)
    )


def test_find_last_checkpoint_picks_the_newest_run(tmp_path):
    old = save_checkpoint(tmp_path / "version_0" / "checkpoints" / "last.ckpt")
    new = save_checkpoint(tmp_path / "version_1" / "checkpoints" / "last.ckpt")
    os.utime(old, (time.time() + 10, time.time() + 10))
    assert find_last_checkpoint(tmp_path) == old
    os.utime(new, (time.time() + 20, time.time() + 20))
    assert find_last_checkpoint(tmp_path) == new
    assert find_last_checkpoint(tmp_path / "missing") is None


def test_ckpt_path_last_resumes_in_the_same_run_folder(tmp_path):
    """Without `checkpoint.dirpath` the checkpoints live in the logger's version folder; a new process would look in
    a new, empty version folder (Lightning's own `last` then finds nothing and silently starts from scratch)."""
    ckpt = save_checkpoint(tmp_path / "x" / "version_3" / "checkpoints" / "last.ckpt")
    config = logger_config(tmp_path)
    resolve_ckpt_path(config, "fit")
    assert config.ckpt_path == str(ckpt)
    assert config.trainer.logger.init_args.version == "version_3"
    assert config.weights_only is True

    fresh = logger_config(tmp_path / "elsewhere")
    resolve_ckpt_path(fresh, "fit")  # nothing to resume: a scheduler can always pass `--ckpt_path last`
    assert fresh.ckpt_path is None
    with pytest.raises(CheckpointError, match="no last"):
        resolve_ckpt_path(logger_config(tmp_path / "elsewhere"), "predict")

    dirpath = logger_config(tmp_path, dirpath=str(ckpt.parent))
    resolve_ckpt_path(dirpath, "validate")
    assert dirpath.ckpt_path == str(ckpt) and dirpath.trainer.logger.init_args.version is None


def test_truncated_or_foreign_checkpoint_is_one_clear_line(tmp_path):
    good = save_checkpoint(tmp_path / "good.ckpt")
    assert load_checkpoint(good)["global_step"] == 3
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    plain = tmp_path / "plain.ckpt"
    torch.save({"weights": torch.ones(1)}, plain)
    for path, reason in [
        (truncated, "truncated"),
        (text, "truncated"),
        (plain, "no `state_dict`"),
        (tmp_path / "missing.ckpt", "does not exist"),
    ]:
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        assert str(path) in str(err.value) and reason in str(err.value) and "\n" not in str(err.value)


class Payload:
    """Unpickling this runs `os.system`: what a tampered checkpoint would do under a full unpickler."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_tampered_checkpoint_runs_no_code(tmp_path):
    marker = tmp_path / "code-ran"
    tampered = tmp_path / "tampered.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": Payload(marker)}, tampered)
    with pytest.raises(CheckpointError, match="weights-only") as err:
        load_checkpoint(tampered)
    assert str(tampered) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_cli_refuses_a_bad_checkpoint_before_any_work(tmp_path, sample_dir, monkeypatch, capsys):
    truncated = tmp_path / "last.ckpt"
    truncated.write_bytes(b"PK\x03\x04 cut short")
    args = ["predict", *data_args(sample_dir, "distilbert"), *trainer_args(tmp_path), f"--ckpt_path={truncated}"]
    with pytest.raises(CheckpointError, match="truncated"):
        main(args)
    monkeypatch.setattr(sys, "argv", ["lightning_cls", *args])  # as from the command line: one line, status 1
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code.startswith("error: Checkpoint") and str(truncated) in exit_info.value.code
    assert "\n" not in exit_info.value.code


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("--trainer.max_epochz=3", "did you mean --trainer.max_epochs"),
        ("--model.learning_rat=0.1", "did you mean --model.learning_rate"),  # prefixes are not accepted
        ("--trainer.max_epochs=abc", 'Parser key "trainer.max_epochs"'),
    ],
)
def test_config_typo_is_one_line(option, expected, sample_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *data_args(sample_dir, "distilbert"), *trainer_args(tmp_path), option])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error:") and expected in err


def test_config_file_typo_is_one_line(tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text("data:\n  tokenizer: tok\ntrainer:\n  max_epochz: 3\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--config={config}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'trainer.max_epochz'" in err and "did you mean --trainer.max_epochs" in err


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("--data.tokenizer=/no/such/tokenizer", "data.tokenizer='/no/such/tokenizer': there is no such folder"),
        (
            "--model.model_name_or_path=no-such-org/no-such-model",
            "model.model_name_or_path='no-such-org/no-such-model'",
        ),
    ],
)
def test_unknown_model_or_tokenizer_names_the_option(option, expected, sample_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["fit", *data_args(sample_dir, "distilbert"), *trainer_args(tmp_path), "--model.model_config=null", option]
    with pytest.raises(ConfigError) as err:
        main(args)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_an_empty_tokenizer_name_is_named_as_empty():
    """A config's `${oc.env:MINILM_DIR}` with the variable unset gives "": not "the folder exists" (Path("") is ".")."""
    from lightning_cls.data.tokenization import load_tokenizer

    with pytest.raises(ConfigError, match=r"^data.tokenizer is empty: give a local folder or a hub name"):
        load_tokenizer("")


# ------------------------------------------------------------------------------------------------ atomic outputs
def prediction_rows(n: int, fail_at: int | None = None, pause: float = 0.0):
    for i in range(n):
        if i == fail_at:
            raise RuntimeError("crash mid-write")
        time.sleep(pause)
        yield {"id": i, "label": "x", "probability": 1.0, "top_k": [{"label": "x", "probability": 1.0}]}


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_failed_prediction_write_leaves_no_file_and_keeps_the_old_one(tmp_path, suffix):
    path = tmp_path / f"predictions{suffix}"
    with pytest.raises(RuntimeError, match="mid-write"):
        write_rows(prediction_rows(10, fail_at=5), path, k=1)
    assert not path.exists() and not list(tmp_path.iterdir())  # no final name, no temporary file left
    assert write_rows(prediction_rows(3), path, k=1) == 3
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        write_rows(prediction_rows(10, fail_at=5), path, k=1)
    assert path.read_bytes() == before  # a reader still finds the previous, complete file


@pytest.mark.slow
def test_a_prediction_writer_killed_mid_write_leaves_no_file(tmp_path):
    path = tmp_path / "predictions.csv"
    script = (
        "import sys, time; sys.path.insert(0, sys.argv[2]); from test_reliability import prediction_rows; "
        "from lightning_cls.model.predictions import write_rows; from pathlib import Path; "
        "write_rows(prediction_rows(1000, pause=0.01), Path(sys.argv[1]), k=1)"
    )
    process = subprocess.Popen([sys.executable, "-c", script, str(path), str(TESTS)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".predictions.csv.tmp-*")):  # writing has started
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.kill()
    process.communicate(timeout=60)
    assert not path.exists()


def test_export_crash_leaves_no_folder(trained, tmp_path, monkeypatch):
    import lightning_cls.export.exporter as export_module

    def crash(*args, **kwargs):
        raise RuntimeError("crash mid-export")

    monkeypatch.setattr(export_module, "export_metadata", crash)  # after the weights are written, before the rest
    out = tmp_path / "export"
    with pytest.raises(RuntimeError, match="mid-export"):
        export_module.export(str(trained("distilbert") / "ckpt" / "last.ckpt"), str(out))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_export_refuses_a_tampered_checkpoint_in_one_line(tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    tampered = tmp_path / "tampered.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": Payload(marker)}, tampered)
    monkeypatch.setattr(
        sys, "argv", ["lightning_cls", "export", f"--ckpt_path={tampered}", f"--output_dir={tmp_path / 'out'}"]
    )
    with pytest.raises(SystemExit) as exit_info:
        main()  # as from the command line
    message = str(exit_info.value.code)
    assert message.startswith("error: export: Checkpoint") and str(tampered) in message and "\n" not in message
    assert not marker.exists() and not (tmp_path / "out").exists()
