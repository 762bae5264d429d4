"""Tokenizer loading, batched tokenization and the padding collator."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lightning_cls.errors import ConfigError, hub_errors


@lru_cache(maxsize=4)
def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The fast tokenizer for a hub name or local folder, with a pad token, padding on its own side.

    GPT-2 (and Llama, Qwen...) have no pad token: they get their end-of-sequence token. Many decoder tokenizers pad
    on the left; the model counts positions over real tokens and pools the last real one, so either side gives the
    same logits (`TextClassifier` refuses left padding for a head that reads the first token).
    """
    with hub_errors("data.tokenizer", name_or_path):  # a wrong name: one line saying so
        # A folder is data: code it names (`auto_map`, for `trust_remote_code` users) is never run, nor asked about.
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, use_fast=True, trust_remote_code=False)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"Tokenizer {name_or_path!r} has neither a pad token nor an end-of-sequence token.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of the tokenizer's definition (vocabulary, merges, normalizer, special tokens).

    The runtime truncation and padding settings are left out: calling the tokenizer changes them.
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    spec["special_tokens"] = sorted(tokenizer.special_tokens_map.items())
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each text, truncated at ``max_length``; no padding (that is done per batch)."""
    # One call on the whole list lets the Rust tokenizer use every core.
    return tokenizer(texts, truncation=True, max_length=max_length, return_attention_mask=False)["input_ids"]


# ------------------------------------------------------------------------------------------------ padding
# The one padding of token id lists: training batches (`PadCollator`) and the runtime's forward passes both use it.
def padded_width(length: int, multiple: int = 1) -> int:
    """A batch's width: its longest row, rounded up to a multiple (tensor cores like multiples of 8)."""
    return max(1, -(-length // multiple) * multiple)


def pad_batch(
    ids: Sequence[Sequence[int]], pad_token_id: int, left: bool = False, multiple: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), both (B, T) int64, padded on the tokenizer's side to the longest row."""
    width = padded_width(max((len(row) for row in ids), default=0), multiple)
    input_ids = np.full((len(ids), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for i, row in enumerate(ids):
        where = slice(width - len(row), width) if left else slice(0, len(row))
        input_ids[i, where], mask[i, where] = row, 1
    return input_ids, mask


class PadCollator:
    """Pads a list of examples to the longest in the batch (rounded up to a multiple), on the tokenizer's side."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = 8, padding_side: str = "right") -> None:
        if padding_side not in ("right", "left"):
            raise ConfigError(f"padding_side={padding_side!r}: use right or left.")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of or 1
        self.padding_side = padding_side

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        left = self.padding_side == "left"
        input_ids, attention_mask = pad_batch(
            [e["input_ids"] for e in examples], self.pad_token_id, left, self.pad_to_multiple_of
        )
        batch = {
            "input_ids": torch.from_numpy(input_ids),  # (B, T)
            "attention_mask": torch.from_numpy(attention_mask),  # (B, T)
            "row_id": torch.tensor([e["row_id"] for e in examples]),  # (B,)
        }
        if "label" in examples[0]:
            batch["labels"] = torch.from_numpy(np.asarray([e["label"] for e in examples]))  # (B,) or (B, L)
        return batch
