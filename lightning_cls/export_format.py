"""The exported model folder: its file names, `lightning_cls.json` (format version, labels, the training data
reference) and how a folder is loaded. `export` writes this format; `serve`, `monitor` and `predict` read it.

The training data reference is what monitoring compares live traffic with: the training split's label counts and
its token lengths in decile bins. `length_bin_edges` / `length_histogram` are the one binning used to make the
reference and to bin live traffic, so that the two always agree.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_cls.errors import InputError

METADATA_FILE = "lightning_cls.json"
ONNX_FILE = "model.onnx"
INT8_ONNX_FILE = "model.int8.onnx"  # model.onnx with int8 weights (onnxruntime dynamic quantization): --quantize int8
CONFIG_FILE = "config.json"
# Bump when a reader of an older version would misread the folder; readers refuse folders of a newer version.
# 2: the folder may fuse a lexical expert (`lexical`), or answer label sets (`thresholds`): a reader of version 1
# would answer with the network alone, or with one label.
FORMAT_VERSION = 2


# ------------------------------------------------------------------------------------------------ token lengths
def length_bin_edges(lengths: Sequence[int]) -> list[int]:
    """Decile edges of the lengths: equal-mass bins, the usual choice for a population stability index."""
    return np.unique(np.percentile(np.asarray(lengths), np.arange(10, 100, 10)).round().astype(int)).tolist()


def length_histogram(lengths: Sequence[int], edges: Sequence[int]) -> np.ndarray:
    """Counts of token lengths in bins: bin i holds [edges[i-1], edges[i]), with edges[-1] = 0 and the last open."""
    index = np.searchsorted(np.asarray(edges), np.asarray(lengths, dtype=np.int64), side="right")
    return np.bincount(index, minlength=len(edges) + 1)


def window_histogram(windows: Sequence[int]) -> dict[str, int]:
    """Texts by the number of windows read: {"1": texts read as one window, "2": ..., ...} (JSON keys are text)."""
    counts = np.bincount(np.asarray(windows, dtype=np.int64))
    return {str(n): int(c) for n, c in enumerate(counts) if c}


@dataclass
class TokenLengths:
    """Token length statistics of a split (as the model saw them: truncated) and its decile histogram."""

    mean: float
    p5: float
    p25: float
    p50: float
    p75: float
    p95: float
    max: int
    bin_edges: list[int] | None = None  # None in references made before the bins were recorded
    bin_counts: list[int] | None = None

    @classmethod
    def of(cls, lengths: np.ndarray) -> TokenLengths:
        edges = length_bin_edges(lengths)
        percentiles = {f"p{q}": float(np.percentile(lengths, q)) for q in (5, 25, 50, 75, 95)}
        return cls(
            mean=float(np.mean(lengths)),
            **percentiles,
            max=int(np.max(lengths)),
            bin_edges=edges,
            bin_counts=length_histogram(lengths, edges).tolist(),
        )


@dataclass
class SplitReference:
    """Row count, label distribution and token lengths of a split; the training split's is monitoring's reference."""

    rows: int
    label_counts: dict[str, int]
    token_length: TokenLengths | None = None
    # Texts by the number of windows read ({"1": ..., "2": ...}), when texts are read as windows; the token lengths
    # are then the tokens read per text (all its windows).
    window_counts: dict[str, int] | None = None

    @classmethod
    def of(
        cls, label_ids: np.ndarray, lengths: np.ndarray, names: Sequence[str], windows: np.ndarray | None = None
    ) -> SplitReference:
        """From per-text class ids (or a multi-hot matrix: texts x labels) and token lengths (and window counts, for
        texts read as windows). A multi-label split counts each label's texts."""
        label_ids = np.asarray(label_ids, dtype=np.int64)
        counts = label_ids.sum(0) if label_ids.ndim == 2 else np.bincount(label_ids, minlength=len(names))
        return cls(
            rows=len(lengths),
            label_counts={name: int(c) for name, c in zip(names, counts, strict=True)},
            token_length=TokenLengths.of(np.asarray(lengths)) if len(lengths) else None,
            window_counts=window_histogram(windows) if windows is not None else None,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SplitReference:
        lengths = data.get("token_length")
        known = set(TokenLengths.__dataclass_fields__)
        return cls(
            rows=int(data.get("rows", sum(data["label_counts"].values()))),
            label_counts={str(k): int(v) for k, v in data["label_counts"].items()},
            token_length=TokenLengths(**{k: v for k, v in lengths.items() if k in known}) if lengths else None,
            window_counts=data.get("window_counts"),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    # softmax(logits / temperature) are the calibrated probabilities (`calibration.calibrated_probabilities`); the
    # exported weights give the raw logits. None: not calibrated (T = 1). `calibration`: ECE, NLL and Brier on the
    # validation split before and after it.
    temperature: float | None = None
    calibration: dict[str, Any] | None = None
    # Each way of running the folder (`lightning_cls.inference`: "fp32", "bf16", "fp16", "onnx_fp32", "onnx_int8")
    # against torch fp32 on validation texts: {"agreement", "max_prob_diff", "texts", "texts_per_s", "device",
    # "source"}, or {"skipped": why, ...}. `serve --precision auto` uses a lower precision only if its agreement is
    # at least the gate. None: not measured (exported before this was recorded).
    inference: dict[str, Any] | None = None
    # The lexical expert fused with the network (`lightning_cls.fusion`): {"file": "lexical.safetensors", "sha256",
    # "labels", "features", "weight"}; the answer is softmax((logits + weight * lexical logits) / temperature), and
    # `temperature` is the fused logits'. None: the network alone.
    lexical: dict[str, Any] | None = None
    # A multi-label model's decision threshold per label, in label order (fitted on validation): its answer is the
    # set of labels whose sigmoid reaches its threshold. None: single-label (a softmax over the labels).
    thresholds: list[float] | None = None
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # keys written by a newer minor version, kept as they are

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(data.pop("extra"))
        if self.lexical is None and self.thresholds is None:  # version-1 readers answer as this reader does
            data.pop("lexical")
            data.pop("thresholds")
            data["format_version"] = min(self.format_version, 1)
        return data


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
    A pooled classifier is built with `lightning_cls.pooling`; any other with transformers' own classes.
    """
    from transformers import AutoModelForSequenceClassification

    from lightning_cls.pooling import MODEL_TYPE, PooledClassifier

    config_path = Path(model_dir) / CONFIG_FILE
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{config_path} cannot be read as a model config ({err}).") from None
    if model_type == MODEL_TYPE:
        return PooledClassifier.from_pretrained(model_dir, **kwargs)
    return AutoModelForSequenceClassification.from_pretrained(model_dir, trust_remote_code=False, **kwargs)
