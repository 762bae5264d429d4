"""The lexical expert fused with the network (`model.lexical`): fitting, storage without pickles, and one answer
through test, predict, the exported folder (PyTorch and ONNX Runtime) and the service."""

import json
import pickle
import queue
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_cli import data_args, trainer_args

from lightning_cls.cli import main
from lightning_cls.data.sample_data import generate_texts
from lightning_cls.errors import ConfigError, InputError
from lightning_cls.export.exporter import export
from lightning_cls.export.folder import METADATA_FILE, read_export_metadata
from lightning_cls.export.runtime import InferenceSettings
from lightning_cls.model.checkpoints import LEXICAL_KEY, LEXICAL_WEIGHT_KEY
from lightning_cls.model.fusion import FolderFusion, SplitScores, fit_fusion_weight, fuse
from lightning_cls.model.lexical import LEXICAL_FILE, LexicalExpert, LexicalSettings

LEXICAL_ARGS = ("--model.lexical=true", "--model.lexical_max_features=2000")


def small_expert() -> tuple[LexicalExpert, list[str], np.ndarray]:
    texts, labels = generate_texts(rows_per_label=12, seed=3)
    names = sorted(set(labels))  # the ten subjects and a few rare ones
    ids = np.array([names.index(label) for label in labels])
    return LexicalExpert.fit(texts, ids, len(names), LexicalSettings(max_features=500, min_df=1)), texts, ids


# ------------------------------------------------------------------------------------------------ pure parts
def test_the_expert_learns_and_its_arrays_give_the_same_scores_from_a_checkpoint_entry_and_a_file(tmp_path):
    expert, texts, ids = small_expert()
    scores = expert.scores(texts)
    assert scores.shape == (len(texts), expert.num_labels) and scores.dtype == np.float32
    assert (scores.argmax(1) == ids).mean() > 0.9  # generated subjects have their own words
    state = expert.state()
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # nothing that needs unpickling
    np.testing.assert_allclose(LexicalExpert.from_state(state).scores(texts), scores, rtol=0, atol=1e-6)
    names = [f"label {i}" for i in range(expert.num_labels)]
    record = expert.save(tmp_path, names)
    assert record["file"] == LEXICAL_FILE and len(record["sha256"]) == 64 and record["features"] == len(expert.idf)
    np.testing.assert_allclose(LexicalExpert.load(tmp_path, record, names).scores(texts), scores, rtol=0, atol=1e-6)


def test_the_fusion_weight_follows_what_the_expert_knows():
    torch.manual_seed(0)
    labels = torch.randint(0, 5, (2000,))
    onehot = torch.nn.functional.one_hot(labels, 5).float()
    neural = 1.5 * onehot + torch.randn(2000, 5)  # a fair network
    informative = 3.0 * onehot + torch.randn(2000, 5)  # an expert that knows more
    useless = torch.randn(2000, 5)
    weight = fit_fusion_weight(neural, informative, labels)
    assert weight > 1.0  # an expert twice as sharp weighs more than the network
    fused = fuse(neural, informative, weight).argmax(-1)
    assert (fused == labels).float().mean() > (neural.argmax(-1) == labels).float().mean() + 0.05
    assert fit_fusion_weight(neural, useless, labels) < 0.1


