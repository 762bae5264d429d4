"""Pooling as a model option: the pooling maths, padding invariance, checkpoints, export (pipeline with remote code,
ONNX) and the rule that this package never runs code that a model folder carries."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import TINY_CONFIGS, tiny_classifier, tokenizer_for
from test_export import assert_onnx_agrees_with_pytorch, predict_file

from lightning_cls.cli import main
from lightning_cls.data.labels import DEFAULT_LABELS
from lightning_cls.data.sample_data import generate_texts
from lightning_cls.data.tokenization import PadCollator, load_tokenizer
from lightning_cls.export.exporter import export
from lightning_cls.export.folder import load_classifier
from lightning_cls.model.classifier import TextClassifier
from lightning_cls.model.pooling import PooledClassifier, pool


def test_pool_takes_the_real_tokens_whichever_side_is_padded():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)  # (B=2, T=4, H=1): values 0..7
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    assert pool(hidden, right, "cls").flatten().tolist() == [0, 4]
    assert pool(hidden, right, "last").flatten().tolist() == [2, 5]
    assert pool(hidden, right, "mean").flatten().tolist() == [1, 4.5]
    assert pool(hidden, left, "cls").flatten().tolist() == [1, 6]
    assert pool(hidden, left, "last").flatten().tolist() == [3, 7]
    assert pool(hidden, left, "mean").flatten().tolist() == [2, 6.5]
    with pytest.raises(ValueError, match="Unknown pooling 'max'"):
        pool(hidden, right, "max")


def tiny_pooled(sample_dir, family, pooling) -> TextClassifier:
    return tiny_classifier(tokenizer_for(sample_dir, family), TINY_CONFIGS[family], pooling=pooling)


@pytest.mark.parametrize("pooling", ["cls", "mean", "last"])
def test_pooled_logits_do_not_depend_on_the_amount_of_padding(sample_dir, family, pooling):
    model = tiny_pooled(sample_dir, family, pooling)
    assert isinstance(model.model, PooledClassifier) and model.model.config.pooling == pooling
    tok = load_tokenizer(tokenizer_for(sample_dir, family))
    short, long = "Galaxy redshift survey.", " ".join(["quantum entanglement of photonic qubits"] * 6)
    collate = PadCollator(tok.pad_token_id, pad_to_multiple_of=8)
    examples = [{"input_ids": ids, "row_id": i} for i, ids in enumerate(tok([short, long])["input_ids"])]
    with torch.no_grad():
        alone = collate(examples[:1])
        batched = collate(examples)
        assert batched["input_ids"].shape[1] >= 4 * len(examples[0]["input_ids"])  # really padded a lot
        torch.testing.assert_close(
            model(alone["input_ids"], alone["attention_mask"])[0],
            model(batched["input_ids"], batched["attention_mask"])[0],
            atol=1e-5,
            rtol=1e-5,
        )


def test_an_unknown_pooling_names_the_option(sample_dir):
    with pytest.raises(ValueError, match=r"model.pooling='max': use one of default, cls, mean, last"):
        tiny_pooled(sample_dir, "distilbert", "max")


def test_the_head_trains_and_the_unused_bert_pooler_is_gone(sample_dir):
    model = TextClassifier(
        model_name_or_path="tiny",
        label_names=list(DEFAULT_LABELS),
        tokenizer=tokenizer_for(sample_dir, "distilbert"),
        model_config={
            "model_type": "bert",
            "num_hidden_layers": 2,
            "hidden_size": 32,
            "num_attention_heads": 2,
            "intermediate_size": 64,
        },
        pooling="mean",
        train_last_n_blocks=1,
    )
    trainable = {name for name, p in model.model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert any(name.startswith("backbone.encoder.layer.1.") for name in trainable)
    assert not any(name.startswith("backbone.encoder.layer.0.") for name in trainable)
    assert not any("pooler" in name for name, _ in model.model.named_parameters())  # no unused parameters


def plant_code(folder, marker) -> None:
    """Make the folder's modelling code, if it is ever imported, leave a marker file behind."""
    code = folder / "pooling.py"
    assert code.is_file()  # the export carries its modelling code (for trust_remote_code users)
    code.write_text(code.read_text() + f"\nopen({str(marker)!r}, 'w').write('ran')\n")


