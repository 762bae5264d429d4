"""Retraining from feedback: the labelled rows of the feedback store (`feedback_data`), added to the training split
only (`data.feedback_db`), and `compare`, a challenger export against the champion on the same held-out rows and on
recent feedback."""

from __future__ import annotations

import json
import re
import sqlite3
import uuid

import numpy as np
import pandas as pd
import pytest
import yaml

from lightning_cls.data.datamodule import ScientificTextDataModule
from lightning_cls.data.feedback import (
    COLUMNS,
    format_time,
    parse_time,
    prepare_feedback,
    read_feedback,
    with_feedback,
)
from lightning_cls.data.labels import DEFAULT_LABELS
from lightning_cls.errors import ConfigError, DataError
from lightning_cls.store.feedback_store import FeedbackStore

NAMES = sorted(DEFAULT_LABELS)


def feedback_db(path, rows, version="v1", now=1_000.0, texts=True):
    """A feedback database with one served prediction per row (text, predicted label) and, where a row has a true
    label (a name or a tuple of names; None: no feedback), that feedback, received at now, now + 1, ... in row
    order. Returns the prediction ids."""
    store = FeedbackStore(path)
    store.register_model(version, NAMES, "export")
    ids = [uuid.uuid4().hex for _ in rows]
    n = len(rows)
    store.insert_batch(
        {
            "time": now - 10,
            "requests": 1,
            "ids": ids,
            "labels": [NAMES[0]] * n,
            "probabilities": [0.5] * n,
            "all_probabilities": [[1 / len(NAMES)] * len(NAMES)] * n,
            "lengths": [12] * n,
            "windows": [1] * n,
            "truncated": [False] * n,
            "abstained": [False] * n,
            **({"texts": [text for text, _ in rows]} if texts else {}),
        },
        version,
        None,
    )
    for i, (pid, (_, truth)) in enumerate(zip(ids, rows, strict=True)):
        if truth is not None:
            assert store.record_feedback([(pid, truth)], now=now + i).stored == 1
    store.close()
    return ids


# ------------------------------------------------------------------------------------------------ reading
def test_reads_labelled_rows_with_texts_and_filters_by_time(tmp_path):
    db = tmp_path / "f.sqlite3"
    ids = feedback_db(db, [("one text", "physics"), ("two", None), ("three", "statistics")])
    raw = read_feedback(db)
    assert raw["prediction_id"].tolist() == [ids[0], ids[2]]  # the unlabelled prediction is not a training row
    assert raw["true_label"].tolist() == ["physics", "statistics"] and raw["feedback_time"].tolist() == [1000, 1002]
    assert raw.attrs["without_text"] == 0
    assert read_feedback(db, after=1000.5)["prediction_id"].tolist() == [ids[2]]  # received after: strictly
    assert read_feedback(db, after=2000).empty


def test_times_are_unix_seconds_or_iso_dates():
    assert parse_time(None) is None and parse_time(12.5) == 12.5 and parse_time("12.5") == 12.5
    assert parse_time("1970-01-02") == 86400.0  # no offset: UTC
    assert parse_time("1970-01-02T01:00:00+01:00") == 86400.0
    assert parse_time("1970-01-02T00:00:00Z") == 86400.0
    assert format_time(86400.0) == "1970-01-02T00:00:00Z"
    with pytest.raises(ConfigError, match=r"data.feedback_after='last tuesday' is not a time"):
        parse_time("last tuesday")