def test_a_multi_label_expert_scores_each_label_on_its_own_and_its_weight_is_fitted_by_binary_nll():
    texts, labels = generate_texts(rows_per_label=12, seed=3)
    names = sorted(set(labels))
    # Pairs of texts carry both their labels: a multi-hot matrix.
    rng = np.random.default_rng(0)
    pairs = [rng.choice(len(texts), 2, replace=False) for _ in range(300)]
    joined = [f"{texts[i]} {texts[j]}" for i, j in pairs]
    y = np.zeros((len(pairs), len(names)), dtype=np.int64)
    for row, (i, j) in enumerate(pairs):
        y[row, [names.index(labels[i]), names.index(labels[j])]] = 1
    y[:, y.sum(0) == 0] = 0
    kept = [k for k in range(len(names)) if 0 < y[:, k].sum() < len(y)]
    y = y[:, kept]
    expert = LexicalExpert.fit(joined, y, len(kept), LexicalSettings(max_features=2000, min_df=1))
    scores = expert.scores(joined)
    assert scores.shape == y.shape
    # Each label's own sigmoid: texts of two subjects get both (a softmax could not give two labels > 0.5).
    assert ((scores > 0).astype(int) == y).mean() > 0.95
    assert ((scores > 0).sum(1) >= 2).mean() > 0.5
    np.testing.assert_allclose(LexicalExpert.from_state(expert.state()).scores(joined), scores, rtol=0, atol=1e-6)
    every = y.copy()
    every[:, 1] = 1  # a label every text has: nothing to learn it from
    with pytest.raises(ConfigError, match=r"every text or none of the label ids \[1\]"):
        LexicalExpert.fit(joined, every, len(kept), LexicalSettings(max_features=500, min_df=1))

    torch.manual_seed(0)
    truth = torch.from_numpy(y[:, :5]).repeat(7, 1)
    neural = 1.5 * (2 * truth.float() - 1) + torch.randn(truth.shape)
    informative = 3.0 * (2 * truth.float() - 1) + torch.randn(truth.shape)
    assert fit_fusion_weight(neural, informative, truth) > 1.0
    assert fit_fusion_weight(neural, torch.randn(truth.shape), truth) < 0.1


def test_split_scores_are_looked_up_by_row_id_and_unknown_ids_are_named():
    scores = SplitScores(np.array([7, 3, 5]), np.arange(6, dtype=np.float32).reshape(3, 2))
    torch.testing.assert_close(scores[torch.tensor([3, 7, 3])], torch.tensor([[2.0, 3.0], [0.0, 1.0], [2.0, 3.0]]))
    with pytest.raises(KeyError, match=r"row ids \[4\]"):
        scores[torch.tensor([3, 4])]


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def fused_run(trained):
    return trained("distilbert", *LEXICAL_ARGS)


@pytest.fixture(scope="module")
def fused_export(fused_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("fused") / "export"
    export(str(fused_run / "ckpt" / "last.ckpt"), str(out), format="onnx", agreement_texts=0)
    return out


def test_fit_stores_the_expert_and_its_weight_and_test_reports_all_three(tmp_path, sample_dir, fused_run):
    ckpt = fused_run / "ckpt" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)  # the expert is tensors: the weights-only loader reads it
    assert set(checkpoint[LEXICAL_KEY]) == {"vocabulary", "idf", "coef", "intercept"}
    weight = checkpoint[LEXICAL_WEIGHT_KEY]
    assert isinstance(weight, float) and weight > 0
    run = main(["test", *data_args(sample_dir, "distilbert"), *trainer_args(tmp_path), f"--ckpt_path={ckpt}"])
    metrics = run.trainer.callback_metrics
    assert {"test/f1_macro", "test/f1_macro_neural", "test/f1_macro_lexical"} <= set(metrics)
    report = json.loads(next((tmp_path / "runs").rglob("test_report.json")).read_text())
    parts = report["components"]
    assert parts["lexical_weight"] == weight
    assert parts["fused"]["macro_f1"] == pytest.approx(float(metrics["test/f1_macro"]), abs=1e-4)
    assert parts["neural"]["macro_f1"] == pytest.approx(float(metrics["test/f1_macro_neural"]), abs=1e-4)
    assert "fusion: neural logits +" in next((tmp_path / "runs").rglob("test_report.txt")).read_text()

    # `predict` on the same split answers with the same fused labels: its accuracy is test's.
    predicted = main(["predict", *data_args(sample_dir, "distilbert"), *trainer_args(tmp_path), f"--ckpt_path={ckpt}"])
    table = pd.read_csv(Path(predicted.trainer.log_dir) / "predictions.csv")
    truth = pd.read_csv(sample_dir / "abstracts.csv")["label"].to_numpy()[table["id"].to_numpy()]
    assert (table["label"].to_numpy() == truth).mean() == pytest.approx(float(metrics["test/acc"]), abs=1e-6)


