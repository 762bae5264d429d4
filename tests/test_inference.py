"""Running an exported folder (`lightning_cls.inference`): the precision gate, the token budget, the ONNX backends,
and the agreement that `export` records in lightning_cls.json."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from lightning_cls import inference
from lightning_cls.errors import ConfigError, ExportError
from lightning_cls.export import agreement_inputs, export
from lightning_cls.export_format import INT8_ONNX_FILE, ONNX_FILE, read_export_metadata
from lightning_cls.inference import (
    VARIANTS,
    Hardware,
    InferenceSettings,
    Runner,
    choose,
    detect_hardware,
    measure_agreement,
    pad_batch,
    plan_batches,
)
from lightning_cls.sample_data import generate_texts
from lightning_cls.tokenization import load_tokenizer

SLOW_CPU = Hardware("cpu", bf16=False, fp16=False, note="CPU without AMX / AVX512-BF16 / AVX512-FP16")
FAST_CPU = Hardware("cpu", bf16=True, fp16=False, note="CPU with amx_bf16")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Models this small run tens of times faster on one thread than on two when another process holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def onnx_export(trained, tmp_path_factory):
    """A tiny DistilBERT checkpoint exported with --format onnx --quantize int8 (agreement measured on 20 of its
    validation texts), shared by the tests of this file."""
    ckpt = trained("distilbert") / "ckpt" / "last.ckpt"
    out = tmp_path_factory.mktemp("inference") / "export"
    export(str(ckpt), str(out), format="onnx", quantize="int8", agreement_texts=20)
    return out


def token_ids(folder, rows: int = 24, seed: int = 5) -> list[list[int]]:
    """Token ids of generated texts of many lengths (some cut at the model's max_length)."""
    texts, _ = generate_texts(rows_per_label=3, seed=seed)
    tokenizer = load_tokenizer(str(folder))
    ids = tokenizer([" ".join(texts[i : i + 1 + i % 3]) for i in range(rows)], truncation=True, max_length=64)
    return ids["input_ids"]


# ------------------------------------------------------------------------------------------------ the precision gate
def record(agreement: float, variant: str = "bf16") -> dict:
    return {variant: {"agreement": agreement, "max_prob_diff": 0.01, "texts": 512, "device": "cpu", "source": "x"}}


def test_auto_is_fp32_unless_the_hardware_runs_bf16_well_and_its_agreement_clears_the_gate(tmp_path):
    auto = InferenceSettings()
    assert choose(auto, FAST_CPU, record(0.999), tmp_path).precision == "bf16"
    # The hardware runs bf16 well, but its labels agree too little: fp32, saying why.
    low = choose(auto, FAST_CPU, record(0.99), tmp_path)
    assert low.precision == "fp32" and "below --agreement_gate 0.995" in low.reason
    assert choose(dataclasses.replace(auto, agreement_gate=0.98), FAST_CPU, record(0.99), tmp_path).precision == "bf16"
    # Agreement is fine, but bf16 is slow on this CPU.
    slow = choose(auto, SLOW_CPU, record(1.0), tmp_path)
    assert slow.precision == "fp32" and "does not run faster" in slow.reason
    # Never measured (an older export) or skipped at export: fp32, and the reason is passed on.
    assert "records no agreement" in choose(auto, FAST_CPU, None, tmp_path).reason
    skipped = {"bf16": {"skipped": "about 200 s for 512 texts", "device": "cpu"}}
    assert "about 200 s" in choose(auto, FAST_CPU, skipped, tmp_path).reason
    assert choose(auto, FAST_CPU, {"fp16": record(1.0)["bf16"]}, tmp_path).precision == "fp32"


def test_an_asked_precision_is_used_with_warnings(tmp_path):
    choice = choose(InferenceSettings(precision="bf16"), SLOW_CPU, record(0.9), tmp_path)
    assert choice.precision == "bf16" and choice.reason == "asked for"
    assert any("below --agreement_gate" in w for w in choice.warnings)
    assert any("slower than fp32" in w for w in choice.warnings)
    assert choose(InferenceSettings(precision="fp32"), SLOW_CPU, None, tmp_path).warnings == ()


def test_hardware_detection_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(inference, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert not detect_hardware("cpu").bf16 and "without AMX" in detect_hardware("cpu").note
    for flag in ("amx_bf16", "avx512_bf16"):
        monkeypatch.setattr(inference, "cpu_flags", lambda flag=flag: frozenset({"avx2", flag}))
        assert detect_hardware("cpu").bf16 and flag in detect_hardware("cpu").note
    assert inference.cpu_flags() is not None


def test_runner_auto_follows_the_gate_and_the_hardware(onnx_export, monkeypatch):
    meta = read_export_metadata(onnx_export)
    ids = token_ids(onnx_export)
    fp32 = Runner(onnx_export, InferenceSettings(precision="fp32")).logits(ids)

    monkeypatch.setattr(inference, "cpu_flags", lambda: frozenset({"avx2"}))
    good = dataclasses.replace(meta, inference=record(1.0))
    assert Runner(onnx_export, metadata=good).precision == "fp32"  # no bf16 hardware

    monkeypatch.setattr(inference, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    runner = Runner(onnx_export, metadata=good)
    assert runner.precision == "bf16" and "amx_bf16" in runner.describe()
    bf16 = runner.logits(ids)
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    assert (bf16.softmax(-1) - fp32.softmax(-1)).abs().max() < 0.05  # bf16, but the same model
    below = dataclasses.replace(meta, inference=record(0.9))
    assert Runner(onnx_export, metadata=below).precision == "fp32"


# ------------------------------------------------------------------------------------------------ the token budget
def test_plan_batches_keeps_every_pass_within_the_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 65, size=200).tolist()
    for budget, multiple in ((64, 1), (100, 1), (1000, 8), (4096, 1)):
        batches = plan_batches(lengths, budget, multiple)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # each sequence exactly once
        for rows in batches:
            width = -(-max(lengths[i] for i in rows) // multiple) * multiple
            assert len(rows) * width <= budget
        firsts = [lengths[b[0]] for b in batches]
        assert firsts == sorted(firsts, reverse=True)  # longest first
    assert plan_batches([10, 500, 3], 100) == [[1], [0, 2]]  # longer than the budget alone: runs alone
    assert plan_batches([], 100) == []


def test_plan_batches_bounds_the_padding_of_each_pass():
    # Long abstracts and short queries mixed: without a bound all share the long pass, padded to 128 tokens.
    lengths = [128, 9, 126, 12, 128, 8, 120, 10]
    assert plan_batches(lengths, 4096) == [[0, 4, 2, 6, 3, 7, 1, 5]]
    assert plan_batches(lengths, 4096, max_padding=24) == [[0, 4, 2, 6], [3, 7, 1, 5]]  # padding 0+2+8, then 2+3+4
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 129, size=300).tolist()
    for bound in (0, 5, 24, 200):
        batches = plan_batches(lengths, 2048, max_padding=bound)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for rows in batches:
            width = max(lengths[i] for i in rows)
            assert sum(width - lengths[i] for i in rows) <= bound
            assert len(rows) * width <= 2048
    assert all(len({lengths[i] for i in rows}) == 1 for rows in plan_batches(lengths, 2048, max_padding=0))


def test_pad_batch_pads_on_the_tokenizer_side():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_token_id=9, left=True, multiple=4)
    assert ids.tolist() == [[9, 5, 6, 7], [9, 9, 9, 8]] and mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert ids.dtype == np.int64


def test_no_forward_pass_exceeds_the_budget_and_answers_do_not_depend_on_it(onnx_export):
    ids = token_ids(onnx_export, rows=30)
    alone = Runner(onnx_export, InferenceSettings(precision="fp32", max_batch_tokens=64))
    expected = torch.cat([alone.logits([row]) for row in ids])  # each text on its own: no padding at all
    for budget, max_padding in ((64, None), (150, None), (10_000, 24), (10_000, None)):
        runner = Runner(onnx_export, InferenceSettings(precision="fp32", max_batch_tokens=budget))
        runner.max_padding = max_padding
        shapes = []
        forward = runner._forward

        def counting(input_ids, mask, forward=forward, shapes=shapes):
            shapes.append(input_ids.shape)
            return forward(input_ids, mask)

        runner._forward = counting
        logits = runner.logits(ids)
        assert all(rows * width <= budget for rows, width in shapes)
        assert sum(rows for rows, _ in shapes) == len(ids)
        assert (len(shapes) > 1) == (max_padding is not None or budget < 10_000)  # these texts differ in length
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)
    assert len(shapes) == 1  # the largest budget and no padding bound: one pass
    assert Runner(onnx_export).logits([]).shape == (0, len(read_export_metadata(onnx_export).labels))