def test_bad_databases_are_refused_naming_the_file(tmp_path):
    with pytest.raises(DataError, match=r"nope.sqlite3 does not exist"):
        read_feedback(tmp_path / "nope.sqlite3")
    assert not (tmp_path / "nope.sqlite3").exists()  # never created by reading

    junk = tmp_path / "junk.sqlite3"
    junk.write_text("not a database at all " * 50)
    with pytest.raises(DataError, match=r"junk.sqlite3 cannot be read as a SQLite database"):
        read_feedback(junk)

    other = tmp_path / "other.sqlite3"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(DataError, match=r"other.sqlite3 is a SQLite database but not a feedback database"):
        read_feedback(other)

    old = tmp_path / "old.sqlite3"  # schema 2: no texts kept
    conn = sqlite3.connect(old)
    conn.executescript(
        "CREATE TABLE predictions (id TEXT, labels TEXT); CREATE TABLE feedback (prediction_id TEXT, labels TEXT);"
        "PRAGMA user_version = 2;"
    )
    conn.close()
    with pytest.raises(DataError, match=r"old.sqlite3 has schema version 2, which keeps no texts.*--keep_texts"):
        read_feedback(old)

    served = tmp_path / "served.sqlite3"  # feedback, but the service ran without --keep_texts
    feedback_db(served, [("a", "physics"), ("b", "physics")], texts=False)
    with pytest.raises(DataError, match=r"served.sqlite3 has no labelled predictions with texts \(2 labelled rows"):
        prepare_feedback(read_feedback(served), [], NAMES)
    with pytest.raises(DataError, match=r"with texts received after 1970-01-01T01:00:00Z"):
        prepare_feedback(read_feedback(served, after=3600), [], NAMES)


# ------------------------------------------------------------------------------------------------ the rules
def test_original_rows_win_and_the_latest_feedback_wins(tmp_path):
    db = tmp_path / "f.sqlite3"
    ids = feedback_db(
        db,
        [
            ("A text  of the data", "physics"),  # the data's text, spaced otherwise: the original row wins
            ("served twice", "physics"),  # older feedback on a text labelled again later
            ("new text", "statistics"),
            ("served\ttwice ", "mathematics"),  # the latest feedback on that text
        ],
    )
    original = pd.DataFrame({"text": ["a text of the data", "A text of the data", "other"], "label": ["x", "y", "z"]})
    table, summary = with_feedback(original, db, NAMES)
    assert list(table.columns) == COLUMNS
    assert table["source"].tolist() == ["original"] * 3 + ["feedback"] * 2
    assert table["text"].tolist()[:3] == original["text"].tolist() and table["label"].tolist()[:3] == ["x", "y", "z"]
    added = table[table["source"] == "feedback"]
    assert added["text"].tolist() == ["new text", "served\ttwice "]
    assert added["label"].tolist() == ["statistics", "mathematics"]
    assert added["prediction_id"].tolist() == [ids[2], ids[3]]
    assert added["model_version"].tolist() == ["v1", "v1"] and added["feedback_time"].tolist() == [1002.0, 1003.0]
    assert table["prediction_id"][:3].isna().all() and table["feedback_time"][:3].isna().all()
    assert (summary.read, summary.added, summary.duplicates, summary.repeated, summary.unknown) == (4, 2, 1, 1, 0)
    assert summary.newest == 1003.0
    assert "added 2 rows to the training split (4 labelled rows with texts read; 1 duplicates" in summary.line()


def test_a_label_outside_the_training_labels_is_an_error_unless_dropped(tmp_path):
    db = tmp_path / "f.sqlite3"
    ids = feedback_db(db, [("one", "physics"), ("two", "astrology"), ("three", "statistics")])
    raw = read_feedback(db)
    with pytest.raises(DataError, match=rf"prediction {ids[1]} has the true label 'astrology', which is not a"):
        prepare_feedback(raw, [], NAMES)
    rows, summary = prepare_feedback(raw, [], NAMES, drop_unknown=True)
    assert rows["text"].tolist() == ["one", "three"] and summary.unknown == 1 and summary.added == 2
    assert "1 with labels outside the training labels dropped" in summary.line()