def test_predict_the_export_the_onnx_path_and_the_service_give_one_fused_answer(
    tmp_path, sample_dir, fused_run, fused_export
):
    from lightning_cls.serving.api import ClassifierAPI

    texts, _ = generate_texts(rows_per_label=2, seed=11)
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(texts) + "\n")
    out = tmp_path / "predictions.jsonl"
    ckpt = fused_run / "ckpt" / "last.ckpt"
    main(
        [
            "predict",
            *data_args(sample_dir, "distilbert"),
            *trainer_args(tmp_path),
            f"--ckpt_path={ckpt}",
            f"--data.predict_path={path}",
            "--prediction_writer.top_k=100",
            f"--prediction_writer.output_path={out}",
        ]
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    want = [{a["label"]: a["probability"] for a in row["top_k"]} for row in rows]

    metadata = read_export_metadata(fused_export)
    assert metadata.lexical["weight"] == torch.load(ckpt, weights_only=True)[LEXICAL_WEIGHT_KEY]
    assert json.loads((fused_export / METADATA_FILE).read_text())["format_version"] == 2
    for backend in ("torch", "onnx"):
        api = ClassifierAPI(
            str(fused_export),
            inference=InferenceSettings(backend=backend, precision="fp32"),
            temperature=metadata.temperature,
        )
        api.set_logger_queue(queue.Queue())
        api.setup("cpu")
        answers = api.predict((texts, 10))
        for answer, row, expected in zip(answers, rows, want, strict=True):
            assert answer["label"] == row["label"], backend
            got = {a["label"]: a["probability"] for a in answer["top_k"]}
            assert got == pytest.approx(expected, abs=1e-5), backend
    # The fusion matters: the network alone (what transformers.pipeline runs) answers otherwise.
    api.models.champion.model.fusion = None
    alone = api.predict((texts, 10))
    assert max(abs(a["probability"] - b["probability"]) for a, b in zip(alone, answers, strict=True)) > 1e-3


def test_predict_writes_the_same_lexical_evidence_as_the_export_answers_with(
    tmp_path, sample_dir, fused_run, fused_export, trained, monkeypatch
):
    """`--prediction_writer.explain lexical`: each row's evidence for the labels it shows is what POST /predict's
    "explain" gives for the checkpoint's export (one function, `model.lexical_evidence`); without an expert, one line
    naming the option."""
    from test_errors import command_line_error

    from lightning_cls.export.answer import ExportedModel
    from lightning_cls.export.explain import explain

    texts, _ = generate_texts(rows_per_label=1, seed=13)
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(texts) + "\n")
    args = [*data_args(sample_dir, "distilbert"), *trainer_args(tmp_path), f"--data.predict_path={path}"]
    args += ["--prediction_writer.explain=lexical", "--prediction_writer.top_k=2"]
    ckpt = fused_run / "ckpt" / "last.ckpt"
    jsonl, csv = tmp_path / "p.jsonl", tmp_path / "p.csv"
    for out in (jsonl, csv):
        main(["predict", *args, f"--ckpt_path={ckpt}", f"--prediction_writer.output_path={out}"])
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    model = ExportedModel.load(fused_export)
    shown = [[model.names.index(t["label"]) for t in row["top_k"]] for row in rows]
    assert [row["evidence"] for row in rows] == explain(model, texts, shown, {"lexical"})
    assert all(list(row["evidence"]) == [t["label"] for t in row["top_k"]] for row in rows)
    assert sum(len(e["lexical"]) for row in rows for e in row["evidence"].values()) > len(rows)  # not all empty
    table = pd.read_csv(csv)
    assert [json.loads(e) for e in table["evidence"]] == [row["evidence"] for row in rows]

    plain = trained("distilbert") / "ckpt" / "last.ckpt"
    out = tmp_path / "plain.csv"
    message = command_line_error(
        monkeypatch, ["predict", *args, f"--ckpt_path={plain}", f"--prediction_writer.output_path={out}"]
    )
    assert "--prediction_writer.explain lexical" in message and "no lexical expert" in message
    assert not out.exists() and not list(tmp_path.glob(".plain.csv*"))  # nothing half-written left behind


