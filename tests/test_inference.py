"""Running an exported folder (`lightning_cls.export.runtime`): the precision gate, the token budget, the ONNX backends,
and the agreement that `export` records in lightning_cls.json."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from lightning_cls import hardware
from lightning_cls.data.sample_data import generate_texts
from lightning_cls.data.tokenization import load_tokenizer, pad_batch
from lightning_cls.errors import ConfigError, ExportError
from lightning_cls.export import variants
from lightning_cls.export.exporter import agreement_inputs, export, validation_split
from lightning_cls.export.folder import INT8_ONNX_FILE, ONNX_FILE, read_export_metadata
from lightning_cls.export.onnx_optimize import (
    INT8_MAX_PROB_DIFF,
    OPTIMIZED_MAX_PROB_DIFF,
    OPTIMIZED_ONNX_FILE,
    int8_sensitivity,
    quantizable_nodes,
    quantize_int8,
)
from lightning_cls.export.runtime import (
    MIN_SPEEDUP,
    VARIANTS,
    InferenceSettings,
    Runner,
    choose,
    plan_batches,
)
from lightning_cls.export.variants import measure_variants
from lightning_cls.hardware import Hardware, detect_hardware
from lightning_cls.task.scores import task_scores

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
def entry(f1: float | None = None, agreement: float = 1.0, speed: float = 100.0, device: str = "cpu") -> dict:
    """One variant's record as export writes it (macro-F1 only when the texts had labels)."""
    out = {"agreement": agreement, "max_prob_diff": 0.01, "texts": 2000, "texts_per_s": speed, "device": device}
    return {**out, "source": "x"} | ({"macro_f1": f1, "accuracy": f1} if f1 is not None else {})


def record(agreement: float, variant: str = "bf16") -> dict:
    """An export that recorded label agreement only (no labels): what the agreement gate reads."""
    return {"fp32": entry(), variant: entry(agreement=agreement, speed=300.0)}


def onnx_folder(tmp_path):
    for name in (ONNX_FILE, INT8_ONNX_FILE):
        (tmp_path / name).touch()  # `auto` only checks that the files are there
    return tmp_path


def test_the_accuracy_gate_takes_the_fastest_variant_that_keeps_macro_f1(tmp_path):
    folder = onnx_folder(tmp_path)
    measured = {
        "fp32": entry(0.850, speed=100),
        "bf16": entry(0.846, agreement=0.97, speed=250),  # -0.4 point, 3% of labels changed
        "onnx_fp32": entry(0.850, speed=130),
        "onnx_int8": entry(0.838, agreement=0.96, speed=400),  # the fastest, but -1.2 points
    }
    auto = InferenceSettings(backend="auto")
    choice = choose(auto, FAST_CPU, measured, folder)
    assert choice.variant == "bf16" and choice.verdicts["bf16"].startswith("taken")
    assert "refused" in choice.verdicts["onnx_int8"] and "-1.20 points" in choice.verdicts["onnx_int8"]
    assert "macro-F1 0.8460 vs fp32's 0.8500" in choice.reason and "bf16 250.0 texts/s" in choice.reason
    assert set(choice.verdicts) == {"fp32", "bf16", "fp16", "onnx_fp32", "onnx_int8"}  # /info shows each
    # A looser tolerance takes int8; a tighter one refuses bf16 too (then the fastest fp32 graph).
    assert choose(dataclasses.replace(auto, max_f1_drop=0.02), FAST_CPU, measured, folder).variant == "onnx_int8"
    strict = choose(dataclasses.replace(auto, max_f1_drop=0.001), FAST_CPU, measured, folder)
    assert strict.variant == "onnx_fp32" and "refused" in strict.verdicts["bf16"]
    # The old gate, by labels alone: bf16's 97% and int8's 96% are under 99.5%.
    assert choose(dataclasses.replace(auto, gate="agreement"), FAST_CPU, measured, folder).variant == "onnx_fp32"
    # Without bf16 hardware, and on one backend at a time.
    assert choose(auto, SLOW_CPU, measured, folder).variant == "onnx_fp32"
    assert choose(InferenceSettings(), FAST_CPU, measured, folder).variant == "bf16"
    assert choose(InferenceSettings(backend="onnx"), FAST_CPU, measured, folder).variant == "onnx_fp32"
    loose = InferenceSettings(backend="onnx", max_f1_drop=0.02)
    assert choose(loose, FAST_CPU, measured, folder).variant == "onnx_int8"
    # A variant that gains accuracy passes whatever the tolerance.
    better = {**measured, "onnx_int8": entry(0.853, agreement=0.96, speed=400)}
    assert choose(dataclasses.replace(auto, max_f1_drop=0.0), FAST_CPU, better, folder).variant == "onnx_int8"


