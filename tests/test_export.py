"""Export: a Hugging Face folder that `transformers.pipeline` loads offline and that agrees with `predict`; ONNX."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_cli import data_args, trainer_args
from transformers import AutoConfig, AutoTokenizer, pipeline

from lightning_cls.cli import main
from lightning_cls.data.sample_data import generate_texts
from lightning_cls.export.exporter import ExportError, export
from lightning_cls.model.classifier import TextClassifier

METADATA_KEYS = {
    "format_version",
    "labels",
    "max_length",
    "model_name_or_path",
    "checkpoint",
    "exported_at",
    "lightning_cls_version",
    "reference",
    "temperature",
    "calibration",
    "max_windows",
    "window_stride",
    "inference",
}


def predict_file(tmp_path, sample_dir, family, ckpt, texts) -> list[dict]:
    """`predict` on a .txt of the texts, all probabilities listed (top_k = every label)."""
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(texts) + "\n")
    out = tmp_path / "predictions.jsonl"
    main(
        [
            "predict",
            *data_args(sample_dir, family),
            *trainer_args(tmp_path),
            f"--ckpt_path={ckpt}",
            f"--data.predict_path={path}",
            "--data.eval_batch_size=4",  # padded batches of different lengths: the pipeline pads nothing
            # The pipeline gives the raw softmax; the temperature is in lightning_cls.json for the server to apply.
            "--model.use_temperature=false",
            "--prediction_writer.top_k=100",
            f"--prediction_writer.output_path={out}",
        ]
    )
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.parametrize(
    ("family", "extra"),
    [("distilbert", ()), ("gpt2", ()), ("gpt2", ("--model.train_last_n_blocks=1",))],
    ids=["distilbert", "gpt2", "gpt2-last-block-only"],
)
def test_pipeline_loads_the_export_offline_and_agrees_with_predict(tmp_path, sample_dir, trained, family, extra):
    run_dir = trained(family, *extra)
    ckpt = run_dir / "ckpt" / "last.ckpt"
    out = tmp_path / "export"
    assert main(["export", f"--ckpt_path={ckpt}", f"--output_dir={out}"]) == out

    # What the folder holds: model, tokenizer with its pad token and the training truncation, labels, metadata.
    checkpoint = torch.load(ckpt, weights_only=True)
    labels = checkpoint["hyper_parameters"]["label_names"]
    config = AutoConfig.from_pretrained(out)
    assert config.id2label == dict(enumerate(labels)) and config.label2id == {n: i for i, n in enumerate(labels)}
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id == config.pad_token_id
    assert tokenizer.model_max_length == 64
    assert (out / "model.safetensors").is_file()
    metadata = json.loads((out / "lightning_cls.json").read_text())
    assert set(metadata) == METADATA_KEYS and metadata["format_version"] == 1
    assert metadata["labels"] == labels and metadata["max_length"] == 64
    assert metadata["temperature"] == checkpoint["lightning_cls_temperature"] > 0
    assert metadata["reference"] == checkpoint["lightning_cls_data_reference"]["train"]
    assert metadata["reference"]["rows"] == 240 and sum(metadata["reference"]["label_counts"].values()) == 240
    assert not list(tmp_path.glob(".export.tmp-*"))  # the temporary folder was renamed, not left behind

    texts, _ = generate_texts(rows_per_label=2, seed=11)
    texts[0] = " ".join([texts[0]] * 6)  # longer than max_length: both must truncate at the same place
    predictions = predict_file(tmp_path, sample_dir, family, ckpt, texts)
    classify = pipeline("text-classification", model=str(out), device="cpu")
    for batch_size in (1, 4):  # alone, and padded beside other texts
        results = classify(texts, truncation=True, top_k=None, batch_size=batch_size)
        for expected, result in zip(predictions, results, strict=True):
            assert result[0]["label"] == expected["label"]
            scores = {r["label"]: r["score"] for r in result}
            for top in expected["top_k"]:
                assert scores[top["label"]] == pytest.approx(top["probability"], abs=1e-4)

    # A partially frozen model exports all its weights, frozen ones included.
    model = TextClassifier.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    exported = classify.model.state_dict()
    for name, value in model.model.state_dict().items():
        torch.testing.assert_close(exported[name], value, msg=name)
    if extra:
        assert not all(p.requires_grad for p in model.model.parameters())


def assert_onnx_agrees_with_pytorch(ckpt: Path, out: Path) -> None:
    """The exported model.onnx against the checkpoint's model, on batch sizes and lengths other than the traced."""
    import onnxruntime

    tokenizer = AutoTokenizer.from_pretrained(out)
    texts, _ = generate_texts(rows_per_label=1, seed=3)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    model = TextClassifier.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    for batch in (texts[:1], texts[:5], texts):  # batch sizes and lengths that differ from the traced ones
        enc = tokenizer(batch, truncation=True, padding=True, return_tensors="pt")
        inputs = {"input_ids": enc["input_ids"].numpy(), "attention_mask": enc["attention_mask"].numpy()}
        (logits,) = session.run(["logits"], inputs)
        with torch.no_grad():
            expected = model(enc["input_ids"], enc["attention_mask"]).softmax(-1)
        assert (torch.from_numpy(logits).softmax(-1) - expected).abs().max() <= 1e-3


