"""What GET /info says about a running service: the model and its version, the deployment at start, labels and
windows, calibration, drift, accuracy baselines, feedback, limits, batching and workers, and how the model runs.
`server.build_server` resolves these values; this module only puts them in the document."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_cls import __version__
from lightning_cls.data.windows import WindowSpec
from lightning_cls.database import redacted
from lightning_cls.export.folder import ExportMetadata
from lightning_cls.export.runtime import Choice, InferenceSettings
from lightning_cls.serving.deployment import DEPLOYMENT_PATH
from lightning_cls.serving.metrics import AccuracySettings
from lightning_cls.store.feedback_store import StoreSettings


@dataclass(frozen=True)
class Resolved:
    """The models as `build_server` resolved them."""

    requested: str  # --model_dir as given (a folder, or a registry reference)
    registered: dict[str, Any] | None  # the registry's record of it, when it is a registered version
    version: str  # the champion's version
    challenger: Any  # its `deployment.Slot`, or None
    windows: WindowSpec
    temperature: float | None  # in use
    exported_temperature: float | None


@dataclass(frozen=True)
class RunSettings:
    """How the service runs, as `build_server` settled it."""

    accuracy: AccuracySettings
    store: StoreSettings
    batching: dict[str, Any]
    num_threads: int
    choice: Choice
    inference: InferenceSettings
    protected: list[str] | None  # the paths that need the API key (None: no key)
    drift: dict[str, Any]


def service_info(s: Any, meta: ExportMetadata, r: Resolved, run: RunSettings, temporary_db: bool) -> dict[str, Any]:
    """The /info document (`s`: the service's `ServeSettings`)."""
    return {
        "model_dir": str(Path(s.model_dir).resolve()),
        "model_name_or_path": meta.model_name_or_path,
        "model_version": r.version,
        "registry": {**r.registered, "requested": r.requested} if r.registered else None,
        "deployment_at_start": {
            "challenger": {"version": r.challenger.version, "source": r.challenger.source} if r.challenger else None,
            "mode": s.challenger_mode if r.challenger else None,
            "share": s.challenger_share if r.challenger else 0.0,
            "now": f"GET {DEPLOYMENT_PATH}",
        },
        "keep_texts": s.keep_texts,
        "labels": meta.labels,
        "problem_type": "multi_label" if meta.multi_label else "single_label",
        "max_length": int(meta.max_length),
        "windows": {"max_windows": r.windows.max_windows, "stride": r.windows.stride},
        "exported_at": meta.exported_at,
        "exported_with": meta.lightning_cls_version,
        "version": __version__,
        "reference": meta.reference is not None,
        "drift": run.drift
        if meta.reference is not None
        else "no reference in the export: drift gauges are not computed",
        "temperature": {
            "in_use": r.temperature,
            "exported": r.exported_temperature,
            "answers": "softmax(logits / in_use): calibrated"
            if r.temperature is not None
            else "the plain softmax: "
            + ("--use_temperature false" if r.exported_temperature is not None else "the export has no temperature"),
        },
        "min_confidence": s.min_confidence,
        "accuracy": {
            "validation": run.accuracy.validation_accuracy,
            **({"validation_micro_f1": run.accuracy.validation_micro_f1} if meta.multi_label else {}),
            "alert_margin": s.accuracy_alert_margin,
        },
        "feedback": {
            "db": redacted(run.store.path),
            "kept_after_stop": not temporary_db,
            "retention": {"predictions": s.feedback_retention, "days": s.feedback_retention_days},
            "window": s.feedback_window,
            "min_feedback": s.min_feedback,
            "wait_seconds": s.feedback_wait,
            "true_label_field": "labels (a list of label names)" if meta.multi_label else "label (a label name)",
        },
        "limits": {"max_texts": s.max_texts, "max_body_bytes": s.max_body_bytes, "default_top_k": s.top_k},
        "batching": run.batching,
        "workers": {"per_device": s.workers_per_device, "torch_threads": run.num_threads},
        "inference": {
            "backend": run.choice.backend,
            "precision": run.choice.precision,
            "reason": run.choice.reason,
            "max_batch_tokens": run.batching["max_batch_tokens"],
            "agreement_gate": s.agreement_gate,
            "gate": run.inference.describe_gate(),
            "variants": run.choice.verdicts,  # auto: each variant's verdict by the export's measurements
        },
        "api_key": {"required_for": run.protected} if run.protected else None,
    }