def test_the_gate_refuses_what_it_cannot_judge_and_what_is_not_clearly_faster(tmp_path):
    folder = onnx_folder(tmp_path)
    # No labels at export (--agreement_data): no macro-F1, so the accuracy gate refuses and names the other gate.
    unscored = choose(InferenceSettings(), FAST_CPU, record(1.0), folder)
    assert unscored.precision == "fp32" and "--gate agreement" in unscored.verdicts["bf16"]
    # A variant must be recorded at least MIN_SPEEDUP times fp32's speed.
    close = {"fp32": entry(0.85, speed=100), "bf16": entry(0.85, speed=100 * MIN_SPEEDUP * 0.95)}
    choice = choose(InferenceSettings(), FAST_CPU, close, folder)
    assert choice.precision == "fp32" and f"less than {MIN_SPEEDUP}x" in choice.reason
    # Speeds recorded on another kind of device do not count: the usual order, bf16 before fp32.
    elsewhere = {"fp32": entry(0.85, device="cuda"), "bf16": entry(0.85, device="cuda")}
    assert choose(InferenceSettings(), FAST_CPU, elsewhere, folder).precision == "bf16"
    assert "records no measurements" in choose(InferenceSettings(), FAST_CPU, None, folder).reason


def test_auto_is_fp32_unless_the_hardware_runs_bf16_well_and_its_agreement_clears_the_gate(tmp_path):
    auto = InferenceSettings(gate="agreement")
    assert choose(auto, FAST_CPU, record(0.999), tmp_path).precision == "bf16"
    # The hardware runs bf16 well, but its labels agree too little: fp32, saying why.
    low = choose(auto, FAST_CPU, record(0.99), tmp_path)
    assert low.precision == "fp32" and "below --agreement_gate 0.995" in low.reason
    assert choose(dataclasses.replace(auto, agreement_gate=0.98), FAST_CPU, record(0.99), tmp_path).precision == "bf16"
    # Agreement is fine, but bf16 is slow on this CPU.
    slow = choose(auto, SLOW_CPU, record(1.0), tmp_path)
    assert slow.precision == "fp32" and "does not run faster" in slow.reason
    # Never measured (an older export) or skipped at export: fp32, and the reason is passed on.
    assert "records no measurements" in choose(auto, FAST_CPU, None, tmp_path).reason
    skipped = {"fp32": entry(), "bf16": {"skipped": "about 200 s for 512 texts", "device": "cpu"}}
    assert "about 200 s" in choose(auto, FAST_CPU, skipped, tmp_path).reason
    assert choose(auto, FAST_CPU, {"fp16": record(1.0)["bf16"]}, tmp_path).precision == "fp32"


def test_an_asked_precision_is_used_with_warnings(tmp_path):
    choice = choose(InferenceSettings(precision="bf16", gate="agreement"), SLOW_CPU, record(0.9), tmp_path)
    assert choice.precision == "bf16" and choice.reason == "asked for"
    assert any("below --agreement_gate" in w for w in choice.warnings)
    assert any("slower than fp32" in w for w in choice.warnings)
    lossy = {"fp32": entry(0.85), "bf16": entry(0.83)}
    choice = choose(InferenceSettings(precision="bf16"), FAST_CPU, lossy, tmp_path)
    assert choice.precision == "bf16" and any("fails the gate" in w and "-2.00 points" in w for w in choice.warnings)
    assert choose(InferenceSettings(precision="fp32"), SLOW_CPU, None, tmp_path).warnings == ()


def test_hardware_detection_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert not detect_hardware("cpu").bf16 and "without AMX" in detect_hardware("cpu").note
    for flag in ("amx_bf16", "avx512_bf16"):
        monkeypatch.setattr(hardware, "cpu_flags", lambda flag=flag: frozenset({"avx2", flag}))
        assert detect_hardware("cpu").bf16 and flag in detect_hardware("cpu").note
    assert hardware.cpu_flags() is not None