def test_label_sets_follow_the_training_label_order(tmp_path):
    db = tmp_path / "f.sqlite3"
    ids = feedback_db(
        db,
        [
            ("one", ("statistics", "computer science")),
            ("two", "physics"),  # a single label on a multi-label model: a set of one
            ("three", ("astrology", "mathematics")),
            ("four", ("astrology",)),
        ],
    )
    raw = read_feedback(db)
    with pytest.raises(DataError, match=rf"prediction {ids[2]} has the true label 'astrology'"):
        prepare_feedback(raw, [], NAMES, multi_label=True)
    rows, summary = prepare_feedback(raw, [], NAMES, multi_label=True, drop_unknown=True)
    assert rows["label"].tolist() == [("computer science", "statistics"), ("physics",), ("mathematics",)]
    assert summary.unknown == 1  # "four" had no training label left
    # A set of several labels cannot train a single-label model, dropped or not.
    with pytest.raises(DataError, match=rf"prediction {ids[0]} has the true label set .* single-label"):
        prepare_feedback(raw, [], NAMES, drop_unknown=True)


# ------------------------------------------------------------------------------------------------ fit
def make_dm(sample_dir, **kwargs) -> ScientificTextDataModule:
    defaults = dict(tokenizer=str(sample_dir / "wordpiece"), path=str(sample_dir / "abstracts.csv"), max_samples=None)
    return ScientificTextDataModule(**{**defaults, **kwargs})


def splits_of(dm: ScientificTextDataModule) -> dict[str, tuple[list[int], list[int]]]:
    dm.prepare_data()
    dm.setup("fit")
    return {name: (split.row_ids.tolist(), np.asarray(split.labels).tolist()) for name, split in dm.splits.items()}


def test_feedback_grows_the_training_split_only(tmp_path, sample_dir, caplog):
    source = pd.read_csv(sample_dir / "abstracts.csv")
    db = tmp_path / "f.sqlite3"
    feedback_db(
        db,
        [
            (source["text"][5], "astrophysics"),  # a text of the data: dropped, whichever split it is in
            ("a served text about galaxies and stars", "astrophysics"),
            ("a served text about   proofs", "physics"),
            ("a served text about proofs", "mathematics"),  # relabelled later: this one
        ],
        now=2_000.0,
    )
    plain = splits_of(make_dm(sample_dir))
    dm = make_dm(sample_dir, feedback_db=str(db))
    with caplog.at_level("INFO"):
        grown = splits_of(dm)
    assert grown["val"] == plain["val"] and grown["test"] == plain["test"]  # the held-out rows are the data's
    rows, labels = grown["train"]
    assert len(rows) == len(plain["train"][0]) + 2
    added = sorted(zip(rows, labels, strict=True))[-2:]  # row ids after the file's rows, in feedback order
    assert [r for r, _ in added] == [len(source), len(source) + 1]
    assert [dm.label_names[i] for _, i in added] == ["astrophysics", "mathematics"]
    assert sorted(zip(*plain["train"], strict=True)) == sorted(zip(rows, labels, strict=True))[:-2]
    assert "added 2 rows to the training split (4 labelled rows with texts read; 1 duplicates" in caplog.text
    assert dm.meta["feedback"]["added"] == 2 and dm.state_dict()["feedback"]["newest"] == 2003.0
    # The texts that read text rather than tokens (the lexical expert) see the same training rows.
    _, texts, _ = dm.split_texts("train")
    assert texts[-1] == "a served text about proofs" and len(texts) == len(rows)

    # More feedback makes another cache (its key hashes the rows read); a time filter keeps the later ones only.
    feedback_db(db, [("one more served text", "statistics")], now=3_000.0)
    assert len(splits_of(make_dm(sample_dir, feedback_db=str(db)))["train"][0]) == len(rows) + 1
    later = make_dm(sample_dir, feedback_db=str(db), feedback_after=2_500)
    assert len(splits_of(later)["train"][0]) == len(plain["train"][0]) + 1
    assert make_dm(sample_dir).state_dict() == {}