# ------------------------------------------------------------------------------------------------ ONNX
def test_onnx_backends_agree_with_pytorch(onnx_export):
    ids = token_ids(onnx_export)
    torch_logits = Runner(onnx_export, InferenceSettings(precision="fp32")).logits(ids)
    onnx = Runner(onnx_export, InferenceSettings(backend="onnx", precision="fp32"))
    torch.testing.assert_close(onnx.logits(ids), torch_logits, atol=1e-4, rtol=1e-4)
    int8 = Runner(onnx_export, InferenceSettings(backend="onnx", precision="int8")).logits(ids)
    assert int8.shape == torch_logits.shape and torch.isfinite(int8).all()
    assert (int8.softmax(-1) - torch_logits.softmax(-1)).abs().max() < 0.2  # quantized, not another model


def test_the_service_on_the_onnx_backend_answers_as_on_pytorch(onnx_export):
    """What `serve --backend onnx` runs: the LitAPI with the ONNX runner gives PyTorch's labels and probabilities,
    whole texts and windows of long ones alike."""
    import queue

    from lightning_cls.serving.api import ClassifierAPI

    texts, _ = generate_texts(rows_per_label=2, seed=9)
    texts = [*texts, " ".join(texts)]  # the last one far longer than a window
    answers = {}
    for backend in ("torch", "onnx"):
        api = ClassifierAPI(
            str(onnx_export),
            64,
            max_batch_size=4,
            inference=InferenceSettings(backend=backend, precision="fp32"),
            max_windows=4,
        )
        api.set_logger_queue(queue.Queue())
        api.setup("cpu")
        assert api.runner.backend == backend
        answers[backend] = api.predict((texts, 3))
    windows = [answer["windows"] for answer in answers["onnx"]]
    assert windows[-1] == 4 and min(windows) < 4, windows  # the long text at the cap, others below it
    for got, want in zip(answers["onnx"], answers["torch"], strict=True):
        assert got["label"] == want["label"] and got["windows"] == want["windows"]
        assert [a["label"] for a in got["top_k"]] == [a["label"] for a in want["top_k"]]
        assert got["probability"] == pytest.approx(want["probability"], abs=1e-4)


