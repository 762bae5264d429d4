"""`python -m lightning_cls monitor`: the drift report of a predictions file against the reference of an exported
model, offline (the same report the service computes over its sliding window, see `monitoring.drift`), written as
JSON plus a PNG plot. It includes the estimated accuracy (the mean probability of the predicted labels) and, given
true labels for some of the predictions (`--labels`), the realized accuracy, macro-F1 and calibration (ECE).

A multi-label model's predictions have label sets (a `labels` column): the report then reads them as the service
does (`monitoring.label_set_drift`: each label's rate against its training rate, the expected micro-F1 when
the rows list every label's probability), and `--labels` gives true label sets (column `labels`, or `label` with
names separated by ";") scored by micro-F1, macro-F1, subset accuracy and per label.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from lightning_cls.arg_parser import run_command
from lightning_cls.errors import InputError
from lightning_cls.export.folder import read_export_metadata
from lightning_cls.monitoring.drift import (
    DEFAULT_THRESHOLDS,
    ECE_BINS,
    DriftThresholds,
    drift_report,
    top_label_ece,
)
from lightning_cls.monitoring.label_set_drift import parse_label_sets, set_drift
from lightning_cls.task import Task

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = "label (predicted) and probability (its probability); optionally token_length or text"


def read_predictions(path: str | Path) -> Any:
    """A predictions file (.csv, .jsonl or .json lines) as a DataFrame; errors name the file and what is missing."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise InputError(f"Predictions file {path} does not exist.")
    # Ids as written (the service's hex ids are not numbers, "007" is not 7): they are matched with --labels.
    if path.suffix == ".csv":
        table = pd.read_csv(path, dtype={"id": str})
    elif path.suffix in (".jsonl", ".json"):
        table = pd.read_json(path, lines=True, dtype={"id": str})
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


