"""The combiner study (scripts/combiner_study.py): cross-fitted choice between one fusion weight and a logistic
regression per label, on planted logits where the answer is known."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from combiner_study import fit_combiner, out_of_fold, study


def planted(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label sets of 4 labels; the network knows labels 0-1 and is noise on 2-3, the expert the other way round: one
    weight for both parts cannot fit both halves, a weight per label can."""
    rng = np.random.default_rng(seed)
    y = (rng.random((rows, 4)) < 0.3).astype(np.int64)
    signal = np.where(y == 1, 2.0, -2.0)
    noise = lambda: rng.normal(0, 1.5, (rows, 4))  # noqa: E731
    z = np.concatenate([signal[:, :2] + noise()[:, :2], noise()[:, 2:]], axis=1)
    s = np.concatenate([noise()[:, :2], signal[:, 2:] + noise()[:, 2:]], axis=1)
    return z, s, y


def test_a_weight_per_label_is_chosen_where_each_part_knows_other_labels_and_it_holds_on_test():
    val, test = planted(600, 0), planted(600, 1)
    result = study(*val, *test, ["a", "b", "c", "d"], folds=3)
    assert result["chosen_on_validation"] == "per_label_lr" == result["better_on_test"]
    assert result["per_label_lr"]["test"]["micro_f1"] > result["one_weight"]["test"]["micro_f1"] + 0.02
    weights = result["per_label_lr"]["weights"]
    assert weights["a"][0] > weights["b"][0] and weights["b"][3] > weights["a"][3]  # each label trusts its part


def test_out_of_fold_logits_never_come_from_a_fit_on_their_own_rows():
    z, s, y = planted(90, 2)
    in_sample = fit_combiner(z, s, y, per_label=True)
    oof = out_of_fold(z, s, y, per_label=True, folds=3, seed=0)
    assert oof.shape == z.shape
    assert not np.allclose(oof, in_sample["a"] * z + in_sample["b"] * s + in_sample["c"])


def test_one_label_per_text_is_scored_by_macro_f1():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 300)
    z = np.eye(3)[y] * 2 + rng.normal(0, 1, (300, 3))
    s = rng.normal(0, 1, (300, 3))
    result = study(z, s, y, z, s, y, ["a", "b", "c"], folds=3)
    assert result["metric"] == "macro_f1"
    assert result["one_weight"]["test"]["macro_f1"] > 0.6


def test_the_served_fusion_is_scored_beside_and_a_fitted_scale_calibrates_overconfident_logits():
    """`served` is the export's own z + w * s, unscaled; logits made 4x overconfident are badly calibrated there,
    and the one weight fitted by likelihood (a scale on each part) brings the label ECE down."""
    (z, s, y), (zt, st, yt) = planted(600, 4), planted(600, 5)
    result = study(4 * z, 4 * s, y, 4 * zt, 4 * st, yt, ["a", "b", "c", "d"], folds=3, weight=1.0)
    served, fitted = result["served"]["test"], result["one_weight"]["test"]
    assert set(served) >= {"micro_f1", "mean_label_ece"}
    assert fitted["mean_label_ece"] < served["mean_label_ece"] - 0.02
