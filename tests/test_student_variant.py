"""The distilled student as a variant of the export (`export --student_ckpt`): measured beside the other variants,
judged by the same gate against the model's fp32, and answering for the folder when `auto` takes it."""

import json

import pytest
import torch

from lightning_cls.errors import ExportError
from lightning_cls.export.answer import ExportedModel
from lightning_cls.export.exporter import export
from lightning_cls.export.folder import METADATA_FILE, STUDENT_DIR, read_export_metadata
from lightning_cls.export.runtime import InferenceSettings, choose
from lightning_cls.hardware import detect_hardware
from lightning_cls.lifecycle.distill import distill


def record(student_f1: float, student_speed: float = 30.0) -> dict:
    fp32 = {"device": "cpu", "agreement": 1.0, "texts": 100, "texts_per_s": 10.0, "macro_f1": 0.80}
    student = {"device": "cpu", "agreement": 0.97, "texts": 100, "texts_per_s": student_speed, "macro_f1": student_f1}
    return {"fp32": fp32, "student": student}


def test_auto_takes_the_student_only_where_it_passes_the_gate_and_is_faster(tmp_path):
    hardware = detect_hardware("cpu")
    settings = InferenceSettings(precision="auto", backend="torch")
    # No student folder: not considered, whatever the record says.
    choice = choose(settings, hardware, record(0.80), tmp_path, students=True)
    assert not choice.student and "no student/" in choice.verdicts["student"]
    (tmp_path / STUDENT_DIR).mkdir()
    (tmp_path / STUDENT_DIR / METADATA_FILE).write_text("{}")
    choice = choose(settings, hardware, record(0.798), tmp_path, students=True)
    assert choice.student and choice.variant == "student" and (choice.backend, choice.precision) == ("torch", "fp32")
    assert "student" in choice.reason and choice.verdicts["student"].startswith("taken; passes")
    assert not choose(settings, hardware, record(0.798), tmp_path).student  # a Runner never switches folders
    refused = choose(settings, hardware, record(0.78), tmp_path, students=True)  # 2 points below fp32's
    assert not refused.student and refused.verdicts["student"].startswith("refused")
    slow = choose(settings, hardware, record(0.80, student_speed=10.5), tmp_path, students=True)  # < 1.1x fp32
    assert not slow.student
    explicit = choose(InferenceSettings(precision="fp32"), hardware, record(0.80), tmp_path, students=True)
    assert not explicit.student


@pytest.mark.slow  # about 20 s: a distillation and two exports
def test_the_student_exported_beside_its_teacher_is_measured_and_answers_when_taken(trained, tmp_path):
    teacher = trained("distilbert") / "ckpt" / "last.ckpt"
    student = distill(str(teacher), str(tmp_path / "student.ckpt"), texts=40, epochs=1, batch_size=8)
    folder = export(str(teacher), str(tmp_path / "export"), agreement_texts=12, student_ckpt=str(student))
    meta = read_export_metadata(folder)
    measured = meta.inference["student"]
    assert measured["texts"] == 12 and measured["folder"] == STUDENT_DIR and 0 <= measured["agreement"] <= 1
    assert {"macro_f1", "texts_per_s", "max_prob_diff"} <= set(measured)
    assert (folder / STUDENT_DIR).stat().st_mode & 0o055 == 0o055  # readable by a server under another user
    texts = ["A survey of quantum error correction codes.", "Deep networks for image segmentation."]
    own = ExportedModel.load(folder / STUDENT_DIR).answer(texts)

    def rewrite(student_f1: float) -> None:
        data = json.loads((folder / METADATA_FILE).read_text())
        data["inference"] = {**record(student_f1), "bf16": {"skipped": "test"}, "fp16": {"skipped": "test"}}
        (folder / METADATA_FILE).write_text(json.dumps(data))

    rewrite(0.80)  # the student keeps the accuracy and is three times faster: `auto` answers with it
    taken = ExportedModel.load(folder, InferenceSettings(precision="auto"))
    assert taken.model_dir == folder / STUDENT_DIR and taken.runner.choice.student
    assert "the distilled student in" in taken.runner.describe() and "auto" in taken.runner.describe()
    torch.testing.assert_close(taken.answer(texts).probs, own.probs)
    rewrite(0.70)  # it loses ten points: the model itself answers
    assert ExportedModel.load(folder, InferenceSettings(precision="auto")).model_dir == folder

    other = trained("distilbert", "--data.labels=[physics,mathematics,statistics]") / "ckpt" / "last.ckpt"
    with pytest.raises(ExportError, match=r"student.*physics.*distill it from this teacher"):
        export(str(teacher), str(tmp_path / "mismatch"), agreement_texts=0, student_ckpt=str(other))
