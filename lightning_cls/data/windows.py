"""Sliding windows: a text longer than the model's window is read as overlapping windows, and its answer is the
mean of its windows' logits.

`WindowSpec` says how (window size `max_length`, `stride` tokens between window starts, at most `max_windows` per
text); `window_token_ids` cuts a batch of texts into windows with the tokenizer's own overflow mechanism
(`return_overflowing_tokens`, each window with the model's special tokens); `mean_logits_per_text` aggregates.
With `max_windows = 1` (the default everywhere) a text is read as before: truncated at `max_length`.

The windows of one text never depend on the other texts of a batch, and the mean over a text's windows does not
depend on how windows were batched: a text's answer is the same alone or among others (tested).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from lightning_cls.errors import ConfigError


@dataclass(frozen=True)
class WindowSpec:
    """How texts are cut into windows.

    max_length: Tokens per window, the model's special tokens included.
    max_windows: At most this many windows per text (the first ones); 1 reads a text's first window only (truncation).
    stride: Text tokens between the starts of consecutive windows (default: three quarters of a window's text
        tokens, so consecutive windows share a quarter). At most a window's text tokens, so that no token is skipped.
    """

    max_length: int
    max_windows: int = 1
    stride: int | None = None

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ConfigError(f"max_length must be at least 2, got {self.max_length}.")
        if self.max_windows < 1:
            raise ConfigError(f"max_windows must be at least 1, got {self.max_windows}.")
        if self.stride is not None and self.stride < 1:
            raise ConfigError(f"window_stride must be at least 1, got {self.stride}.")

    def body(self, tokenizer: PreTrainedTokenizerBase) -> int:
        """Text tokens per window: the window less the special tokens the tokenizer adds."""
        body = self.max_length - tokenizer.num_special_tokens_to_add()
        if body < 1:
            raise ConfigError(f"max_length {self.max_length} leaves no room for text beside the special tokens.")
        return body

    def step(self, tokenizer: PreTrainedTokenizerBase) -> int:
        body = self.body(tokenizer)
        step = self.stride if self.stride is not None else max(1, body * 3 // 4)
        if step > body:
            raise ConfigError(
                f"window_stride {step} is longer than a window's {body} text tokens (max_length {self.max_length} "
                "less the special tokens): tokens between windows would never be read."
            )
        return step


@dataclass
class Windows:
    """The windows of a batch of texts: token ids per window, and per text where its windows are."""

    input_ids: list[list[int]]  # one list per window, texts in order, each text's windows in reading order
    text_index: np.ndarray  # (num_windows,) the text each window belongs to
    counts: np.ndarray  # (num_texts,) windows read per text
    cut: np.ndarray  # (num_texts,) bool: the text had more (windows, or tokens when max_windows is 1) than were read
    tokens: np.ndarray  # (num_texts,) text tokens read (each token once, overlaps not counted twice)

    @property
    def num_texts(self) -> int:
        return len(self.counts)


def window_token_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str], spec: WindowSpec) -> Windows:
    """Cut each text into windows of `spec.max_length` tokens (special tokens included), `spec.stride` apart.

    The tokenizer tokenizes each text once, whole (linear in its length); the model's work is bounded by the cap.
    """
    body, step = spec.body(tokenizer), spec.step(tokenizer)
    special = tokenizer.num_special_tokens_to_add()
    # Overflow windows past the cap are made too (the tokenizer has no cap): they say whether the cap cut the text.
    encoded = tokenizer(
        texts,
        truncation=True,
        max_length=spec.max_length,
        stride=body - step,  # transformers' `stride` is the overlap between consecutive windows
        return_overflowing_tokens=True,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    mapping = np.asarray(encoded["overflow_to_sample_mapping"], dtype=np.int64)
    available = np.bincount(mapping, minlength=len(texts))
    # Position of each window within its text (mapping is grouped by text, in order).
    first = np.concatenate([[0], np.cumsum(available)[:-1]])
    position = np.arange(len(mapping)) - first[mapping]
    keep = position < spec.max_windows
    input_ids = [ids for ids, k in zip(encoded["input_ids"], keep, strict=True) if k]
    counts = np.minimum(available, spec.max_windows)
    kept_lengths = np.asarray([len(ids) - special for ids in input_ids], dtype=np.int64)
    text_index = mapping[keep]
    # Tokens read: the first window whole, every next one adds the part past the previous window's end.
    last_length = np.zeros(len(texts), dtype=np.int64)
    np.maximum.at(last_length, text_index, np.where(position[keep] == counts[text_index] - 1, kept_lengths, 0))
    tokens = np.where(counts > 0, (counts - 1) * step + last_length, 0)
    return Windows(input_ids, text_index, counts, available > spec.max_windows, tokens)


def mean_logits_per_text(logits: torch.Tensor, text_index: torch.Tensor | np.ndarray, num_texts: int) -> torch.Tensor:
    """The mean of each text's windows' logits (num_windows, num_labels) -> (num_texts, num_labels).

    The mean of logits (not of probabilities) is the aggregation rule: a window that is sure of a label counts more
    than one that is unsure, and one window reproduces the single-window answer exactly.
    """
    index = torch.as_tensor(np.asarray(text_index), dtype=torch.long, device=logits.device)
    sums = torch.zeros(num_texts, logits.shape[-1], dtype=torch.float64, device=logits.device)
    sums.index_add_(0, index, logits.double())
    counts = torch.bincount(index, minlength=num_texts).clamp(min=1).unsqueeze(-1)
    return (sums / counts).to(logits.dtype)


class WindowedTexts:
    """Texts cut into windows chunk by chunk, for `TokenizedSplit.write`: `chunks` yields each chunk's windows and
    keeps, for the whole split, the text of each window and each text's window count, cut flag and tokens read."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, spec: WindowSpec) -> None:
        self.tokenizer, self.spec = tokenizer, spec
        self._parts: list[Windows] = []

    def chunks(self, text_chunks: Iterable[list[str]]) -> Iterator[list[list[int]]]:
        for texts in text_chunks:
            windows = window_token_ids(self.tokenizer, texts, self.spec)
            yield windows.input_ids
            windows.input_ids = []  # the token ids are written by now: keep only the per-text arrays
            self._parts.append(windows)

    def _concat(self, field: str) -> np.ndarray:
        return np.concatenate([getattr(p, field) for p in self._parts]) if self._parts else np.zeros(0, np.int64)

    @property
    def text_index(self) -> np.ndarray:
        """(num_windows,) the position of each window's text among all texts."""
        starts = np.cumsum([0] + [p.num_texts for p in self._parts])
        parts = [p.text_index + s for p, s in zip(self._parts, starts, strict=False)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    @property
    def counts(self) -> np.ndarray:
        return self._concat("counts")

    @property
    def cut(self) -> np.ndarray:
        return self._concat("cut").astype(bool)

    @property
    def tokens(self) -> np.ndarray:
        """(num_texts,) tokens read per text, the model's special tokens counted once (as a single window has them)."""
        return self._concat("tokens") + self.tokenizer.num_special_tokens_to_add()


def per_text(
    logits: torch.Tensor, labels: torch.Tensor, row_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows (texts, or windows of texts: rows sharing a row id) -> one per text: its mean logits, its label, its row
    id, in row id order. A row seen twice (a distributed sampler repeats a few to even out the ranks) is averaged
    with itself, so it counts once, as a text should."""
    if not len(row_ids):
        return logits, labels, row_ids
    texts, index = torch.unique(row_ids, return_inverse=True)
    label = torch.zeros((len(texts), *labels.shape[1:]), dtype=labels.dtype, device=labels.device)
    label[index] = labels  # a text's windows share its label (a class id, or a multi-hot row)
    return mean_logits_per_text(logits, index.cpu().numpy(), len(texts)), label, texts