def read_labels(path: str | Path, multi_label: bool = False) -> Any:
    """A file of true labels (.csv, .jsonl or .json lines) with columns `id` and `label`, as a DataFrame of strings;
    errors name the file and what is wrong (a missing column, empty labels, an id given twice). ``multi_label``:
    true label sets, column `labels` (or `label`), as lists of names in a column `labels`."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise InputError(f"Labels file {path} does not exist.")
    if path.suffix == ".csv":
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    elif path.suffix in (".jsonl", ".json"):
        table = pd.read_json(path, lines=True, dtype={"id": str, "label": str})
    else:
        raise InputError(f"Labels file {path}: expected .csv or .jsonl, got {path.suffix!r}.")
    if multi_label:
        return _read_label_sets(table, path)
    missing = [c for c in ("id", "label") if c not in table.columns]
    if missing:
        raise InputError(
            f"Labels file {path} has no column {missing} (columns: {list(table.columns)}); it needs `id` (the "
            "predictions' ids) and `label` (the true label)."
        )
    table = pd.DataFrame({"id": table["id"].astype(str), "label": table["label"].fillna("").astype(str)})
    empty = table.index[table["label"].str.strip() == ""].tolist()
    if empty:
        raise InputError(f"Labels file {path}: empty label at rows {empty[:10]}.")
    twice = table["id"][table["id"].duplicated()].unique().tolist()
    if twice:
        raise InputError(f"Labels file {path}: ids given more than once: {_few(twice)}.")
    return table


def _read_label_sets(table: Any, path: Path) -> Any:
    import pandas as pd

    column = "labels" if "labels" in table.columns else "label"
    if "id" not in table.columns or column not in table.columns:
        raise InputError(
            f"Labels file {path} has no column {[c for c in ('id', 'labels') if c not in table.columns]} (columns: "
            f"{list(table.columns)}); it needs `id` (the predictions' ids) and `labels` (the true label set)."
        )
    ids = table["id"].astype(str)
    twice = ids[ids.duplicated()].unique().tolist()
    if twice:
        raise InputError(f"Labels file {path}: ids given more than once: {_few(twice)}.")
    return pd.DataFrame({"id": ids, "labels": parse_label_sets(table[column].tolist(), str(path), column)})


def _labelled_rows(predictions: Any, labels: Any, column: str, names: list[str], labels_path: str | Path) -> Any:
    """The rows of the predictions that have a true label (or set) in ``labels[column]``, and those labels, joined
    on `id`; ids not among the predictions and labels the model does not have are errors naming them."""
    if "id" not in predictions.columns:
        raise InputError("--labels needs an `id` column in the predictions file, to match the labels to predictions.")
    ids = predictions["id"].astype(str)
    twice = ids[ids.duplicated()].unique().tolist()
    if twice:
        raise InputError(f"The predictions file has ids more than once: {_few(twice)}; --labels cannot match them.")
    unknown = labels["id"][~labels["id"].isin(set(ids))].tolist()
    if unknown:
        raise InputError(
            f"Labels file {labels_path}: {len(unknown)} id(s) not in the predictions file: {_few(unknown)}."
        )
    sent = [v for value in labels[column] for v in ([value] if isinstance(value, str) else value)]
    bad = sorted(set(sent) - set(names))
    if bad:
        raise InputError(f"Labels file {labels_path}: label(s) {_few(bad)} are not among the model's labels {names}.")
    true = dict(zip(labels["id"], labels[column], strict=True))
    rows = [i for i, pid in enumerate(ids) if pid in true]
    return rows, [true[ids.iloc[i]] for i in rows]


def realized_set_scores(
    predictions: Any, sets: list[list[str]], labels: Any, task: Task, labels_path: str | Path
) -> dict[str, Any]:
    """Micro-F1, macro-F1, subset accuracy and per-label scores of the predicted label ``sets`` that have a true set
    in ``labels`` (joined on `id`), as the task scores live answers."""
    rows, truth = _labelled_rows(predictions, labels, "labels", list(task.names), labels_path)
    scores = task.live_scores([sets[i] for i in rows], truth)
    return {
        "labels": str(labels_path),
        "of_predictions": len(predictions),
        **{k: scores[k] for k in ("rows", "micro_f1", "macro_f1", "top_label_in_set")},
        "subset_accuracy": scores["accuracy"],
        "per_label": scores["per_label"],
    }


def every_label_probability(table: Any, names: list[str]) -> list[list[float]] | None:
    """Each row's probability of every label, from its `top_k` list (JSONL of `predict` with top_k = the number of
    labels); None when the rows do not list every label."""
    if "top_k" not in table.columns:
        return None
    out = []
    for top in table["top_k"]:
        given = {t["label"]: t["probability"] for t in top} if isinstance(top, list) else {}
        if set(given) != set(names):
            return None
        out.append([float(given[name]) for name in names])
    return out


def realized_scores(predictions: Any, labels: Any, task: Task, labels_path: str | Path) -> dict[str, Any]:
    """Accuracy, macro-F1 and ECE of the predictions that have a true label in ``labels`` (joined on `id`), beside
    the accuracy their probabilities estimate. Ids not among the predictions and labels the model does not have
    are errors naming them."""
    rows, truth = _labelled_rows(predictions, labels, "label", list(task.names), labels_path)
    predicted = predictions["label"].astype(str).iloc[rows].tolist()
    confidence = predictions["probability"].astype(float).iloc[rows].to_numpy()
    scores = task.live_scores(predicted, truth) if rows else task.no_scores(0)
    correct = [p == t for p, t in zip(predicted, truth, strict=True)]
    return {
        "labels": str(labels_path),
        "rows": len(rows),
        "of_predictions": len(predictions),
        "accuracy": scores["accuracy"],
        "macro_f1": scores["macro_f1"],
        # estimated on the same rows, for comparison with the realized accuracy
        "estimated_accuracy": float(confidence.mean()) if rows else None,
        "ece": top_label_ece(confidence, correct),
        "ece_bins": ECE_BINS,
    }


def _few(items: list[Any], limit: int = 10) -> str:
    shown = repr(list(items[:limit]))
    return shown if len(items) <= limit else f"{shown} (and {len(items) - limit} more)"


def read_input_texts(inputs: str | Path, text_column: str, predictions: Any) -> list[str]:
    """The texts of the file the predictions were made from, checked to line up with the predictions' rows."""
    from lightning_cls.data.tables import read_text_chunks

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
    labels: str | None = None,
    thresholds: DriftThresholds = DEFAULT_THRESHOLDS,
) -> dict[str, Any]:
    """Drift report of a predictions file against the reference of an exported model: JSON plus a PNG plot, with
    the estimated accuracy (mean probability of the predicted labels) and, with `labels`, the realized one.

    Args:
        predictions: CSV or JSONL file with columns `label` (predicted label) and `probability` (its probability),
            e.g. what `python -m lightning_cls predict` writes. For the token-length signal, a `token_length` or
            `text` column, or `inputs`.
        model_dir: The exported model folder (`python -m lightning_cls export`), for its labels and reference.
        inputs: The file the predictions were made from (.txt, .csv or .jsonl, rows in the same order): its texts
            are tokenized with the model's tokenizer for the token-length signal.
        text_column: Column of `inputs` (or of the predictions file) that holds the text.
        out: Output path prefix: writes OUT.json and OUT.png (default: beside the predictions file, `<name>.drift`).
        labels: CSV or JSONL file of true labels, columns `id` (ids of the predictions file) and `label`, for some
            or all predictions: adds their accuracy, macro-F1 and calibration error (ECE, 15 bins) to the report.
        thresholds: When a drift signal is an alert.
    """
    meta = read_export_metadata(model_dir)
    reference = meta.reference.to_dict() if meta.reference is not None else None
    table = read_predictions(predictions)
    task = meta.task()
    multi_label = task.multi_label
    truth = read_labels(labels, multi_label) if labels is not None else None
    texts, lengths = None, None
    if "token_length" in table.columns:
        lengths = table["token_length"].astype(int).tolist()
    elif inputs is not None:
        texts = read_input_texts(inputs, text_column, table)
    elif text_column in table.columns:
        texts = table[text_column].fillna("").astype(str).tolist()
    # Windows read per text: written by `predict` for texts read as windows (the window PSI needs them).
    windows = table["windows"].astype(int).tolist() if "windows" in table.columns else None
    if texts is not None:
        from lightning_cls.data.tokenization import load_tokenizer
        from lightning_cls.data.windows import WindowSpec, window_token_ids

        tokenizer = load_tokenizer(str(model_dir))
        read = window_token_ids(tokenizer, texts, WindowSpec(meta.max_length, meta.max_windows, meta.window_stride))
        lengths = (read.tokens + tokenizer.num_special_tokens_to_add()).tolist()  # as the model read each text
        windows = read.counts.tolist() if windows is None else windows
    report = drift_report(
        reference,
        meta.labels,
        table["label"].astype(str).tolist(),
        table["probability"].astype(float).tolist(),
        lengths,
        thresholds,
        windows,
    )
    report["predictions"] = str(predictions)
    report["model_dir"] = str(model_dir)
    has_sets = multi_label and "labels" in table.columns
    sets = parse_label_sets(table["labels"].tolist(), str(predictions), "labels") if has_sets else None
    if sets is not None:
        set_drift(report, reference, meta.labels, sets, every_label_probability(table, meta.labels), thresholds)
    elif multi_label:
        report["note_label_sets"] = (
            "no `labels` column (the predicted label sets): the per-label signals are not computed"
        )
    if truth is not None and multi_label:
        if sets is None:
            raise InputError(
                f"--labels with a multi-label model needs the predicted label sets: {predictions} has no `labels` "
                "column."
            )
        report["realized"] = realized_set_scores(table, sets, truth, task, labels)
    else:
        report["realized"] = realized_scores(table, truth, task, labels) if truth is not None else None
    if reference is None:
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
    realized = report["realized"]
    scored = (
        f"; on the {realized['rows']} labelled: accuracy {_fmt(realized['accuracy'])} (estimated "
        f"{_fmt(realized['estimated_accuracy'])}), macro-F1 {_fmt(realized['macro_f1'])}, ECE {_fmt(realized['ece'])}"
        if realized and not multi_label
        else ""
    )
    if multi_label and "per_label" in report:
        drifted = report["label_rate_alerts"]
        scored += (
            f"\nlabel sets: largest per-label rate PSI {_fmt(report['label_rate_psi'])} (over the threshold: "
            f"{drifted or 'none'}), estimated micro-F1 {_fmt(report['estimated_micro_f1'])}"
        )
        if realized:
            scored += (
                f"; on the {realized['rows']} labelled: micro-F1 {_fmt(realized['micro_f1'])}, macro-F1 "
                f"{_fmt(realized['macro_f1'])}, subset accuracy {_fmt(realized['subset_accuracy'])}"
            )
    print(
        f"{report['texts']} predictions: label PSI {_fmt(report['label_psi'])}, length PSI "
        f"{_fmt(report['length_psi'])}, low-confidence share {_fmt(report['low_confidence_share'])}; "
        f"alerts: {report['alerts'] or 'none'}\nestimated accuracy {_fmt(report['estimated_accuracy'])}{scored}\n"
        f"wrote {json_path} and {png_path}"
    )
    return report


def main(argv: list[str]) -> dict[str, Any]:
    """`python -m lightning_cls monitor --predictions FILE --model_dir DIR`: flat flags, as users type them
    (--psi_warning, not --thresholds.psi_warning)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_command(monitor, argv, "monitor", config_file=True)
