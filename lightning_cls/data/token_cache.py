"""The token cache: tokenized texts stored flat and memory-mapped, and the key that names a cache folder.

One format for the training splits and for files of texts to classify. A split ``name`` is four .npy files in a
folder: ``name.tokens`` (int32: every text's token ids, one text after another), ``name.offsets`` (int64, N + 1:
text i is ``tokens[offsets[i]:offsets[i + 1]]``), ``name.labels`` (int64, N; empty for texts without labels) and
``name.row_ids`` (int64, N: where each text came from). Nothing but the offsets is ever held for all texts at once,
so a file of texts larger than memory can be cached and read back.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

# Bump when the layout of these files changes: every cache key changes with it, so old folders are never read.
FORMAT_VERSION = 1  # 1: one format for training splits and prediction inputs
FIELDS = ("tokens", "offsets", "labels", "row_ids")


def cache_key(spec: dict, prefix: str = "") -> str:
    """The folder name of the cache made from ``spec`` (JSON values: what the content depends on, a version of its
    meaning, fingerprints of the inputs, the settings): a cache is reused only for exactly the same spec."""
    text = json.dumps({**spec, "format": FORMAT_VERSION}, sort_keys=True)
    return prefix + hashlib.sha256(text.encode()).hexdigest()[:20]


def file_fingerprint(path: str | Path) -> str:
    """SHA-256 of the file's bytes: a cache is reused only for identical inputs, whatever the file's name or date."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class TokenizedSplit(Dataset):
    """Token ids of many texts stored flat (one array plus offsets), memory-mapped from the cache."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, labels: np.ndarray, row_ids: np.ndarray) -> None:
        self.tokens, self.offsets, self.labels, self.row_ids = tokens, offsets, labels, row_ids

    @classmethod
    def from_lists(cls, ids: list[list[int]], labels: np.ndarray, row_ids: np.ndarray) -> TokenizedSplit:
        """In memory, from each text's token ids (tests and small reference splits)."""
        offsets = _offsets([np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))])
        tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(offsets[-1]))
        return cls(tokens, offsets, np.asarray(labels, dtype=np.int64), np.asarray(row_ids, dtype=np.int64))

    @classmethod
    def write(
        cls,
        folder: str | Path,
        name: str,
        token_chunks: Iterable[list[list[int]]],
        labels: np.ndarray | Callable[[], np.ndarray] | None = None,
        row_ids: np.ndarray | Callable[[], np.ndarray] | None = None,
    ) -> TokenizedSplit:
        """Write the split ``name`` into ``folder`` from chunks of tokenized texts, one chunk in memory at a time, and
        return it memory-mapped from there. Without ``row_ids`` the texts are numbered 0..N-1 in order; without
        ``labels`` the split has none. ``labels`` and ``row_ids`` may be functions, called once the chunks are written:
        when texts are cut into windows, how many rows each text gives is known only then."""
        folder, lengths = Path(folder), []

        def flat_chunks() -> Iterator[np.ndarray]:
            for ids in token_chunks:
                lengths.append(np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)))
                yield np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths[-1].sum()))

        _save_streamed(folder / f"{name}.tokens.npy", flat_chunks(), np.dtype(np.int32))
        offsets = _offsets(lengths)
        n = len(offsets) - 1
        labels, row_ids = (x() if callable(x) else x for x in (labels, row_ids))
        labels = np.asarray([] if labels is None else labels, dtype=np.int64)
        row_ids = np.arange(n, dtype=np.int64) if row_ids is None else np.asarray(row_ids, dtype=np.int64)
        if len(labels) not in (0, n) or len(row_ids) != n:
            raise ValueError(f"{n} texts but {len(labels)} labels and {len(row_ids)} row ids.")
        for field, values in (("offsets", offsets), ("labels", labels), ("row_ids", row_ids)):
            np.save(folder / f"{name}.{field}.npy", values)
        return cls.load(folder, name)

    @classmethod
    def load(cls, folder: str | Path, name: str) -> TokenizedSplit:
        return cls(*(np.load(Path(folder) / f"{name}.{field}.npy", mmap_mode="r") for field in FIELDS))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict:
        start, end = self.offsets[i], self.offsets[i + 1]
        item = {"input_ids": self.tokens[start:end], "row_id": int(self.row_ids[i])}
        if len(self.labels):  # a class id, or a multi-hot row (multi-label)
            item["label"] = int(self.labels[i]) if self.labels.ndim == 1 else np.asarray(self.labels[i])
        return item


def _offsets(lengths: list[np.ndarray]) -> np.ndarray:
    offsets = np.zeros(sum(len(x) for x in lengths) + 1, dtype=np.int64)
    if lengths:
        np.cumsum(np.concatenate(lengths), out=offsets[1:])
    return offsets


def _save_streamed(path: Path, chunks: Iterable[np.ndarray], dtype: np.dtype) -> None:
    """A one-dimensional .npy file written chunk by chunk, its length known only at the end.

    numpy pads the header so that the shape can grow in place (`numpy.lib.format.GROWTH_AXIS_MAX_DIGITS`): the header
    is written first for length 0 and again, with the same size, once the length is known.
    """
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (0,)}
    count = 0
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        data_start = f.tell()
        for chunk in chunks:
            f.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())
            count += len(chunk)
        f.seek(0)
        np.lib.format.write_array_header_1_0(f, {**header, "shape": (count,)})
        if f.tell() != data_start:  # an old numpy without the padding: the data would be shifted, so refuse
            raise RuntimeError(f"numpy {np.__version__} cannot rewrite an .npy header in place; upgrade numpy.")
