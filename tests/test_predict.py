"""Predictions on any .txt / .csv / .jsonl file: reading, the writer's ordering and checks, and the CLI end to end."""

import codecs
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_cli import data_args, trainer_args

from lightning_cls.cli import main
from lightning_cls.data.sample_data import generate_texts
from lightning_cls.data.tables import read_table, read_text_chunks
from lightning_cls.data.tokenization import load_tokenizer
from lightning_cls.errors import DataError
from lightning_cls.model.calibration import calibrated_probabilities
from lightning_cls.model.classifier import TextClassifier
from lightning_cls.model.predictions import (
    PredictionWriter,
    logit_records,
    merge_in_input_order,
    prediction_rows,
    record_dtype,
)
from lightning_cls.task import SingleLabel

# ------------------------------------------------------------------------------------------------ reading the inputs


def read_all(path, **kwargs):
    ids, texts = [], []
    for chunk_ids, chunk_texts in read_text_chunks(path, **kwargs):
        ids += chunk_ids
        texts += chunk_texts
    return ids, texts


def test_txt_one_text_per_line_blank_lines_skipped_but_counted(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("first text\n\n  \nsecond, with a comma\nthird\n")
    chunks = list(read_text_chunks(path, chunk_rows=2))
    assert [len(texts) for _, texts in chunks] == [2, 1]  # bounded chunks
    assert read_all(path) == ([1, 4, 5], ["first text", "second, with a comma", "third"])


def test_csv_uses_the_id_column_when_there_is_one(tmp_path):
    path = tmp_path / "texts.csv"
    pd.DataFrame({"id": ["a-7", "007", "x"], "abstract": ["one", "two, three", "NA"]}).to_csv(path, index=False)
    assert read_all(path, text_column="abstract", chunk_rows=2) == (["a-7", "007", "x"], ["one", "two, three", "NA"])
    pd.DataFrame({"abstract": ["one", "two"]}).to_csv(path, index=False)
    assert read_all(path, text_column="abstract") == ([0, 1], ["one", "two"])  # 0-based data rows


def test_jsonl_ids_or_line_numbers(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text('{"id": 10, "text": "one"}\n\n{"id": "b", "text": "two"}\n')
    assert read_all(path) == ([10, "b"], ["one", "two"])
    path.write_text('{"text": "one"}\n{"text": "two"}\n')
    assert read_all(path) == ([1, 2], ["one", "two"])


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "", r"empty\.txt is empty"),
        ("blank.txt", "\n \n", r"blank\.txt has no texts"),
        ("empty.csv", "", r"empty\.csv is empty"),
        ("empty.jsonl", "", r"empty\.jsonl is empty"),
        ("cols.csv", "id,abstract\n1,hello\n", r"cols\.csv has no column 'text' \(columns: \['id', 'abstract'\]\)"),
        (
            "gap.csv",
            'text\nhello\n""\nworld\n',
            r"gap\.csv: column 'text' is empty in 1 row\(s\) \(0-based data rows \[1\]\)",
        ),
        ("shift.csv", "id,text\n1,hello\n2,one, two\n", r"shift\.csv, line 3: 3 fields where the header has 2"),
        ("field.jsonl", '{"text": "a"}\n{"body": "b"}\n', r"field\.jsonl, line 2: no field 'text'"),
        ("bad.jsonl", '{"text": "a"}\n{"text": \n', r"bad\.jsonl, line 2: not valid JSON"),
        ("texts.parquet", "x", r"use a \.txt, \.csv, \.jsonl file"),
    ],
)
def test_bad_inputs_name_the_file_column_and_row(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_all(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"missing\.txt does not exist"):
        read_all(tmp_path / "missing.txt")


def test_texts_are_decoded_and_checked_as_training_files_are(tmp_path):
    """One set of reading rules: what a training file may hold, a file to classify may too, and the same faults get
    the same message (though a file to classify is read as a stream, never whole)."""
    path = tmp_path / "texts.csv"
    path.write_bytes("text,label\nünï,x\nzwei,y\n".encode("utf-16"))  # UTF-16 with its byte-order mark
    assert read_all(path) == ([0, 1], ["ünï", "zwei"])
    path.write_bytes(codecs.BOM_UTF8 + b"text,label\n" + b"ok,x\n" * 3000 + b"caf\xe9,y\n")
    with pytest.raises(DataError, match=r"line 3002 \(byte 15017\): not valid UTF-8") as streamed:
        read_all(path, chunk_rows=100)
    with pytest.raises(DataError) as whole:
        read_table(path, "text", "label")
    assert str(streamed.value) == str(whole.value)
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text('{"text": "fine"}\n{"text": ["a", "list"]}\n')
    with pytest.raises(DataError, match=r"texts\.jsonl, line 2: field 'text' holds list, not text"):
        read_all(jsonl)
    zipped = tmp_path / "texts.txt"
    zipped.write_bytes(b"PK\x03\x04rest")
    with pytest.raises(DataError, match=r"texts\.txt is a ZIP archive"):
        read_all(zipped)


# ------------------------------------------------------------------------------------------------ the writer's merge


def test_merge_restores_input_order_from_shuffled_parts(tmp_path):
    row_ids = np.array([3, 8, 10, 11, 40])  # sparse, like the test split's rows in the data file
    logits = torch.randn(5, 4)
    order = [4, 0, 2, 1, 3]  # longest-first: not the input order
    parts = []
    for rank, rows in enumerate((order[::2], order[1::2])):
        part = tmp_path / f"rank{rank}.bin"
        part.write_bytes(logit_records(row_ids[rows].tolist(), logits[rows]).tobytes())
        parts.append(part)
    merged = merge_in_input_order(parts, row_ids, 4, tmp_path / "merged.npy")
    torch.testing.assert_close(torch.from_numpy(np.array(merged)).float(), logits)
    rows = list(prediction_rows(merged, iter(["a", "b", "c", "d", "e"]), SingleLabel(("w", "x", "y", "z")), k=2))
    assert [r["id"] for r in rows] == ["a", "b", "c", "d", "e"]
    assert [r["label"] for r in rows] == [["w", "x", "y", "z"][i] for i in logits.argmax(-1).tolist()]
    assert all(r["top_k"][0]["probability"] >= r["top_k"][1]["probability"] for r in rows)
    assert "windows" not in rows[0]


def test_merge_averages_the_windows_of_a_text_wherever_they_were(tmp_path):
    # Text 0 has three windows, text 1 one, text 2 two; windows spread over two ranks, in any order.
    text_of_window = np.array([0, 2, 0, 1, 2, 0])
    logits = torch.randn(6, 3)
    parts = []
    for rank, rows in enumerate(([5, 1, 3], [0, 4, 2])):
        part = tmp_path / f"rank{rank}.bin"
        part.write_bytes(logit_records(text_of_window[rows].tolist(), logits[rows]).tobytes())
        parts.append(part)
    counts = np.array([3, 1, 2])
    merged = merge_in_input_order(parts, np.arange(3), 3, tmp_path / "merged.npy", counts)
    expected = torch.stack([logits[text_of_window == t].mean(0) for t in range(3)])
    torch.testing.assert_close(torch.from_numpy(np.array(merged)).float(), expected)
    task, cut = SingleLabel(("x", "y", "z")), np.array([True, False, False])
    rows = list(prediction_rows(merged, iter("abc"), task, 1, (counts, cut)))
    assert [(r["windows"], r["truncated"]) for r in rows] == [(3, True), (1, False), (2, False)]
    # A text missing one of its windows is lost, not answered from the others.
    with pytest.raises(RuntimeError, match=r"1 row\(s\) lost \(row ids \[0\]\)"):
        merge_in_input_order(parts, np.arange(3), 3, tmp_path / "merged.npy", np.array([4, 1, 2]))


def test_merge_refuses_lost_or_duplicated_rows(tmp_path):
    part = tmp_path / "rank0.bin"
    part.write_bytes(logit_records([0, 1, 1], torch.randn(3, 3)).tobytes())
    with pytest.raises(RuntimeError, match=r"1 row\(s\) lost \(row ids \[2\]\), 1 duplicated \(row ids \[1\]\)"):
        merge_in_input_order([part], np.arange(3), 3, tmp_path / "merged.npy")
    part.write_bytes(logit_records([0, 7], torch.randn(2, 3)).tobytes())
    with pytest.raises(RuntimeError, match=r"rows that are not in the input: \[7\]"):
        merge_in_input_order([part], np.arange(2), 3, tmp_path / "merged.npy")
    assert record_dtype(3).itemsize == 8 + 3 * 4  # fixed-size records: parts are read as arrays


# ------------------------------------------------------------------------------------------------ end to end


def expected_probs(ckpt: Path, texts: list[str]) -> torch.Tensor:
    """Each text classified alone (no padding, no batching): what every row of the predictions must say."""
    model = TextClassifier.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    tokenizer = load_tokenizer(model.hparams.tokenizer)
    rows = []
    with torch.no_grad():
        for text in texts:
            enc = tokenizer(text, truncation=True, max_length=64, return_tensors="pt")
            # `predict` gives calibrated probabilities: the logits divided by the checkpoint's temperature.
            rows.append(calibrated_probabilities(model(enc["input_ids"], enc["attention_mask"]), model.temperature)[0])
    return torch.stack(rows)


def write_input(tmp_path: Path, suffix: str, texts: list[str]) -> tuple[Path, list]:
    """The texts as a file of that kind, and the ids the predictions must show, in input order."""
    path = tmp_path / f"inputs{suffix}"
    if suffix == ".txt":  # a blank line in the middle: skipped, but the line numbers still count it
        lines = [*texts[:5], "", *texts[5:]]
        path.write_text("\n".join(lines) + "\n")
        return path, [i + 1 for i, line in enumerate(lines) if line]
    ids = [f"doc-{i:03d}" for i in range(len(texts))][::-1]
    if suffix == ".csv":
        pd.DataFrame({"id": ids, "abstract": texts}).to_csv(path, index=False)
    else:
        path.write_text("".join(json.dumps({"id": i, "abstract": t}) + "\n" for i, t in zip(ids, texts, strict=True)))
    return path, ids


@pytest.mark.parametrize(
    ("family", "suffix", "output"),
    [
        ("distilbert", ".txt", None),
        ("gpt2", ".txt", None),
        ("distilbert", ".csv", "out.jsonl"),
        ("gpt2", ".jsonl", "out.csv"),
    ],
)
def test_predict_a_file_in_input_order(tmp_path, sample_dir, trained, family, suffix, output):
    ckpt = trained(family) / "ckpt" / "last.ckpt"
    texts, _ = generate_texts(rows_per_label=2, seed=5)  # 26 texts of 20-90 words: longest-first is not file order
    path, ids = write_input(tmp_path, suffix, texts)
    args = [*data_args(sample_dir, family), *trainer_args(tmp_path), f"--ckpt_path={ckpt}"]
    args += [f"--data.predict_path={path}", "--data.eval_batch_size=4", "--prediction_writer.top_k=3"]
    if suffix != ".txt":
        args.append("--data.predict_text_column=abstract")
    if output:
        args.append(f"--prediction_writer.output_path={tmp_path / output}")
    run = main(["predict", *args])

    out = tmp_path / output if output else Path(run.trainer.log_dir) / "predictions.csv"
    if out.suffix == ".csv":
        table = pd.read_csv(out, dtype={"id": str})
        assert list(table.columns) == [
            "id",
            "label",
            "probability",
            "label_2",
            "probability_2",
            "label_3",
            "probability_3",
        ]
        rows = [
            {
                "id": r["id"],
                "labels": [r["label"], r["label_2"], r["label_3"]],
                "probs": [r["probability"], r["probability_2"], r["probability_3"]],
            }
            for r in table.to_dict("records")
        ]
    else:
        records = [json.loads(line) for line in out.read_text().splitlines()]
        rows = [
            {"id": r["id"], "labels": [t["label"] for t in r["top_k"]], "probs": [t["probability"] for t in r["top_k"]]}
            for r in records
        ]
        assert all(r["label"] == r["top_k"][0]["label"] for r in records)
    assert [str(r["id"]) for r in rows] == [str(i) for i in ids]  # every input once, in input order, with its id

    probs = expected_probs(ckpt, texts)
    top = probs.topk(3)
    names = run.model.label_names
    for row, values, classes in zip(rows, top.values.tolist(), top.indices.tolist(), strict=True):
        assert row["labels"] == [names[c] for c in classes]
        assert row["probs"] == pytest.approx(values, abs=1e-5)
    assert run.trainer.predict_loop.predictions == []  # streamed to the file, not also kept in memory


def test_predict_without_a_file_writes_the_test_split(tmp_path, sample_dir, trained):
    ckpt = trained("distilbert") / "ckpt" / "last.ckpt"
    run = main(["predict", *data_args(sample_dir, "distilbert"), *trainer_args(tmp_path), f"--ckpt_path={ckpt}"])
    table = pd.read_csv(Path(run.trainer.log_dir) / "predictions.csv")
    test_rows = sorted(run.datamodule.splits["test"].row_ids.tolist())
    assert table["id"].tolist() == test_rows  # rows of the data file, in file order


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", r"inputs\.csv is empty"),
        ("body\nhello\n", r"inputs\.csv has no column 'text' \(columns: \['body'\]\)"),
        (None, r"Prediction input .*inputs\.csv does not exist"),
    ],
)
def test_predict_bad_file_stops_with_a_clear_error(tmp_path, sample_dir, trained, content, message):
    ckpt = trained("distilbert") / "ckpt" / "last.ckpt"
    path = tmp_path / "inputs.csv"
    if content is not None:
        path.write_text(content)
    args = [*data_args(sample_dir, "distilbert"), *trainer_args(tmp_path), f"--ckpt_path={ckpt}"]
    with pytest.raises(DataError, match=message):
        main(["predict", *args, f"--data.predict_path={path}"])