def test_export_records_the_agreement_of_each_way_of_running_the_model(onnx_export):
    assert (onnx_export / ONNX_FILE).is_file() and (onnx_export / INT8_ONNX_FILE).is_file()
    records = json.loads((onnx_export / "lightning_cls.json").read_text())["inference"]
    assert list(records) == list(VARIANTS)  # fp32, bf16, fp16, onnx_fp32, onnx_int8
    for name, entry in records.items():
        assert entry["device"] == "cpu" and entry["source"].startswith("validation split of ")
        assert "skipped" not in entry, (name, entry)  # a tiny model: every precision is quick to measure
        assert entry["texts"] == 20 and 0 <= entry["agreement"] <= 1 and entry["texts_per_s"] > 0
        assert 0 <= entry["max_prob_diff"] <= 1
    assert records["fp32"]["agreement"] == 1.0 and records["onnx_fp32"]["max_prob_diff"] < 1e-4
    # `auto` with the ONNX backend: int8 exactly when its recorded agreement clears the gate.
    int8 = records["onnx_int8"]["agreement"]
    for gate in (0.5, 0.999999):
        runner = Runner(onnx_export, InferenceSettings(backend="onnx", agreement_gate=gate))
        assert runner.precision == ("int8" if int8 >= gate else "fp32"), runner.describe()