def test_runner_auto_follows_the_gate_and_the_hardware(onnx_export, monkeypatch):
    meta = read_export_metadata(onnx_export)
    ids = token_ids(onnx_export)
    fp32 = Runner(onnx_export, InferenceSettings(precision="fp32")).logits(ids)

    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2"}))
    good = dataclasses.replace(meta, inference={"fp32": entry(0.8), "bf16": entry(0.8, speed=300)})
    assert Runner(onnx_export, metadata=good).precision == "fp32"  # no bf16 hardware

    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    runner = Runner(onnx_export, metadata=good)
    assert runner.precision == "bf16" and "amx_bf16" in runner.describe()
    bf16 = runner.logits(ids)
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    assert (bf16.softmax(-1) - fp32.softmax(-1)).abs().max() < 0.05  # bf16, but the same model
    below = dataclasses.replace(meta, inference={"fp32": entry(0.8), "bf16": entry(0.7, speed=300)})
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
    assert (int8.softmax(-1) - torch_logits.softmax(-1)).abs().max() < INT8_MAX_PROB_DIFF  # quantized, same model


def test_the_optimized_graph_is_fused_and_answers_as_pytorch_and_int8_is_made_from_it(onnx_export):
    import onnx

    recorded = read_export_metadata(onnx_export).extra["onnx"]
    # The tiny DistilBERT has 2 layers: both attentions fused, LayerNorm + residual and bias + GELU too.
    fused = recorded["optimized"]["fused"]
    assert fused["Attention"] == 2 and fused["SkipLayerNormalization"] == 4 and fused["BiasGelu"] == 2
    assert recorded["optimized"]["max_prob_diff"] < OPTIMIZED_MAX_PROB_DIFF
    ops = {node.op_type for node in onnx.load(str(onnx_export / OPTIMIZED_ONNX_FILE)).graph.node}
    assert {"Attention", "SkipLayerNormalization"} <= ops and "Softmax" not in ops
    # ONNX fp32 runs the optimized graph, padded batches of many lengths included: PyTorch's answers.
    ids = token_ids(onnx_export, rows=30)
    expected = Runner(onnx_export, InferenceSettings(precision="fp32")).logits(ids).softmax(-1)
    runner = Runner(onnx_export, InferenceSettings(backend="onnx", precision="fp32"))
    assert runner.onnx_file == OPTIMIZED_ONNX_FILE and OPTIMIZED_ONNX_FILE in runner.describe()
    assert (runner.logits(ids).softmax(-1) - expected).abs().max() < 1e-4
    # int8 was quantized from the optimized graph: the fused attention in int8 (QAttention).
    assert recorded["int8"] == {"from": OPTIMIZED_ONNX_FILE, "per_channel": True, "dynamic": True, "kept_fp32": []}
    int8_ops = {node.op_type for node in onnx.load(str(onnx_export / INT8_ONNX_FILE)).graph.node}
    assert "QAttention" in int8_ops
    int8 = Runner(onnx_export, InferenceSettings(backend="onnx", precision="int8")).logits(ids).softmax(-1)
    assert (int8 - expected).abs().max() < INT8_MAX_PROB_DIFF


def test_int8_sensitivity_names_each_node_and_excluded_nodes_stay_fp32(onnx_export, tmp_path):
    import onnx

    graph = onnx_export / OPTIMIZED_ONNX_FILE
    nodes = quantizable_nodes(graph)
    kinds = {node.name: node.op_type for node in onnx.load(str(graph)).graph.node}
    # Per layer the attention and three matrix products, and the embeddings (the head's Gemm layers stay fp32).
    counts = Counter(kinds[n] for n in nodes)
    assert (
        counts["Attention"] == 2
        and counts["MatMul"] == 6
        and set(counts) <= {"Attention", "MatMul", "Gather", "EmbedLayerNormalization"}
    )
    ids = token_ids(onnx_export, rows=8)
    feeds = [{"input_ids": np.array([row[:10] for row in ids]), "attention_mask": np.ones((8, 10), dtype=np.int64)}]
    cost = int8_sensitivity(graph, feeds, nodes[:2])
    assert set(cost) == {"", *nodes[:2]} and all(v >= 0 for v in cost.values())
    attention = next(n for n in nodes if kinds[n] == "Attention")
    quantize_int8(graph, tmp_path / "int8.onnx", exclude=[attention])
    kept = {node.name: node.op_type for node in onnx.load(str(tmp_path / "int8.onnx")).graph.node}
    assert kept[attention] == "Attention" and "QAttention" in kept.values()  # the other attention is int8


