"""The student (`lifecycle.distill`): half the teacher's layers, initialised from them, trained on the teacher's
probabilities; a checkpoint that exports, loads, serves and predicts like any other."""

from __future__ import annotations

import copy
import queue

import pytest
import torch

from lightning_cls.data.sample_data import generate_texts
from lightning_cls.errors import ExportError
from lightning_cls.export.exporter import export
from lightning_cls.export.folder import read_export_metadata
from lightning_cls.export.runtime import InferenceSettings, Runner
from lightning_cls.lifecycle.distill import DISTILLED_KEY, distill, evenly_spaced, student_checkpoint
from lightning_cls.lifecycle.distillation import DistillationModule
from lightning_cls.model.classifier import TextClassifier


def test_layers_kept_are_evenly_spaced_and_end_with_the_last():
    assert evenly_spaced(6, 3) == [1, 3, 5] and evenly_spaced(12, 6) == [1, 3, 5, 7, 9, 11]
    assert evenly_spaced(6, 2) == [2, 5] and evenly_spaced(2, 1) == [1] and evenly_spaced(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ExportError, match="--layers must be between 1 and the teacher's 6 layers"):
        evenly_spaced(6, 7)


def test_options_out_of_range_are_named_together_before_anything_is_read(tmp_path):
    with pytest.raises(
        ExportError, match=r"^--epochs must be at least 1, got 0; --temperature must be positive, got 0"
    ):
        distill(str(tmp_path / "missing.ckpt"), str(tmp_path / "student.ckpt"), epochs=0, temperature=0.0)


class _BagOfEmbeddings(torch.nn.Module):
    """A stand-in classifier: forward(input_ids, attention_mask) -> logits (B, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(20, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return (self.embedding(input_ids) * attention_mask[..., None]).sum(1)


def test_the_teacher_answers_once_and_the_steps_read_its_logits_by_row_id():
    torch.manual_seed(0)
    teacher = _BagOfEmbeddings()
    module = DistillationModule(copy.deepcopy(teacher), teacher, temperature=2.0)
    # Batches come in any order: their row ids say which texts they hold.
    batches = [
        {
            "input_ids": torch.tensor([[1, 2, 3], [4, 5, 0]]),
            "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
            "row_id": torch.tensor([2, 0]),
        },
        {
            "input_ids": torch.tensor([[6, 7, 8]]),
            "attention_mask": torch.tensor([[1, 1, 1]]),
            "row_id": torch.tensor([1]),
        },
    ]
    module.keep_teacher_logits([module.predict_step(batch, i) for i, batch in enumerate(batches)])
    assert module.teacher is None and module.teacher_logits.shape == (3, 3)
    for batch in batches:  # a student equal to its teacher diverges by nothing from it
        assert module.training_step(batch, 0).abs() < 1e-6
    swapped = module.training_step({**batches[0], "row_id": torch.tensor([0, 2])}, 0)  # the other text's targets
    assert swapped > 1e-3 and swapped.requires_grad


def test_the_student_checkpoint_holds_the_kept_layers_renumbered(trained):
    checkpoint = torch.load(trained("distilbert") / "ckpt" / "last.ckpt", weights_only=True)
    student, keep = student_checkpoint(checkpoint, None)
    assert keep == [1] and student["hyper_parameters"]["model_config"]["n_layers"] == 1
    teacher_state = checkpoint["state_dict"]
    for key, value in student["state_dict"].items():
        source = key.replace(".layer.0.", ".layer.1.")  # the student's layer 0 is the teacher's layer 1
        assert torch.equal(value, teacher_state[source]), key
    assert not any(".layer.1." in key for key in student["state_dict"])
    assert "optimizer_states" not in student and "lightning_cls_temperature" not in student


@pytest.mark.slow  # about a minute: distils, exports with ONNX and int8, measures, serves
def test_a_student_trains_on_the_teacher_and_exports_loads_serves_and_predicts(trained, tmp_path):
    from lightning_cls.serving.api import ClassifierAPI

    # The tiny trained model answers nearly uniformly, and its first layer barely matters: a sharper head and a
    # first layer that does give the student (its second layer alone) something to learn.
    checkpoint = torch.load(trained("distilbert") / "ckpt" / "last.ckpt", weights_only=True)
    for key in checkpoint["state_dict"]:
        if key.endswith("classifier.weight") or ".layer.0.ffn.lin2." in key:
            checkpoint["state_dict"][key] = checkpoint["state_dict"][key] * 50
    teacher = tmp_path / "teacher.ckpt"
    torch.save(checkpoint, teacher)
    out = distill(str(teacher), str(tmp_path / "student.ckpt"), texts=60, epochs=2, batch_size=8, learning_rate=1e-3)
    record = torch.load(out, weights_only=True)[DISTILLED_KEY]
    assert record["layers_kept"] == [1] and record["texts"] == 60
    assert record["kl_after"] < record["kl_before"]  # it learned the teacher's probabilities
    model = TextClassifier.load_from_checkpoint(out, map_location="cpu", weights_only=True)
    assert len(model.model.distilbert.transformer.layer) == 1

    folder = export(str(out), str(tmp_path / "export"), format="onnx", quantize="int8", agreement_texts=10)
    meta = read_export_metadata(folder)
    assert meta.inference["fp32"]["texts"] == 10 and "macro_f1" in meta.inference["onnx_int8"]
    texts, _ = generate_texts(rows_per_label=1, seed=4)
    runner = Runner(folder, InferenceSettings(backend="auto"))
    logits = runner.logits(runner.tokenizer(texts, truncation=True, max_length=64)["input_ids"])
    assert logits.shape == (len(texts), len(meta.labels)) and torch.isfinite(logits).all()
    api = ClassifierAPI(str(folder), max_batch_size=4, inference=InferenceSettings(backend="auto"))
    api.set_logger_queue(queue.Queue())
    api.setup("cpu")
    answers = api.predict((texts, 2))
    assert [a["label"] for a in answers] == [meta.labels[i] for i in logits.argmax(-1).tolist()]


def test_distill_is_a_subcommand(capsys):
    from lightning_cls.cli import main

    with pytest.raises(SystemExit) as done:
        main(["distill", "--help"])
    assert done.value.code == 0 and "python -m lightning_cls distill" in capsys.readouterr().out
