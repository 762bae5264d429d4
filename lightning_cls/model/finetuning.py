"""Which parameters to train: the whole model, the head only, or the head plus the last N transformer blocks."""

from __future__ import annotations

from torch import nn

from lightning_cls.errors import ConfigError


def transformer_blocks(model: nn.Module) -> tuple[str, int]:
    """Name and length of the model's stack of transformer blocks: the ModuleList holding the most parameters.

    Works for DistilBERT (`distilbert.transformer.layer`), GPT-2 (`transformer.h`) and BERT (`bert.encoder.layer`).
    """
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of transformer blocks to freeze or unfreeze.")
    name, blocks = max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))
    return name, len(blocks)


def trainable_names(model: nn.Module, last_n_blocks: int | None) -> set[str]:
    """Names of the parameters to train. ``None``: all. ``0``: the head, i.e. everything registered after the last
    block (final norm, pooler, classifier). ``N``: the head and the last N blocks."""
    names = [name for name, _ in model.named_parameters()]
    if last_n_blocks is None:
        return set(names)
    prefix, count = transformer_blocks(model)
    if not 0 <= last_n_blocks <= count:
        raise ConfigError(f"model.train_last_n_blocks={last_n_blocks}, but the model has {count} transformer blocks.")
    in_blocks = [i for i, name in enumerate(names) if name.startswith(prefix + ".")]
    head = set(names[in_blocks[-1] + 1 :])
    first_trained = count - last_n_blocks
    blocks = {
        name
        for name in names
        if name.startswith(prefix + ".") and int(name[len(prefix) + 1 :].split(".")[0]) >= first_trained
    }
    return head | blocks


def freeze_all_but(model: nn.Module, names: set[str]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
