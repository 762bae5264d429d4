"""Tokenizer loading, batched tokenization and the padding collator."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lightning_cls.errors import hub_errors


@lru_cache(maxsize=4)
def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The fast tokenizer for a hub name or local folder, with a pad token and right padding.

    GPT-2 has no pad token: it gets its end-of-text token. Padding is on the right because GPT-2 uses absolute
    positions counted from the left, so left padding would change a text's logits.
    """
    with hub_errors("data.tokenizer", name_or_path):  # a wrong name: one line saying so
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, use_fast=True)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"Tokenizer {name_or_path!r} has neither a pad token nor an end-of-sequence token.")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
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


class PadCollator:
    """Pads a list of examples to the longest in the batch (rounded up to a multiple), on the right."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = 8) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of or 1

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(e["input_ids"]) for e in examples]
        multiple = self.pad_to_multiple_of
        width = -(-max(lengths) // multiple) * multiple
        input_ids = np.full((len(examples), width), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(examples), width), dtype=np.int64)
        for i, (example, n) in enumerate(zip(examples, lengths, strict=True)):
            input_ids[i, :n] = example["input_ids"]
            attention_mask[i, :n] = 1
        batch = {
            "input_ids": torch.from_numpy(input_ids),  # (B, T)
            "attention_mask": torch.from_numpy(attention_mask),  # (B, T)
            "row_id": torch.tensor([e["row_id"] for e in examples]),  # (B,)
        }
        if "label" in examples[0]:
            batch["labels"] = torch.tensor([e["label"] for e in examples])  # (B,)
        return batch
