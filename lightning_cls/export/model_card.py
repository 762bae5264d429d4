"""The model card `export` writes as the folder's README.md, in the Hugging Face model-card form (YAML metadata,
then sections): labels, training data, training configuration, validation and test metrics, calibration, intended
use and limits. Everything in it comes from the checkpoint, `lightning_cls.json` and, if given, a test report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from lightning_cls.errors import ExportError
from lightning_cls.export.folder import ExportMetadata

# Training settings worth a reader's time (the checkpoint's hyperparameters hold more, e.g. the whole HF config).
TRAINING_KEYS = (
    "model_name_or_path",
    "pooling",
    "train_last_n_blocks",
    "learning_rate",
    "weight_decay",
    "warmup_ratio",
    "lora_r",
    "lora_alpha",
    "gradient_checkpointing",
    "calibrate",
)


def read_test_report(path: str | Path) -> dict[str, Any]:
    """A `test_report.json` written by `python -m lightning_cls test`; errors name the file."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"--test_report {path} cannot be read as a test report ({err}).") from None
    if not isinstance(report, dict) or "macro_f1" not in report:  # both tasks' reports have it
        raise ExportError(f"--test_report {path} is not a test report (no macro_f1): use test_report.json of `test`.")
    return report


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def model_card(metadata: ExportMetadata, hparams: dict[str, Any], test_report: dict | None = None) -> str:
    """The README.md of an exported folder."""
    header = {
        "library_name": "transformers",
        "pipeline_tag": "text-classification",
        "tags": ["lightning_cls", "text-classification", "scientific-text"],
        "base_model": hparams.get("model_name_or_path"),
    }
    task = metadata.task(use_temperature=False)  # one label or a label set: the card says which, and scores it so
    if test_report is not None:
        header["model-index"] = [
            {
                "name": "lightning_cls export",
                "results": [
                    {
                        "task": {"type": "text-classification"},
                        "metrics": [
                            {"type": key, "name": f"{name} (test)", "value": round(test_report[key], 4)}
                            for key, name in task.headline
                            if isinstance(test_report.get(key), int | float)
                        ],
                    }
                ],
            }
        ]
    out = ["---", yaml.safe_dump(header, sort_keys=False).strip(), "---", ""]
    out += [
        "# Subject classifier for scientific text",
        "",
        f"A sequence classifier fine-tuned from `{hparams.get('model_name_or_path')}` with "
        "[lightning_cls](https://github.com/) to tag papers and articles with their subjects: each text gets "
        f"{task.describe()}. Exported from `{metadata.checkpoint}` on {metadata.exported_at} "
        f"(lightning_cls {metadata.lightning_cls_version}).",
        "",
        "## Labels",
        "",
        ", ".join(f"`{name}`" for name in metadata.labels),
        "",
        "## Training data",
        "",
    ]
    reference = metadata.reference
    if reference is not None:
        out.append(f"{reference.rows} training texts, by label:")
        out.append("")
        out.append("| label | texts |")
        out.append("|---|---|")
        out += [f"| {name} | {count} |" for name, count in reference.label_counts.items()]
        if reference.token_length is not None:
            t = reference.token_length
            out += ["", f"Tokens per text as the model read them: median {t.p50:.0f}, 95th percentile {t.p95:.0f}."]
    else:
        out.append("The checkpoint records no training data summary.")
    reading = (
        f"truncated at {metadata.max_length} tokens"
        if metadata.max_windows == 1
        else f"read as up to {metadata.max_windows} windows of {metadata.max_length} tokens (mean of window logits)"
    )
    out += ["", "## Training configuration", "", f"- texts {reading}"]
    out += [f"- {key}: `{hparams[key]}`" for key in TRAINING_KEYS if hparams.get(key) is not None]
    out += ["", "## Evaluation", ""]
    calibration = metadata.calibration
    if calibration and calibration.get("accuracy") is not None:
        out.append(f"- validation accuracy: {_fmt(calibration['accuracy'])}")
    if test_report is not None:
        # A score the report lacks is left out (the tagger's top label needs the papers' subjects: data.subjects_path).
        scores = [(name, test_report[key]) for key, name in task.headline if test_report.get(key) is not None]
        if "weighted_f1" in test_report:
            scores.append(("weighted F1", test_report["weighted_f1"]))
        out.append(f"- test ({test_report['rows']} texts): " + ", ".join(f"{n} {_fmt(v)}" for n, v in scores))
        out += ["", "| label | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        per_label = test_report.get("per_label" if task.multi_label else "per_class", {})
        out += [
            f"| {name} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |"
            for name, m in per_label.items()
        ]
    elif not calibration:
        out.append("No metrics given (export with `--test_report runs/.../test_report.json` to quote the test split).")
    lexical = metadata.lexical
    if lexical:
        out += [
            "",
            "## Lexical fusion",
            "",
            f"The answer fuses the network with a lexical expert ({lexical.get('file')}: TF-IDF over word 1-2 grams, "
            f"{lexical.get('features')} n-grams, and a logistic regression fitted on the training split): logits + "
            f"{_fmt(lexical.get('weight'))} x the expert's logits, the weight fitted on the validation split. "
            "`serve` and `predict` give the fused answer (any backend); `transformers.pipeline` on this folder runs "
            "the network alone, and so gives the network's own (unfused, uncalibrated) answer.",
        ]
    out += ["", "## Calibration", ""]
    temperature = metadata.temperature
    if task.multi_label:
        thresholds = ", ".join(f"{name} {t:.2f}" for name, t in zip(metadata.labels, metadata.thresholds, strict=True))
        scaled = ""
        if temperature is not None:
            scaled = (
                f"Temperature scaling fitted on the validation split, one T for every label: T = {temperature:.4f}, "
                "each label's probability sigmoid(logits / T); mean label ECE "
                f"{_fmt((calibration or {}).get('mean_label_ece_uncalibrated'))} -> "
                f"{_fmt((calibration or {}).get('mean_label_ece'))}. "
            )
        out.append(
            f"{scaled}Per-label decision thresholds fitted on the validation split"
            f"{' (on the scaled probabilities)' if scaled else ''}: {thresholds}. `serve` and `predict` answer each "
            "label's probability and the set of labels at or above their thresholds; `transformers.pipeline` on this "
            "folder gives the plain sigmoids alone."
        )
    elif temperature is not None and calibration:
        before, after = calibration.get("before", {}), calibration.get("after", {})
        out.append(
            f"Temperature scaling fitted on the validation split: T = {temperature:.4f}. Expected calibration error "
            f"{_fmt(before.get('ece'))} -> {_fmt(after.get('ece'))}, negative log-likelihood {_fmt(before.get('nll'))}"
            f" -> {_fmt(after.get('nll'))}. `serve` and `predict` answer calibrated probabilities "
            "(softmax(logits / T)); `transformers.pipeline` on this folder gives the uncalibrated softmax."
        )
    else:
        out.append("Not calibrated: probabilities are the plain softmax (`python -m lightning_cls calibrate`).")
    out += [
        "",
        "## Intended use and limits",
        "",
        "- Intended use: suggesting the subject of English scientific abstracts and articles among the labels above,",
        "  with a person or a downstream rule deciding on low-confidence answers (`serve --min_confidence`).",
        "- Trained on arXiv abstracts: other kinds of text (news, patents, titles alone) and subjects outside the",
        "  labels get a confident-looking label all the same. Every text gets at least one of the labels above.",
        f"- Texts are {reading}; what lies past that is not read.",
        "- Papers written after the training data drift in vocabulary and subject mix: watch the drift and",
        "  accuracy gauges of `serve` (docs/monitoring.md), and send true labels to POST /feedback.",
        "",
        "## How to use",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        'classify = pipeline("text-classification", model="path/to/this/folder", truncation=True)',
        'classify("We measure the rotation curves of nearby spiral galaxies ...")',
        "```",
        "",
        "or `python -m lightning_cls serve --model_dir path/to/this/folder`.",
        "",
    ]
    return "\n".join(out)
