"""The one owner of what a model answers: one label per text (`SingleLabel`) or a set of labels (`LabelSet`).

Everything that turns logits into an answer or scores answers asks the task instead of branching on "is this a
multi-label model": the probabilities (a softmax, or each label's sigmoid, under the calibrated temperature), the
decision (the most probable label, or every label at or above its threshold, at least one), the scores against the
truth (accuracy and macro-F1, or micro-/macro-F1 and subset accuracy), and whether two answers are the same.

    task = LabelSet(names, thresholds, temperature) # or SingleLabel(names, temperature)
    probs = task.probabilities(logits)              # (N, C) float32 tensor
    decided = task.decide(probs)                    # (N,) class ids, or (N, C) multi-hot
    task.scores(decided, truth)                     # {"macro_f1": ..., ...}

The arithmetic is in `lightning_cls.task.scores` (pure numpy). An exported folder's task is
`lightning_cls.export.folder.ExportMetadata.task()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:  # torch is needed only for logits (training, answering): scoring names stays light to import
    import torch

from lightning_cls.errors import kind_of, short
from lightning_cls.task.scores import decide, label_scores, multi_hot, multilabel_scores, set_scores, task_scores

Truth = str | tuple[str, ...]  # a true (or predicted) answer as names: one label, or a label set


@dataclass(frozen=True)
class Task:
    """What every task answers; `SingleLabel` and `LabelSet` say how."""

    names: tuple[str, ...]

    multi_label: ClassVar[bool] = False
    # The scores `scores` returns (macro-F1 is in both: what a faster variant is gated by).
    metrics: ClassVar[tuple[str, ...]] = ()

    @property
    def num_labels(self) -> int:
        return len(self.names)

    # What `transformers` calls the task (the exported config's `problem_type`: `pipeline` reads it).
    problem_type: ClassVar[str] = ""

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss of logits (B, C) against labels: class ids (B,) or multi-hot rows (B, C)."""
        raise NotImplementedError

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decide(self, probs: np.ndarray | torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def scores(self, decided: np.ndarray, truth: np.ndarray) -> dict[str, float]:
        raise NotImplementedError

    def same(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Per text, whether two decisions are the same answer (the same label, or the same set)."""
        raise NotImplementedError

    def encode(self, truth: Sequence[Any]) -> np.ndarray:
        """True labels as the decisions are written: names -> class ids (N,), or label sets -> multi-hot (N, C).
        Names not among the task's are the caller's to refuse before (a KeyError here)."""
        raise NotImplementedError

    def labels_of(self, decided: np.ndarray, probs: np.ndarray | torch.Tensor) -> list[list[str]]:
        """Each text's answer as label names, most probable first: one name, or the set."""
        raise NotImplementedError

    # How a report of this task names its headline scores: (report key, what to call it), for cards and tables.
    headline: ClassVar[tuple[tuple[str, str], ...]] = ()

    def describe(self) -> str:
        """What each text gets, in words (the model card says it)."""
        raise NotImplementedError

    # The truth as a client sends it: POST /feedback's field, an example of it, and what several are called.
    truth_field: ClassVar[str] = ""
    truth_example: ClassVar[str] = ""
    truth_noun: ClassVar[str] = ""

    def truth_from(self, item: dict, where: str) -> Truth:
        """The true answer in a sent ``item`` (its `truth_field`), as this task takes it; a ValueError whose message
        names ``where`` and what to send instead. Label names are checked by the caller (all of them at once)."""
        raise NotImplementedError

    def canonical(self, truth: Truth) -> Truth:
        """One spelling per answer (a set in the task's label order), so that equal answers compare equal."""
        return truth

    def truth_of(self, value: Truth) -> Truth | None:
        """A stored answer or truth (one name, or a tuple of names) as this task scores it; None: it cannot be."""
        raise NotImplementedError

    # The keys `live_scores` reports (None until a window holds enough rows).
    live_metrics: ClassVar[tuple[str, ...]] = ()

    def live_scores(self, predicted: Sequence[Truth], true: Sequence[Truth]) -> dict[str, Any]:
        """Scores of answers against true ones, both as names (live feedback, a labels file): over the labels
        present or predicted, so a window of a few subjects is not marked down for the others."""
        raise NotImplementedError

    def no_scores(self, rows: int) -> dict[str, Any]:
        """What `live_scores` reports when there are too few rows to score."""
        return {"rows": rows, **dict.fromkeys(self.live_metrics)}

    def answer(self, logits: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """(probabilities, decisions) of per-text logits."""
        probs = self.probabilities(logits)
        return probs, self.decide(probs)


@dataclass(frozen=True)
class SingleLabel(Task):
    """One label per text: softmax(logits / temperature), the most probable label."""

    temperature: float | None = None  # None: not calibrated (1.0)

    multi_label: ClassVar[bool] = False
    metrics: ClassVar[tuple[str, ...]] = ("accuracy", "macro_f1")
    headline: ClassVar[tuple[tuple[str, str], ...]] = (
        ("macro_f1", "macro-F1"),
        ("accuracy", "accuracy"),
        ("top_label_in_set", "top label one of the paper's subjects"),  # in test reports with data.subjects_path
    )

    problem_type: ClassVar[str] = "single_label_classification"

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from torch.nn.functional import cross_entropy

        return cross_entropy(logits, labels)

    def describe(self) -> str:
        return f"one of {self.num_labels} labels (the most probable; probabilities are a softmax over the labels)"

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return _scaled(logits, self.temperature).softmax(-1)  # (N, num_labels)

    def decide(self, probs: np.ndarray | torch.Tensor) -> np.ndarray:
        return _numpy(probs).argmax(-1)

    def scores(self, decided: np.ndarray, truth: np.ndarray) -> dict[str, float]:
        return task_scores(decided, truth)

    def same(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.asarray(a) == np.asarray(b)

    def labels_of(self, decided: np.ndarray, probs: np.ndarray | torch.Tensor) -> list[list[str]]:
        return [[self.names[int(i)]] for i in np.asarray(decided)]

    def encode(self, truth: Sequence[Any]) -> np.ndarray:
        index = {n: i for i, n in enumerate(self.names)}
        return np.asarray([index[name] for name in truth], dtype=np.int64)

    truth_field: ClassVar[str] = "label"
    truth_example: ClassVar[str] = '"label": "..."'
    truth_noun: ClassVar[str] = "labels"
    live_metrics: ClassVar[tuple[str, ...]] = ("accuracy", "macro_f1")

    def truth_from(self, item: dict, where: str) -> Truth:
        label = item.get("label")
        if "labels" in item:
            raise ValueError(
                f'{where}: this model answers one label per text: send "label": "..." (a string), not "labels" '
                f"(got {short(item['labels'])})"
            )
        if not isinstance(label, str):
            raise ValueError(f'{where}: "label" must be a string, got {kind_of(label)}')
        return label

    def truth_of(self, value: Truth) -> Truth | None:
        # A set of one name is that name; any other set cannot be scored as one label.
        if isinstance(value, str):
            return value
        return value[0] if len(value) == 1 else None

    def live_scores(self, predicted: Sequence[Truth], true: Sequence[Truth]) -> dict[str, Any]:
        return label_scores(true, predicted, self.names)


@dataclass(frozen=True)
class LabelSet(Task):
    """A set of labels per text: each label's sigmoid(logits / temperature), every label at or above its threshold
    (both fitted on validation, the thresholds on the scaled probabilities), the most probable one when none is
    (every text gets at least one label)."""

    thresholds: tuple[float, ...] = ()
    temperature: float | None = None  # None: not calibrated (1.0); the thresholds are on the same scale

    multi_label: ClassVar[bool] = True
    # micro precision and recall: a tagger's two errors apart (tags the paper does not have, subjects left untagged)
    metrics: ClassVar[tuple[str, ...]] = ("micro_f1", "macro_f1", "subset_accuracy", "micro_precision", "micro_recall")
    headline: ClassVar[tuple[tuple[str, str], ...]] = (
        ("micro_f1", "micro-F1"),
        ("macro_f1", "macro-F1"),
        ("subset_accuracy", "subset accuracy"),
        ("micro_precision", "micro precision"),
        ("micro_recall", "micro recall"),
        ("top_label_in_set", "top label one of the text's"),  # in test reports (it needs the probabilities)
    )

    problem_type: ClassVar[str] = "multi_label_classification"

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from torch.nn.functional import binary_cross_entropy_with_logits

        return binary_cross_entropy_with_logits(logits, labels.float())

    def describe(self) -> str:
        return (
            f"a set of the {self.num_labels} labels (each label's sigmoid against its own threshold, fitted on "
            "validation; at least one label per text)"
        )

    def __post_init__(self) -> None:
        if len(self.thresholds) != len(self.names):
            raise ValueError(f"{len(self.thresholds)} thresholds for {len(self.names)} labels")

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return _scaled(logits, self.temperature).sigmoid()

    def uncalibrated(self) -> LabelSet:
        """The same decisions on the plain sigmoids: each threshold moved to where sigmoid(z / T) meets it,
        sigmoid(T * logit(threshold)) (`--use_temperature false`: the raw probabilities, the same label sets)."""
        if self.temperature is None:
            return self
        t = np.clip(np.asarray(self.thresholds, dtype=np.float64), 1e-12, 1 - 1e-12)
        raw = 1 / (1 + np.exp(-self.temperature * np.log(t / (1 - t))))
        return LabelSet(self.names, tuple(float(x) for x in raw))

    def decide(self, probs: np.ndarray | torch.Tensor) -> np.ndarray:
        return decide(_numpy(probs), np.asarray(self.thresholds))

    def scores(self, decided: np.ndarray, truth: np.ndarray) -> dict[str, float]:
        found = multilabel_scores(decided, truth, self.names)
        return {k: found[k] for k in self.metrics}

    def same(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (np.asarray(a) == np.asarray(b)).all(-1)

    def encode(self, truth: Sequence[Any]) -> np.ndarray:
        return multi_hot(truth, self.names).astype(np.int64)

    truth_field: ClassVar[str] = "labels"
    truth_example: ClassVar[str] = '"labels": ["...", ...]'
    truth_noun: ClassVar[str] = "label sets"
    # `accuracy` is the subset accuracy (the whole set right): what the single-label gauges read for label sets.
    live_metrics: ClassVar[tuple[str, ...]] = ("accuracy", "macro_f1", "micro_f1", "top_label_in_set", "per_label")

    def truth_from(self, item: dict, where: str) -> Truth:
        labels = item.get("labels")
        if "label" in item:
            sent = item["label"]
            raise ValueError(
                f'{where}: this model answers label sets: send the true labels as "labels": '
                f"{short([sent] if isinstance(sent, str) else ['...'])} (a list of label names, one or more), not "
                f'"label" (got "label": {short(sent)})'
            )
        if not isinstance(labels, list):
            raise ValueError(f'{where}: "labels" must be a list of label names, got {kind_of(labels)}')
        if not labels:
            raise ValueError(f'{where}: "labels" is empty: give the text\'s true labels (at least one)')
        bad = [
            f"{where}.labels[{j}] must be a string, got {kind_of(x)}"
            for j, x in enumerate(labels)
            if not isinstance(x, str)
        ]
        if bad:
            raise ValueError(*bad)
        return tuple(dict.fromkeys(labels))

    def canonical(self, truth: Truth) -> Truth:
        order = {name: k for k, name in enumerate(self.names)}
        return tuple(sorted(self.truth_of(truth), key=lambda name: order.get(name, len(order))))

    def truth_of(self, value: Truth) -> Truth | None:
        # One name stands for the set of that name (feedback sent as one name, or a prediction stored before sets were).
        return (value,) if isinstance(value, str) else tuple(value)

    def live_scores(self, predicted: Sequence[Truth], true: Sequence[Truth]) -> dict[str, Any]:
        return set_scores(true, predicted, self.names)

    def labels_of(self, decided: np.ndarray, probs: np.ndarray | torch.Tensor) -> list[list[str]]:
        order = np.argsort(-_numpy(probs), axis=-1, kind="stable")
        decided = np.asarray(decided, dtype=bool)
        return [[self.names[j] for j in row if decided[i, j]] for i, row in enumerate(order)]


def _scaled(logits: torch.Tensor, temperature: float | None) -> torch.Tensor:
    """Logits divided by the calibrated temperature (None: not calibrated, T = 1), in float32."""
    return logits.float() / (1.0 if temperature is None else temperature)


def _numpy(values: np.ndarray | torch.Tensor) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor
        return values.detach().cpu().numpy()
    return np.asarray(values)


def task_for(
    names: Sequence[str],
    thresholds: Sequence[float] | None = None,
    temperature: Any = None,
    use_temperature: bool = True,
) -> Task:
    """A label set task when there are thresholds, else one label per text. `use_temperature` false: the plain
    softmax or sigmoids (a label set's thresholds moved so that its answers stay the same)."""
    t = None if temperature is None else float(temperature)
    if thresholds is not None:
        task = LabelSet(tuple(names), tuple(float(x) for x in thresholds), t)
        return task if use_temperature else task.uncalibrated()
    return SingleLabel(tuple(names), t if use_temperature else None)
