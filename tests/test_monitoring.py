"""Drift monitoring: PSI, binning, the sliding window, the Prometheus metrics and the offline `monitor` command."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from serving_helpers import fabricate_export

from lightning_cls.cli import main as cli_main
from lightning_cls.data.split_cache import split_summary
from lightning_cls.data.split_reference import length_histogram as length_bins
from lightning_cls.data.token_cache import TokenizedSplit
from lightning_cls.errors import UserError
from lightning_cls.monitoring.drift import PSI_EPSILON, PSI_WARNING, DriftWindow, drift_report, label_counts, psi
from lightning_cls.monitoring.monitor import read_predictions
from lightning_cls.serving.gauges import collect_metrics, enable_multiprocess_metrics
from lightning_cls.serving.metrics import PredictionMetrics

NAMES = ["a", "b", "c"]
REFERENCE = {
    "rows": 300,
    "label_counts": {"a": 100, "b": 100, "c": 100},
    "token_length": {"bin_edges": [10, 20], "bin_counts": [100, 100, 100]},
}


# ------------------------------------------------------------------------------------------------ pure functions
def test_psi_is_zero_for_the_same_distribution_and_matches_the_formula():
    assert psi([10, 20, 30], [1, 2, 3]) == pytest.approx(0.0)
    e, a = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    assert psi(e, a) == pytest.approx(float(np.sum((a - e) * np.log(a / e))))


def test_psi_of_an_empty_bin_is_finite_through_epsilon():
    value = psi([1, 1], [1, 0])
    expected = (1 - 0.5) * math.log(1 / 0.5) + (PSI_EPSILON - 0.5) * math.log(PSI_EPSILON / 0.5)
    assert value == pytest.approx(expected)
    assert value > PSI_WARNING


def test_psi_rejects_mismatched_or_empty_counts():
    with pytest.raises(ValueError, match="same length"):
        psi([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="at least one observation"):
        psi([0, 0], [1, 2])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 1000)), min_size=1, max_size=12))
def test_psi_is_never_negative(pairs):
    expected, actual = zip(*pairs, strict=True)
    if sum(expected) and sum(actual):
        assert psi(expected, actual) >= -1e-12


def test_length_bins_bin_exactly_like_the_export_reference(sample_dir):
    """Live lengths binned with the reference's edges give the reference's own counts for the same lengths."""
    rng = np.random.default_rng(0)
    ids = [[1] * int(n) for n in rng.integers(5, 120, size=400)]
    split = TokenizedSplit.from_lists(ids, rng.integers(0, 3, size=400), np.arange(400))
    summary = split_summary(split, NAMES)["token_length"]
    assert length_bins(split.lengths, summary["bin_edges"]).tolist() == summary["bin_counts"]
    # bin i holds [edges[i-1], edges[i]): an edge value goes to the bin above it
    assert length_bins([9, 10, 19, 20, 500], [10, 20]).tolist() == [1, 2, 2]


def test_label_counts_names_an_unknown_label():
    assert label_counts(["b", "a", "b"], NAMES).tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match=r"\['zebra'\] are not among"):
        label_counts(["a", "zebra"], NAMES)


def test_drift_report_flags_a_skew_and_not_a_match():
    matching = drift_report(REFERENCE, NAMES, ["a", "b", "c"] * 10, [0.9] * 30, [5, 15, 25] * 10)
    assert matching["label_psi"] == pytest.approx(0) and matching["length_psi"] == pytest.approx(0)
    assert matching["low_confidence_share"] == 0 and matching["alerts"] == []

    skewed = drift_report(REFERENCE, NAMES, ["a"] * 30, [0.3] * 20 + [0.9] * 10, [25] * 30)
    assert skewed["label_psi"] > PSI_WARNING and skewed["length_psi"] > PSI_WARNING
    assert skewed["low_confidence_share"] == pytest.approx(20 / 30)
    assert skewed["alerts"] == ["label_psi", "length_psi", "low_confidence_share"]
    assert skewed["labels"]["live"] == [30, 0, 0] and skewed["lengths"]["live"] == [0, 0, 30]


def test_drift_report_without_reference_or_lengths_gives_what_it_can():
    report = drift_report(None, NAMES, ["a", "b"], [0.2, 0.9], None)
    assert report["label_psi"] is None and report["length_psi"] is None
    assert report["low_confidence_share"] == 0.5
    no_lengths = drift_report(REFERENCE, NAMES, ["a", "b"], [0.2, 0.9], None)
    assert no_lengths["label_psi"] is not None and no_lengths["length_psi"] is None
    no_bins = {**REFERENCE, "token_length": {"mean": 12.0, "p50": 11.0}}  # a reference from before bins were kept
    assert drift_report(no_bins, NAMES, ["a", "b"], [0.2, 0.9], [3, 30])["length_psi"] is None


def test_window_keeps_the_last_predictions_and_waits_for_enough_of_them():
    window = DriftWindow(NAMES, REFERENCE, size=30, min_texts=20)
    window.add(["a"] * 10, [0.9] * 10, [5] * 10)
    early = window.report()
    assert early["texts"] == 10 and early["label_psi"] is None and early["alerts"] == []
    assert "fewer than 20" in early["note"]
    window.add(["b", "c", "a"] * 10, [0.9] * 30, [5, 15, 25] * 10)  # the first ten (all "a") slide out
    balanced = window.report()
    assert len(window) == 30 and balanced["labels"]["live"] == [10, 10, 10]
    assert balanced["label_psi"] == pytest.approx(0)
    window.add(["c"] * 30, [0.9] * 30, [25] * 30)
    assert window.report()["labels"]["live"] == [0, 0, 30]
    assert window.report()["alerts"] == ["label_psi", "length_psi"]
    with pytest.raises(ValueError, match="min_window"):
        DriftWindow(NAMES, REFERENCE, size=10, min_texts=11)


def test_prediction_metrics_expose_the_drift_and_log_when_it_crosses_the_threshold(tmp_path, caplog):
    from prometheus_client import values

    old_class = values.ValueClass
    try:
        enable_multiprocess_metrics(tmp_path)
        metrics = PredictionMetrics(NAMES, max_batch_size=8, max_length=32, window=DriftWindow(NAMES, REFERENCE, 10, 5))
        text = collect_metrics()[0].decode()
        assert "lightning_cls_drift_label_psi NaN" in text
        assert 'lightning_cls_predictions_total{label="c"} 0.0' in text
        batch = {"requests": 2, "labels": ["a", "b", "c"] * 2, "probabilities": [0.9] * 6, "lengths": [5, 15, 25] * 2}
        with caplog.at_level("WARNING", logger="lightning_cls.serving.metrics"):
            metrics.observe({**batch, "truncated": [False] * 6})
            assert not caplog.records
            metrics.observe({**batch, "labels": ["a"] * 6, "truncated": [True] * 6})
        text = collect_metrics()[0].decode()
        assert 'lightning_cls_predictions_total{label="a"} 8.0' in text
        assert "lightning_cls_truncated_texts_total 6.0" in text
        assert "lightning_cls_batch_requests_count 2.0" in text
        assert 'lightning_cls_drift_alert{signal="label_psi"} 1.0' in text
        warning = next(r.message for r in caplog.records if "label_psi" in r.message)
        assert warning.startswith("Drift: label_psi =")
    finally:
        values.ValueClass = old_class
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)


# ------------------------------------------------------------------------------------------------ offline monitor
@pytest.fixture(scope="module")
def model_dir(sample_dir, tmp_path_factory):
    return fabricate_export(sample_dir / "wordpiece", tmp_path_factory.mktemp("exported"))


def test_read_predictions_names_the_missing_column_and_bad_rows(tmp_path):
    bad = tmp_path / "p.csv"
    pd.DataFrame({"id": [1], "label": ["a"]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match=r"p.csv has no column \['probability'\]"):
        read_predictions(bad)
    pd.DataFrame({"label": ["a", "b"], "probability": [0.5, 1.5]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match=r"not in \[0, 1\] at rows \[1\]"):
        read_predictions(bad)


def test_monitor_writes_the_json_report_and_the_plot(model_dir, tmp_path, capsys):
    meta = json.loads((model_dir / "lightning_cls.json").read_text())
    labels = ["astrophysics"] * 40 + ["statistics"] * 10
    texts = ["galaxy redshift halo"] * 25 + [" ".join(["qubit"] * 200)] * 25
    predictions = tmp_path / "predictions.csv"
    # the columns `python -m lightning_cls predict` writes, plus the inputs file it read
    pd.DataFrame({"id": range(50), "label": labels, "probability": [0.95] * 30 + [0.2] * 20}).to_csv(
        predictions, index=False
    )
    inputs = tmp_path / "inputs.csv"
    pd.DataFrame({"id": range(50), "text": texts}).to_csv(inputs, index=False)

    cli_main(["monitor", "--predictions", str(predictions), "--model_dir", str(model_dir), "--inputs", str(inputs)])
    report = json.loads((tmp_path / "predictions.drift.json").read_text())
    assert (tmp_path / "predictions.drift.png").read_bytes()[:4] == b"\x89PNG"
    assert "label PSI" in capsys.readouterr().out
    counts = [meta["reference"]["label_counts"][n] for n in meta["labels"]]
    live = [labels.count(n) for n in meta["labels"]]
    assert report["label_psi"] == pytest.approx(psi(counts, live))
    assert report["low_confidence_share"] == pytest.approx(20 / 50)
    assert report["lengths"]["live"][-1] == 25  # the 200-qubit texts fill max_length: the last, open bin
    assert set(report["alerts"]) == {"label_psi", "length_psi", "low_confidence_share"}


def test_monitor_checks_that_inputs_and_predictions_line_up(model_dir, tmp_path):
    predictions = tmp_path / "predictions.jsonl"
    pd.DataFrame({"id": [0, 1], "label": ["physics"] * 2, "probability": [0.9, 0.9]}).to_json(
        predictions, orient="records", lines=True
    )
    inputs = tmp_path / "inputs.csv"
    pd.DataFrame({"id": [0, 1, 2], "text": ["a", "b", "c"]}).to_csv(inputs, index=False)
    args = ["monitor", "--predictions", str(predictions), "--model_dir", str(model_dir), "--inputs", str(inputs)]
    with pytest.raises(UserError, match=r"^monitor: .*has 3 texts but the predictions file has 2 rows"):
        cli_main(args)
    pd.DataFrame({"id": [0, 5], "text": ["a", "b"]}).to_csv(inputs, index=False)
    with pytest.raises(UserError, match=r"disagree on the ids of rows \[1\]"):
        cli_main(args)
    with pytest.raises(UserError, match=r"lightning_cls\.json does not exist"):
        cli_main(["monitor", "--predictions", str(predictions), "--model_dir", str(tmp_path)])