def test_feedback_settings_are_checked_before_reading(sample_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"data.feedback_after filters the feedback of data.feedback_db"):
        make_dm(sample_dir, feedback_after="2026-01-01")
    with pytest.raises(ConfigError, match=r"data.feedback_after='soon' is not a time"):
        make_dm(sample_dir, feedback_db="f.sqlite3", feedback_after="soon")
    dm = make_dm(sample_dir, feedback_db=str(tmp_path / "missing.sqlite3"))
    with pytest.raises(DataError, match=r"missing.sqlite3 does not exist"):
        dm.prepare_data()


# ------------------------------------------------------------------------------------------------ compare
@pytest.fixture(scope="module")
def exports(sample_dir, tmp_path_factory):
    """Two tiny exports of the same labels: untrained (the champion) and trained a few steps on generated texts of
    the same subjects (the challenger); made without a checkpoint, in a second or two."""
    from serving_helpers import fabricate_export

    root = tmp_path_factory.mktemp("exports")
    tokenizer = sample_dir / "wordpiece"
    return fabricate_export(tokenizer, root / "a"), fabricate_export(tokenizer, root / "b", train_steps=40, seed=1)


def write_config(path, sample_dir, **data) -> str:
    data = {
        "path": str(sample_dir / "abstracts.csv"),
        "tokenizer": str(sample_dir / "wordpiece"),
        "max_samples": None,
        **data,
    }
    path.write_text(yaml.safe_dump({"trainer": {"max_epochs": 1}, "data": data, "model": {"model_name_or_path": "x"}}))
    return str(path)


def test_compare_scores_both_models_on_the_test_split_and_recent_feedback(
    tmp_path, sample_dir, exports, capsys, db_location
):
    """On either store: a SQLite file or a PostgreSQL URL (`--feedback_db postgresql://...`)."""
    from lightning_cls.cli import main

    champion, challenger = exports
    source = pd.read_csv(sample_dir / "abstracts.csv")
    db = db_location
    # Feedback on texts of the data (scored like any feedback), one relabelled later, and one outside the labels.
    rows = [(source["text"][i], source["label"][i]) for i in range(12) if source["label"][i] in NAMES]
    feedback_db(db, [*rows, (rows[0][0], "physics")])
    config = write_config(tmp_path / "config.yaml", sample_dir)
    out = tmp_path / "report" / "compare.json"
    args = ["compare", f"--champion={champion}", f"--challenger={challenger}", f"--config={config}"]
    report = main([*args, f"--feedback_db={db}", "--recent=5", f"--output_path={out}"])
    assert json.loads(out.read_text()) == report
    test, recent = report["sets"]["test"], report["sets"]["recent_feedback"]
    assert report["problem"] == "single-label" and report["metrics"] == ["accuracy", "macro_f1"]
    assert test["rows"] == 30 and recent["rows"] == 5 and recent["read"] == len(rows) + 1 and recent["repeated"] == 1
    for entry in (test, recent):
        for metric in ("accuracy", "macro_f1"):
            assert 0 <= entry["champion"][metric] <= 1 and 0 <= entry["challenger"][metric] <= 1
            assert entry["difference"][metric] == pytest.approx(entry["challenger"][metric] - entry["champion"][metric])
    assert test["challenger"] != test["champion"]  # two models, two sets of answers
    assert recent["seen_in_training"] == {"champion": None, "challenger": None}  # no checkpoint to tell
    assert report["champion"]["model_dir"] == str(champion) and report["challenger"]["version"]

    printed = capsys.readouterr().out
    assert "test split" in printed and "recent feedback" in printed and f"wrote {out}" in printed
    assert "note: whether the challenger trained on these rows is unknown" in printed

    # No feedback database, or one without texts: the set is there, empty, and says why.
    report = main([*args, f"--output_path={out}"])
    assert report["sets"]["recent_feedback"] == {"rows": 0, "note": "empty: no --feedback_db given"}
    assert re.search(r"recent feedback +0 +empty: no --feedback_db given", capsys.readouterr().out)
    bare = tmp_path / "bare.sqlite3"
    feedback_db(bare, [("a text", "physics")], texts=False)
    report = main([*args, f"--feedback_db={bare}", f"--output_path={out}"])
    note = report["sets"]["recent_feedback"]["note"]
    assert note.startswith("empty: ") and "1 labelled rows have none: serve --keep_texts keeps them" in note


