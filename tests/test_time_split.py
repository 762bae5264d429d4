"""Split by time (`data.split_by`): the newest rows are the test split, the next newest validation."""

import numpy as np
import pandas as pd
import pytest
from conftest import tokenizer_for

from lightning_cls.data.datamodule import ScientificTextDataModule
from lightning_cls.data.labels import ordered_split
from lightning_cls.data.sample_data import generate_texts
from lightning_cls.errors import DataError


def test_ordered_split_puts_the_newest_rows_last():
    keys = ["2503.00001", "2601.00002", "2412.00003", "2607.00004", "2511.00005", "2606.00006", "2501.00007",
            "2602.00008", "2509.00009", "2605.00010"]  # fmt: skip
    parts = ordered_split(keys, val_fraction=0.2, test_fraction=0.2)
    months = {name: sorted(keys[i][:4] for i in rows) for name, rows in parts.items()}
    assert months["test"] == ["2606", "2607"] and months["val"] == ["2602", "2605"]
    assert max(months["train"]) < min(months["val"]) <= max(months["val"]) < min(months["test"])
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(len(keys)))  # every row, once
    with pytest.raises(ValueError, match="sum below 1"):
        ordered_split(keys, 0.5, 0.5)


def test_ties_keep_file_order():
    parts = ordered_split(["2601"] * 5, val_fraction=0.2, test_fraction=0.2)
    assert parts["train"].tolist() == [0, 1, 2] and parts["val"].tolist() == [3] and parts["test"].tolist() == [4]


def write_dated_csv(path, months):
    texts, labels = generate_texts(rows_per_label=12, seed=1)
    rng = np.random.default_rng(0)
    ids = [f"{rng.choice(months)}.{i:05d}" for i in range(len(texts))]
    pd.DataFrame({"text": texts, "label": labels, "arxiv_id": ids}).to_csv(path, index=False)
    return pd.read_csv(path, dtype=str)


def test_data_module_splits_by_time(tmp_path, sample_dir):
    table = write_dated_csv(tmp_path / "dated.csv", ["2503", "2508", "2512", "2604", "2607"])
    dm = ScientificTextDataModule(
        tokenizer=tokenizer_for(sample_dir, "distilbert"),
        path=str(tmp_path / "dated.csv"),
        labels=None,
        max_samples=None,
        split_by="arxiv_id",
        max_length=32,
    )
    dm.prepare_data()
    dm.setup("fit")
    kept = table[table["label"].isin(dm.label_names)]
    month = {int(row): kept.loc[row, "arxiv_id"] for row in kept.index}  # row_id = 0-based data row
    when = {name: [month[int(r)] for r in split.row_ids] for name, split in dm.splits.items()}
    assert max(when["train"]) <= min(when["val"]) and max(when["val"]) <= min(when["test"])
    assert len(when["test"]) == round(0.1 * len(kept)) and len(when["val"]) == round(0.1 * len(kept))

    # A random split (the default) of the same file mixes the months; its cache is another one.
    random = ScientificTextDataModule(
        tokenizer=tokenizer_for(sample_dir, "distilbert"), path=str(tmp_path / "dated.csv"), max_samples=None
    )
    assert random.cache_path() != dm.cache_path()
    random.prepare_data()
    random.setup("fit")
    assert min(month[int(r)] for r in random.splits["test"].row_ids) < max(when["train"])


def test_a_missing_or_blank_order_column_is_named(tmp_path, sample_dir):
    write_dated_csv(tmp_path / "dated.csv", ["2601"])
    dm = ScientificTextDataModule(
        tokenizer=tokenizer_for(sample_dir, "distilbert"), path=str(tmp_path / "dated.csv"), split_by="published"
    )
    with pytest.raises(DataError, match="has no column 'published'"):
        dm.prepare_data()
    table = pd.read_csv(tmp_path / "dated.csv", dtype=str)
    table.loc[3, "arxiv_id"] = ""
    table.to_csv(tmp_path / "blank.csv", index=False)
    dm = ScientificTextDataModule(
        tokenizer=tokenizer_for(sample_dir, "distilbert"), path=str(tmp_path / "blank.csv"), split_by="arxiv_id"
    )
    with pytest.raises(
        DataError, match=r"column 'arxiv_id' is empty or missing in 1 row\(s\) \(0-based data rows \[3\]"
    ):
        dm.prepare_data()