@pytest.mark.slow
def test_onnx_export_agrees_with_pytorch(tmp_path, family, trained):
    ckpt = trained(family) / "ckpt" / "last.ckpt"
    out = tmp_path / "export"
    export(str(ckpt), str(out), format="onnx")
    assert (out / "model.onnx").is_file() and (out / "model.safetensors").is_file()
    assert_onnx_agrees_with_pytorch(ckpt, out)


def test_export_refuses_a_missing_checkpoint_and_a_used_folder(tmp_path, trained):
    with pytest.raises(ExportError, match=r"Checkpoint .*nope\.ckpt does not exist"):  # cli.main reports it
        main(["export", f"--ckpt_path={tmp_path / 'nope.ckpt'}", f"--output_dir={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()

    ckpt = trained("distilbert") / "ckpt" / "last.ckpt"
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match=r"Output folder .*used exists and is not empty"):
        export(str(ckpt), str(used))
    assert [p.name for p in used.iterdir()] == ["notes.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    export(str(ckpt), str(empty))  # an empty folder is fine
    assert (empty / "lightning_cls.json").is_file()


def test_export_without_a_data_reference(tmp_path, trained, capsys):
    checkpoint = torch.load(trained("distilbert") / "ckpt" / "last.ckpt", weights_only=True)
    del checkpoint["lightning_cls_data_reference"]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    out = Path(export(str(old), str(tmp_path / "export"), max_length=48))
    metadata = json.loads((out / "lightning_cls.json").read_text())
    assert metadata["reference"] is None and metadata["max_length"] == 48
    assert '"reference": null' in capsys.readouterr().out
    assert AutoTokenizer.from_pretrained(out).model_max_length == 48


def test_export_writes_a_model_card_from_the_checkpoint_and_a_test_report(tmp_path, sample_dir, trained):
    run_dir = trained("distilbert")
    ckpt = run_dir / "ckpt" / "last.ckpt"
    main(["test", *data_args(sample_dir, "distilbert"), *trainer_args(tmp_path), f"--ckpt_path={ckpt}"])
    report_path = next((tmp_path / "runs").rglob("test_report.json"))
    report = json.loads(report_path.read_text())
    out = Path(export(str(ckpt), str(tmp_path / "export"), test_report=str(report_path)))
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])  # the Hugging Face metadata block
    assert front["pipeline_tag"] == "text-classification" and front["library_name"] == "transformers"
    assert front["model-index"][0]["results"][0]["metrics"][0]["value"] == round(report["macro_f1"], 4)
    metadata = json.loads((out / "lightning_cls.json").read_text())
    for label in metadata["labels"]:
        assert f"`{label}`" in card and f"| {label} | {metadata['reference']['label_counts'][label]} |" in card
    assert f"T = {metadata['temperature']:.4f}" in card  # calibrated during fit
    for section in ("## Training data", "## Training configuration", "## Evaluation", "## Intended use and limits"):
        assert section in card
    # A wrong report path fails before anything is written.
    with pytest.raises(ExportError, match=r"--test_report .*nope\.json cannot be read"):
        export(str(ckpt), str(tmp_path / "export2"), test_report=str(tmp_path / "nope.json"))
    assert not (tmp_path / "export2").exists()
