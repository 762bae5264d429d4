"""The lexical expert beside a training model (`model.lexical`): fitted on the training split, its scores of each
split read once, its fusion weight fitted on validation. The fusion maths are `fusion`'s; this module holds the state
and the order of the steps.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_cls.errors import ConfigError
from lightning_cls.model.epoch_reports import Epoch
from lightning_cls.model.fusion import SplitScores, component_scores, fit_fusion_weight, fuse
from lightning_cls.model.lexical import LexicalExpert, LexicalSettings


class LexicalFusion:
    """A model's lexical expert and fusion weight (both None until fitted or loaded) and the expert's scores of the
    splits read so far. `datamodule` arguments give the raw texts (`split_texts`): batches carry row ids, not texts.
    """

    def __init__(self, settings: LexicalSettings | None) -> None:
        # None: fit no expert (a checkpoint's own is still loaded and used).
        self.settings = settings
        self.expert: LexicalExpert | None = None
        self.weight: float | None = None
        self._scores: dict[str, SplitScores] = {}

    def restore(self, state: dict[str, Any], weight: float | None) -> None:
        """The expert and weight a checkpoint saved (`LexicalExpert.state()`, a float or None)."""
        self.expert, self.weight, self._scores = LexicalExpert.from_state(state), weight, {}

    def fit_expert(self, datamodule: Any, num_labels: int) -> None:
        """Fit the expert on the training split, if the settings ask for one and there is none yet."""
        if self.settings is None or self.expert is not None:
            return
        _, texts, labels = datamodule.split_texts("train")
        self.expert = LexicalExpert.fit(texts, labels, num_labels, self.settings)
        self.weight, self._scores = None, {}
        rank_zero_info(f"Lexical expert: {len(self.expert.idf)} n-grams, fitted on {len(texts)} training texts.")

    def logits(self, stage: str, row_ids: torch.Tensor, datamodule: Any) -> torch.Tensor:
        """The expert's logits of these rows of the stage's split (the split is scored once)."""
        if stage not in self._scores:
            ids, texts, _ = datamodule.split_texts(stage)
            self._scores[stage] = SplitScores(ids, self.expert.scores(texts))
        return self._scores[stage][row_ids]

    def fused(self, logits: torch.Tensor, stage: str, row_ids: torch.Tensor, datamodule: Any) -> torch.Tensor:
        """The network's `logits` of these rows fused with the expert's (there must be one)."""
        return fuse(logits, self.logits(stage, row_ids, datamodule), self.weight)

    def fuse_epoch(
        self, epoch: Epoch, logits: torch.Tensor, labels: torch.Tensor, row_ids: torch.Tensor, datamodule: Any
    ) -> tuple[torch.Tensor, dict | None]:
        """An epoch's fused per-text logits (fitting the weight first on the rows to fit on) and the scores of the
        neural head, the lexical expert and the fusion (`fusion.component_scores`); the logits as they are, and no
        scores, without an expert."""
        if self.expert is None:
            return logits, None
        lexical = self.logits(epoch.stage, row_ids, datamodule)
        if epoch.fit:
            self.weight = epoch.broadcast(fit_fusion_weight(logits, lexical, labels))
        if self.weight is None:
            if not epoch.sanity:
                raise ConfigError(
                    "The model has a lexical expert but no fusion weight: run `calibrate` on the checkpoint (the "
                    "weight is fitted on the validation split)."
                )
            return logits, None
        components = component_scores(logits, lexical, labels, self.weight)
        components["lexical_weight"] = self.weight
        return fuse(logits, lexical, self.weight), components
