"""A one-label model scored as a tagger (`data.subjects_path`): its answer is right when it is any of the paper's
subjects, read from a second file of arXiv categories joined by id."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_CONFIGS, tokenizer_for
from test_cli import trainer_args
from test_multilabel_cli import ARCHIVES

from lightning_cls.cli import main
from lightning_cls.data.labels import DEFAULT_LABELS
from lightning_cls.data.paper_subjects import read_paper_subjects
from lightning_cls.errors import DataError

NAMES = sorted(DEFAULT_LABELS)


def files(tmp_path, categories):
    data = pd.DataFrame(
        {
            "arxiv_id": ["2501.00001", "2501.00002", "2501.00003"],
            "text": ["an abstract", "another abstract", "a third abstract"],
            "label": ["mathematics", "computer science", "statistics"],
        }
    )
    data.to_csv(tmp_path / "data.csv", index=False)
    pd.DataFrame({"arxiv_id": data["arxiv_id"][::-1], "all_categories": categories[::-1]}).to_csv(
        tmp_path / "categories.csv", index=False
    )
    return str(tmp_path / "data.csv"), str(tmp_path / "categories.csv")


def test_each_row_gets_its_papers_subjects_and_its_own_label(tmp_path):
    # Row 0: a cross-list and an MSC class spilled into the categories (left out); row 1: its own subject is not
    # among its categories (added: the primary subject is one of the paper's); row 2: a category of no kept subject.
    data, categories = files(tmp_path, ["math.NT cs.LG 11N35", "stat.ML", "stat.ME nlin.CD"])
    got = read_paper_subjects(data, "text", "label", categories, "arxiv_id", "all_categories", NAMES)
    want = [
        {"mathematics", "computer science"},
        {"statistics", "computer science"},
        {"statistics"},
    ]
    assert [{NAMES[j] for j in np.flatnonzero(row)} for row in got] == want


def test_a_missing_file_key_or_value_is_named(tmp_path):
    data, categories = files(tmp_path, ["math.NT", "", "stat.ML"])
    with pytest.raises(DataError, match=r"all_categories"):
        read_paper_subjects(data, "text", "label", categories, "arxiv_id", "all_categories", NAMES)
    with pytest.raises(DataError, match=r"nowhere.csv \(data.subjects_path\) does not exist"):
        read_paper_subjects(data, "text", "label", str(tmp_path / "nowhere.csv"), "arxiv_id", "all_categories", NAMES)
    pd.DataFrame({"arxiv_id": ["2501.00001"], "all_categories": ["math.NT"]}).to_csv(categories, index=False)
    with pytest.raises(DataError, match=r"categories.csv"):
        read_paper_subjects(data, "text", "label", categories, "arxiv_id", "all_categories", NAMES)


@pytest.mark.parametrize("every_subject", [True, False])
def test_the_test_report_scores_the_top_label_against_the_papers_subjects(tmp_path, sample_dir, every_subject):
    """An untrained tiny model: where every paper has every subject its top label is always one of them (1.0, far
    above its accuracy); where each has only its own, the share is its accuracy."""
    frame = pd.read_csv(sample_dir / "abstracts.csv")
    frame["arxiv_id"] = [f"2501.{i:05d}" for i in range(len(frame))]
    frame.to_csv(tmp_path / "abstracts.csv", index=False)
    categories = [" ".join(ARCHIVES.values()) if every_subject else ARCHIVES.get(label) for label in frame["label"]]
    frame = frame[[c is not None for c in categories]]  # the sample's rare rows: not one of the ten subjects
    frame.to_csv(tmp_path / "abstracts.csv", index=False)
    categories = [c for c in categories if c is not None]
    pd.DataFrame({"arxiv_id": frame["arxiv_id"], "all_categories": categories}).to_csv(
        tmp_path / "categories.csv", index=False
    )
    run = main(
        [
            "test",
            f"--data.path={tmp_path / 'abstracts.csv'}",
            f"--data.subjects_path={tmp_path / 'categories.csv'}",
            f"--data.tokenizer={tokenizer_for(sample_dir, 'distilbert')}",
            "--data.max_samples=null",
            "--data.max_length=32",
            "--data.batch_size=8",
            *trainer_args(tmp_path),
            "--model.model_name_or_path=tiny",
            f"--model.model_config={json.dumps(TINY_CONFIGS['distilbert'])}",
        ]
    )
    report = json.loads(next((tmp_path / "runs").rglob("test_report.json")).read_text())
    logged = float(run.trainer.callback_metrics["test/top_in_set"])
    assert report["top_label_in_set"] == pytest.approx(logged, abs=1e-6)
    if every_subject:
        assert report["top_label_in_set"] == 1.0 > report["accuracy"]
    else:
        assert report["top_label_in_set"] == pytest.approx(report["accuracy"], abs=1e-6)
    assert "top label one of the paper's subjects" in next((tmp_path / "runs").rglob("test_report.txt")).read_text()