@pytest.mark.slow
def test_compare_answers_as_transformers_reads_the_folders(tmp_path, sample_dir, exports):
    from transformers import pipeline

    from lightning_cls.lifecycle.compare import compare

    report = compare(*map(str, exports), write_config(tmp_path / "c.yaml", sample_dir), output_path=str(tmp_path / "r"))
    dm = make_dm(sample_dir)
    _, texts, truth = dm.split_texts("test")
    for role, folder in zip(("champion", "challenger"), exports, strict=True):
        classify = pipeline("text-classification", model=str(folder), device="cpu")
        predicted = [r["label"] for r in classify(texts, truncation=True)]
        expected = np.mean([p == dm.label_names[t] for p, t in zip(predicted, truth, strict=True)])
        assert report["sets"]["test"][role]["accuracy"] == pytest.approx(expected, abs=1e-6)


def test_compare_counts_the_feedback_a_model_trained_on(tmp_path, sample_dir, exports):
    import shutil

    import torch

    from lightning_cls.lifecycle.compare import compare

    champion, challenger = exports
    retrained = tmp_path / "retrained"
    shutil.copytree(challenger, retrained)
    ckpt = tmp_path / "retrained.ckpt"  # what `fit --data.feedback_db` saves: the data module's feedback state
    state = {"path": "copy.sqlite3", "read": 3, "added": 3, "after": None, "newest": 1001.0}
    torch.save({"state_dict": {}, "ScientificTextDataModule": {"feedback": state}}, ckpt)
    meta = json.loads((retrained / "lightning_cls.json").read_text())
    (retrained / "lightning_cls.json").write_text(json.dumps({**meta, "checkpoint": str(ckpt)}))
    db = tmp_path / "f.sqlite3"
    feedback_db(db, [("first text", "physics"), ("second text", "statistics"), ("third text", "mathematics")])
    config = write_config(tmp_path / "config.yaml", sample_dir)
    report = compare(str(champion), str(retrained), config, str(db), output_path=str(tmp_path / "r.json"))
    recent = report["sets"]["recent_feedback"]
    # Received at 1000, 1001, 1002: the retrained model read feedback up to 1001 (from a copy: by time, not path).
    assert recent["seen_in_training"] == {"champion": None, "challenger": 2}
    assert report["challenger"]["trained_on_feedback"] == state and report["challenger"]["checkpoint_read"]
    later = compare(
        str(champion), str(retrained), config, str(db), feedback_after="1001.5", output_path=str(tmp_path / "r.json")
    )
    assert later["sets"]["recent_feedback"]["rows"] == 1
    assert later["sets"]["recent_feedback"]["seen_in_training"]["challenger"] == 0


def test_compare_refuses_models_of_other_labels_and_a_config_of_other_data(tmp_path, sample_dir, exports):
    import shutil

    from lightning_cls.lifecycle.compare import compare

    champion, challenger = exports
    other = tmp_path / "other"
    shutil.copytree(challenger, other)
    meta = json.loads((other / "lightning_cls.json").read_text())
    (other / "lightning_cls.json").write_text(json.dumps({**meta, "labels": [*meta["labels"][:-1], "astrology"]}))
    config = write_config(tmp_path / "config.yaml", sample_dir)
    with pytest.raises(ConfigError, match=r"--champion .* has the labels .*--challenger .*other.*same labels"):
        compare(str(champion), str(other), config, output_path=str(tmp_path / "r.json"))
    narrow = write_config(tmp_path / "narrow.yaml", sample_dir, labels=["physics", "statistics"])
    with pytest.raises(ConfigError, match=r"narrow.yaml: its data has the labels \['physics', 'statistics'\]"):
        compare(str(champion), str(challenger), narrow, output_path=str(tmp_path / "r.json"))
    with pytest.raises(ConfigError, match=r"--config .*nope.yaml does not exist"):
        compare(str(champion), str(challenger), str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match=r"--challenger .*missing is not a folder"):
        compare(str(champion), str(tmp_path / "missing"), config)
    assert not (tmp_path / "r.json").exists()


