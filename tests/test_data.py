import json

import numpy as np
import pandas as pd
import pytest
import torch

import lightning_cls.data.split_cache as split_cache
from lightning_cls.data.datamodule import ScientificTextDataModule
from lightning_cls.data.samplers import length_grouped_order
from lightning_cls.data.tables import read_table
from lightning_cls.data.tokenization import PadCollator
from lightning_cls.errors import DataError


def make_dm(sample_dir, **kwargs) -> ScientificTextDataModule:
    defaults = dict(tokenizer=str(sample_dir / "wordpiece"), path=str(sample_dir / "abstracts.csv"), max_samples=None)
    return ScientificTextDataModule(**{**defaults, **kwargs})


def test_prepare_keeps_the_ten_subjects_and_reports_dropped(sample_dir, caplog):
    dm = make_dm(sample_dir)
    with caplog.at_level("INFO"):
        dm.prepare_data()
    dm.setup("fit")
    assert "dropped 6 rows with 2 other labels" in caplog.text
    assert dm.meta["dropped_rows"] == 6
    assert sum(len(s) for s in dm.splits.values()) == 300
    assert {name: len(s) for name, s in dm.splits.items()} == {"train": 240, "val": 30, "test": 30}
    assert dm.meta["splits"]["val"]["label_counts"] == {name: 3 for name in dm.label_names}
    # Row ids point back at the source rows, whose labels match.
    source = pd.read_csv(sample_dir / "abstracts.csv")
    split = dm.splits["test"]
    assert [source.label[r] for r in split.row_ids] == [dm.label_names[i] for i in split.labels]


def test_min_count_selects_the_same_ten(sample_dir):
    dm = make_dm(sample_dir, min_count=20)
    assert dm.label_names == make_dm(sample_dir).label_names


def test_subsample_and_split_are_seeded(sample_dir):
    def rows(seed):
        dm = make_dm(sample_dir, max_samples=100, seed=seed)
        dm.prepare_data()
        dm.setup()
        return {name: sorted(s.row_ids.tolist()) for name, s in dm.splits.items()}

    first = rows(1)
    assert sum(len(v) for v in first.values()) == 100
    assert rows(1) == first
    assert rows(2) != first


def test_tokenization_is_cached_and_reused(sample_dir, monkeypatch):
    dm = make_dm(sample_dir)
    dm.prepare_data()

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again although nothing changed")

    monkeypatch.setattr(split_cache, "tokenize", fail)
    make_dm(sample_dir).prepare_data()  # same inputs: the cache is reused
    with pytest.raises(AssertionError, match="tokenized again"):
        make_dm(sample_dir, max_length=16).prepare_data()  # a new setting means a new cache


def test_truncation_at_max_length(sample_dir):
    dm = make_dm(sample_dir, max_length=12)
    dm.prepare_data()
    dm.setup()
    assert dm.splits["train"].lengths.max() == 12


def test_batches_are_dynamically_padded_to_multiple_of_8(sample_dir):
    dm = make_dm(sample_dir, batch_size=4)
    dm.prepare_data()
    dm.setup()
    widths = set()
    for batch in dm.train_dataloader():
        lengths = batch["attention_mask"].sum(1)
        width = batch["input_ids"].shape[1]
        assert width % 8 == 0 and width - 8 < lengths.max() <= width
        widths.add(width)
        # right padding: every row's mask is ones then zeros
        assert torch.equal(batch["attention_mask"].cummin(1).values, batch["attention_mask"])
    assert len(widths) > 1  # not padded to a global maximum


def test_pad_collator_without_rounding():
    batch = PadCollator(pad_token_id=9, pad_to_multiple_of=None)(
        [{"input_ids": [1, 2, 3], "row_id": 0, "label": 1}, {"input_ids": [4], "row_id": 5, "label": 0}]
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0] and batch["row_id"].tolist() == [0, 5]


def test_length_grouped_order_groups_lengths_and_shuffles_per_epoch():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, size=1000)
    order = length_grouped_order(lengths, batch_size=10, seed=3, epoch=0, megabatches=5)
    assert sorted(order.tolist()) == list(range(1000))
    batches = order.reshape(100, 10)
    spread_grouped = np.mean([lengths[b].max() - lengths[b].min() for b in batches])
    spread_random = np.mean([lengths[b].max() - lengths[b].min() for b in rng.permutation(1000).reshape(100, 10)])
    assert spread_grouped < spread_random / 4
    assert np.array_equal(order, length_grouped_order(lengths, 10, seed=3, epoch=0, megabatches=5))
    assert not np.array_equal(order, length_grouped_order(lengths, 10, seed=3, epoch=1, megabatches=5))


def test_length_grouped_shards_cover_every_sample_once():
    """Lightning deals the global order round-robin to the ranks; each rank's batches stay length-grouped."""
    lengths = np.random.default_rng(1).integers(5, 500, size=960)
    world, per_device = 2, 8
    order = length_grouped_order(lengths, per_device * world, seed=0, epoch=0)
    shards = [order[rank::world] for rank in range(world)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(960))
    for shard in shards:
        spreads = [np.ptp(lengths[b]) for b in shard.reshape(-1, per_device)]
        assert np.mean(spreads) < 100


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ("text,label\nhello,physics\n,physics\n", ".csv", r"column 'text' is empty or missing in 1 row\(s\) .*\[1\]"),
        ("text,label\nhello,physics\n   ,physics\n", ".csv", r"column 'text' is empty"),
        ("text,label\nhello,\n", ".csv", r"column 'label' is empty or missing"),
        ("body,label\nhello,physics\n", ".csv", r"has no column 'text' \(columns: \['body', 'label'\]\)"),
        ('{"text": "a", "label": "x"}\n{"text": 3}\n', ".jsonl", r"column 'label' is empty or missing"),
        ("text,label\n", ".csv", "has no rows"),
        ("a,b\n1,2\n", ".xlsx", "Unsupported file type"),
    ],
)
def test_bad_files_name_the_problem(tmp_path, content, suffix, message):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        read_table(path, "text", "label")
    if suffix != ".xlsx":
        assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_table(tmp_path / "nope.csv", "text", "label")


def test_numbers_as_labels_stay_strings(tmp_path):
    path = tmp_path / "n.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"t{i}", "label": i % 2}) for i in range(4)))
    assert read_table(path, "text", "label")["label"].tolist() == ["0", "1", "0", "1"]


def test_absent_label_and_empty_selection_are_refused(sample_dir):
    with pytest.raises(ValueError, match=r"\['zoology'\] not found in .*abstracts.csv"):
        make_dm(sample_dir, labels=["physics", "zoology"]).prepare_data()
    with pytest.raises(ValueError, match=r"No label in .* has at least 1000 rows"):
        make_dm(sample_dir, min_count=1000).prepare_data()
    with pytest.raises(ValueError, match="not both"):
        make_dm(sample_dir, labels=["physics"], min_count=3)


def test_custom_column_names_and_parquet(sample_dir, tmp_path):
    frame = pd.read_csv(sample_dir / "abstracts.csv").rename(columns={"text": "abstract", "label": "subject"})
    path = tmp_path / "renamed.parquet"
    frame.to_parquet(path)
    dm = make_dm(sample_dir, path=str(path), text_column="abstract", label_column="subject")
    dm.prepare_data()
    dm.setup()
    assert len(dm.splits["train"]) == 240
