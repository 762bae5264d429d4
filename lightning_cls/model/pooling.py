"""Pooling token states into one vector per text, and a sequence classifier built on any backbone with it.

`BertForSequenceClassification` classifies from the `[CLS]` pooler, which a sentence encoder such as
all-MiniLM-L6-v2 (trained with mean pooling) never shaped; this classifier pools the way the backbone was trained.

This file is also written into exported folders, so that `transformers.pipeline(..., trust_remote_code=True)` can
load them: it must import nothing but torch and transformers. This package itself never runs that copy: it loads
exported folders with the classes below (see `export_format.load_classifier`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

MODEL_TYPE = "lightning_cls_pooled"
# "default": the architecture's own head ([CLS] pooler for BERT-like encoders, last real token for GPT-2).
POOLINGS = ("default", "cls", "mean", "last")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """One vector per text from token states (B, T, H) -> (B, H), whichever side the batch is padded on.

    cls: the first real token; mean: the mean over real tokens; last: the last real token.
    """
    mask = attention_mask.to(torch.long)
    positions = torch.arange(mask.shape[1], device=mask.device)
    rows = torch.arange(mask.shape[0], device=mask.device)
    if how == "cls":
        return hidden[rows, (mask * (mask.shape[1] - positions)).argmax(-1)]  # the lowest position with mask 1
    if how == "last":
        return hidden[rows, (mask * positions).argmax(-1)]  # the highest position with mask 1
    if how == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    raise ValueError(f"Unknown pooling {how!r}: use one of {', '.join(p for p in POOLINGS if p != 'default')}.")


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (B, T): 0, 1, 2... from a text's first real token, whichever side the
    batch is padded on. With right padding they equal the default 0..T-1 on every real token."""
    return (attention_mask.to(torch.long).cumsum(-1) - 1).clamp(min=0)


class PooledClassifierConfig(PretrainedConfig):
    """The backbone's own config (as a dict), the pooling, and the head's dropout; labels as in any HF config."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        backbone: dict[str, Any] | None = None,
        pooling: str = "mean",
        classifier_dropout: float = 0.1,
        **kwargs: Any,
    ) -> None:
        self.backbone = dict(backbone or {})
        self.pooling = pooling
        self.classifier_dropout = classifier_dropout
        super().__init__(**kwargs)

    def backbone_config(self) -> PretrainedConfig:
        settings = dict(self.backbone)
        return AutoConfig.for_model(settings.pop("model_type"), **settings)


class PooledClassifier(PreTrainedModel):
    """backbone (token states) -> pool -> dropout -> linear head: (B, T) ids -> (B, num_labels) logits."""

    config_class = PooledClassifierConfig
    base_model_prefix = "backbone"

    def __init__(self, config: PooledClassifierConfig) -> None:
        super().__init__(config)
        self.backbone = without_pooler(AutoModel.from_config(config.backbone_config()))
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(hidden_size(self.backbone.config), config.num_labels)
        self.post_init()

    @classmethod
    def from_backbone(cls, backbone: PreTrainedModel, pooling: str, **labels: Any) -> PooledClassifier:
        """A new head on a (pretrained) backbone, whose weights are kept as they are."""
        config = PooledClassifierConfig(backbone=backbone.config.to_dict(), pooling=pooling, **labels)
        model = cls(config)
        model.backbone = without_pooler(backbone)  # after post_init: the pretrained weights are not re-initialised
        return model

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):  # the head; the backbone initialises its own modules
            module.weight.data.normal_(mean=0.0, std=0.02)
            if module.bias is not None:
                module.bias.data.zero_()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: Any,  # token_type_ids and the like from a tokenizer: single texts need none of them
    ) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        extra = {} if position_ids is None else {"position_ids": position_ids}  # only for backbones that take them
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        logits = self.classifier(self.dropout(pool(hidden, attention_mask, self.config.pooling)))  # (B, num_labels)
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def hidden_size(config: PretrainedConfig) -> int:
    for name in ("hidden_size", "dim", "n_embd", "d_model"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise ValueError(f"Cannot tell the hidden size of a {config.model_type} model.")


def without_pooler(backbone: PreTrainedModel) -> PreTrainedModel:
    """BERT-like backbones carry a [CLS] pooler that a pooled head never uses: drop it (no unused parameters)."""
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None
    return backbone


# `save_pretrained` copies this file into the folder and writes `auto_map` to config.json, so that Hugging Face's
# documented remote-code mechanism can load the export.
PooledClassifierConfig.register_for_auto_class()
PooledClassifier.register_for_auto_class("AutoModelForSequenceClassification")
