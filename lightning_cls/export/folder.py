"""The exported model folder: its file names, `lightning_cls.json` (format version, labels, the training data
reference) and how a folder is loaded. `export` writes this format; `serve`, `monitor` and `predict` read it.

The training data reference is what monitoring compares live traffic with: the training split's label counts and
its token lengths in decile bins (`lightning_cls.data.split_reference`, which owns the one binning).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lightning_cls.data.split_reference import SplitReference
from lightning_cls.errors import InputError
from lightning_cls.task import Task, task_for

METADATA_FILE = "lightning_cls.json"
ONNX_FILE = "model.onnx"
INT8_ONNX_FILE = "model.int8.onnx"  # model.onnx with int8 weights (onnxruntime dynamic quantization): --quantize int8
CONFIG_FILE = "config.json"
# A distilled student of the folder's model, exported beside it (`export --student_ckpt`): a folder of its own (its
# weights, tokenizer, fusion and calibration), run as the `student` variant when `auto` finds it keeps the accuracy.
STUDENT_DIR = "student"
# Bump when a reader of an older version would misread the folder; readers refuse folders of a newer version.
# 2: the folder may fuse a lexical expert (`lexical`), or answer label sets (`thresholds`): a reader of version 1
# would answer with the network alone, or with one label.
# 3: a label set's sigmoids are divided by a temperature, its thresholds on that scale: a reader of version 2 would
# compare the plain sigmoids with them, and tag other labels.
FORMAT_VERSION = 3


# ------------------------------------------------------------------------------------------------ lightning_cls.json
@dataclass
class ExportMetadata:
    """The content of `lightning_cls.json`."""

    labels: list[str]
    max_length: int
    max_windows: int = 1  # as the model was trained: windows per text (1: truncated at max_length)
    window_stride: int | None = None  # text tokens between window starts (None: the default of `WindowSpec`)
    reference: SplitReference | None = None
    model_name_or_path: str | None = None
    checkpoint: str | None = None
    exported_at: str | None = None
    lightning_cls_version: str | None = None
    # softmax(logits / temperature), or each label's sigmoid(logits / temperature), are the calibrated probabilities
    # (`lightning_cls.task`); the exported weights give the raw logits. None: not calibrated (T = 1). `calibration`:
    # the validation scores before and after it (ECE, NLL and Brier; a label set's mean label ECE).
    temperature: float | None = None
    calibration: dict[str, Any] | None = None
    # Each way of running the folder (`lightning_cls.export.runtime`: "fp32", "bf16", "fp16", "onnx_fp32", "onnx_int8")
    # against torch fp32 on validation texts: {"agreement", "max_prob_diff", "texts", "texts_per_s", "device",
    # "source"}, or {"skipped": why, ...}. `serve --precision auto` uses a lower precision only if its agreement is
    # at least the gate. None: not measured (exported before this was recorded).
    inference: dict[str, Any] | None = None
    # The lexical expert fused with the network (`model.fusion`): {"file": "lexical.safetensors", "sha256",
    # "labels", "features", "weight"}; the answer is softmax((logits + weight * lexical logits) / temperature), and
    # `temperature` is the fused logits'. None: the network alone.
    lexical: dict[str, Any] | None = None
    # A multi-label model's decision threshold per label, in label order (fitted on validation): its answer is the
    # set of labels whose sigmoid (under the temperature, when there is one) reaches its threshold. None:
    # single-label (a softmax over the labels).
    thresholds: list[float] | None = None
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # keys written by a newer minor version, kept as they are

    @property
    def multi_label(self) -> bool:
        """Whether the folder answers label sets (it has per-label thresholds) rather than one label."""
        return self.thresholds is not None

    def task(self, use_temperature: bool = True) -> Task:
        """What the folder answers: label sets under its thresholds, or one label, under its calibrated temperature
        (`use_temperature` false: the raw softmax or sigmoids, a label set's answers the same)."""
        return task_for(self.labels, self.thresholds, export_temperature(self), use_temperature)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(data.pop("extra"))
        # The oldest version whose readers answer as this reader does: older readers can read the folder.
        if self.lexical is None and self.thresholds is None:
            data.pop("lexical")
            data.pop("thresholds")
            data["format_version"] = min(self.format_version, 1)
        elif self.thresholds is None or self.temperature is None:
            data["format_version"] = min(self.format_version, 2)
        return data


def export_temperature(meta: ExportMetadata) -> float | None:
    """The export's temperature (None: not calibrated); a bad value is an error naming the file."""
    t = getattr(meta, "temperature", None)
    t = meta.extra.get("temperature") if t is None else t  # read by an older ExportMetadata, it lands in `extra`
    if t is None:
        return None
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
        raise InputError(f"lightning_cls.json: temperature {t!r} must be a positive finite number (or null).")
    return float(t)


def write_export_metadata(folder: str | Path, metadata: ExportMetadata) -> Path:
    path = Path(folder) / METADATA_FILE
    path.write_text(json.dumps(metadata.to_dict(), indent=2) + "\n")
    return path


def read_export_metadata(model_dir: str | Path) -> ExportMetadata:
    """`lightning_cls.json` of an exported model folder; errors name the file and what is wrong with it."""
    path = Path(model_dir) / METADATA_FILE
    if not path.is_file():
        raise InputError(
            f"{path} does not exist: --model_dir must be a folder written by `python -m lightning_cls export`."
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path} is not valid JSON ({err}).") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a JSON object.")
    version = data.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise InputError(
            f"{path} has format_version {version!r}, newer than this lightning_cls reads ({FORMAT_VERSION}): "
            "upgrade lightning_cls, or export the checkpoint again with this version."
        )
    missing = [k for k in ("labels", "max_length") if k not in data]
    if missing:
        raise InputError(f"{path} has no {missing}.")
    known = set(ExportMetadata.__dataclass_fields__) - {"extra"}
    reference = data.get("reference")
    return ExportMetadata(
        **{k: v for k, v in data.items() if k in known and k != "reference"},
        reference=SplitReference.from_dict(reference) if reference else None,
        extra={k: v for k, v in data.items() if k not in known},
    )


# ------------------------------------------------------------------------------------------------ the model
def load_classifier(model_dir: str | Path, **kwargs: Any) -> Any:
    """The folder's sequence classifier, built with this package's own classes.

    A folder is data: code it carries (`auto_map` in config.json, for `trust_remote_code` users) is never run here.
    A pooled classifier is built with `lightning_cls.model.pooling`; any other with transformers' own classes.
    """
    from transformers import AutoModelForSequenceClassification

    from lightning_cls.model.pooling import MODEL_TYPE, PooledClassifier

    config_path = Path(model_dir) / CONFIG_FILE
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{config_path} cannot be read as a model config ({err}).") from None
    if model_type == MODEL_TYPE:
        return PooledClassifier.from_pretrained(model_dir, **kwargs)
    return AutoModelForSequenceClassification.from_pretrained(model_dir, trust_remote_code=False, **kwargs)