def test_export_keeps_the_costliest_int8_nodes_in_fp32_when_asked(trained, tmp_path):
    import onnx

    ckpt = str(trained("distilbert") / "ckpt" / "last.ckpt")
    with pytest.raises(ExportError, match=r"--int8_keep_fp32 measures on the validation texts"):
        export(ckpt, str(tmp_path / "none"), format="onnx", quantize="int8", int8_keep_fp32=1, agreement_texts=0)
    folder = export(ckpt, str(tmp_path / "out"), format="onnx", quantize="int8", int8_keep_fp32=2, agreement_texts=8)
    kept = read_export_metadata(folder).extra["onnx"]["int8"]["kept_fp32"]
    assert len(kept) == 2 and set(kept) <= set(quantizable_nodes(folder / OPTIMIZED_ONNX_FILE))
    ops = {node.name: node.op_type for node in onnx.load(str(folder / INT8_ONNX_FILE)).graph.node}
    assert all(ops[name] in ("Attention", "MatMul", "Gather", "EmbedLayerNormalization") for name in kept)


def test_task_scores_are_accuracy_and_macro_f1():
    scores = task_scores([0, 0, 1, 2], [0, 1, 1, 2])
    assert scores["accuracy"] == 0.75
    assert scores["macro_f1"] == pytest.approx(np.mean([2 / 3, 2 / 3, 1.0]))  # classes 0, 1, 2
    assert task_scores([3], [3]) == {"accuracy": 1.0, "macro_f1": 1.0}  # only classes that occur are averaged


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


