"""Tokenizer loading, batched tokenization and the padding collator."""

from __future__ import annotations

import hashlib
import json
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


class PadCollator:
    """Pads a list of examples to the longest in the batch (rounded up to a multiple), on the tokenizer's side."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = 8, padding_side: str = "right") -> None:
        if padding_side not in ("right", "left"):
            raise ConfigError(f"padding_side={padding_side!r}: use right or left.")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of or 1
        self.padding_side = padding_side

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(e["input_ids"]) for e in examples]
        multiple = self.pad_to_multiple_of
        width = -(-max(lengths) // multiple) * multiple
        input_ids = np.full((len(examples), width), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(examples), width), dtype=np.int64)
        for i, (example, n) in enumerate(zip(examples, lengths, strict=True)):
            where = slice(0, n) if self.padding_side == "right" else slice(width - n, width)
            input_ids[i, where] = example["input_ids"]
            attention_mask[i, where] = 1
        batch = {
            "input_ids": torch.from_numpy(input_ids),  # (B, T)
            "attention_mask": torch.from_numpy(attention_mask),  # (B, T)
            "row_id": torch.tensor([e["row_id"] for e in examples]),  # (B,)
        }
        if "label" in examples[0]:
            batch["labels"] = torch.from_numpy(np.asarray([e["label"] for e in examples]))  # (B,) or (B, L)
        return batch
