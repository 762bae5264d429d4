"""`trainer.precision: auto` (model/precision.py): bf16 only where the hardware runs it natively, said in one line;
bf16 asked for on a CPU that emulates it warns of the cost; a typo is one error naming the option."""

from __future__ import annotations

import pytest
import torch
from test_cli import fit

from lightning_cls import hardware
from lightning_cls.errors import ConfigError
from lightning_cls.model.precision import choose_precision


@pytest.fixture
def avx2_only(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def avx512_bf16(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_takes_fp32_where_bf16_would_be_emulated_and_says_why(avx2_only):
    chosen, said = choose_precision("auto", "cpu")
    assert chosen == "32-true" and "emulated" in said and "16x slower" in said


def test_auto_takes_bf16_where_the_cpu_has_it(avx512_bf16):
    chosen, said = choose_precision("auto", "cpu")
    assert chosen == "bf16-mixed" and "avx512_bf16" in said


def test_explicit_bf16_on_an_emulating_cpu_is_kept_with_a_warning(avx2_only):
    with pytest.warns(UserWarning, match=r"bf16 is emulated here .*16x slower.*--trainer.precision auto"):
        assert choose_precision("bf16-mixed", "cpu") == ("bf16-mixed", None)
    assert choose_precision("32-true", "cpu") == ("32-true", None)
    assert choose_precision(None, "cpu") == (None, None)  # Lightning's default


def test_a_precision_typo_names_the_option():
    with pytest.raises(ConfigError, match=r"--trainer.precision 'bf61-mixed' is not a precision"):
        choose_precision("bf61-mixed", "cpu")


def test_fit_with_auto_precision_trains_in_what_the_hardware_runs(tmp_path, sample_dir, avx2_only):
    cli = fit(tmp_path, sample_dir, "distilbert", "--trainer.precision=auto", "--trainer.max_epochs=1")
    assert cli.trainer.precision == "32-true" and cli.trainer.global_step == 4
