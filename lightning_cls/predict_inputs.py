"""Texts to classify from any .txt / .csv / .jsonl file, read in bounded chunks and tokenized once to a disk cache.

The cache holds flat int32 token ids, one int32 length per text and the texts' ids (one JSON value per line), so
files larger than memory can be classified: nothing but per-row offsets is ever held for the whole file.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from lightning_cls.sources import DataError, file_fingerprint, json_object_line
from lightning_cls.tokenization import tokenize, tokenizer_fingerprint

PREDICT_SUFFIXES = (".txt", ".csv", ".jsonl")
# Bump when the layout of the prepared folder changes.
PREDICT_CACHE_VERSION = 1


def _is_blank(value: Any) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return value is None or (isinstance(value, float) and math.isnan(value))


def _txt_chunks(path: Path, chunk_rows: int) -> Iterator[tuple[list[Any], list[str]]]:
    # One text per line; blank lines carry no text and are skipped, but the ids (line numbers) still count them.
    ids, texts = [], []
    with open(path, encoding="utf-8-sig") as f:  # a BOM is not part of the first text
        for number, line in enumerate(f, start=1):
            text = line.rstrip("\r\n")
            if not text.strip():
                continue
            ids.append(number)
            texts.append(text)
            if len(texts) == chunk_rows:
                yield ids, texts
                ids, texts = [], []
    if texts:
        yield ids, texts


def _csv_chunks(
    path: Path, text_column: str, id_column: str | None, chunk_rows: int
) -> Iterator[tuple[list[Any], list[str]]]:
    # Python's csv module, row by row: every row must have the header's number of fields, so that an unquoted comma
    # cannot shift part of a text into the id column unnoticed. Values stay strings ("007" is not 7, "NA" is a text).
    with open(path, encoding="utf-8-sig", newline="") as f:  # a BOM is not part of the first column's name
        reader = csv.reader(f)
        columns = next(reader, None)
        if columns is None:
            raise DataError(f"{path} is empty: no texts to classify.")
        if text_column not in columns:
            raise DataError(
                f"{path} has no column {text_column!r} (columns: {columns}); choose one with data.predict_text_column."
            )
        use_id = id_column is not None and id_column in columns
        text_at, id_at = columns.index(text_column), columns.index(id_column) if use_id else None
        ids, texts, row = [], [], 0
        for fields in reader:
            if not fields:  # a blank line is no row
                continue
            if len(fields) != len(columns):
                raise DataError(
                    f"{path}, line {reader.line_num}: {len(fields)} fields where the header has {len(columns)} "
                    "(an unquoted comma or quote in a text?)."
                )
            for name, at in [(text_column, text_at)] + ([(id_column, id_at)] if use_id else []):
                if not fields[at].strip():
                    raise DataError(f"{path}: column {name!r} is empty in 1 row(s) (0-based data rows [{row}]).")
            ids.append(fields[id_at] if use_id else row)
            texts.append(fields[text_at])
            row += 1
            if len(texts) == chunk_rows:
                yield ids, texts
                ids, texts = [], []
        if texts:
            yield ids, texts


def _jsonl_chunks(
    path: Path, text_column: str, id_column: str | None, chunk_rows: int
) -> Iterator[tuple[list[Any], list[str]]]:
    ids, texts, use_id = [], [], None
    with open(path, encoding="utf-8-sig") as f:  # a BOM is not part of the first text
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = json_object_line(path, number, line)
            if use_id is None:  # the first record decides whether the file has ids
                use_id = id_column is not None and id_column in record
            if text_column not in record:
                raise DataError(
                    f"{path}, line {number}: no field {text_column!r} (fields: {list(record)}); "
                    "choose one with data.predict_text_column."
                )
            text = record[text_column]
            if _is_blank(text):
                raise DataError(f"{path}, line {number}: field {text_column!r} is empty.")
            if use_id and id_column not in record:
                raise DataError(f"{path}, line {number}: no field {id_column!r}, which earlier lines have.")
            ids.append(record[id_column] if use_id else number)
            texts.append(text if isinstance(text, str) else str(text))
            if len(texts) == chunk_rows:
                yield ids, texts
                ids, texts = [], []
    if texts:
        yield ids, texts


def read_text_chunks(
    path: str | Path, text_column: str = "text", id_column: str | None = "id", chunk_rows: int = 10_000
) -> Iterator[tuple[list[Any], list[str]]]:
    """(ids, texts) chunks of at most ``chunk_rows`` rows, in file order.

    ``.txt``: one text per line, id = line number (1-based; blank lines skipped). ``.csv`` / ``.jsonl``: the text in
    ``text_column``, id = the ``id_column`` value when the file has that column, else the 0-based data row (.csv) or
    the line number (.jsonl). Raises ``DataError`` naming the file, column and rows for anything unusable.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Prediction input {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix not in PREDICT_SUFFIXES:
        raise DataError(f"Cannot classify {path.name!r}: use a {', '.join(PREDICT_SUFFIXES)} file.")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty: no texts to classify.")
    if suffix == ".txt":
        chunks = _txt_chunks(path, chunk_rows)
    elif suffix == ".csv":
        chunks = _csv_chunks(path, text_column, id_column, chunk_rows)
    else:
        chunks = _jsonl_chunks(path, text_column, id_column, chunk_rows)
    rows = 0
    try:
        for ids, texts in chunks:
            rows += len(texts)
            yield ids, texts
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"Cannot read {path}: {err}") from err
    if rows == 0:
        raise DataError(f"{path} has no texts to classify (only a header or blank lines).")


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
    return "predict-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


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
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rows = 0
    try:
        with (
            open(tmp / "tokens.bin", "wb") as tokens,
            open(tmp / "lengths.bin", "wb") as lengths,
            open(tmp / "ids.jsonl", "w") as ids_file,
        ):
            for ids, texts in read_text_chunks(path, text_column, id_column, chunk_rows):
                token_ids = tokenize(tokenizer, texts, max_length)
                tokens.write(np.fromiter((t for x in token_ids for t in x), dtype=np.int32).tobytes())
                lengths.write(np.array([len(x) for x in token_ids], dtype=np.int32).tobytes())
                ids_file.writelines(json.dumps(i) + "\n" for i in ids)
                rows += len(texts)
        meta = {"rows": rows, "path": str(path), "text_column": text_column, "id_column": id_column}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            tmp.rename(folder)  # atomic: a reader never sees a half-written folder
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process got there first with the same content
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return rows


def load_predict_inputs(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (memory-mapped) and the offsets of each text in them."""
    folder = Path(folder)
    lengths = np.fromfile(folder / "lengths.bin", dtype=np.int32)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.memmap(folder / "tokens.bin", dtype=np.int32, mode="r") if offsets[-1] else np.zeros(0, np.int32)
    return tokens, offsets


def iter_predict_ids(folder: str | Path) -> Iterator[Any]:
    """The texts' ids in input order, read lazily."""
    with open(Path(folder) / "ids.jsonl") as f:
        for line in f:
            yield json.loads(line)
