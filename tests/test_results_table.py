"""scripts/results_table.py: rows from each recorded file kind, the stable CSV, the tables and the README refresh.

Every run folder here is made up in tmp_path: a few numbers in the shape `test`, `calibrate`, run.sh and
scripts/tfidf_baseline.py write them; no data, no model.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import results_table as rt

MINILM = {"model_name_or_path": "${oc.env:MINILM_DIR}", "pretrained": True}


def write(folder: Path, name: str, content) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content))
    return path


def config(data: dict, model: dict | None = None) -> str:
    import yaml

    return yaml.safe_dump({"data": data, **({"model": model} if model is not None else {})})


def single_run(root: Path, name="net", split_by=None, max_samples=None, macro=0.81) -> Path:
    run = root / name
    data = {"labels": None, "max_samples": max_samples, **({"split_by": split_by} if split_by else {})}
    write(run, "config.yaml", config(data, MINILM))
    ckpt = f"runs/experiments/{name}/checkpoints/epoch00-step400-f10.7956.ckpt"
    report = {"checkpoint": ckpt, "rows": 1997, "accuracy": 0.82, "macro_f1": macro, "top_label_in_set": 0.93}
    write(run, "test_report.json", report)
    write(run, "timing.json", {"fit_cpu_seconds": 573, "cpu": "AMD EPYC", "date": "2026-11-26T19:21:10Z"})
    return run


def tfidf_run(root: Path, name="tfidf", multi=False) -> Path:
    run = root / name
    data = {"multi_label": True, "label_column": "all_categories"} if multi else {"labels": None}
    write(run, "config.yaml", config(data))
    base = {"split_sizes": {"train": 80, "val": 10, "test": 10}, "cpu_seconds": 90.0, "machine": "EPYC"}
    if multi:
        scores = {"test_f1_micro": 0.8226, "test_f1_macro": 0.828, "test_hamming_loss": 0.0489, "val_f1_micro": 0.8246}
    else:
        scores = {"test_acc": 0.8673, "test_f1_macro": 0.867, "val_f1_macro": 0.8675, "test_top_label_in_set": 0.929}
    write(run, "metrics.json", {**base, **scores, "date": "2026-11-30", "per_class": {}})
    return run


def by(rows, model, metric):
    (row,) = [r for r in rows if r["model"] == model and r["metric"] == metric]
    return row


# ------------------------------------------------------------------------------------------------ rows_of
def test_rows_of_a_fine_tuned_run(tmp_path):
    rows = rt.rows_of(single_run(tmp_path, max_samples=20000), note=pytest.fail)
    row = by(rows, "minilm", "macro_f1")
    assert row["value"] == 0.81 and row["task"] == "primary_subject" and row["split"] == "random_20000"
    assert row["cpu_minutes"] == 9.55 and row["date"] == "2026-11-26" and row["cpu"] == "AMD EPYC"
    assert row["source"] == "net/test_report.json"
    assert by(rows, "minilm", "val_macro_f1")["value"] == 0.7956  # the tested checkpoint's file name
    assert by(rows, "minilm", "step")["value"] == 400
    assert by(rows, "minilm", "test_rows")["value"] == 1997
    assert by(rows, "minilm", "top_label_in_set")["value"] == 0.93  # with data.subjects_path


def test_rows_of_tfidf_single_and_label_sets(tmp_path):
    rows = rt.rows_of(tfidf_run(tmp_path), note=pytest.fail)
    assert by(rows, "tfidf", "macro_f1")["value"] == 0.867 and by(rows, "tfidf", "accuracy")["value"] == 0.8673
    assert by(rows, "tfidf", "macro_f1")["cpu_minutes"] == 1.5 and by(rows, "tfidf", "test_rows")["value"] == 10
    assert by(rows, "tfidf", "top_label_in_set")["value"] == 0.929
    multi = rt.rows_of(tfidf_run(tmp_path, "tfidf_ml", multi=True), note=pytest.fail)
    assert {r["task"] for r in multi} == {"label_sets"}
    assert by(multi, "tfidf", "micro_f1")["value"] == 0.8226 and by(multi, "tfidf", "val_micro_f1")["value"] == 0.8246


def test_rows_of_fused_reports_and_components(tmp_path):
    run = single_run(tmp_path, "fused_run", split_by="arxiv_id")
    components = {
        "neural": {"accuracy": 0.82, "macro_f1": 0.81},
        "lexical": {"accuracy": 0.86, "macro_f1": 0.8643},
        "lexical_weight": 1.5,
    }
    write(run, "fused/test_report.json", {"rows": 1997, "accuracy": 0.873, "macro_f1": 0.872, "components": components})
    ckpt = "runs/x/checkpoints/epoch00-step1400-f10.8494.ckpt"
    write(run, "fused/timing.json", {"fuse_cpu_seconds": 202, "checkpoint": ckpt, "date": "2026-12-03T10:11:19Z"})
    rows = rt.rows_of(run, note=pytest.fail)
    fused = by(rows, "minilm+lexical", "macro_f1")
    assert (
        fused["value"] == 0.872
        and fused["split"] == "by_time"
        and fused["source"] == "fused_run/fused/test_report.json"
    )
    assert fused["cpu_minutes"] == round(9.55 + 202 / 60, 2) and fused["date"] == "2026-12-03"
    assert by(rows, "minilm+lexical", "step")["value"] == 1400
    assert by(rows, "lexical", "macro_f1")["value"] == 0.8643 and by(rows, "lexical", "macro_f1")["cpu_minutes"] is None
    assert by(rows, "minilm", "macro_f1")["source"] == "fused_run/test_report.json"  # the network's own report wins


def test_rows_of_label_sets_with_a_fused_report_at_top_level(tmp_path):
    run = tmp_path / "ml"
    write(run, "config.yaml", config({"multi_label": True, "label_column": "all_categories"}, MINILM))
    report = {"rows": 50, "micro_f1": 0.81, "macro_f1": 0.816, "cardinality": {"predicted": 1.35, "true": 1.37}}
    write(run, "test_report.json", report)
    components = {"lexical": {"micro_f1": 0.8097, "macro_f1": 0.8136}}
    write(run, "fused_test_report.json", {**report, "micro_f1": 0.83, "components": components})
    notes = []
    rows = rt.rows_of(run, note=notes.append)
    assert by(rows, "minilm", "labels_per_text")["value"] == 1.35
    assert by(rows, "minilm+lexical", "micro_f1")["value"] == 0.83
    assert by(rows, "minilm+lexical", "micro_f1")["cpu_minutes"] is None  # no timing for the fusion
    assert by(rows, "lexical", "micro_f1_at_0.5")["value"] == 0.8097  # a common 0.5 threshold, named so
    assert by(rows, "minilm", "micro_f1")["task"] == "label_sets"
    assert any("timing.json" in n for n in notes)  # missing: noted, the rows kept without a cost


def test_rows_of_fine_grained_from_a_text_report(tmp_path):
    run = tmp_path / "cat"
    write(run, "config.yaml", config({"label_column": "category", "min_count": 100}, MINILM))
    text = (
        "test: 4969 rows, checkpoint runs/c/checkpoints/epoch00-step300-f10.3144.ckpt\n\n"
        "           precision  recall  f1  support\n"
        "accuracy                                     0.6516      4969\n"
        "macro avg              0.3462     0.3403     0.3218      4969\n"
    )
    write(run, "test_report.txt", text)
    rows = rt.rows_of(run, note=lambda _: None)  # (no timing.json here)
    assert by(rows, "minilm", "macro_f1")["value"] == 0.3218 and by(rows, "minilm", "accuracy")["value"] == 0.6516
    assert by(rows, "minilm", "macro_f1")["task"] == "fine_grained" and by(rows, "minilm", "step")["value"] == 300


def test_model_names():
    assert rt.model_name(MINILM) == "minilm"
    scratch = {"model_name_or_path": "x/distilbert-base", "pretrained": False, "model_config": {"model_type": "gpt2"}}
    assert rt.model_name(scratch) == "gpt2-scratch"


def test_missing_files_are_noted_and_skipped(tmp_path):
    notes = []
    write(tmp_path / "pending", "config.yaml", config({}, MINILM))
    write(tmp_path / "no_config", "metrics.json", {"test_f1_macro": 0.8})
    (tmp_path / "long_documents").mkdir()  # not a run folder: nothing to say
    assert rt.rows_of(tmp_path / "pending", note=notes.append) == []
    assert rt.rows_of(tmp_path / "no_config", note=notes.append) == []
    assert rt.rows_of(tmp_path / "long_documents", note=notes.append) == []
    assert len(notes) == 2 and "pending" in notes[0] and "config.yaml" in notes[1]


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("test_report.json", "{not json", "not valid JSON"),
        ("test_report.json", json.dumps({"accuracy": 0.8}), "no 'macro_f1'"),
        ("test_report.json", json.dumps({"accuracy": "high", "macro_f1": 0.8}), "not a number"),
        ("timing.json", "[1, 2]", "expected a JSON object"),
        ("config.yaml", "data: [unclosed", "not valid YAML"),
    ],
)
def test_a_malformed_file_is_a_one_line_error_naming_it(tmp_path, name, content, says):
    run = single_run(tmp_path)
    bad = write(run, name, content)
    with pytest.raises(rt.ResultsError) as err:
        rt.rows_of(run, note=lambda _: None)
    assert str(bad) in str(err.value) and says in str(err.value) and "\n" not in str(err.value)


def test_the_cli_reports_a_malformed_file_in_one_line(tmp_path, capsys):
    write(single_run(tmp_path), "timing.json", "{")
    assert rt.main(["collect", "--experiments", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "timing.json" in err[-1]


# ------------------------------------------------------------------------------------------------ the CSV
def test_collect_writes_a_sorted_stable_csv(tmp_path):
    single_run(tmp_path, "b_run")
    tfidf_run(tmp_path, "a_tfidf")
    path = rt.collect(tmp_path, note=lambda _: None)
    first = path.read_text()
    rows = list(csv.DictReader(first.splitlines()))
    assert tuple(rows[0]) == rt.FIELDS
    keys = [(r["task"], r["split"], r["run"], r["model"], r["metric"]) for r in rows]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    mtime = path.stat().st_mtime_ns
    assert rt.collect(tmp_path, note=lambda _: None).read_text() == first
    assert path.stat().st_mtime_ns == mtime  # unchanged: not rewritten
    back = rt.read_csv(path)
    assert by(back, "minilm", "macro_f1")["value"] == 0.81 and by(back, "minilm", "macro_f1")["cpu_minutes"] == 9.55


# ------------------------------------------------------------------------------------------------ tables
def test_table_baseline_first_then_best_first(tmp_path):
    single_run(tmp_path, "weaker", macro=0.79)
    single_run(tmp_path, "stronger", macro=0.88)
    single_run(tmp_path, "other_split", split_by="arxiv_id")
    tfidf_run(tmp_path, "tfidf")
    rows = rt.read_csv(rt.collect(tmp_path, note=lambda _: None))
    text = rt.table(rows, "primary_subject", ["macro_f1", "accuracy"], split="random")
    lines = text.splitlines()
    assert lines[0].startswith("| run | model | test macro-F1 | test acc | fit CPU-min | date | read from |")
    assert [line.split("|")[1].strip() for line in lines[2:]] == [
        "[tfidf](tfidf/)",
        "[stronger](stronger/)",
        "[weaker](weaker/)",
    ]
    assert "| 0.8800 | 0.8200 | 9.6 | 2026-11-26 | [test_report.json](stronger/test_report.json) |" in text
    only = rt.table(rows, "primary_subject", ["macro_f1"], split="random", models=["tfidf"], link_prefix="experiments/")
    assert "[tfidf](experiments/tfidf/)" in only and "stronger" not in only
    assert "no recorded run" in rt.table(rows, "label_sets", split="random")


def test_a_missing_metric_is_a_dash(tmp_path):
    tfidf_run(tmp_path, "tfidf")
    rows = rt.read_csv(rt.collect(tmp_path, note=lambda _: None))
    line = rt.table(rows, "primary_subject", ["macro_f1", "step"]).splitlines()[2]
    assert f"| 0.8670 | {rt.MISSING} |" in line


def test_readme_refresh_rewrites_only_between_markers(tmp_path):
    experiments = tmp_path / "experiments"
    single_run(experiments, "net")
    tfidf_run(experiments, "tfidf")
    csv_path = rt.collect(experiments, note=lambda _: None)
    readme = tmp_path / "README.md"
    before = "# Results\n\nProse before, `<!-- results:quoted -->` in a sentence.\n\n"
    after = "\nProse after.\n"
    marked = (
        "<!-- results:primary_subject:random models=minilm metrics=macro_f1 -->\n| stale | table |\n<!-- /results -->\n"
    )
    readme.write_text(before + marked + after)
    assert rt.refresh_readme(readme, csv_path) is True
    text = readme.read_text()
    assert text.startswith(before) and text.endswith(after) and "stale" not in text
    assert "[net](experiments/net/)" in text and "| 0.8100 |" in text and "tfidf" not in text.split("-->")[2]
    assert rt.refresh_readme(readme, csv_path) is False  # a second refresh changes nothing
    readme.write_text(before + "<!-- results:primary_subject:random -->\n| a table |\n" + after)
    with pytest.raises(rt.ResultsError, match="without its"):
        rt.refresh_readme(readme, csv_path)
    readme.write_text("<!-- results:primary_subject -->\n<!-- /results -->\n")
    with pytest.raises(rt.ResultsError, match="line 1"):
        rt.refresh_readme(readme, csv_path)