def test_writer_options_are_checked():
    with pytest.raises(ValueError, match=r"output_path 'out.parquet' must end in .csv or .jsonl"):
        PredictionWriter(output_path="out.parquet")
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        PredictionWriter(top_k=0)
    with pytest.raises(ValueError, match=r"explain must be one of \['lexical'\] or null, got 'network'"):
        PredictionWriter(explain="network")


@pytest.mark.slow
def test_ddp_predict_on_two_processes_loses_and_repeats_no_row(tmp_path, sample_dir, trained):
    ckpt = trained("distilbert") / "ckpt" / "last.ckpt"
    texts, _ = generate_texts(rows_per_label=3, seed=7, rare_rows=3)  # 36 texts
    texts = texts[:-1]  # 35: an odd count, which a padding sampler would fill with a repeated row
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(texts) + "\n")
    out = tmp_path / "predictions.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "lightning_cls",
        "predict",
        *data_args(sample_dir, "distilbert"),
        *trainer_args(tmp_path),
        f"--ckpt_path={ckpt}",
        f"--data.predict_path={path}",
        "--data.eval_batch_size=4",
        f"--prediction_writer.output_path={out}",
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == list(range(1, 36))
    top = expected_probs(ckpt, texts).max(-1)
    assert [r["probability"] for r in records] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert not (tmp_path / ".predictions.jsonl.parts").exists()  # the per-rank parts are cleaned up
