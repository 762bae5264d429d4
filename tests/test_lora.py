"""Decoders as classifiers, with LoRA: tiny random configs of each family, tokenizers trained in the tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIGS, tiny_classifier, tokenizer_for
from test_cli import data_args, trainer_args

from lightning_cls.cli import main
from lightning_cls.data.labels import DEFAULT_LABELS
from lightning_cls.data.tokenization import load_tokenizer
from lightning_cls.errors import ConfigError
from lightning_cls.model.adapters import is_peft, merged
from lightning_cls.model.classifier import TextClassifier

DECODER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
DECODER |= {"num_key_value_heads": 2, "max_position_embeddings": 256}
FAMILIES = {
    "gpt2": TINY_CONFIGS["gpt2"],
    "llama": {"model_type": "llama", **DECODER},
    "qwen2": {"model_type": "qwen2", **DECODER},
    "qwen3": {"model_type": "qwen3", "head_dim": 8, **DECODER},
    "mistral": {"model_type": "mistral", **DECODER},
    "phi3": {"model_type": "phi3", "original_max_position_embeddings": 256, **DECODER},
    "gemma": {"model_type": "gemma", "head_dim": 8, **DECODER},
    "distilbert": TINY_CONFIGS["distilbert"],
    "bert": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64},
}  # fmt: skip
ENCODERS = ("distilbert", "bert")
CONFIGS = Path(__file__).parent.parent / "configs"


def tokenizer_path(sample_dir, family) -> str:
    return tokenizer_for(sample_dir, "distilbert" if family in ENCODERS else "gpt2")


def tiny(sample_dir, family, **kwargs) -> TextClassifier:
    return tiny_classifier(tokenizer_path(sample_dir, family), FAMILIES[family], **kwargs)


def padded(ids: list[list[int]], pad_id: int, width: int, side: str) -> dict[str, torch.Tensor]:
    """A batch padded to `width` on `side`."""
    input_ids = torch.full((len(ids), width), pad_id)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        where = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        input_ids[i, where], mask[i, where] = torch.tensor(row), 1
    return {"input_ids": input_ids, "attention_mask": mask}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_do_not_change_with_the_side_or_amount_of_padding(sample_dir, family):
    model = tiny(sample_dir, family, lora_r=4)
    tok = load_tokenizer(tokenizer_path(sample_dir, family))
    short, long = "Galaxy redshift survey.", " ".join(["quantum entanglement of photonic qubits"] * 5)
    ids = tok([short, long])["input_ids"]
    with torch.no_grad():
        alone = model(**padded(ids[:1], tok.pad_token_id, len(ids[0]), "right"))[0]
        # Encoders' own heads read the first token ([CLS]) and their tokenizers pad right; decoders pad either side.
        for side in ("right",) if family in ENCODERS else ("right", "left"):
            for width in (len(ids[1]), len(ids[1]) + 9):
                logits = model(**padded(ids, tok.pad_token_id, width, side))[0]
                torch.testing.assert_close(logits, alone, atol=1e-4, rtol=1e-4, msg=f"{side} padding to {width}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_trains_adapters_and_the_whole_head(sample_dir, family):
    model = tiny(sample_dir, family, lora_r=4).model
    assert is_peft(model)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    head = [n for n in trainable if "lora_" not in n]
    assert head and all(".modules_to_save." in n for n in head)  # the head, in full; nothing else but adapters
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    export = merged(model)
    assert not is_peft(export) and not any("lora_" in n for n, _ in export.named_parameters())
    assert is_peft(model)  # merging for export leaves the training model as it was


def test_lora_with_last_blocks_adapts_only_those_blocks(sample_dir):
    model = tiny(sample_dir, "llama", lora_r=4, train_last_n_blocks=1).model
    adapted = {n.split(".layers.")[1].split(".")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {"1"}
    with pytest.raises(ConfigError, match=r"train_last_n_blocks=0 with LoRA.*turn LoRA off"):
        tiny(sample_dir, "llama", lora_r=4, train_last_n_blocks=0)
    with pytest.raises(ConfigError, match=r"lora_target_modules: the model has no module named \['nope'\]"):
        tiny(sample_dir, "llama", lora_r=4, lora_target_modules=["nope"])
    with pytest.raises(ConfigError, match="save_adapter_only needs LoRA"):
        tiny(sample_dir, "llama", save_adapter_only=True)


def test_bf16_weights_and_gradient_checkpointing(sample_dir):
    model = tiny(sample_dir, "qwen2", lora_r=4, dtype="bfloat16", gradient_checkpointing=True).train()
    base = model.model.get_base_model()
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16 and base.is_gradient_checkpointing
    tok = load_tokenizer(tokenizer_path(sample_dir, "qwen2"))
    ids = tok(["a galaxy", "a quantum dot in a cavity"])["input_ids"]
    batch = padded(ids, tok.pad_token_id, max(map(len, ids)) + 2, "left")
    model(**batch).float().sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)
    with pytest.raises(ConfigError, match=r"model\.dtype='bf17' is not a torch dtype"):
        tiny(sample_dir, "qwen2", dtype="bf17")


def fit_lora(run, sample_dir, family, *extra):
    return main(
        [
            "fit",
            *data_args(sample_dir, "gpt2"),
            *trainer_args(run),
            f"--data.cache_dir={run / 'cache'}",
            "--model.model_name_or_path=tiny",
            f"--model.model_config={json.dumps(FAMILIES[family])}",
            "--model.lora_r=4",
            "--model.learning_rate=1e-2",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=4",
            "--trainer.limit_val_batches=2",
            *extra,
        ]
    )


def test_lora_checkpoint_predicts_and_exports_a_merged_folder_the_pipeline_loads(tmp_path, sample_dir):
    from test_export import predict_file
    from transformers import pipeline

    from lightning_cls.data.sample_data import generate_texts

    fit_lora(tmp_path / "run", sample_dir, "llama")
    ckpt = tmp_path / "run" / "ckpt" / "last.ckpt"
    out = tmp_path / "export"
    main(["export", f"--ckpt_path={ckpt}", f"--output_dir={out}"])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and "auto_map" not in config
    assert config["id2label"]["0"] == sorted(DEFAULT_LABELS)[0]  # the label names survive the merge
    assert not (out / "adapter_config.json").exists()  # a standard folder: no PEFT needed to load it

    texts, _ = generate_texts(rows_per_label=1, seed=4)
    predictions = predict_file(tmp_path, sample_dir, "gpt2", ckpt, texts)
    classify = pipeline("text-classification", model=str(out), device="cpu")
    for expected, result in zip(predictions, classify(texts, truncation=True, top_k=None, batch_size=4), strict=True):
        assert result[0]["label"] == expected["label"]
        scores = {r["label"]: r["score"] for r in result}
        for top in expected["top_k"]:
            assert scores[top["label"]] == pytest.approx(top["probability"], abs=1e-4)


@pytest.mark.slow
def test_lora_onnx_export_agrees_with_pytorch(tmp_path, sample_dir):
    from test_export import assert_onnx_agrees_with_pytorch

    from lightning_cls.export.exporter import export

    fit_lora(tmp_path / "run", sample_dir, "qwen2")
    ckpt = tmp_path / "run" / "ckpt" / "last.ckpt"
    export(str(ckpt), str(tmp_path / "export"), format="onnx")
    assert_onnx_agrees_with_pytorch(ckpt, tmp_path / "export")


def test_adapter_only_checkpoints_are_small_and_need_the_base_model(tmp_path, sample_dir):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    tok = load_tokenizer(tokenizer_path(sample_dir, "llama"))
    specials = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    config = AutoConfig.for_model(**{**FAMILIES["llama"], "vocab_size": len(tok), **specials})
    base = tmp_path / "base-model"  # a "pretrained" model on disk
    torch.manual_seed(1)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(base)

    def fit_from(base_dir, *extra):
        return main(
            [
                "fit",
                *data_args(sample_dir, "gpt2"),
                *trainer_args(tmp_path / "run"),
                f"--data.cache_dir={tmp_path / 'cache'}",
                f"--model.model_name_or_path={base_dir}",
                "--model.lora_r=4",
                "--trainer.max_epochs=1",
                "--trainer.limit_train_batches=2",
                "--trainer.limit_val_batches=1",
                *extra,
            ]
        )

    cli = fit_from(base, "--model.save_adapter_only=true")
    ckpt = tmp_path / "run" / "ckpt" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    trained = {n for n, p in cli.model.named_parameters() if p.requires_grad}
    assert set(saved["state_dict"]) == trained  # adapters and head only
    assert saved["hyper_parameters"]["model_config"] is None  # rebuilt from the base model, not from a config
    full = sum(p.numel() for p in cli.model.parameters())
    assert sum(v.numel() for v in saved["state_dict"].values()) < full / 2

    # validate rebuilds it from the base model plus the saved adapters: the same weights as at the end of fit
    run = main(["validate", *data_args(sample_dir, "gpt2"), *trainer_args(tmp_path / "v"), f"--ckpt_path={ckpt}"])
    for name, value in cli.model.state_dict().items():
        torch.testing.assert_close(run.model.state_dict()[name], value, msg=name)

    moved = tmp_path / "moved"
    base.rename(moved)
    with pytest.raises(ConfigError, match=r"hold only the adapters and the head: loading one needs the base model"):
        main(["validate", *data_args(sample_dir, "gpt2"), *trainer_args(tmp_path / "w"), f"--ckpt_path={ckpt}"])


def test_the_0_5b_decoder_config_runs_offline_with_a_tiny_model_of_its_family(tmp_path, sample_dir):
    """configs/qwen2.5-0.5b-lora.yaml as a user runs it, with a tiny Qwen2 in place of the hub model."""
    import yaml
    from transformers import AutoConfig, AutoModelForSequenceClassification

    spec = yaml.safe_load((CONFIGS / "qwen2.5-0.5b-lora.yaml").read_text())
    assert spec["model"]["model_name_or_path"] == "Qwen/Qwen2.5-0.5B" and spec["model"]["lora_r"]
    tok = load_tokenizer(tokenizer_path(sample_dir, "qwen2"))
    config = AutoConfig.for_model(**{**FAMILIES["qwen2"], "vocab_size": len(tok), "pad_token_id": tok.pad_token_id})
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "tiny-qwen2")
    main(
        [
            "fit",
            f"--config={CONFIGS / 'qwen2.5-0.5b-lora.yaml'}",
            f"--model.model_name_or_path={tmp_path / 'tiny-qwen2'}",
            f"--data.tokenizer={tokenizer_path(sample_dir, 'qwen2')}",
            f"--data.path={sample_dir / 'abstracts.csv'}",
            f"--data.cache_dir={tmp_path / 'cache'}",
            "--data.max_length=32",
            "--trainer.accelerator=cpu",
            "--trainer.precision=32-true",  # this CPU has no fast bf16; the config's bf16 is for GPUs
            "--trainer.fast_dev_run=2",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
        ]
    )


@pytest.mark.slow
def test_resume_with_adapters_is_exact(tmp_path, sample_dir):
    """SIGKILL mid-run, resume from the periodic last.ckpt: the LoRA run ends bit-identical to one never stopped."""
    from test_reliability import TESTS, THREADS, assert_same_run, fit_args, in_process, wait_for

    lora = ["--model.lora_r=4"]
    reference_run = tmp_path / "reference"
    in_process(fit_args(reference_run, sample_dir, *lora))
    reference = torch.load(reference_run / "ckpt" / "last.ckpt", weights_only=True)

    run = tmp_path / "run"
    throttle = {"class_path": "reliability_helpers.Throttle", "init_args": {"seconds": 0.3}}
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": str(THREADS)}
    args = fit_args(run, sample_dir, *lora, f"--trainer.callbacks+={json.dumps(throttle)}")
    process = subprocess.Popen(
        [sys.executable, "-m", "lightning_cls", *args], env=env, stderr=subprocess.PIPE, text=True
    )
    wait_for(run / "ckpt" / "last.ckpt", process)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert torch.load(run / "ckpt" / "last.ckpt", weights_only=True)["global_step"] < reference["global_step"]
    in_process(fit_args(run, sample_dir, *lora, "--ckpt_path=last"))
    assert_same_run(torch.load(run / "ckpt" / "last.ckpt", weights_only=True), reference)


def left_padding_copy(tokenizer: str, folder: Path) -> Path:
    load_tokenizer(tokenizer).save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
    assert load_tokenizer(str(folder)).padding_side == "left"
    return folder


DECODERS = [family for family in FAMILIES if family not in ENCODERS]


@pytest.mark.parametrize(
    "family", [f if f == "llama" else pytest.param(f, marks=pytest.mark.slow) for f in DECODERS]
)  # one family in the fast suite, every decoder family in the slow one
def test_predict_gives_the_same_answers_whichever_side_the_tokenizer_pads(tmp_path, sample_dir, family):
    """A decoder tokenizer that pads on the left (as Llama's and Qwen's may) through `predict`: same probabilities."""
    from lightning_cls.data.sample_data import generate_texts

    right = tokenizer_path(sample_dir, family)
    left = left_padding_copy(right, tmp_path / "left-tokenizer")
    fit_lora(tmp_path / "run", sample_dir, family)
    texts, _ = generate_texts(rows_per_label=1, seed=8)
    texts[0] = texts[0][:20]  # short beside long: a lot of padding in its batch
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")

    def predict(tokenizer) -> list[dict]:
        out = tmp_path / f"predictions-{Path(tokenizer).name}.jsonl"
        main(
            [
                "predict",
                *data_args(sample_dir, "gpt2"),
                f"--data.tokenizer={tokenizer}",
                *trainer_args(tmp_path / "predict"),
                f"--ckpt_path={tmp_path / 'run' / 'ckpt' / 'last.ckpt'}",
                f"--data.predict_path={tmp_path / 'texts.txt'}",
                "--data.eval_batch_size=4",
                "--prediction_writer.top_k=100",
                f"--prediction_writer.output_path={out}",
            ]
        )
        return [json.loads(line) for line in out.read_text().splitlines()]

    for a, b in zip(predict(right), predict(left), strict=True):
        assert a["label"] == b["label"]
        for x, y in zip(a["top_k"], b["top_k"], strict=True):
            assert x["label"] == y["label"] and x["probability"] == pytest.approx(y["probability"], abs=1e-4)


def test_a_first_token_head_refuses_a_left_padding_tokenizer(tmp_path, sample_dir):
    left = left_padding_copy(tokenizer_path(sample_dir, "bert"), tmp_path / "left-wordpiece")
    with pytest.raises(ConfigError, match=r"pads on the left, but this model's head reads a fixed position"):
        TextClassifier("tiny", list(DEFAULT_LABELS), tokenizer=str(left), model_config=FAMILIES["bert"])
    pooled = TextClassifier(  # a pooled head finds its tokens by the mask: fine
        "tiny", list(DEFAULT_LABELS), tokenizer=str(left), model_config=FAMILIES["bert"], pooling="mean"
    )
    assert pooled.model.config.pooling == "mean"
