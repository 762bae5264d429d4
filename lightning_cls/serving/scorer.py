"""One exported model loaded in an inference worker: texts in, probabilities (and label sets) out.

`ClassifierAPI` holds one per deployed model (the champion, and a challenger beside it: `serving.router`); each
has its own tokenizer, runner (backend and precision), windows, lexical expert, temperature and thresholds, read
from its own export, so that two versions of a model can differ in all of them and still answer the same request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from lightning_cls.export.answer import ExportedModel
from lightning_cls.export.runtime import InferenceSettings, Runner
from lightning_cls.task import Task

log = logging.getLogger(__name__)


@dataclass
class ScorerSettings:
    """How the service runs every model it loads (the serve flags), the rest is read from each export."""

    inference: InferenceSettings
    device: str = "cpu"
    max_windows: int | None = None  # None: the export's
    window_stride: int | None = None  # None: the export's
    use_temperature: bool = True


@dataclass
class Scores:
    """One model's answers to a list of texts."""

    probs: list[list[float]]  # (texts, labels)
    order: list[list[int]]  # label indices, most probable first
    tokens: list[int]  # tokens read, special tokens included
    windows: list[int]
    cut: list[bool]
    sets: list[list[str]] | None  # a multi-label model's label sets (None: one label each)


class Scorer:
    """An export folder, loaded for the service (`lightning_cls.export.answer.ExportedModel`, the one answer path),
    with its version: `score` gives the answers as lists for the worker's JSON."""

    def __init__(self, model_dir: str, version: str, settings: ScorerSettings) -> None:
        self.model_dir, self.version = model_dir, version
        self.model = ExportedModel.load(
            model_dir,
            settings.inference,
            settings.device,
            max_windows=settings.max_windows,
            window_stride=settings.window_stride,
            use_temperature=settings.use_temperature,
        )
        log.info(f"{version}: {self.runner.describe()}")
        self.names = list(self.model.names)
        self.model.network_logits(["warm up"])  # the slow first pass

    @property
    def runner(self) -> Runner:
        return self.model.runner

    @property
    def task(self) -> Task:
        return self.model.task

    def score(self, texts: list[str]) -> Scores:
        answers = self.model.answer(texts)
        probs = answers.probs
        return Scores(
            probs=probs.tolist(),
            order=probs.argsort(dim=-1, descending=True).tolist(),
            tokens=answers.tokens.tolist(),
            windows=answers.windows.tolist(),
            cut=answers.cut.tolist(),
            sets=self.task.labels_of(answers.decided, probs) if self.task.multi_label else None,
        )