def test_compare_multi_label_exports_by_micro_f1(tmp_path, sample_dir, exports):
    import shutil

    from lightning_cls.lifecycle.compare import compare

    folders = []
    for export in exports:  # the same folders answering label sets: a sigmoid per label and thresholds
        folder = tmp_path / export.name
        shutil.copytree(export, folder)
        meta = json.loads((folder / "lightning_cls.json").read_text())
        meta.update(format_version=2, thresholds=[0.5] * len(meta["labels"]))
        (folder / "lightning_cls.json").write_text(json.dumps(meta))
        folders.append(str(folder))
    config = write_config(tmp_path / "config.yaml", sample_dir, multi_label=True, label_separator=",")
    db = tmp_path / "f.sqlite3"
    feedback_db(db, [("one text", ("physics", "statistics")), ("two", ("mathematics",))])
    report = compare(*folders, config, str(db), output_path=str(tmp_path / "r.json"))
    assert report["problem"] == "multi-label" and report["metrics"] == [
        "micro_f1",
        "macro_f1",
        "subset_accuracy",
        "micro_precision",
        "micro_recall",
        "top_label_in_set",  # the first suggestion one of the text's labels
    ]
    test = report["sets"]["test"]
    for role in ("champion", "challenger"):
        assert 0 <= test[role]["top_label_in_set"] <= 1
    assert report["sets"]["test"]["rows"] == 30 and report["sets"]["recent_feedback"]["rows"] == 2
    assert 0 <= report["sets"]["recent_feedback"]["champion"]["micro_f1"] <= 1
    with pytest.raises(ConfigError, match=r"single-label.*multi-label|multi-label.*single-label"):
        compare(folders[0], str(exports[1]), config, output_path=str(tmp_path / "r.json"))


@pytest.mark.slow
def test_fit_with_feedback_then_compare_with_the_champion(tmp_path, sample_dir, exports):
    """`fit --data.feedback_db`: the run's checkpoint says which feedback it trained on, its export is compared with
    the champion, and the recent feedback it trained on is counted as seen."""
    import torch
    from test_cli import fit

    from lightning_cls.cli import main

    db = tmp_path / "f.sqlite3"
    feedback_db(db, [("a served text about proofs and lemmas", "mathematics"), ("a served text on qubits", "physics")])
    fit(tmp_path, sample_dir, "distilbert", f"--data.feedback_db={db}", "--trainer.max_epochs=1")
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)["ScientificTextDataModule"]["feedback"]
    assert state["added"] == 2 and state["newest"] == 1001.0
    assert torch.load(ckpt, weights_only=True)["lightning_cls_data_reference"]["train"]["rows"] == 242
    main(["export", f"--ckpt_path={ckpt}", f"--output_dir={tmp_path / 'challenger'}"])
    config = write_config(tmp_path / "config.yaml", sample_dir)
    models = [f"--champion={exports[0]}", f"--challenger={tmp_path / 'challenger'}"]
    report = main(["compare", *models, f"--config={config}", f"--feedback_db={db}", f"--output_path={tmp_path / 'r'}"])
    assert report["sets"]["test"]["rows"] == 30 and report["sets"]["recent_feedback"]["rows"] == 2
    assert report["sets"]["recent_feedback"]["seen_in_training"] == {"champion": None, "challenger": 2}