def test_export_records_each_variants_scores_on_the_validation_split(onnx_export, trained):
    assert (onnx_export / ONNX_FILE).is_file() and (onnx_export / INT8_ONNX_FILE).is_file()
    records = json.loads((onnx_export / "lightning_cls.json").read_text())["inference"]
    assert list(records) == [v for v in VARIANTS if v != "student"]  # fp32, bf16, fp16, onnx_fp32, onnx_int8
    for name, entry in records.items():
        assert entry["device"] == "cpu" and entry["source"].startswith("validation split of ")
        assert "skipped" not in entry, (name, entry)  # a tiny model: every precision is quick to measure
        assert entry["texts"] == 20 and 0 <= entry["agreement"] <= 1 and entry["texts_per_s"] > 0
        assert 0 <= entry["max_prob_diff"] <= 1 and entry["fused"] is False
        assert 0 <= entry["macro_f1"] <= 1 and 0 <= entry["accuracy"] <= 1
        assert entry["changed"] == round((1 - entry["agreement"]) * 20) >= entry["now_right"] + entry["now_wrong"]
    assert records["fp32"]["agreement"] == 1.0 and records["onnx_fp32"]["max_prob_diff"] < 1e-4
    assert records["onnx_fp32"]["graph"] == OPTIMIZED_ONNX_FILE
    # The scores are fp32's answers against the true labels of the same 20 validation texts.
    checkpoint = torch.load(trained("distilbert") / "ckpt" / "last.ckpt", weights_only=True)
    texts, names, _ = validation_split(checkpoint, 20)
    labels = read_export_metadata(onnx_export).labels
    runner = Runner(onnx_export, InferenceSettings(precision="fp32"))
    ids = runner.tokenizer(texts, truncation=True, max_length=64)["input_ids"]
    expected = task_scores(runner.logits(ids).argmax(-1).numpy(), [labels.index(n) for n in names])
    assert records["fp32"]["macro_f1"] == pytest.approx(expected["macro_f1"], abs=1e-6)
    assert records["fp32"]["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)


def test_a_fused_export_is_scored_on_its_fused_answers(trained, tmp_path):
    from lightning_cls.model.fusion import FolderFusion

    run = trained("distilbert", "--model.lexical=true", "--model.lexical_max_features=2000")
    out = tmp_path / "fused"
    export(str(run / "ckpt" / "last.ckpt"), str(out), agreement_texts=20)
    meta = read_export_metadata(out)
    records = meta.inference
    assert records["fp32"]["fused"] is True
    checkpoint = torch.load(run / "ckpt" / "last.ckpt", weights_only=True)
    texts, names, _ = validation_split(checkpoint, 20)
    runner = Runner(out, InferenceSettings(precision="fp32"))
    network = runner.logits(runner.tokenizer(texts, truncation=True, max_length=64)["input_ids"])
    fused = FolderFusion.from_folder(out, meta).fused(network, texts)
    truth = [meta.labels.index(n) for n in names]
    assert records["fp32"]["macro_f1"] == pytest.approx(task_scores(fused.argmax(-1).numpy(), truth)["macro_f1"])


def test_slow_precisions_are_skipped_with_the_reason_recorded(onnx_export, monkeypatch):
    monkeypatch.setattr(variants, "SKIP_FACTOR", 0.0)  # anything slower than nothing
    texts, _ = generate_texts(rows_per_label=1, seed=2)
    records = measure_variants(onnx_export, texts, "generated", seconds=0, variants=["fp32", "bf16", "onnx_int8"])
    assert records["fp32"]["agreement"] == 1.0 and records["fp32"]["texts"] == len(texts)
    for name in ("bf16", "onnx_int8"):
        assert "over the 0 s allowed" in records[name]["skipped"] and "agreement" not in records[name]
    nothing = measure_variants(onnx_export, [], "the reason", variants=["fp32", "bf16"])
    assert all("no texts to measure on (the reason)" in r["skipped"] for r in nothing.values())


def test_agreement_texts_come_from_the_validation_split_else_a_given_file(trained, tmp_path):
    checkpoint = torch.load(trained("distilbert") / "ckpt" / "last.ckpt", weights_only=True)
    texts, names, source = agreement_inputs(checkpoint, None, 10)
    assert len(texts) == 10 and source.startswith("validation split of ") and "(10 of its" in source
    assert len(names) == 10 and set(names) <= set(checkpoint["hyper_parameters"]["label_names"])

    moved = {**checkpoint, "datamodule_hyper_parameters": {**checkpoint["datamodule_hyper_parameters"]}}
    moved["datamodule_hyper_parameters"]["path"] = str(tmp_path / "gone.csv")
    texts, names, reason = agreement_inputs(moved, None, 10)
    assert texts == [] and names is None and "gone.csv does not exist" in reason and "--agreement_data" in reason

    given = tmp_path / "texts.txt"
    given.write_text("first text\nsecond text\nthird text\n")
    texts, names, source = agreement_inputs(moved, str(given), 2)
    assert names is None and len(texts) == 2 and "texts.txt" in source
    assert set(texts) <= {"first text", "second text", "third text"}


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


def test_a_multi_label_exports_variants_are_scored_on_label_sets(sample_dir, tmp_path):
    """measure_variants on a multi-label folder: each variant's answers are the sets its thresholds decide, scored
    against true sets (macro-F1 over the labels, which the gate reads; micro-F1; subset accuracy)."""
    import json

    from serving_helpers import fabricate_export

    from lightning_cls.data.sample_data import generate_texts
    from lightning_cls.export.exporter import label_ids
    from lightning_cls.task.scores import decide, multilabel_scores

    folder = fabricate_export(sample_dir / "wordpiece", tmp_path / "ml", train_steps=5)
    meta = json.loads((folder / "lightning_cls.json").read_text())
    names = meta["labels"]
    thresholds = [0.3 + 0.02 * i for i in range(len(names))]
    (folder / "lightning_cls.json").write_text(json.dumps({**meta, "format_version": 2, "thresholds": thresholds}))
    texts, single = generate_texts(rows_per_label=2, seed=5, rare_rows=0)
    sets = [
        (label, names[(names.index(label) + 1) % len(names)]) if i % 3 else (label,) for i, label in enumerate(single)
    ]
    ids, why = label_ids(sets, names)
    assert (
        why == "" and np.asarray(ids).shape == (len(texts), len(names)) and np.asarray(ids).sum() == sum(map(len, sets))
    )
    records = measure_variants(folder, texts, "generated", variants=["fp32", "bf16"], labels=ids)
    runner = Runner(folder, InferenceSettings(precision="fp32"))
    probs = runner.logits(runner.tokenizer(texts, truncation=True, max_length=96)["input_ids"]).sigmoid().numpy()
    expected = multilabel_scores(decide(probs, np.asarray(thresholds)), np.asarray(ids), names)
    fp32 = records["fp32"]
    assert fp32["macro_f1"] == pytest.approx(expected["macro_f1"], abs=1e-5)
    assert fp32["micro_f1"] == pytest.approx(expected["micro_f1"], abs=1e-5)
    assert fp32["accuracy"] == pytest.approx(expected["subset_accuracy"], abs=1e-5)
    assert 0 <= records["bf16"].get("agreement", 1.0) <= 1  # sets compared with fp32's (or skipped on a slow CPU)
    assert label_ids([("physics", "zoology")], names) == (None, "the validation labels ['zoology'] are not the model's")
