"""LoRA adapters through PEFT: which modules get them, how they combine with freezing, and merging for export.

The classification head is always trained and saved in full (PEFT's `modules_to_save`): a new head has no
pretrained weights for a low-rank update to start from, and a head left out of the saved adapters is a common way
to lose a trained classifier.
"""

from __future__ import annotations

from lightning_utilities.core.imports import RequirementCache
from torch import nn

from lightning_cls.errors import ConfigError
from lightning_cls.model.finetuning import transformer_blocks

# PEFT knows the attention projections of most families; these it does not (peft 0.21).
EXTRA_TARGET_MODULES = {"phi3": ["qkv_proj"], "distilbert": ["q_lin", "v_lin"]}
HEAD_MODULES = ["classifier", "score"]  # the head of every HF *ForSequenceClassification we use, and ours
_PEFT_AVAILABLE = RequirementCache("peft")


def backbone_type(model: nn.Module) -> str:
    """The model_type whose layers the adapters go into (a pooled classifier's backbone's)."""
    backbone = getattr(model, "backbone", None)
    return (backbone.config if backbone is not None else model.config).model_type


def default_target_modules(model_type: str) -> list[str]:
    """The attention projections LoRA adapts by default: query and value (or the fused qkv projection)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    modules = EXTRA_TARGET_MODULES.get(model_type) or TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if not modules:
        raise ConfigError(
            f"No default LoRA target modules for model_type {model_type!r}: set model.lora_target_modules "
            "(names of its linear layers, e.g. [q_proj, v_proj])."
        )
    return list(modules)


def add_lora(
    model: nn.Module,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: list[str] | None,
    last_n_blocks: int | None,
) -> nn.Module:
    """`model` wrapped by PEFT with LoRA adapters of rank `r`, in every block or in the last `last_n_blocks` only;
    everything else frozen but the head."""
    if not _PEFT_AVAILABLE:
        raise ConfigError(f"model.lora_r needs PEFT: pip install 'lightning_cls[lora]' ({_PEFT_AVAILABLE.message}).")
    from peft import LoraConfig, TaskType, get_peft_model

    if r < 1:
        raise ConfigError(f"model.lora_r={r}: the LoRA rank must be at least 1 (null turns LoRA off).")
    prefix, count = transformer_blocks(model)
    if last_n_blocks is not None and not 1 <= last_n_blocks <= count:
        raise ConfigError(
            f"model.train_last_n_blocks={last_n_blocks} with LoRA: adapters go into the last N blocks, so N must be "
            f"from 1 to the model's {count} blocks (null: every block). For the head alone, turn LoRA off "
            "(model.lora_r null)."
        )
    targets = target_modules or default_target_modules(backbone_type(model))
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(targets) - present)
    if missing:
        raise ConfigError(f"model.lora_target_modules: the model has no module named {missing}.")
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        modules_to_save=[m for m in HEAD_MODULES if m in present],
        # With train_last_n_blocks: the adapters go into those blocks only (the rest stays exactly pretrained).
        layers_to_transform=None if last_n_blocks is None else list(range(count - last_n_blocks, count)),
        layers_pattern=None if last_n_blocks is None else prefix.rsplit(".", 1)[-1],
    )
    return get_peft_model(model, config)


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "merge_and_unload") and hasattr(model, "peft_config")


def merged(model: nn.Module) -> nn.Module:
    """A plain Hugging Face model with the adapters folded into its weights and the trained head in place (for
    export: the folder then needs neither PEFT nor adapter code). The model it came from is left unchanged."""
    import copy

    return copy.deepcopy(model).merge_and_unload() if is_peft(model) else model
