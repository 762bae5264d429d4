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

from transformers import PreTrainedTokenizerBase

from lightning_cls.atomic import atomic_folder
from lightning_cls.errors import DataError
from lightning_cls.tables import read_text_chunks
from lightning_cls.token_cache import TokenizedSplit, cache_key, file_fingerprint
from lightning_cls.tokenization import tokenize, tokenizer_fingerprint

# Bump when the meaning of the prepared folder's content changes (its token format has its own version).
PREDICT_CACHE_VERSION = 1
SPLIT = "predict"
IDS_FILE = "ids.jsonl"


def predict_cache_key(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, max_length: int, text_column: str, id_column: str | None
) -> str:
    """A hash of the file's bytes, the tokenizer and the settings: the prepared inputs are reused only for the same."""
    if not Path(path).is_file():
        raise DataError(f"Prediction input {path} does not exist.")
    spec = {
        "version": PREDICT_CACHE_VERSION,
        "file": file_fingerprint(path),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": max_length,
        "columns": [text_column, id_column],
    }
    return cache_key(spec, prefix="predict-")


def prepare_predict_inputs(
    path: str | Path,
    folder: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    text_column: str = "text",
    id_column: str | None = "id",
    chunk_rows: int = 10_000,
) -> int:
    """Tokenize the file chunk by chunk into ``folder`` (written atomically); returns the number of texts."""
    folder = Path(folder)
    if (folder / "meta.json").is_file():
        return json.loads((folder / "meta.json").read_text())["rows"]
    with atomic_folder(folder, exist_ok=True) as tmp, open(tmp / IDS_FILE, "w") as ids_file:

        def token_chunks() -> Iterator[list[list[int]]]:
            for ids, texts in read_text_chunks(path, text_column, id_column, chunk_rows):
                ids_file.writelines(json.dumps(i) + "\n" for i in ids)
                yield tokenize(tokenizer, texts, max_length)

        rows = len(TokenizedSplit.write(tmp, SPLIT, token_chunks()))
        meta = {"rows": rows, "path": str(path), "text_column": text_column, "id_column": id_column}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return rows


def load_predict_inputs(folder: str | Path) -> TokenizedSplit:
    """The prepared texts, memory-mapped; row ids are their positions in the file's texts."""
    return TokenizedSplit.load(folder, SPLIT)


def iter_predict_ids(folder: str | Path) -> Iterator[Any]:
    """The texts' ids in input order, read lazily."""
    with open(Path(folder) / IDS_FILE) as f:
        for line in f:
            yield json.loads(line)
