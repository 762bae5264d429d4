"""Retraining from feedback: the labelled rows of the feedback store (`feedback_data`), added to the training split
only (`data.feedback_db`), and `compare`, a challenger export against the champion on the same held-out rows and on
recent feedback."""

from __future__ import annotations

import sqlite3
import uuid

import numpy as np
import pandas as pd
import pytest

from lightning_cls.data import ScientificTextDataModule
from lightning_cls.errors import ConfigError, DataError
from lightning_cls.feedback_data import (
    COLUMNS,
    format_time,
    parse_time,
    prepare_feedback,
    read_feedback,
    with_feedback,
)
from lightning_cls.labels import DEFAULT_LABELS
from lightning_cls.serving.feedback import FeedbackStore

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
