"""A file of texts to classify, tokenized once into the token cache, chunk by chunk.

The folder holds the texts as the split ``predict`` of the token cache (`token_cache.TokenizedSplit`: row ids are
positions in the file's texts) and the texts' ids, one JSON value per line in input order, read back lazily. So a
file larger than memory can be classified: reading (`tables.read_text_chunks`), tokenizing and writing go a chunk
at a time, and nothing but per-text offsets is ever held for the whole file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from lightning_cls.atomic import atomic_folder
from lightning_cls.data.tables import read_text_chunks
from lightning_cls.data.token_cache import TokenizedSplit, cache_key, file_fingerprint
from lightning_cls.data.tokenization import tokenize, tokenizer_fingerprint
from lightning_cls.data.windows import WindowedTexts, WindowSpec
from lightning_cls.errors import DataError

# Bump when the meaning of the prepared folder's content changes (its token format has its own version).
PREDICT_CACHE_VERSION = 1
SPLIT = "predict"
IDS_FILE = "ids.jsonl"
WINDOWS_FILE = "windows.npy"  # per text: windows read (texts read as windows only)
CUT_FILE = "cut.npy"  # per text: the window cap cut it


def predict_cache_key(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, windows: WindowSpec, text_column: str, id_column: str | None
) -> str:
    """A hash of the file's bytes, the tokenizer and the settings: the prepared inputs are reused only for the same."""
    if not Path(path).is_file():
        raise DataError(f"Prediction input {path} does not exist.")
    spec = {
        "version": PREDICT_CACHE_VERSION,
        "file": file_fingerprint(path),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": windows.max_length,
        **({"windows": [windows.max_windows, windows.stride]} if windows.max_windows > 1 else {}),
        "columns": [text_column, id_column],
    }
    return cache_key(spec, prefix="predict-")


def prepare_predict_inputs(
    path: str | Path,
    folder: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    windows: WindowSpec,
    text_column: str = "text",
    id_column: str | None = "id",
    chunk_rows: int = 10_000,
) -> int:
    """Tokenize the file chunk by chunk into ``folder`` (written atomically); returns the number of texts.

    With ``windows.max_windows`` > 1 each row of the split is a window and its row id is its text's position; the
    folder also keeps each text's window count and whether the cap cut it (`load_window_counts`)."""
    folder = Path(folder)
    if (folder / "meta.json").is_file():
        return json.loads((folder / "meta.json").read_text())["rows"]
    with atomic_folder(folder, exist_ok=True) as tmp, open(tmp / IDS_FILE, "w") as ids_file:

        def text_chunks() -> Iterator[list[str]]:
            for ids, texts in read_text_chunks(path, text_column, id_column, chunk_rows):
                ids_file.writelines(json.dumps(i) + "\n" for i in ids)
                yield texts

        if windows.max_windows == 1:
            chunks = (tokenize(tokenizer, texts, windows.max_length) for texts in text_chunks())
            rows = len(TokenizedSplit.write(tmp, SPLIT, chunks))
        else:
            windowed = WindowedTexts(tokenizer, windows)
            TokenizedSplit.write(tmp, SPLIT, windowed.chunks(text_chunks()), row_ids=lambda: windowed.text_index)
            rows = len(windowed.counts)
            np.save(tmp / WINDOWS_FILE, windowed.counts.astype(np.int32))
            np.save(tmp / CUT_FILE, windowed.cut)
        meta = {"rows": rows, "path": str(path), "text_column": text_column, "id_column": id_column}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return rows


def load_predict_inputs(folder: str | Path) -> TokenizedSplit:
    """The prepared texts, memory-mapped; row ids are their positions in the file's texts."""
    return TokenizedSplit.load(folder, SPLIT)


def load_window_counts(folder: str | Path) -> tuple[np.ndarray, np.ndarray] | None:
    """Each text's window count and whether the window cap cut it (None when texts were not read as windows)."""
    folder = Path(folder)
    if not (folder / WINDOWS_FILE).is_file():
        return None
    return np.load(folder / WINDOWS_FILE), np.load(folder / CUT_FILE)


def iter_predict_ids(folder: str | Path) -> Iterator[Any]:
    """The texts' ids in input order, read lazily."""
    with open(Path(folder) / IDS_FILE) as f:
        for line in f:
            yield json.loads(line)


def predict_file_index(
    folder: str | Path, split: TokenizedSplit | None
) -> tuple[np.ndarray, Iterator[Any], tuple[np.ndarray, np.ndarray] | None]:
    """The prepared file's texts as `predict` reports them: their positions 0..N-1, their ids in input order (read
    lazily), and for texts read as windows each text's window count and whether the cap cut it (else None).
    ``split``: the loaded inputs (`load_predict_inputs`), which count the texts when they were not read as windows."""
    windows = load_window_counts(folder)
    texts = len(windows[0]) if windows is not None else len(split)
    return np.arange(texts), iter_predict_ids(folder), windows


def read_predict_texts(path: str | Path, text_column: str, id_column: str | None) -> list[str]:
    """The file's texts in input order, untokenized, for what reads text rather than tokens (the lexical expert)."""
    return [text for _, chunk in read_text_chunks(path, text_column, id_column) for text in chunk]
