"""Multi-label pure functions: label sets, arXiv subjects, iterative stratification, thresholds and metrics."""

import numpy as np
import pytest
import torch

from lightning_cls.data.label_sets import (
    arxiv_subject,
    arxiv_subject_sets,
    iterative_split,
    label_counts,
    multi_hot,
    parse_label_sets,
)
from lightning_cls.errors import DataError
from lightning_cls.model.calibration import fit_temperature
from lightning_cls.task import LabelSet, task_for
from lightning_cls.task.scores import (
    decide,
    epoch_report,
    fit_thresholds,
    format_label_set_report,
    label_ece,
    multilabel_scores,
    top_label_in_set,
)


def test_label_sets_split_on_whitespace_or_commas_keep_order_and_drop_repeats():
    assert parse_label_sets(["cs.LG stat.ML cs.LG", " hep-th "], None, "f.csv", "cats") == [
        ["cs.LG", "stat.ML"],
        ["hep-th"],
    ]
    assert parse_label_sets(["computer science, statistics"], ",", "f.csv", "cats") == [
        ["computer science", "statistics"]
    ]


@pytest.mark.parametrize(
    ("values", "separator", "message"),
    [
        (["cs.LG", "", "  ", "math.AG"], None, r"f\.csv: column 'cats' has no labels in 2 row\(s\) \(rows 1, 2;"),
        (["a, b", None], ",", r"no labels in 1 row\(s\) \(rows 1;"),
        (["a,,b", "c,"], ",", r"a malformed label set in 2 row\(s\) \(rows 0, 1;"),
        (["a", 3.5], None, r"a malformed label set in 1 row\(s\) \(rows 1;"),
    ],
)
def test_empty_and_malformed_label_sets_name_the_file_column_and_rows(values, separator, message):
    with pytest.raises(DataError, match=message):
        parse_label_sets(values, separator, "f.csv", "cats")


def test_arxiv_categories_map_to_the_subjects_of_the_label_column():
    assert arxiv_subject("cs.LG") == "computer science"
    assert arxiv_subject("hep-th") == "high energy physics theory"
    assert arxiv_subject("cond-mat.str-el") == "condensed matter"
    with pytest.raises(KeyError):
        arxiv_subject("bogus.XY")


def test_tokens_that_are_not_arxiv_categories_are_left_out_and_counted_but_a_row_without_any_is_an_error():
    # As in arXiv's metadata: MSC classes spilled into the category list.
    sets = [["math.NT", "11N35", "(Primary)", "cs.IT"], ["hep-th", "hep-ph", "hep-th"], ["quant-ph", "(Primary)"]]
    subjects, ignored = arxiv_subject_sets(sets, "f.csv", "cats")
    assert subjects == [
        ["mathematics", "computer science"],
        ["high energy physics theory", "high energy physics phenomenology"],
        ["quantum physics"],
    ]
    assert ignored == {"11N35": 1, "(Primary)": 2}
    with pytest.raises(DataError, match=r"f\.csv: column 'cats' has no arXiv category .* in 1 row\(s\) \(rows 4;"):
        arxiv_subject_sets([["cs.LG"], ["68T07", "I.2.6;"]], "f.csv", "cats", first_row=3)


def test_multi_hot_leaves_out_filtered_labels():
    y = multi_hot([["a", "c"], ["b"], ["z"]], ["a", "b", "c"])
    np.testing.assert_array_equal(y, [[1, 0, 1], [0, 1, 0], [0, 0, 0]])
    assert label_counts([["a", "c"], ["a"]]) == {"a": 2, "c": 1}


def test_iterative_split_keeps_rare_labels_in_every_split_and_is_seeded():
    rng = np.random.default_rng(0)
    y = (rng.random((2000, 12)) < np.linspace(0.4, 0.006, 12)).astype(np.uint8)  # the last labels are rare
    parts = iterative_split(y, 0.1, 0.1, seed=3)
    rows = np.concatenate(list(parts.values()))
    assert sorted(rows.tolist()) == list(range(2000))  # every row once
    assert abs(len(parts["val"]) - 200) <= 10 and abs(len(parts["test"]) - 200) <= 10
    for j in range(12):
        total = y[:, j].sum()
        for name, share in (("val", 0.1), ("test", 0.1)):
            got = y[parts[name], j].sum()
            # Each label in proportion: the rare ones (dealt out first) within a row or two, the frequent ones (whose
            # rows were partly placed with rarer labels first) within 8%.
            assert abs(got - share * total) <= max(1.5, 0.08 * share * total), (j, name, got, total)
            assert got >= 1
    again = iterative_split(y, 0.1, 0.1, seed=3)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)


