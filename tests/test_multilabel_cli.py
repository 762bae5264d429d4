"""Multi-label end to end on a tiny model: fit, test, predict and export with label sets; a second file of label
sets joined by id and mapped from arXiv categories to subjects; bad label sets named."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_CONFIGS, tokenizer_for
from test_cli import trainer_args

from lightning_cls.cli import main
from lightning_cls.data.datamodule import ScientificTextDataModule
from lightning_cls.data.labels import DEFAULT_LABELS
from lightning_cls.data.sample_data import generate_texts
from lightning_cls.errors import DataError
from lightning_cls.export.exporter import export
from lightning_cls.export.folder import METADATA_FILE, read_export_metadata
from lightning_cls.model.checkpoints import (
    CALIBRATION_KEY,
    LEXICAL_KEY,
    LEXICAL_WEIGHT_KEY,
    TEMPERATURE_KEY,
    THRESHOLDS_KEY,
)
from lightning_cls.trainer_cli import calibrate

SUBJECTS = sorted(DEFAULT_LABELS)
ARCHIVES = {
    "astrophysics": "astro-ph.GA",
    "computer science": "cs.LG",
    "condensed matter": "cond-mat.str-el",
    "electrical engineering and systems science": "eess.SP",
    "high energy physics phenomenology": "hep-ph",
    "high energy physics theory": "hep-th",
    "mathematics": "math.AG",
    "physics": "physics.optics",
    "quantum physics": "quant-ph",
    "statistics": "stat.ML",
}


@pytest.fixture(scope="module")
def label_sets_csv(tmp_path_factory):
    """Generated abstracts of one subject, and pairs of abstracts of two subjects labelled with both; also the
    same rows as a file of ids and a file of arXiv categories joined by id (as ../shared/data/arxiv has)."""
    texts, labels = generate_texts(rows_per_label=24, seed=1)
    rows = [(t, lab) for t, lab in zip(texts, labels, strict=True) if lab in SUBJECTS]
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(120):
        i, j = rng.choice(len(rows), 2, replace=False)
        if rows[i][1] != rows[j][1]:
            pairs.append((f"{rows[i][0]} {rows[j][0]}", [rows[i][1], rows[j][1]]))
    data = [(t, [lab]) for t, lab in rows] + pairs
    root = tmp_path_factory.mktemp("multilabel")
    frame = pd.DataFrame({"text": [t for t, _ in data], "labels": [", ".join(s) for _, s in data]})
    frame["arxiv_id"] = [f"2501.{i:05d}" for i in range(len(frame))]
    frame.to_csv(root / "sets.csv", index=False)
    frame[["arxiv_id", "text"]].to_csv(root / "abstracts.csv", index=False)
    categories = [" ".join(ARCHIVES[s] for s in labels_) for _, labels_ in data]
    titles = [f"On {labels_[0]}" for _, labels_ in data]
    pd.DataFrame({"arxiv_id": frame["arxiv_id"], "title": titles, "all_categories": categories}).to_csv(
        root / "categories.csv", index=False
    )
    return root


def args(root, sample_dir, tmp_path, *extra):
    return [
        f"--data.path={root / 'sets.csv'}",
        "--data.label_column=labels",
        "--data.multi_label=true",
        "--data.label_separator=,",
        f"--data.tokenizer={tokenizer_for(sample_dir, 'distilbert')}",
        "--data.max_samples=null",
        "--data.max_length=128",  # a pair of abstracts: both must be read
        "--data.batch_size=8",
        *trainer_args(tmp_path),
        *extra,
    ]


@pytest.mark.slow  # about a minute and a half: four runs of the CLI and an export
def test_fit_test_predict_and_export_answer_label_sets(tmp_path, sample_dir, label_sets_csv):
    model = ["--model.model_name_or_path=tiny", f"--model.model_config={json.dumps(TINY_CONFIGS['distilbert'])}"]
    # A tiny random encoder collapses to the label priors under binary cross-entropy within a test's budget; its
    # mean-pooled embeddings with a trained head (bag-of-words-like) learn the generated subjects' words.
    train = [
        "--trainer.max_epochs=6",
        "--model.learning_rate=1e-2",
        "--model.pooling=mean",
        "--model.train_last_n_blocks=0",
        "--early_stopping.patience=10",
    ]
    cli = main(["fit", *args(label_sets_csv, sample_dir, tmp_path, *model, *train)])
    assert cli.model.multi_label and cli.model.model.config.problem_type == "multi_label_classification"
    metrics = cli.trainer.callback_metrics
    assert {"val/f1_micro", "val/f1_macro", "val/subset_acc", "val/hamming_loss", "train/f1_micro"} <= set(metrics)
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    thresholds, temperature = saved[THRESHOLDS_KEY], saved[TEMPERATURE_KEY]
    assert len(thresholds) == 10 and all(0 < t < 1 for t in thresholds)
    assert temperature > 0 and temperature != 1.0  # fitted by the sigmoids' likelihood, before the thresholds

    run = main(["test", *args(label_sets_csv, sample_dir, tmp_path, f"--ckpt_path={last}")])
    assert run.model.thresholds == thresholds and run.model.temperature == temperature  # fitted on validation
    report = json.loads(next((tmp_path / "runs").rglob("test_report.json")).read_text())
    assert {"micro_f1", "macro_f1", "subset_accuracy", "hamming_loss", "cardinality", "mean_label_ece"} <= set(report)
    assert report["micro_f1"] == pytest.approx(float(run.trainer.callback_metrics["test/f1_micro"]), abs=1e-5)
    cardinality = report["cardinality"]["true"]
    tag_everything = 2 * cardinality / (10 + cardinality)  # the micro-F1 of predicting every label
    assert report["micro_f1"] > tag_everything, (report["micro_f1"], tag_everything)  # learnt something
    assert report["per_label"]["physics"]["threshold"] == pytest.approx(thresholds[SUBJECTS.index("physics")])
    assert report["temperature"] == temperature and "mean_label_ece_uncalibrated" in report

    out = tmp_path / "predictions.jsonl"
    main(
        [
            "predict",
            *args(label_sets_csv, sample_dir, tmp_path, f"--ckpt_path={last}"),
            f"--prediction_writer.output_path={out}",
            "--prediction_writer.top_k=10",
        ]
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == report["rows"]
    for row in rows:
        scores = {a["label"]: a["probability"] for a in row["top_k"]}
        assert row["labels"] and row["labels"][0] == row["label"]  # at least one label, the most probable first
        assert row["scores"] == [scores[name] for name in row["labels"]] == sorted(row["scores"], reverse=True)
        passing = {name for name, p in scores.items() if p >= thresholds[SUBJECTS.index(name)]}
        # The set: exactly the labels at or above their thresholds, or the most probable one when none is.
        assert set(row["labels"]) == (passing or {max(scores, key=scores.get)})
    assert 1 <= np.mean([len(r["labels"]) for r in rows]) < 10  # sets, neither every label nor only ever one

    folder = tmp_path / "export"
    export(str(last), str(folder), format="onnx", agreement_texts=16)
    meta = read_export_metadata(folder)
    assert meta.thresholds == thresholds and meta.temperature == temperature
    # A version-2 reader would compare the plain sigmoids with thresholds fitted on the scaled ones: refused instead.
    assert json.loads((folder / METADATA_FILE).read_text())["format_version"] == 3
    # Each variant scored on validation label sets, so that `auto`'s macro-F1 gate can judge it.
    assert meta.inference["fp32"]["agreement"] == 1.0 and meta.inference["fp32"]["texts"] == 16
    assert {"macro_f1", "micro_f1", "accuracy"} <= set(meta.inference["onnx_fp32"])
    assert meta.inference["onnx_fp32"]["macro_f1"] == pytest.approx(meta.inference["fp32"]["macro_f1"], abs=1e-6)
    # The validation scores at those thresholds: the baseline of the service's micro-F1 alerts.
    from lightning_cls.serving.server import validation_micro_f1

    assert meta.calibration["split"] == "validation" and validation_micro_f1(meta) == meta.calibration["micro_f1"] > 0
    # The service, on PyTorch and on ONNX Runtime, answers the label sets `predict` wrote for the same texts.
    texts = pd.read_csv(label_sets_csv / "sets.csv")["text"].to_numpy()[[r["id"] for r in rows[:12]]].tolist()
    for backend in ("torch", "onnx"):
        answers = service_answers(folder, backend, texts)
        for answer, row in zip(answers, rows, strict=False):
            assert answer["labels"] == row["labels"] and answer["label"] == row["label"], backend
            assert answer["scores"] == pytest.approx(row["scores"], abs=1e-5), backend
    # Without the temperature: the plain sigmoids, and the same label sets (the thresholds moved with them).
    for plain, answer in zip(service_answers(folder, "torch", texts, use_temperature=False), answers, strict=True):
        assert plain["labels"] == answer["labels"] and plain["scores"] != pytest.approx(answer["scores"], abs=1e-4)
    assert json.loads((folder / "config.json").read_text())["problem_type"] == "multi_label_classification"
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(folder), top_k=None, truncation=True)
    text = pd.read_csv(label_sets_csv / "sets.csv")["text"].iloc[-1]
    scores = {a["label"]: a["score"] for a in classify([text])[0]}
    # The pipeline applies a sigmoid per label (problem_type), as predict does: the same probabilities.
    ours = export_probabilities(folder, text)
    assert scores == pytest.approx(ours, abs=1e-5)
    assert abs(sum(scores.values()) - 1) > 1e-3  # sigmoids, not a softmax


def service_answers(folder, backend: str, texts: list[str], use_temperature: bool = True) -> list[dict]:
    import queue

    from lightning_cls.export.runtime import InferenceSettings
    from lightning_cls.serving.api import ClassifierAPI

    settings = InferenceSettings(backend=backend, precision="fp32")
    api = ClassifierAPI(str(folder), inference=settings, use_temperature=use_temperature)
    api.set_logger_queue(queue.Queue())
    api.setup("cpu")
    return api.predict((texts, 3))


def export_probabilities(folder, text) -> dict[str, float]:
    from lightning_cls.data.tokenization import load_tokenizer
    from lightning_cls.export.folder import load_classifier

    tokenizer, model = load_tokenizer(str(folder)), load_classifier(folder).eval()
    batch = tokenizer([text], truncation=True, return_tensors="pt")
    with torch.no_grad():
        probs = model(**batch).logits.sigmoid()[0].tolist()
    return dict(zip(SUBJECTS, probs, strict=True))


def test_label_sets_joined_from_a_second_file_and_mapped_to_subjects(tmp_path, sample_dir, label_sets_csv):
    data = ScientificTextDataModule(
        tokenizer=tokenizer_for(sample_dir, "distilbert"),
        path=str(label_sets_csv / "abstracts.csv"),
        labels_path=str(label_sets_csv / "categories.csv"),
        label_column="all_categories",
        multi_label=True,
        arxiv_subjects=True,
        title_column="title",
        max_samples=None,
        cache_dir=str(tmp_path / "cache"),
    )
    plan = data.plan()
    assert plan.names == SUBJECTS
    truth = pd.read_csv(label_sets_csv / "sets.csv")["labels"].str.split(", ")
    np.testing.assert_array_equal(plan.label_ids.sum(1), truth.str.len().to_numpy())  # two labels for the pairs
    assert plan.table["text"].iloc[0].startswith("On ") and " [SEP] " in plan.table["text"].iloc[0]
    # Every label is in every split (iterative stratification), in about its share.
    for name in ("val", "test"):
        assert plan.label_ids[plan.rows[name]].sum(0).min() >= 1
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["labels"].shape == (32, 10) and set(batch["labels"].unique().tolist()) <= {0, 1}


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (["a, b", "", "c"], r"column 'labels' is empty or missing in 1 row\(s\)"),
        (["a, b", "a,,c", "c"], r"sets\.csv: column 'labels' has a malformed label set in 1 row\(s\) \(rows 1;"),
    ],
)
def test_bad_label_sets_are_named_with_file_column_and_rows(tmp_path, sample_dir, labels, message):
    pd.DataFrame({"text": ["one text", "two texts", "three texts"], "labels": labels}).to_csv(
        tmp_path / "sets.csv", index=False
    )
    data = ScientificTextDataModule(
        tokenizer=tokenizer_for(sample_dir, "distilbert"),
        path=str(tmp_path / "sets.csv"),
        label_column="labels",
        label_separator=",",
        multi_label=True,
        min_count=1,
    )
    with pytest.raises(DataError, match=message):
        data.plan()


def test_a_joined_file_missing_ids_is_named(tmp_path, sample_dir, label_sets_csv):
    categories = pd.read_csv(label_sets_csv / "categories.csv", dtype=str).iloc[3:]
    categories.to_csv(tmp_path / "categories.csv", index=False)
    data = ScientificTextDataModule(
        tokenizer=tokenizer_for(sample_dir, "distilbert"),
        path=str(label_sets_csv / "abstracts.csv"),
        labels_path=str(tmp_path / "categories.csv"),
        label_column="all_categories",
        multi_label=True,
        arxiv_subjects=True,
    )
    with pytest.raises(DataError, match=r"categories\.csv has no row for 3 'arxiv_id' value\(s\) .*rows \[0, 1, 2\]"):
        data.plan()


@pytest.mark.slow
def test_the_multilabel_config_runs_with_fast_dev_run(tmp_path, sample_dir, label_sets_csv, monkeypatch):
    """configs/minilm-multilabel.yaml as a user runs it, pointed at the tiny joined files and a tiny model."""
    monkeypatch.setenv("MINILM_DIR", tokenizer_for(sample_dir, "distilbert"))
    cli = main(
        [
            "fit",
            "--config",
            "configs/minilm-multilabel.yaml",
            f"--data.path={label_sets_csv / 'abstracts.csv'}",
            f"--data.labels_path={label_sets_csv / 'categories.csv'}",
            "--data.max_length=64",
            *trainer_args(tmp_path),
            "--trainer.devices=1",
            f"--model.model_config={json.dumps(TINY_CONFIGS['distilbert'])}",
            "--trainer.fast_dev_run=2",
        ]
    )
    assert cli.model.multi_label and cli.model.label_names == SUBJECTS


@pytest.mark.slow  # about 40 s: fit, test, predict and an export
def test_a_fused_lexical_expert_answers_label_sets_alike_in_test_predict_and_the_service(
    tmp_path, sample_dir, label_sets_csv
):
    """`model.lexical` with multi-label data: one binary expert per label, its weight fitted by binary NLL; the
    thresholds are fitted on the fused scores and every path answers the fused label sets."""
    model = ["--model.model_name_or_path=tiny", f"--model.model_config={json.dumps(TINY_CONFIGS['distilbert'])}"]
    train = ["--trainer.max_epochs=2", "--model.pooling=mean", "--model.train_last_n_blocks=0"]
    lexical = ["--model.lexical=true", "--model.lexical_max_features=3000"]
    main(["fit", *args(label_sets_csv, sample_dir, tmp_path, *model, *train, *lexical)])
    last = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint[LEXICAL_KEY]["coef"].shape[0] == 10 and checkpoint[LEXICAL_WEIGHT_KEY] > 0

    # `calibrate` refits the weight, the temperature of the fused logits and the thresholds of a multi-label
    # checkpoint.
    output = f"--output_path={tmp_path / 'calibrated.ckpt'}"
    calibrate([*args(label_sets_csv, sample_dir, tmp_path, f"--ckpt_path={last}"), output])
    calibrated = torch.load(tmp_path / "calibrated.ckpt", weights_only=True)
    assert len(calibrated[THRESHOLDS_KEY]) == 10 and calibrated[LEXICAL_WEIGHT_KEY] > 0
    assert calibrated[TEMPERATURE_KEY] > 0 and calibrated[CALIBRATION_KEY]["temperature"] == calibrated[TEMPERATURE_KEY]
    assert calibrated[CALIBRATION_KEY]["split"] == "validation" and 0 < calibrated[CALIBRATION_KEY]["micro_f1"] <= 1
    run = main(["test", *args(label_sets_csv, sample_dir, tmp_path, f"--ckpt_path={last}")])
    metrics = run.trainer.callback_metrics
    assert {"test/f1_micro_neural", "test/f1_micro_lexical"} <= set(metrics)
    report = json.loads(next((tmp_path / "runs").rglob("test_report.json")).read_text())
    parts = report["components"]
    # The two epochs' tiny network knows little; the expert's words carry the fusion past it.
    assert parts["fused"]["micro_f1"] > parts["neural"]["micro_f1"], parts
    assert report["micro_f1"] == pytest.approx(float(metrics["test/f1_micro"]), abs=1e-5)

    out = tmp_path / "predictions.jsonl"
    predict = ["predict", *args(label_sets_csv, sample_dir, tmp_path, f"--ckpt_path={last}")]
    main([*predict, f"--prediction_writer.output_path={out}", "--prediction_writer.top_k=10"])
    rows = [json.loads(line) for line in out.read_text().splitlines()][:12]
    folder = tmp_path / "export"
    export(str(last), str(folder), format="onnx", agreement_texts=0)
    assert read_export_metadata(folder).lexical["weight"] == pytest.approx(checkpoint[LEXICAL_WEIGHT_KEY])
    texts = pd.read_csv(label_sets_csv / "sets.csv")["text"].to_numpy()[[r["id"] for r in rows]].tolist()
    for backend in ("torch", "onnx"):
        for answer, row in zip(service_answers(folder, backend, texts), rows, strict=True):
            served = {a["label"]: a["probability"] for a in answer["top_k"]}
            written = {a["label"]: a["probability"] for a in row["top_k"]}
            # The service's top 3 labels and their fused probabilities, as `predict` wrote them.
            assert served == pytest.approx({k: written[k] for k in served}, abs=1e-5), backend
            # The same set, unless two of the untrained network's near-equal probabilities tie (the most probable
            # label is the answer when none reaches its threshold).
            top = sorted(written.values(), reverse=True)
            if top[0] - top[1] > 1e-4:
                assert answer["labels"] == row["labels"], (backend, served, written)