@pytest.mark.slow
def test_mean_pooled_model_exports_to_a_folder_pipeline_loads_and_agrees_with_predict(tmp_path, sample_dir, trained):
    """fit -> checkpoint -> predict -> export; the folder loads with transformers' remote-code mechanism in a fresh
    process, agrees with `predict`; this package loads it with its own code and never runs the folder's."""
    ckpt = trained("distilbert", "--model.pooling=mean") / "ckpt" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    assert checkpoint["hyper_parameters"]["model_config"]["model_type"] == "lightning_cls_pooled"
    out = tmp_path / "export"
    assert main(["export", f"--ckpt_path={ckpt}", f"--output_dir={out}"]) == out
    config = json.loads((out / "config.json").read_text())
    assert config["pooling"] == "mean" and config["auto_map"]["AutoModelForSequenceClassification"]

    texts, _ = generate_texts(rows_per_label=1, seed=5)
    texts[0] = " ".join([texts[0]] * 6)  # longer than max_length: both must truncate at the same place
    predictions = predict_file(tmp_path, sample_dir, "distilbert", ckpt, texts)

    marker = tmp_path / "folder-code-ran"
    plant_code(out, marker)
    model = load_classifier(out).eval()  # this package's loader: the folder's code must not run
    assert isinstance(model, PooledClassifier) and not marker.exists()

    # A user without lightning_cls: transformers.pipeline with trust_remote_code, in a fresh process.
    script = (
        "import json, sys\n"
        "from transformers import pipeline\n"
        f"classify = pipeline('text-classification', model={str(out)!r}, trust_remote_code=True, device='cpu')\n"
        "texts = json.loads(sys.stdin.read())\n"
        "print(json.dumps(classify(texts, truncation=True, top_k=None, batch_size=4)))\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], input=json.dumps(texts), capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert marker.exists()  # the control: the planted code does run where remote code is trusted
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for expected, result in zip(predictions, results, strict=True):
        assert result[0]["label"] == expected["label"]
        scores = {r["label"]: r["score"] for r in result}
        for top in expected["top_k"]:
            assert scores[top["label"]] == pytest.approx(top["probability"], abs=1e-4)

    tok = load_tokenizer(str(out))
    enc = tok(texts, truncation=True, padding=True, return_tensors="pt")
    reference = TextClassifier.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(**enc).logits, reference(enc["input_ids"], enc["attention_mask"]), atol=1e-5, rtol=1e-5
        )


@pytest.mark.slow
def test_mean_pooled_onnx_export_agrees_with_pytorch(tmp_path, trained):
    ckpt = trained("distilbert", "--model.pooling=mean") / "ckpt" / "last.ckpt"
    out = tmp_path / "export"
    export(str(ckpt), str(out), format="onnx")
    assert_onnx_agrees_with_pytorch(ckpt, out)


def test_validate_rebuilds_a_pooled_checkpoint(tmp_path, sample_dir, trained):
    """validate --ckpt_path rebuilds the pooled model from the checkpoint (no pooling flag needed)."""
    from test_cli import data_args, trainer_args

    ckpt = trained("gpt2", "--model.pooling=last") / "ckpt" / "last.ckpt"
    run = main(["validate", *data_args(sample_dir, "gpt2"), *trainer_args(tmp_path), f"--ckpt_path={ckpt}"])
    assert isinstance(run.model.model, PooledClassifier) and run.model.model.config.pooling == "last"
    assert 0 <= float(run.trainer.callback_metrics["val/acc"]) <= 1


def test_a_folder_from_a_newer_format_version_is_refused_naming_it(tmp_path):
    from lightning_cls.errors import InputError
    from lightning_cls.export.folder import FORMAT_VERSION, METADATA_FILE, read_export_metadata

    (tmp_path / METADATA_FILE).write_text(
        json.dumps({"format_version": FORMAT_VERSION + 1, "labels": ["a"], "max_length": 8})
    )
    with pytest.raises(InputError, match=rf"{METADATA_FILE} has format_version {FORMAT_VERSION + 1}, newer than"):
        read_export_metadata(tmp_path)
    (tmp_path / METADATA_FILE).write_text(
        json.dumps({"format_version": FORMAT_VERSION, "labels": ["a"], "max_length": 8})
    )
    assert read_export_metadata(tmp_path).labels == ["a"]
