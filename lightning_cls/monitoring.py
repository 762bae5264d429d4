"""Drift monitoring: population stability index, a sliding window of live traffic, the Prometheus metrics of the
service, and `python -m lightning_cls monitor` (the same drift report, offline, from a predictions file).

The reference is the training split's summary written at export (`lightning_cls.json` -> `reference`): its label
counts and its token lengths binned at their deciles. Live traffic is compared with it on three signals:

- label PSI: predicted labels of the window vs the training label distribution,
- length PSI: token lengths of the window (as the model saw them, i.e. truncated) in the reference's bins,
- low-confidence share: the share of the window whose top probability is below a threshold.

A PSI above ``PSI_WARNING`` (0.2, the usual rule of thumb: < 0.1 stable, 0.1-0.2 moderate shift, > 0.2 large
shift) logs a warning, as does a low-confidence share above its own threshold.

The pure functions and the metric classes need neither torch nor LitServe (prometheus-client and matplotlib are
imported where used); the LitServe side (the logger process that feeds `PredictionMetrics`) is in `serve.py`.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_cls.errors import InputError
from lightning_cls.export_format import length_histogram as length_bins
from lightning_cls.export_format import read_export_metadata

log = logging.getLogger(__name__)

# Proportions below this are raised to it before the PSI's logarithm: an empty bin on either side would otherwise
# give an infinite index. 1e-4 keeps one empty bin that held 10% of the reference at about 0.1 * ln(0.1 / 1e-4)
# = 0.69, i.e. clearly over the warning threshold, without letting a single empty bin dominate everything.
PSI_EPSILON = 1e-4
PSI_WARNING = 0.2  # PSI above this is a large shift: a warning is logged
LOW_CONFIDENCE = 0.5  # a prediction whose top probability is below this counts as low-confidence
LOW_CONFIDENCE_WARNING = 0.3  # a low-confidence share above this logs a warning

# Prometheus multiprocess mode: the service runs in several processes (HTTP server, inference worker, logger
# process); each writes its metrics to files in this folder and `/metrics` merges them.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


# ------------------------------------------------------------------------------------------------ pure functions
def psi(expected: Sequence[float], actual: Sequence[float], eps: float = PSI_EPSILON) -> float:
    """Population stability index of ``actual`` against ``expected`` (both counts or proportions, same bins).

    PSI = sum_i (a_i - e_i) * ln(a_i / e_i) over the proportions, each raised to at least ``eps``.
    """
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.shape != a.shape or e.ndim != 1:
        raise ValueError(f"PSI needs two count vectors of the same length, got shapes {e.shape} and {a.shape}.")
    if e.sum() <= 0 or a.sum() <= 0:
        raise ValueError("PSI needs at least one observation on each side.")
    e = np.maximum(e / e.sum(), eps)
    a = np.maximum(a / a.sum(), eps)
    return float(np.sum((a - e) * np.log(a / e)))


def label_counts(labels: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """Counts of each name in ``labels``, in the order of ``names``; an unknown label is an error naming it."""
    position = {name: i for i, name in enumerate(names)}
    unknown = sorted({label for label in labels if label not in position})
    if unknown:
        raise InputError(f"Labels {unknown} are not among the model's labels {list(names)}.")
    return np.bincount([position[label] for label in labels], minlength=len(names))


def drift_report(
    reference: dict | None,
    names: Sequence[str],
    labels: Sequence[str],
    probabilities: Sequence[float],
    lengths: Sequence[int] | None,
    low_confidence: float = LOW_CONFIDENCE,
    psi_warning: float = PSI_WARNING,
    low_confidence_warning: float = LOW_CONFIDENCE_WARNING,
) -> dict[str, Any]:
    """Drift of a set of predictions against the export's reference: label PSI, length PSI, low-confidence share.

    Signals that cannot be computed (no reference, no lengths, no predictions) are None; ``alerts`` lists the
    signals over their threshold.
    """
    n = len(labels)
    if len(probabilities) != n or (lengths is not None and len(lengths) != n):
        raise ValueError("labels, probabilities and lengths must have one entry per prediction.")
    live_labels = label_counts(labels, names)
    report: dict[str, Any] = {
        "texts": n,
        "thresholds": {
            "psi": psi_warning,
            "low_confidence": low_confidence,
            "low_confidence_share": low_confidence_warning,
        },
        "psi_epsilon": PSI_EPSILON,
        "label_psi": None,
        "length_psi": None,
        "low_confidence_share": float(np.mean(np.asarray(probabilities) < low_confidence)) if n else None,
        "labels": {"names": list(names), "live": live_labels.tolist(), "reference": None},
        "lengths": None,
        # the top probabilities in tenths, for the plot
        "confidence": np.histogram(np.asarray(probabilities, dtype=float), bins=10, range=(0, 1))[0].tolist(),
    }
    if reference is not None and n:
        ref_labels = np.asarray([reference["label_counts"].get(name, 0) for name in names])
        report["labels"]["reference"] = ref_labels.tolist()
        report["label_psi"] = psi(ref_labels, live_labels)
        token_length = reference.get("token_length") or {}
        # (references made before the length bins were recorded have statistics but no bins: no length PSI)
        if lengths is not None and token_length.get("bin_edges") is not None:
            edges = token_length["bin_edges"]
            live_bins = length_bins(lengths, edges)
            report["length_psi"] = psi(token_length["bin_counts"], live_bins)
            report["lengths"] = {
                "bin_edges": list(edges),
                "live": live_bins.tolist(),
                "reference": token_length["bin_counts"],
            }
    alerts = [k for k in ("label_psi", "length_psi") if report[k] is not None and report[k] > psi_warning]
    share = report["low_confidence_share"]
    if share is not None and share > low_confidence_warning:
        alerts.append("low_confidence_share")
    report["alerts"] = alerts
    return report


class DriftWindow:
    """The last ``size`` predictions of live traffic (label, top probability, token length) and their drift."""

    def __init__(
        self,
        names: Sequence[str],
        reference: dict | None,
        size: int = 1000,
        min_texts: int = 100,
        low_confidence: float = LOW_CONFIDENCE,
        psi_warning: float = PSI_WARNING,
        low_confidence_warning: float = LOW_CONFIDENCE_WARNING,
    ) -> None:
        if not 1 <= min_texts <= size:
            raise InputError(
                f"The drift window needs 1 <= min_texts (--min_window) <= size (--window_size), "
                f"got {min_texts} and {size}."
            )
        self.names, self.reference, self.min_texts = list(names), reference, min_texts
        self.thresholds = {
            "low_confidence": low_confidence,
            "psi_warning": psi_warning,
            "low_confidence_warning": low_confidence_warning,
        }
        self.items: deque[tuple[str, float, int]] = deque(maxlen=size)

    def add(self, labels: Sequence[str], probabilities: Sequence[float], lengths: Sequence[int]) -> None:
        """Append predictions; the oldest fall out of the window."""
        self.items.extend(zip(labels, probabilities, lengths, strict=True))

    def __len__(self) -> int:
        return len(self.items)

    def report(self) -> dict[str, Any]:
        """The drift report of the predictions now in the window; no signal while it holds under ``min_texts``."""
        labels, probabilities, lengths = (
            (list(c) for c in zip(*self.items, strict=True)) if self.items else ([], [], [])
        )
        report = drift_report(self.reference, self.names, labels, probabilities, lengths, **self.thresholds)
        if len(self) < self.min_texts:
            # A handful of predictions always looks drifted (most bins empty): wait for a meaningful sample.
            report.update(label_psi=None, length_psi=None, low_confidence_share=None, alerts=[])
            report["note"] = f"{len(self)} predictions, fewer than {self.min_texts}: no drift signal yet"
        return report


# ------------------------------------------------------------------------------------------------ Prometheus wiring
def enable_multiprocess_metrics(folder: str | Path) -> Path:
    """Point prometheus-client at ``folder`` (emptied) for this process and every process it starts."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):  # files of an earlier run would be merged into this one's metrics
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(folder)
    # prometheus-client picks its value class when first imported; switch it in case it was imported already.
    from prometheus_client import values

    values.ValueClass = values.MultiProcessValue()
    return folder