def test_thresholds_are_fitted_per_label_and_decisions_tag_at_least_one_label():
    y = np.array([[1, 0], [1, 0], [0, 1], [0, 0]])
    probs = np.array([[0.3, 0.1], [0.35, 0.2], [0.1, 0.9], [0.05, 0.6]])
    thresholds = fit_thresholds(probs, y)
    assert thresholds[0] <= 0.3 and 0.6 < thresholds[1] <= 0.9  # label 0 needs a low bar, label 1 a high one
    decided = decide(probs, thresholds)
    np.testing.assert_array_equal(decided, [[1, 0], [1, 0], [0, 1], [0, 1]])  # the last: its most probable label


def test_scores_by_hand():
    truth = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1]])
    predicted = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1]])
    s = multilabel_scores(predicted, truth, ["a", "b", "c"])
    # tp = 1, 1, 1; fp = 0, 0, 1; fn = 0, 1, 0
    assert s["micro_f1"] == pytest.approx(6 / 8)
    assert s["micro_precision"] == pytest.approx(3 / 4) and s["micro_recall"] == pytest.approx(3 / 4)
    assert s["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert s["subset_accuracy"] == pytest.approx(1 / 3)
    assert s["hamming_loss"] == pytest.approx(2 / 9)
    assert s["cardinality"] == {"predicted": pytest.approx(4 / 3), "true": pytest.approx(4 / 3)}
    assert s["per_label"]["b"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}


def test_the_top_label_is_judged_against_the_texts_whole_label_set():
    """A tagger's first suggestion is right when it is any of the paper's subjects, not only the primary one."""
    y = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]])
    probs = np.array([[0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.9], [0.1, 0.8, 0.3]])
    assert top_label_in_set(probs, y) == pytest.approx(2 / 4)  # rows 0 (a second subject) and 2 are right
    report = epoch_report(probs, y, ["a", "b", "c"], np.full(3, 0.5))
    assert report["top_label_in_set"] == pytest.approx(0.5) and "top label one of the text's 0.5000" in (
        format_label_set_report(report)
    )


def test_a_label_set_temperature_is_fitted_by_each_labels_likelihood_and_lowers_held_out_ece():
    # Every label's logits three times too large: the fitted T is near 3, and the scaled sigmoids are calibrated on
    # rows the fit never saw.
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, size=(6000, 4))
    y = (rng.random((6000, 4)) < 1 / (1 + np.exp(-true_logits))).astype(int)
    t = fit_temperature(3 * true_logits[:3000], y[:3000])
    assert t == pytest.approx(3.0, rel=0.15)
    held = 3 * torch.tensor(true_logits[3000:])
    plain, scaled = LabelSet(("a", "b", "c", "d"), (0.5,) * 4), LabelSet(("a", "b", "c", "d"), (0.5,) * 4, t)
    ece_plain = label_ece(plain.probabilities(held).numpy(), y[3000:]).mean()
    ece_scaled = label_ece(scaled.probabilities(held).numpy(), y[3000:]).mean()
    assert ece_scaled < 0.03 and ece_scaled < ece_plain / 3  # 0.03: the sampling noise of 15 bins on 3,000 rows
    with pytest.raises(ValueError, match="shapes"):
        fit_temperature(true_logits[:5], y[:4])


def test_without_the_temperature_a_label_set_keeps_its_answers_on_the_plain_sigmoids():
    logits = torch.tensor([[2.0, -1.0, 0.3], [-0.5, 0.1, 4.0], [0.9, 0.8, -3.0], [-2.0, -2.5, -1.5]])
    calibrated = task_for(["a", "b", "c"], [0.3, 0.55, 0.7], temperature=2.5)
    plain = task_for(["a", "b", "c"], [0.3, 0.55, 0.7], temperature=2.5, use_temperature=False)
    assert plain.temperature is None and plain.thresholds != calibrated.thresholds
    torch.testing.assert_close(plain.probabilities(logits), logits.sigmoid())
    _, want = calibrated.answer(logits)
    _, got = plain.answer(logits)
    np.testing.assert_array_equal(got, want)
    assert (want.sum(1) >= 1).all() and not np.array_equal(want, decide(logits.sigmoid().numpy(), 0.5))