def copy_export(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    return copy


def test_a_missing_truncated_or_foreign_lexical_file_is_refused_in_one_line(tmp_path, fused_export):
    folder = copy_export(fused_export, tmp_path)
    lexical = folder / LEXICAL_FILE
    original = lexical.read_bytes()

    lexical.unlink()
    with pytest.raises(InputError, match=rf"{LEXICAL_FILE} is missing"):
        FolderFusion.from_folder(folder, read_export_metadata(folder))
    lexical.write_bytes(original[: len(original) // 2])
    with pytest.raises(InputError, match=r"is not the lexical expert this export wrote .*truncated"):
        FolderFusion.from_folder(folder, read_export_metadata(folder))
    expert, _, _ = small_expert()  # another export's expert: a valid file, of other contents
    expert.save(folder, read_export_metadata(folder).labels)
    with pytest.raises(InputError, match=r"SHA-256 differs"):
        FolderFusion.from_folder(folder, read_export_metadata(folder))


class _Planted:
    """Unpickling this writes a marker file: what a loader that unpickles would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def test_a_planted_pickle_is_never_loaded(tmp_path, fused_export):
    from lightning_cls.serving.api import ClassifierAPI

    folder = copy_export(fused_export, tmp_path)
    marker = tmp_path / "marker"
    payload = pickle.dumps(_Planted(marker))
    for name in ("lexical.pkl", "lexical.joblib", "pytorch_model.bin", "training_args.bin"):
        (folder / name).write_bytes(payload)
    api = ClassifierAPI(str(folder))  # the folder loads and answers, fused
    api.set_logger_queue(queue.Queue())
    api.setup("cpu")
    assert api.models.champion.model.fusion is not None and api.predict((["galaxies and stars"], 1))[0]["label"]
    assert not marker.exists()

    # A pickle in the lexical file's place, its SHA-256 recorded as if it were the export's: refused, not unpickled.
    (folder / LEXICAL_FILE).write_bytes(payload)
    meta = json.loads((folder / METADATA_FILE).read_text())
    from lightning_cls.model.lexical import sha256

    meta["lexical"]["sha256"] = sha256(folder / LEXICAL_FILE)
    (folder / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"cannot be read as a lexical expert"):
        FolderFusion.from_folder(folder, read_export_metadata(folder))
    assert not marker.exists()


def test_calibrate_adds_an_expert_and_its_weight_to_a_checkpoint_that_has_none(tmp_path, sample_dir, trained, capsys):
    """What the whole-data experiments do: a network trained without `model.lexical` gets one afterwards."""
    ckpt = trained("distilbert") / "ckpt" / "last.ckpt"
    assert LEXICAL_KEY not in torch.load(ckpt, weights_only=True)
    args = [*data_args(sample_dir, "distilbert"), *trainer_args(tmp_path), f"--ckpt_path={ckpt}"]
    out = main(["calibrate", *args, *LEXICAL_ARGS, f"--output_path={tmp_path / 'fused.ckpt'}"])
    written = torch.load(out, weights_only=True)
    assert written[LEXICAL_WEIGHT_KEY] > 0 and len(written[LEXICAL_KEY]["idf"]) <= 2000
    assert "lexical weight" in capsys.readouterr().out
    # Validating it reports the fused score with the neural and lexical ones beside it.
    run = main(["validate", *args[:-1], f"--ckpt_path={out}"])
    assert {"val/f1_macro_neural", "val/f1_macro_lexical"} <= set(run.trainer.callback_metrics)
