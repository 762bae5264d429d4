import pytest
import torch
from conftest import TINY_CONFIGS, tiny_classifier, tokenizer_for

from lightning_cls.data.labels import DEFAULT_LABELS
from lightning_cls.data.tokenization import PadCollator, load_tokenizer
from lightning_cls.model.classifier import TextClassifier
from lightning_cls.model.finetuning import transformer_blocks


def tiny_model(sample_dir, family, **kwargs) -> TextClassifier:
    return tiny_classifier(tokenizer_for(sample_dir, family), TINY_CONFIGS[family], **kwargs)


def test_logits_do_not_depend_on_padding(sample_dir, family):
    """A text's logits are the same alone and batched with a much longer text (GPT-2 pools the last real token)."""
    model = tiny_model(sample_dir, family)
    tok = load_tokenizer(tokenizer_for(sample_dir, family))
    short, long = "Galaxy redshift survey.", " ".join(["quantum entanglement of photonic qubits"] * 6)
    collate = PadCollator(tok.pad_token_id, pad_to_multiple_of=8)
    examples = [{"input_ids": ids, "row_id": i} for i, ids in enumerate(tok([short, long])["input_ids"])]
    with torch.no_grad():
        alone = model(**{k: v for k, v in collate(examples[:1]).items() if k != "row_id"})
        batched = collate(examples)
        together = model(batched["input_ids"], batched["attention_mask"])
    assert batched["input_ids"].shape[1] >= 4 * len(examples[0]["input_ids"])  # really padded a lot
    torch.testing.assert_close(alone[0], together[0], atol=1e-5, rtol=1e-5)


def test_gpt2_gets_a_pad_token(sample_dir):
    tok = load_tokenizer(tokenizer_for(sample_dir, "gpt2"))
    model = tiny_model(sample_dir, "gpt2")
    assert tok.pad_token == tok.eos_token and model.model.config.pad_token_id == tok.pad_token_id


@pytest.mark.parametrize(("n_blocks", "expected_trainable_blocks"), [(None, {0, 1}), (0, set()), (1, {1})])
def test_train_last_n_blocks(sample_dir, family, n_blocks, expected_trainable_blocks):
    model = tiny_model(sample_dir, family, train_last_n_blocks=n_blocks).model
    prefix, count = transformer_blocks(model)
    assert count == 2
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    blocks = {int(n[len(prefix) + 1 :].split(".")[0]) for n in trainable if n.startswith(prefix + ".")}
    assert blocks == expected_trainable_blocks
    head = "score.weight" if family == "gpt2" else "classifier.weight"
    assert head in trainable
    embeddings_trained = any("embed" in n or "wte" in n for n in trainable)
    assert embeddings_trained == (n_blocks is None)


def test_train_last_n_blocks_out_of_range(sample_dir):
    with pytest.raises(ValueError, match="has 2 transformer blocks"):
        tiny_model(sample_dir, "distilbert", train_last_n_blocks=3)


def test_no_weight_decay_on_biases_and_layernorm(sample_dir):
    model = tiny_model(sample_dir, "distilbert", train_last_n_blocks=1)
    model.trainer = type("T", (), {"estimated_stepping_batches": 100})()
    optimizer = model.configure_optimizers()["optimizer"]
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(decayed["params"]) + len(plain["params"]) == n_trainable < len(list(model.parameters()))


def test_predict_step_returns_names_and_probabilities(sample_dir):
    model = tiny_model(sample_dir, "distilbert")
    batch = {
        "input_ids": torch.tensor([[2, 50, 60, 3]]),
        "attention_mask": torch.ones(1, 4, dtype=torch.long),
        "row_id": torch.tensor([7]),
    }
    out = model.predict_step(batch, 0)
    assert out["row_id"] == [7] and out["label"][0] in DEFAULT_LABELS
    assert out["probs"].shape == (1, 10)
    torch.testing.assert_close(out["probs"].sum(-1), torch.ones(1))


def test_pretrained_model_starts_in_train_mode(sample_dir, tmp_path):
    """from_pretrained returns eval mode; fine-tuning with dropout off would silently change training."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model(**TINY_CONFIGS["distilbert"], vocab_size=400)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "pretrained")
    model = TextClassifier(str(tmp_path / "pretrained"), list(DEFAULT_LABELS), tokenizer_for(sample_dir, "distilbert"))
    assert all(m.training for m in model.model.modules())
