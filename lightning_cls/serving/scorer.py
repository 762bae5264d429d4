"""One exported model loaded in an inference worker: texts in, probabilities (and label sets) out.

`ClassifierAPI` holds one per deployed model (the champion, and a challenger beside it: `serving.router`); each
has its own tokenizer, runner (backend and precision), windows, lexical expert, temperature and thresholds, read
from its own export, so that two versions of a model can differ in all of them and still answer the same request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from lightning_cls.export_format import read_export_metadata
from lightning_cls.fusion import FolderFusion
from lightning_cls.inference import InferenceSettings, Runner
from lightning_cls.tokenization import load_tokenizer
from lightning_cls.windows import WindowSpec, mean_logits_per_text, window_token_ids

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
    """An export folder, loaded: `score` answers texts as the service does (windows, fusion, temperature, sets)."""

    def __init__(self, model_dir: str, version: str, settings: ScorerSettings) -> None:
        from lightning_cls.serving.server import export_temperature  # the one reader of an export's temperature

        self.model_dir, self.version = model_dir, version
        meta = read_export_metadata(model_dir)
        self.tokenizer = load_tokenizer(model_dir)
        self.runner = Runner(model_dir, settings.inference, device=settings.device, tokenizer=self.tokenizer)
        log.info(f"{version}: {self.runner.describe()}")
        # A folder that fuses a lexical expert (lightning_cls.json `lexical`): checked and loaded here, or refused.
        self.fusion = FolderFusion.from_folder(model_dir, self.runner.metadata)
        # A multi-label export's per-label thresholds: each answer is a label set (None: one label, a softmax).
        thresholds = getattr(self.runner.metadata, "thresholds", None)
        self.thresholds = torch.tensor(thresholds, dtype=torch.float32) if thresholds is not None else None
        self.temperature = export_temperature(meta) if settings.use_temperature else None
        self.names = self.runner.labels
        self.special_tokens = self.tokenizer.num_special_tokens_to_add()
        self.windows = WindowSpec(
            int(meta.max_length),
            settings.max_windows if settings.max_windows is not None else meta.max_windows,
            settings.window_stride if settings.window_stride is not None else meta.window_stride,
        )
        self.windows.step(self.tokenizer)  # a stride longer than a window fails here, at load, not per request
        self.logits(window_token_ids(self.tokenizer, ["warm up"], self.windows).input_ids)  # the slow first pass

    def logits(self, ids: list[list[int]]) -> torch.Tensor:
        """Logits (N, num_labels) of token id lists (whole texts or windows), float32, in input order: the runner
        runs them longest first, at most `max_batch_tokens` tokens per forward pass."""
        return self.runner.logits(ids)

    def score(self, texts: list[str]) -> Scores:
        windows = window_token_ids(self.tokenizer, texts, self.windows)
        # The windows of every text are batched together; each text's answer is its windows' mean.
        logits = mean_logits_per_text(self.logits(windows.input_ids), windows.text_index, windows.num_texts)
        if self.fusion is not None:  # plus the lexical expert's logits of the whole texts, times its weight
            logits = self.fusion.fused(logits, texts)
        probs = self.probabilities(logits)
        return Scores(
            probs=probs.tolist(),
            order=probs.argsort(dim=-1, descending=True).tolist(),
            tokens=(windows.tokens + self.special_tokens).tolist(),
            windows=windows.counts.tolist(),
            cut=windows.cut.tolist(),
            sets=self.label_sets(probs) if self.thresholds is not None else None,
        )

    def label_sets(self, p: torch.Tensor) -> list[list[str]]:
        """A multi-label answer per text: every label whose probability reaches its threshold (its most probable
        label when none does), most probable first, as `predict` writes them (`multilabel.decide`)."""
        chosen = p >= self.thresholds
        chosen[torch.arange(len(p)), p.argmax(-1)] |= ~chosen.any(-1)
        order = p.argsort(-1, descending=True).tolist()
        return [[self.names[j] for j in row if chosen[i, j]] for i, row in enumerate(order)]

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """softmax(logits / temperature) over the labels: `lightning_cls.calibration.calibrated_probabilities`
        (a test checks they agree), written out here because importing that module loads torchmetrics, seconds of
        start-up for every worker. A multi-label model's: each label's sigmoid."""
        if self.thresholds is not None:
            return logits.float().sigmoid()
        t = 1.0 if self.temperature is None else self.temperature
        return (logits.float() / t).softmax(-1)  # (N, num_labels)
