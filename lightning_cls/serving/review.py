"""The review queue, as the page serves it: which kept answer a reviewer sees next, and why.

Candidates come from the store (`store.review_queue`: kept texts with no true label, not held by another reviewer).
Each is given its reasons, and the one with the most reasons (then the least certain) is claimed and shown:

- **least certain**: its probability is below the drift monitor's low-confidence threshold;
- **drift**: its label, or its token length, is where its version's recent answers drifted from training (the
  window's label or length PSI is in alert, and that label or length bin is among the causes: `review_drift`);
- **experts disagree**: the network alone and the lexical expert alone would answer different labels. Read without
  running the network: the stored answer is the task's probabilities of ``z + w * s`` (network logits ``z``, the
  expert's ``s``, weight ``w``), so ``z`` is ``T * log p - w * s`` up to a constant per text (softmax with
  temperature ``T``), or ``T * logit(p) - w * s`` (a label set's sigmoids); ``s`` is the expert's, scored here;
- **challenger answered otherwise**: a shadow model's stored answer has another label;
- **abstained**: the service marked it (``--min_confidence``).

The item's evidence is `export.explain`'s, from the version's own `ExportedModel` (loaded here, once per version,
on first use: the HTTP process does not otherwise hold a model): the lexical expert's exact shares, or the
network's occlusion for a folder without an expert.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import numpy as np

from lightning_cls.errors import UserError
from lightning_cls.export.answer import ExportedModel
from lightning_cls.export.explain import explain
from lightning_cls.export.folder import read_export_metadata
from lightning_cls.monitoring.drift import DEFAULT_THRESHOLDS, DriftThresholds
from lightning_cls.serving.review_drift import DriftedBins, drift_reason, drifted_bins
from lightning_cls.store import review_queue as queue
from lightning_cls.store.feedback_store import FeedbackStore

TOP = 3  # subjects shown per item
DRIFT_SECONDS = 30.0  # a version's drifted labels and bins are read again after this (a window moves slowly)
log = logging.getLogger(__name__)


def network_part(
    probabilities: list[float], temperature: float | None, multi_label: bool, weight: float, lexical: np.ndarray
) -> np.ndarray:
    """The network's own logits in a stored fused answer, up to a constant per text: the task's probabilities of
    ``(z + w * s) / T`` undone (``T * log p``, or ``T * logit(p)`` for a label set's sigmoids: the temperature the
    answer was given under, stored with it), less the expert's part ``w * s``."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1 - 1e-9)
    scaled = np.log(p / (1 - p)) if multi_label else np.log(p)
    return (temperature or 1.0) * scaled - weight * lexical


