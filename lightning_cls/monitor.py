"""`python -m lightning_cls monitor`: the drift report of a predictions file against the reference of an exported
model, offline (the same report the service computes over its sliding window, see `lightning_cls.drift`), written as
JSON plus a PNG plot.
"""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from lightning_cls.drift import DEFAULT_THRESHOLDS, DriftThresholds, drift_report
from lightning_cls.errors import DataError, InputError
from lightning_cls.export_format import read_export_metadata

log = logging.getLogger(__name__)

PROG = "python -m lightning_cls monitor"
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
    from lightning_cls.tables import read_text_chunks

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
    thresholds: DriftThresholds = DEFAULT_THRESHOLDS,
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
        thresholds: When a drift signal is an alert.
    """
    meta = read_export_metadata(model_dir)
    reference = meta.reference.to_dict() if meta.reference is not None else None
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

        lengths = [len(ids) for ids in tokenize(load_tokenizer(str(model_dir)), texts, meta.max_length)]
    report = drift_report(
        reference,
        meta.labels,
        table["label"].astype(str).tolist(),
        table["probability"].astype(float).tolist(),
        lengths,
        thresholds,
    )
    report["predictions"] = str(predictions)
    report["model_dir"] = str(model_dir)
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
    print(
        f"{report['texts']} predictions: label PSI {_fmt(report['label_psi'])}, length PSI "
        f"{_fmt(report['length_psi'])}, low-confidence share {_fmt(report['low_confidence_share'])}; "
        f"alerts: {report['alerts'] or 'none'}\nwrote {json_path} and {png_path}"
    )
    return report


def main(argv: list[str]) -> dict[str, Any]:
    """`python -m lightning_cls monitor --predictions FILE --model_dir DIR`."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = ArgumentParser(prog=PROG, description=inspect.getdoc(monitor).split("\n\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="Path to a configuration file.")
    # Flat flags, as users type them: --psi_warning, not --thresholds.psi_warning.
    parser.add_function_arguments(monitor, as_group=False, skip={"thresholds"})
    parser.add_class_arguments(DriftThresholds, as_group=False)
    values = parser.parse_args(argv).as_dict()
    names = [name for name in inspect.signature(monitor).parameters if name != "thresholds"]
    try:
        return monitor(**{name: values[name] for name in names}, thresholds=DriftThresholds.pick(values))
    except (InputError, DataError) as err:
        raise SystemExit(f"monitor: {err}") from None