def test_slow_precisions_are_skipped_with_the_reason_recorded(onnx_export):
    texts, _ = generate_texts(rows_per_label=1, seed=2)
    records = measure_agreement(onnx_export, texts, "generated", seconds=0, variants=["fp32", "bf16", "onnx_int8"])
    assert records["fp32"]["agreement"] == 1.0 and records["fp32"]["texts"] == len(texts)
    for name in ("bf16", "onnx_int8"):
        assert "over the 0 s allowed" in records[name]["skipped"] and "agreement" not in records[name]
    nothing = measure_agreement(onnx_export, [], "the reason", variants=["fp32", "bf16"])
    assert all("no texts to measure on (the reason)" in r["skipped"] for r in nothing.values())


def test_agreement_texts_come_from_the_validation_split_else_a_given_file(trained, tmp_path):
    checkpoint = torch.load(trained("distilbert") / "ckpt" / "last.ckpt", weights_only=True)
    texts, source = agreement_inputs(checkpoint, None, 10)
    assert len(texts) == 10 and source.startswith("validation split of ") and "(10 of its" in source

    moved = {**checkpoint, "datamodule_hyper_parameters": {**checkpoint["datamodule_hyper_parameters"]}}
    moved["datamodule_hyper_parameters"]["path"] = str(tmp_path / "gone.csv")
    texts, reason = agreement_inputs(moved, None, 10)
    assert texts == [] and "gone.csv does not exist" in reason and "--agreement_data" in reason

    given = tmp_path / "texts.txt"
    given.write_text("first text\nsecond text\nthird text\n")
    texts, source = agreement_inputs(moved, str(given), 2)
    assert len(texts) == 2 and set(texts) <= {"first text", "second text", "third text"} and "texts.txt" in source


# ------------------------------------------------------------------------------------------------ errors
def test_settings_errors_name_the_file_and_the_option(onnx_export, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(onnx_export, plain, ignore=shutil.ignore_patterns("*.onnx"))
    with pytest.raises(ConfigError, match=r"--backend onnx needs .*plain/model\.onnx: export .* --format onnx"):
        Runner(plain, InferenceSettings(backend="onnx"))
    with pytest.raises(ConfigError, match=r"model\.int8\.onnx: export .*--format onnx --quantize int8"):
        Runner(plain, InferenceSettings(backend="onnx", precision="int8"))
    with pytest.raises(ConfigError, match=r"--precision int8 is the ONNX backend's"):
        Runner(onnx_export, InferenceSettings(precision="int8"))
    # Every problem at once, each naming its flag.
    with pytest.raises(ConfigError) as err:
        InferenceSettings(backend="onnx", precision="bf16", max_batch_tokens=10, agreement_gate=2).check(plain, 64)
    message = str(err.value)
    for part in ("--precision bf16 runs on --backend torch", "--max_batch_tokens 10 is below", "--agreement_gate"):
        assert part in message


def test_export_refuses_quantize_without_onnx_and_missing_agreement_data(trained, tmp_path):
    ckpt = str(trained("distilbert") / "ckpt" / "last.ckpt")
    with pytest.raises(ExportError, match=r"--quantize int8 quantizes the ONNX model: add --format onnx"):
        export(ckpt, str(tmp_path / "out"), quantize="int8")
    with pytest.raises(ExportError, match=r"--agreement_data .*nope\.txt does not exist"):
        export(ckpt, str(tmp_path / "out"), agreement_data=str(tmp_path / "nope.txt"))
    assert not (tmp_path / "out").exists()