def collect_metrics() -> tuple[bytes, str]:
    """The merged metrics of every process of the service, in the Prometheus text format, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def exponential_buckets(start: float, factor: float, stop: float) -> list[float]:
    """Histogram buckets start, start*factor, ... up to and including the first one >= stop."""
    buckets = [start]
    while buckets[-1] < stop:
        buckets.append(buckets[-1] * factor)
    return buckets


class HttpMetrics:
    """Requests, errors and latency, recorded where the HTTP requests arrive (the API server processes)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.requests = Counter("lightning_cls_http_requests", "HTTP requests by path and status", ["path", "status"])
        self.errors = Counter("lightning_cls_http_errors", "HTTP responses with status >= 400", ["path", "status"])
        self.latency = Histogram(
            "lightning_cls_http_request_duration_seconds",
            "Time from request arrival to response, by path",
            ["path"],
            buckets=exponential_buckets(0.001, 2, 30),
        )

    def observe(self, path: str, status: int, seconds: float) -> None:
        self.requests.labels(path, str(status)).inc()
        if status >= 400:
            self.errors.labels(path, str(status)).inc()
        self.latency.labels(path).observe(seconds)


class PredictionMetrics:
    """What the model saw and answered (batch sizes, labels, confidence, token lengths) and the drift gauges."""

    def __init__(self, names: Sequence[str], max_batch_size: int, max_length: int, window: DriftWindow) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.window = window
        self.batch_requests = Histogram(
            "lightning_cls_batch_requests",
            "Requests per server-side batch",
            buckets=exponential_buckets(1, 2, max_batch_size),
        )
        self.batch_texts = Histogram(
            "lightning_cls_batch_texts", "Texts per server-side batch", buckets=exponential_buckets(1, 2, 1024)
        )
        self.predictions = Counter("lightning_cls_predictions", "Predicted labels", ["label"])
        for name in names:  # every label shows from the start, at 0
            self.predictions.labels(name)
        self.confidence = Histogram(
            "lightning_cls_prediction_confidence",
            "Probability of the predicted label",
            buckets=[round(0.1 * i, 1) for i in range(1, 10)] + [0.95, 0.99, 1.0],
        )
        self.tokens = Histogram(
            "lightning_cls_input_tokens",
            "Tokens per text as the model saw it (after truncation)",
            buckets=exponential_buckets(4, 2, max_length),
        )
        self.truncated = Counter("lightning_cls_truncated_texts", "Texts truncated at the model's max_length")
        gauge = {"multiprocess_mode": "mostrecent"}  # one process (the logger) writes them
        self.window_texts = Gauge("lightning_cls_drift_window_texts", "Predictions in the drift window", **gauge)
        self.label_psi = Gauge(
            "lightning_cls_drift_label_psi", "PSI of predicted labels vs the training labels", **gauge
        )
        self.length_psi = Gauge(
            "lightning_cls_drift_length_psi", "PSI of binned token lengths vs the training lengths", **gauge
        )
        self.low_confidence = Gauge(
            "lightning_cls_drift_low_confidence_share", "Share of the window below the confidence threshold", **gauge
        )
        self.alert = Gauge(
            "lightning_cls_drift_alert", "1 when a drift signal is over its threshold", ["signal"], **gauge
        )
        self.psi_threshold = Gauge("lightning_cls_drift_psi_threshold", "PSI warning threshold", **gauge)
        self.psi_threshold.set(window.thresholds["psi_warning"])
        self.window_texts.set(0)
        for gauge in (self.label_psi, self.length_psi, self.low_confidence):
            gauge.set(math.nan)  # not computed yet (too few predictions, or no reference)
        self._alerts: set[str] = set()

    def observe(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Record one server batch (keys requests, labels, probabilities, lengths, truncated); returns the drift."""
        self.batch_requests.observe(batch["requests"])
        self.batch_texts.observe(len(batch["labels"]))
        for label, p, n in zip(batch["labels"], batch["probabilities"], batch["lengths"], strict=True):
            self.predictions.labels(label).inc()
            self.confidence.observe(p)
            self.tokens.observe(n)
        self.truncated.inc(sum(batch["truncated"]))
        self.window.add(batch["labels"], batch["probabilities"], batch["lengths"])
        report = self.window.report()
        self.window_texts.set(report["texts"])
        for key, gauge in (
            ("label_psi", self.label_psi),
            ("length_psi", self.length_psi),
            ("low_confidence_share", self.low_confidence),
        ):
            gauge.set(math.nan if report[key] is None else report[key])
        self._log_alert_changes(report)
        return report

    def _log_alert_changes(self, report: dict[str, Any]) -> None:
        # Logged when a signal crosses its threshold, not on every batch it stays over it.
        alerts = set(report["alerts"])
        for signal in ("label_psi", "length_psi", "low_confidence_share"):
            self.alert.labels(signal).set(float(signal in alerts))
        for signal in sorted(alerts - self._alerts):
            log.warning(
                f"Drift: {signal} = {report[signal]:.3f} over the last {report['texts']} predictions is above its "
                f"threshold ({report['thresholds']['psi' if 'psi' in signal else 'low_confidence_share']})."
            )
        for signal in sorted(self._alerts - alerts):
            log.warning(f"Drift: {signal} = {report[signal]:.3f} is back under its threshold.")
        self._alerts = alerts


# ------------------------------------------------------------------------------------------------ offline report
PREDICTION_COLUMNS = "label (predicted) and probability (its probability); optionally token_length or text"


def read_predictions(path: str | Path) -> Any:
    """A predictions file (.csv, .jsonl or .json lines) as a DataFrame; errors name the file and what is missing."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise InputError(f"Predictions file {path} does not exist.")
    if path.suffix == ".csv":
        table = pd.read_csv(path)
    elif path.suffix in (".jsonl", ".json"):
        table = pd.read_json(path, lines=True)
    else:
        raise InputError(f"Predictions file {path}: expected .csv or .jsonl, got {path.suffix!r}.")
    missing = [c for c in ("label", "probability") if c not in table.columns]
    if missing:
        raise InputError(
            f"Predictions file {path} has no column {missing} (columns: {list(table.columns)}); "
            f"it needs {PREDICTION_COLUMNS}."
        )
    bad = table.index[~table["probability"].between(0, 1)].tolist()
    if bad:
        raise InputError(f"Predictions file {path}: column 'probability' is not in [0, 1] at rows {bad[:10]}.")
    return table


def read_input_texts(inputs: str | Path, text_column: str, predictions: Any) -> list[str]:
    """The texts of the file the predictions were made from, checked to line up with the predictions' rows."""
    from lightning_cls.predict_inputs import read_text_chunks

    ids, texts = [], []
    for chunk_ids, chunk_texts in read_text_chunks(inputs, text_column=text_column):
        ids += chunk_ids
        texts += chunk_texts
    if len(texts) != len(predictions):
        raise InputError(f"{inputs} has {len(texts)} texts but the predictions file has {len(predictions)} rows.")
    if "id" in predictions.columns:
        differ = [i for i, (a, b) in enumerate(zip(ids, predictions["id"], strict=True)) if str(a) != str(b)]
        if differ:
            raise InputError(
                f"{inputs} and the predictions file disagree on the ids of rows {differ[:10]} "
                f"(first: {ids[differ[0]]!r} vs {predictions['id'].iloc[differ[0]]!r}): not the same inputs."
            )
    return texts


def plot_report(report: dict[str, Any], out: str | Path, title: str = "") -> Path:
    """A PNG with the reference and live distributions of labels, token lengths and the drift numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if report["lengths"] else 2
    fig, axes = plt.subplots(
        1, panels, figsize=(6 * panels, 4.8), squeeze=False, width_ratios=[2] + [1.5] * (panels - 1)
    )
    ax = axes[0, 0]
    names = report["labels"]["names"]
    x = np.arange(len(names))
    live = np.asarray(report["labels"]["live"], dtype=float)
    width = 0.4
    if report["labels"]["reference"] is not None:
        ref = np.asarray(report["labels"]["reference"], dtype=float)
        ax.bar(x - width / 2, ref / ref.sum(), width, label="reference (training labels)", color="#999999")
    ax.bar(x + width / 2, live / max(live.sum(), 1), width, label="live (predicted labels)", color="#1f77b4")
    ax.set_xticks(x, [_short(n) for n in names], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("share")
    ax.set_title(f"labels: PSI {_fmt(report['label_psi'])}")
    _legend_above_bars(ax)
    if report["lengths"]:
        ax = axes[0, 1]
        edges = report["lengths"]["bin_edges"]
        bounds = [0, *edges]
        ticks = [f"{lo}-{hi - 1}" for lo, hi in itertools.pairwise(bounds)] + [f"{bounds[-1]}+"]
        ref = np.asarray(report["lengths"]["reference"], dtype=float)
        live = np.asarray(report["lengths"]["live"], dtype=float)
        x = np.arange(len(ticks))
        ax.bar(x - width / 2, ref / ref.sum(), width, label="reference (training)", color="#999999")
        ax.bar(x + width / 2, live / max(live.sum(), 1), width, label="live", color="#ff7f0e")
        ax.set_xticks(x, ticks, rotation=35, ha="right", fontsize=8)
        ax.set_xlabel("tokens (reference decile bins)")
        ax.set_ylabel("share")
        ax.set_title(f"token lengths: PSI {_fmt(report['length_psi'])}")
        _legend_above_bars(ax)
    t = report["thresholds"]
    ax = axes[0, -1]
    counts = np.asarray(report["confidence"], dtype=float)
    ax.bar(np.arange(0.05, 1, 0.1), counts / max(counts.sum(), 1), width=0.09, color="#2ca02c")
    ax.axvline(
        t["low_confidence"], color="black", linestyle="--", label=f"low-confidence threshold {t['low_confidence']}"
    )
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability of the predicted label")
    ax.set_ylabel("share")
    ax.set_title(f"confidence: share below threshold {_fmt(report['low_confidence_share'])}")
    _legend_above_bars(ax)
    fig.suptitle(
        f"{title}  {report['texts']} predictions; low-confidence (p < {t['low_confidence']}) share "
        f"{_fmt(report['low_confidence_share'])}; PSI warning above {t['psi']}; alerts: {report['alerts'] or 'none'}",
        fontsize=9,
    )
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _legend_above_bars(ax: Any) -> None:
    # Head room over the tallest bar, so that the legend never hides one.
    ax.set_ylim(0, ax.get_ylim()[1] * 1.3)
    ax.legend(fontsize=8, loc="upper right")


def _short(name: str) -> str:
    words = name.split()
    return name if len(name) <= 18 else " ".join(w[:4] for w in words)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def monitor(
    predictions: str,
    model_dir: str,
    inputs: str | None = None,
    text_column: str = "text",
    out: str | None = None,
    low_confidence: float = LOW_CONFIDENCE,
    psi_warning: float = PSI_WARNING,
    low_confidence_warning: float = LOW_CONFIDENCE_WARNING,
) -> dict[str, Any]:
    """Drift report of a predictions file against the reference of an exported model: JSON plus a PNG plot.

    Args:
        predictions: CSV or JSONL file with columns `label` (predicted label) and `probability` (its probability),
            e.g. what `python -m lightning_cls predict` writes. For the token-length signal, a `token_length` or
            `text` column, or `inputs`.
        model_dir: The exported model folder (`python -m lightning_cls export`), for its labels and reference.
        inputs: The file the predictions were made from (.txt, .csv or .jsonl, rows in the same order): its texts
            are tokenized with the model's tokenizer for the token-length signal.
        text_column: Column of `inputs` (or of the predictions file) that holds the text.
        out: Output path prefix: writes OUT.json and OUT.png (default: beside the predictions file, `<name>.drift`).
        low_confidence: A prediction whose probability is below this counts as low-confidence.
        psi_warning: PSI above this is reported as an alert.
        low_confidence_warning: A low-confidence share above this is reported as an alert.
    """
    meta = read_export_metadata(model_dir).to_dict()
    table = read_predictions(predictions)
    texts, lengths = None, None
    if "token_length" in table.columns:
        lengths = table["token_length"].astype(int).tolist()
    elif inputs is not None:
        texts = read_input_texts(inputs, text_column, table)
    elif text_column in table.columns:
        texts = table[text_column].fillna("").astype(str).tolist()
    if texts is not None:
        from lightning_cls.tokenization import load_tokenizer, tokenize

        lengths = [len(ids) for ids in tokenize(load_tokenizer(str(model_dir)), texts, meta["max_length"])]
    report = drift_report(
        meta.get("reference"),
        meta["labels"],
        table["label"].astype(str).tolist(),
        table["probability"].astype(float).tolist(),
        lengths,
        low_confidence,
        psi_warning,
        low_confidence_warning,
    )
    report["predictions"] = str(predictions)
    report["model_dir"] = str(model_dir)
    if meta.get("reference") is None:
        report["note"] = "the export has no reference: only the low-confidence share is computed"
    elif lengths is None:
        report["note"] = "no token_length or text column and no --inputs: the length PSI is not computed"
    elif report["length_psi"] is None:
        report["note"] = "the export's reference has no token-length bins: the length PSI is not computed"
    prefix = Path(out) if out else Path(predictions).with_suffix(".drift")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = Path(f"{prefix}.json"), Path(f"{prefix}.png")
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    plot_report(report, png_path, title=Path(predictions).name)
    for signal in report["alerts"]:
        log.warning(f"Drift: {signal} = {report[signal]:.3f} is above its threshold.")
    print(
        f"{report['texts']} predictions: label PSI {_fmt(report['label_psi'])}, length PSI "
        f"{_fmt(report['length_psi'])}, low-confidence share {_fmt(report['low_confidence_share'])}; "
        f"alerts: {report['alerts'] or 'none'}\nwrote {json_path} and {png_path}"
    )
    return report


def main(argv: list[str]) -> dict[str, Any]:
    """`python -m lightning_cls monitor --predictions FILE --model_dir DIR`."""
    from jsonargparse import CLI

    from lightning_cls.sources import DataError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return CLI(monitor, args=argv, as_positional=False, prog="python -m lightning_cls monitor")
    except (InputError, DataError) as err:
        raise SystemExit(f"monitor: {err}") from None
