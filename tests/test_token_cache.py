"""The token cache's one format (training splits and prediction inputs) and the folder it is written into."""

import numpy as np
import pytest

from lightning_cls.atomic import atomic_folder
from lightning_cls.data.token_cache import TokenizedSplit, cache_key


def test_written_in_chunks_equals_built_in_memory(tmp_path):
    ids = [[5, 6, 7], [8], [], [9, 10]]
    chunks = iter([ids[:2], ids[2:3], [], ids[3:]])  # an empty chunk too
    written = TokenizedSplit.write(tmp_path, "train", chunks, labels=[1, 0, 2, 1], row_ids=[10, 11, 12, 13])
    expected = TokenizedSplit.from_lists(ids, np.array([1, 0, 2, 1]), np.array([10, 11, 12, 13]))
    loaded = TokenizedSplit.load(tmp_path, "train")
    for split in (written, loaded):
        assert isinstance(split.tokens, np.memmap)  # read from disk, not held in memory
        for field in ("tokens", "offsets", "labels", "row_ids"):
            assert np.array_equal(getattr(split, field), getattr(expected, field)), field
        assert [split[i]["input_ids"].tolist() for i in range(len(split))] == ids
        assert split[3]["label"] == 1 and split[3]["row_id"] == 13
    assert split.lengths.tolist() == [3, 1, 0, 2]


def test_without_labels_or_row_ids_rows_are_positions(tmp_path):
    split = TokenizedSplit.write(tmp_path, "predict", iter([[[1], [2, 3]], [[4]]]))
    assert split.row_ids.tolist() == [0, 1, 2] and len(split.labels) == 0
    assert "label" not in split[0]
    empty = TokenizedSplit.write(tmp_path, "empty", iter([]))
    assert len(empty) == 0 and len(empty.tokens) == 0


def test_labels_must_match_the_texts(tmp_path):
    with pytest.raises(ValueError, match="2 texts but 3 labels"):
        TokenizedSplit.write(tmp_path, "x", iter([[[1], [2]]]), labels=[0, 1, 2])


def test_cache_key_depends_on_every_value_not_on_order():
    assert cache_key({"a": 1, "b": [1, 2]}) == cache_key({"b": [1, 2], "a": 1})
    assert cache_key({"a": 1}) != cache_key({"a": 2})
    assert cache_key({"a": 1}, prefix="predict-") == "predict-" + cache_key({"a": 1})


def test_atomic_folder_appears_whole_or_not_at_all(tmp_path):
    final = tmp_path / "deep" / "out"
    with atomic_folder(final) as tmp:
        (tmp / "a.txt").write_text("a")
        assert not final.exists()  # nothing at the final path until the block is done
    assert (final / "a.txt").read_text() == "a"
    assert sorted(p.name for p in final.parent.iterdir()) == ["out"]

    failed = tmp_path / "failed"
    with pytest.raises(RuntimeError, match="crash"), atomic_folder(failed) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("crash")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep"]  # no folder, no temporary left


def test_atomic_folder_when_another_process_got_there_first(tmp_path):
    final = tmp_path / "cache"
    with atomic_folder(final, exist_ok=True) as tmp:
        (tmp / "mine").write_text("x")
        (final / "theirs").mkdir(parents=True)  # another process completed the same folder meanwhile
    assert [p.name for p in final.iterdir()] == ["theirs"] and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(OSError), atomic_folder(final) as tmp:  # without exist_ok: an error, and no temporary left
        (tmp / "mine").write_text("x")
    assert len(list(tmp_path.iterdir())) == 1