class ReviewDesk:
    """The queue for the page's reviewers, on the store at ``db_path`` (opened in the HTTP process, on first use).
    ``drift``, ``window`` and ``min_window``: the service's drift thresholds and window (`serve --window_size`,
    `--min_window`), which the least-certain and drift reasons read as the drift monitor does."""

    def __init__(
        self, db_path: str, drift: DriftThresholds = DEFAULT_THRESHOLDS, window: int = 1000, min_window: int = 100
    ) -> None:
        self.db_path, self.drift, self.window, self.min_window = db_path, drift, window, min_window
        self._store: FeedbackStore | None = None
        self._models: dict[str, ExportedModel | None] = {}
        self._references: dict[str, dict | None] = {}  # each version's training reference (`lightning_cls.json`)
        self._drifted: dict[str, tuple[float, DriftedBins]] = {}  # version -> (when read, its drifted bins)
        self._lock = threading.Lock()  # one store connection and the loaded models, used by one thread at a time

    def store(self) -> FeedbackStore:
        if self._store is None:
            self._store = FeedbackStore(self.db_path, setup=False)  # `serve` made the tables (review_claims too)
        return self._store

    def model(self, version: str) -> ExportedModel | None:
        if version not in self._models:
            folder = queue.model_dir_of(self.store(), version)
            try:
                self._models[version] = ExportedModel.load(folder) if folder else None
                reference = read_export_metadata(folder).reference if folder else None
                self._references[version] = reference.to_dict() if reference is not None else None
            except UserError as err:  # the folder moved or was deleted: its items are shown without evidence
                log.warning(f"Review: version {version}'s export cannot be loaded ({err}): no evidence for it.")
                self._models[version], self._references[version] = None, None
        return self._models[version]

    def drifted(self, version: str, now: float) -> DriftedBins:
        """The labels and length bins where ``version``'s newest answers drifted (read at most every
        `DRIFT_SECONDS`)."""
        if version not in self._drifted or self._drifted[version][0] < now - DRIFT_SECONDS:
            model = self.model(version)
            names = list(model.names) if model is not None else []
            window = queue.recent_answers(self.store(), version, self.window) if model is not None else []
            found = drifted_bins(window, names, self._references.get(version), self.drift.psi_warning, self.min_window)
            self._drifted[version] = (now, found)
        return self._drifted[version][1]

    def next_item(self, reviewer: str) -> dict[str, Any] | None:
        """Claim the next item for ``reviewer`` and describe it; None when the queue is empty."""
        with self._lock:
            now = time.time()
            ranked = sorted(
                ((self.reasons(c, now), c) for c in queue.candidates(self.store(), reviewer, now)),
                key=lambda rc: (-len(rc[0]), rc[1].probability, -rc[1].time),
            )
            for reasons, candidate in ranked:
                if queue.claim(self.store(), candidate.id, reviewer, now):
                    item = self.describe(candidate, reasons)
                    item["remaining"] = queue.remaining(self.store(), reviewer, now)
                    return item
            return None

    def skip(self, prediction_id: str, reviewer: str) -> bool:
        with self._lock:
            return queue.skip(self.store(), prediction_id, reviewer)

    def reasons(self, c: queue.Candidate, now: float) -> list[str]:
        found = []
        if c.probability < self.drift.low_confidence:
            found.append(f"least certain ({c.probability:.2f})")
        drifted = drift_reason(
            self.drifted(c.version, now), json.loads(c.labels) if c.labels else [c.label], c.num_tokens
        )
        if drifted:
            found.append(drifted)
        disagree = self.experts_disagree(c)
        if disagree:
            found.append(disagree)
        if c.challenger_label:
            found.append(f"the challenger answered {c.challenger_label}")
        if c.abstained:
            found.append("abstained")
        return found

    def experts_disagree(self, c: queue.Candidate) -> str | None:
        model = self.model(c.version)
        if model is None or model.fusion is None:
            return None
        names, fusion = model.names, model.fusion
        lexical = fusion.expert.scores([c.text])[0].astype(np.float64)
        p = json.loads(c.probabilities)
        network = network_part(p, c.temperature, model.task.multi_label, fusion.weight, lexical)
        a, b = int(network.argmax()), int(lexical.argmax())
        return None if a == b else f"the network says {names[a]}, the lexical expert {names[b]}"

    def describe(self, c: queue.Candidate, reasons: list[str]) -> dict[str, Any]:
        model = self.model(c.version)
        p = json.loads(c.probabilities)
        names = list(model.names) if model is not None else []
        order = sorted(range(len(p)), key=lambda i: -p[i])[:TOP]
        top = [{"label": names[i], "probability": p[i]} for i in order] if names else []
        item = {
            "prediction_id": c.id,
            "time": c.time,
            "model_version": c.version,
            "text": c.text,
            "label": c.label,
            "labels": json.loads(c.labels) if c.labels else None,
            "probability": c.probability,
            "top_k": top,
            "reasons": reasons or ["oldest unlabelled"],
        }
        if model is not None:
            kinds = ("lexical",) if model.fusion is not None else ("network",)
            shown = [names.index(t["label"]) for t in top]
            item["evidence"] = explain(model, [c.text], [shown], kinds)[0]
        return item
