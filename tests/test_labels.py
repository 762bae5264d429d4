import numpy as np
import pytest

from lightning_cls.data.labels import DEFAULT_LABELS, label_maps, select_labels, stratified_split, stratified_subsample


def test_select_explicit_labels_are_sorted_and_checked():
    labels = ["b", "a", "c", "a", "b"]
    assert select_labels(labels, names=["b", "a"]) == ["a", "b"]
    with pytest.raises(ValueError, match=r"\['zeta'\] not found in data.csv"):
        select_labels(labels, names=["a", "zeta"], source="data.csv")
    with pytest.raises(ValueError, match="more than once"):
        select_labels(labels, names=["a", "a"])


def test_select_by_min_count():
    labels = ["a"] * 5 + ["b"] * 3 + ["c"]
    assert select_labels(labels, min_count=3) == ["a", "b"]
    with pytest.raises(ValueError, match="No label in x has at least 10 rows"):
        select_labels(labels, min_count=10, source="x")
    with pytest.raises(ValueError, match="exactly one"):
        select_labels(labels, names=["a"], min_count=1)


def test_default_labels_are_the_ten_subjects_sorted():
    assert len(DEFAULT_LABELS) == 10 and list(DEFAULT_LABELS) == sorted(DEFAULT_LABELS)
    id2label, label2id = label_maps(DEFAULT_LABELS)
    assert id2label[0] == "astrophysics" and label2id["statistics"] == 9


def test_subsample_is_stratified_exact_and_seeded():
    label_ids = np.repeat([0, 1, 2], [600, 300, 100])
    rows = stratified_subsample(label_ids, 500, seed=1)
    assert len(rows) == 500 and len(set(rows)) == 500
    assert np.bincount(label_ids[rows]).tolist() == [300, 150, 50]
    assert np.array_equal(rows, stratified_subsample(label_ids, 500, seed=1))
    assert not np.array_equal(rows, stratified_subsample(label_ids, 500, seed=2))
    assert len(stratified_subsample(label_ids, None, seed=1)) == 1000


def test_split_is_stratified_disjoint_complete_and_reproducible():
    rng = np.random.default_rng(0)
    label_ids = rng.integers(0, 4, size=1001)
    splits = stratified_split(label_ids, 0.1, 0.2, seed=7)
    all_rows = np.concatenate(list(splits.values()))
    assert sorted(all_rows.tolist()) == list(range(1001))  # every row once
    for c in range(4):
        n = (label_ids == c).sum()
        assert (label_ids[splits["val"]] == c).sum() == round(n * 0.1)
        assert (label_ids[splits["test"]] == c).sum() == round(n * 0.2)
    again = stratified_split(label_ids, 0.1, 0.2, seed=7)
    assert all(np.array_equal(splits[k], again[k]) for k in splits)
    other = stratified_split(label_ids, 0.1, 0.2, seed=8)
    assert not np.array_equal(splits["val"], other["val"])


def test_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="sum below 1"):
        stratified_split(np.zeros(10), 0.5, 0.5, seed=0)
