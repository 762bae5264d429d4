"""Reading text tables, with errors that name the file, column and rows.

Labelled training data (CSV / JSON / JSONL / Parquet files, or a hub dataset) is read whole; files of texts to
classify (.txt / .csv / .jsonl) are read in bounded chunks, since they may be larger than memory. Both follow one set
of rules: how bytes become text, how CSV and JSON lines are parsed, and which values are blank or not text.
"""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd

from lightning_cls.errors import DataError, first_line

HUB_DATASET = "knowledgator/Scientific-text-classification"
TABLE_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet")

# What a file is when its first bytes say so, whatever its name: refused with that name, not parsed as garbage.
MAGIC_BYTES = {
    b"PAR1": "a Parquet file",
    b"PK\x03\x04": "a ZIP archive (an Excel .xlsx file?)",
    b"\x1f\x8b": "gzip-compressed (decompress it first)",
    b"\x89PNG": "a PNG image",
    b"%PDF": "a PDF document",
    b"SQLite format 3": "an SQLite database",
}


# ------------------------------------------------------------------------------------------------ bytes to text
def _encoding(head: bytes) -> tuple[str, int]:
    """The codec of a file starting with ``head``, and the length of its byte-order mark (which is not text)."""
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8", len(codecs.BOM_UTF8)
    if head.startswith(codecs.BOM_UTF16_LE):
        return "utf-16-le", len(codecs.BOM_UTF16_LE)
    if head.startswith(codecs.BOM_UTF16_BE):
        return "utf-16-be", len(codecs.BOM_UTF16_BE)
    return "utf-8", 0


def _undecodable(path: Path | str, encoding: str, line: int, byte: int, value: bytes) -> DataError:
    name = "UTF-8" if encoding == "utf-8" else "UTF-16"
    return DataError(
        f"{path}, line {line} (byte {byte}): not valid {name} (byte {value!r}); a binary file, or text in another "
        "encoding? Save it as UTF-8."
    )


def decode_text(data: bytes, path: Path | str) -> str:
    """The file's text: UTF-8, or UTF-16 / UTF-8 with a byte-order mark (dropped). Other bytes are refused with the
    line where they are, since guessing an encoding silently changes texts."""
    encoding, bom = _encoding(data[:4])
    try:
        return data[bom:].decode(encoding)
    except UnicodeDecodeError as err:
        line = data[bom : bom + err.start].decode(encoding, "replace").count("\n") + 1
        raise _undecodable(path, encoding, line, bom + err.start, data[bom + err.start : bom + err.start + 1]) from None


@contextmanager
def open_text(path: Path, newline: str | None = None) -> Iterator[TextIO]:
    """The file as a text stream, decoded as `decode_text` decodes it, without reading it whole."""
    raw = open(path, "rb")  # noqa: SIM115 -- the text stream around it closes it
    encoding, bom = _encoding(raw.read(4))
    raw.seek(bom)
    with io.TextIOWrapper(raw, encoding=encoding, newline=newline) as f:
        try:
            yield f
        except UnicodeDecodeError:
            raise _locate_undecodable(path, encoding, bom) from None


def _locate_undecodable(path: Path, encoding: str, bom: int) -> DataError:
    """`decode_text`'s error for a file read as a stream: the stream does not say where decoding failed, so the file
    is decoded again piece by piece (once, after the failure) to name the line and byte."""
    decoder, line, fed = codecs.getincrementaldecoder(encoding)(), 1, bom
    with open(path, "rb") as f:
        f.seek(bom)
        # Pieces split at b"\n": lines in UTF-8; in UTF-16, pieces that the decoder joins up across the splits.
        for piece, final in itertools.chain(((piece, False) for piece in f), [(b"", True)]):
            try:
                line += decoder.decode(piece, final).count("\n")
            except UnicodeDecodeError as err:
                # err.object: the bytes the decoder held back from earlier pieces, then this piece.
                start = fed + len(piece) - len(err.object) + err.start
                line += err.object[: err.start].decode(encoding, "replace").count("\n")
                return _undecodable(path, encoding, line, start, err.object[err.start : err.start + 1])
            fed += len(piece)
    return DataError(f"{path}: not valid {encoding.upper()}; save it as UTF-8.")


def _refuse_disguised(path: Path, suffix: str) -> bytes:
    """The file's first bytes, after refusing a file whose first bytes say it is something else than its name says."""
    with open(path, "rb") as f:
        head = f.read(16)
    for magic, what in MAGIC_BYTES.items():
        if head.startswith(magic) and not (suffix == ".parquet" and magic == b"PAR1"):
            raise DataError(f"{path} is {what}, not {suffix[1:]}: give the file its real extension or convert it.")
    return head


# ------------------------------------------------------------------------------------------------ values and rows
def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # None, or NaN (pandas, JSON NaN)


def _blank(value: Any) -> bool:
    return isinstance(value, str) and not value.strip()


def _is_text(value: Any) -> bool:
    # Numbers are read as their text (a label 1 is the label "1"); lists, objects or bytes are not text.
    return isinstance(value, (str, int, float, np.number))


def _row_list(rows: list[int]) -> str:
    return f"0-based data rows {rows[:10]}{' ...' if len(rows) > 10 else ''}"


def _no_column(source: Path | str, name: str, columns: Iterable[str], hint: str = "") -> DataError:
    return DataError(f"{source} has no column {name!r} (columns: {list(columns)}){'; ' + hint if hint else ''}.")


def _csv_rows(stream: Iterable[str], path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of the header, then of each data row; blank lines are no rows.

    Python's csv module, strictly: pandas takes a first data row with one field too many for an index column (shifting
    every value left), and its errors do not always say which line. Values stay strings ("007" is not 7).
    """
    csv.field_size_limit(2**31 - 1)  # very long texts are read whole (and truncated by the tokenizer)
    reader, row = csv.reader(stream, strict=True), 0
    try:
        header = next((fields for fields in reader if fields), None)
        if header is None:
            raise DataError(f"{path} is empty: no header, no rows.")
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise DataError(f"{path}: the header names column(s) {repeated} more than once.")
        yield reader.line_num, header
        for fields in reader:
            if fields:
                yield reader.line_num, fields
                row += 1
    except csv.Error as err:
        raise DataError(
            f"{path}, line {reader.line_num} (data row {row}): CSV quoting error ({err}); a quote opened "
            'and never closed, or text right after a closing quote? Inside a quoted text, write " as "".'
        ) from None


def _json_object_line(path: Path, number: int, line: str) -> dict:
    """One line of a JSON lines file, which must hold a JSON object; errors name the file and the line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}, line {number}: not valid JSON ({err.msg}).") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}, line {number}: expected one JSON object per line, got {type(record).__name__}.")
    return record


def _jsonl_records(lines: Iterable[str], path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line."""
    for number, line in enumerate(lines, 1):
        if line.strip():
            yield number, _json_object_line(path, number, line)


# ------------------------------------------------------------------------------------------------ whole tables
def _read_local(path: Path) -> pd.DataFrame:
    """The file's table, every value as read (str, int, float, None...): nothing is converted or guessed here."""
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(f"Unsupported file type {path.name!r}: use one of {', '.join(TABLE_SUFFIXES)}.")
    head = _refuse_disguised(path, suffix)
    if suffix == ".parquet":
        if not head.startswith(b"PAR1"):
            raise DataError(f"{path} is not a Parquet file (it does not start with PAR1): is it CSV or JSON?")
        return _read_parquet(path)
    text = decode_text(path.read_bytes(), path)
    if suffix == ".csv":
        return _read_csv(text, path)
    return _read_json(text, path, lines=suffix == ".jsonl")


def _read_csv(text: str, path: Path) -> pd.DataFrame:
    rows_read = _csv_rows(io.StringIO(text, newline=""), path)
    _, header = next(rows_read)
    rows: list[list[str]] = []
    for line, fields in rows_read:
        if len(fields) != len(header):
            raise DataError(
                f"{path}, line {line} (data row {len(rows)}): {len(fields)} field(s) where the header "
                f"has {len(header)} {header}. A comma in an unquoted text? Quote texts that contain commas."
            )
        rows.append(fields)
    return pd.DataFrame(rows, columns=header, dtype=object)


def _read_json(text: str, path: Path, lines: bool) -> pd.DataFrame:
    if not lines:
        try:
            return _json_table(json.loads(text), path)
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":
                raise DataError(f"{path}, line {err.lineno} column {err.colno}: not valid JSON ({err.msg}).") from None
        # Several JSON values one after the other: JSON lines in a .json file.
    # Split at "\n" only, not splitlines(): JSON strings may hold U+2028 etc.
    return _records_frame([record for _, record in _jsonl_records(text.split("\n"), path)])


def _json_table(data: object, path: Path) -> pd.DataFrame:
    """A list of objects (one per row), or an object of equal-length lists (one per column)."""
    if isinstance(data, list) and all(isinstance(row, dict) for row in data):
        return _records_frame(data)
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) == 1:
            return pd.DataFrame({k: pd.Series(v, dtype=object) for k, v in data.items()})
    where = ""
    if isinstance(data, list):
        where = f" (row {next(i for i, row in enumerate(data) if not isinstance(row, dict))} is not an object)"
    raise DataError(
        f'{path} is JSON but not a table{where}: expected a list of objects [{{"text": ..., "label": ...}}, ...], '
        "an object of equal-length column lists, or one object per line (JSON lines)."
    )


def _records_frame(records: list[dict]) -> pd.DataFrame:
    """Rows as given, absent keys as None; no type inference (pandas would turn labels [1, None] into 1.0, NaN)."""
    keys = list(dict.fromkeys(key for record in records for key in record))
    return pd.DataFrame({key: pd.Series([r.get(key) for r in records], dtype=object) for key in keys})


def _read_parquet(path: Path) -> pd.DataFrame:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow's errors for damaged files are many
        raise DataError(f"Cannot read {path} as parquet: {first_line(err)}") from err
    # Python values column by column: pandas would turn an integer column with nulls into floats (label 1 -> "1.0").
    return pd.DataFrame({name: pd.Series(table.column(name).to_pylist(), dtype=object) for name in table.column_names})


def read_table(
    path: str | Path,
    text_column: str,
    label_column: str | None,
    order_column: str | None = None,
    key_column: str | None = None,
) -> pd.DataFrame:
    """A local CSV/JSON/JSONL/Parquet file as a frame with columns ``text``, ``label`` (if asked), ``order`` (the
    values of ``order_column``, if asked: what a split by time orders rows by), ``key`` (the values of
    ``key_column``, if asked: what `join_columns` joins another file on) and ``row_id``.

    ``row_id`` is the 0-based row number in the file, kept so that predictions can be traced back to their input.
    Missing or blank texts and missing labels raise ``DataError`` with the file, column and row numbers.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Data file {path} does not exist.")
    frame = _read_local(path)
    table = validate_table(frame, str(path), text_column, label_column, order_column=order_column)
    if key_column:
        if key_column not in frame.columns:
            raise _no_column(str(path), key_column, frame.columns)
        keys = _checked_strings(frame[key_column], str(path), key_column)
        table["key"] = [keys[i] for i in table["row_id"]]
    return table


def join_columns(
    table: pd.DataFrame, path: str | Path, key_column: str, columns: list[str], source: str
) -> pd.DataFrame:
    """``table`` (with a ``key`` column, `read_table`'s) with ``columns`` of the file at ``path`` added, joined on
    the file's ``key_column``: e.g. every abstract's arXiv categories and title from categories.csv by `arxiv_id`.

    Each key of the table must be in the file once (or several times with the same values); a key it lacks, a
    repeated key with other values, or a missing or blank value raises ``DataError`` naming the file, the column and
    the rows.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Data file {path} (data.labels_path) does not exist.")
    frame = _read_local(path)
    for name in (key_column, *columns):
        if name not in frame.columns:
            raise _no_column(str(path), name, frame.columns)
    keys = _checked_strings(frame[key_column], str(path), key_column)
    values = {name: _checked_strings(frame[name], str(path), name) for name in columns}
    index: dict[str, int] = {}
    conflicting = []
    for row, key in enumerate(keys):
        first = index.setdefault(key, row)
        if first != row and any(values[c][first] != values[c][row] for c in columns):
            conflicting.append(row)
    if conflicting:
        raise DataError(
            f"{path}: {key_column!r} repeats a key with other values in {len(conflicting)} row(s) "
            f"({_row_list(conflicting)})."
        )
    absent = [i for i, key in enumerate(table["key"]) if key not in index]
    if absent:
        rows = table["row_id"].to_numpy()[absent].tolist()
        raise DataError(
            f"{path} has no row for {len(absent)} {key_column!r} value(s) of {source} ({_row_list(rows)}; e.g. "
            f"{table['key'].iloc[absent[0]]!r})."
        )
    out = table.copy()
    at = [index[key] for key in table["key"]]
    for name in columns:
        out[name] = [values[name][i] for i in at]
    out.attrs = dict(table.attrs)
    return out


def read_hub(
    dataset: str, text_column: str, label_column: str | None, split: str = "train", order_column: str | None = None
) -> pd.DataFrame:
    """A hub dataset split, validated like a local file (needs the hub or its local cache)."""
    import datasets

    frame = datasets.load_dataset(dataset, split=split).to_pandas()
    return validate_table(frame, f"hub dataset {dataset!r}", text_column, label_column, order_column=order_column)


def validate_table(
    frame: pd.DataFrame,
    source: str,
    text_column: str,
    label_column: str | None,
    drop_duplicates: bool = True,
    order_column: str | None = None,
) -> pd.DataFrame:
    """Check the columns and values; labels lose surrounding whitespace; numbers become their text.

    With labels, a row whose text repeats an earlier row's text is dropped (the first is kept): duplicates would
    otherwise land in both the training and the test split. ``frame.attrs`` says how many: ``rows_read`` (rows in
    the source), ``duplicate_rows`` and, if any, ``duplicates`` (a sentence naming the first rows, for the log).
    """
    columns = [text_column] + ([label_column] if label_column else []) + ([order_column] if order_column else [])
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise _no_column(source, missing[0], frame.columns)
    if frame.empty:
        raise DataError(f"{source} has no rows.")
    out = pd.DataFrame({"row_id": range(len(frame))})
    out["text"] = _checked_strings(frame[text_column], source, text_column)
    if label_column:
        labels = _checked_strings(frame[label_column], source, label_column)
        out["label"] = [label.strip() for label in labels]  # " physics" and "physics" are one label
    if order_column:
        # As text: the values are compared, and a number read back as text keeps its digits (2503.10 stays "2503.10").
        out["order"] = _checked_strings(frame[order_column], source, order_column)
    rows_read, duplicates = len(out), 0
    if label_column and drop_duplicates:
        repeated = out["text"].duplicated(keep="first").to_numpy()
        duplicates = int(repeated.sum())
        if duplicates:
            first_label = dict(zip(out["text"][~repeated], out["label"][~repeated], strict=True))
            conflicting = int((out["label"][repeated] != out["text"][repeated].map(first_label)).sum())
            rows = out["row_id"][repeated].tolist()
            out = out[~repeated].reset_index(drop=True)
            out.attrs["duplicates"] = (
                f"dropped {duplicates} row(s) repeating an earlier row's text ({conflicting} with another label), "
                f"keeping the first of each: {_row_list(rows)}"
            )
    out.attrs.update(rows_read=rows_read, duplicate_rows=duplicates)
    return out


def _checked_strings(column: pd.Series, source: str, name: str) -> list[str]:
    """The column's values as text; a missing or blank value, or one that is not text, is refused naming its rows."""
    values = column.tolist()
    bad = [i for i, v in enumerate(values) if _missing(v) or _blank(v)]
    if bad:
        raise DataError(f"{source}: column {name!r} is empty or missing in {len(bad)} row(s) ({_row_list(bad)}).")
    wrong = [i for i, v in enumerate(values) if not _is_text(v)]
    if wrong:
        kinds = sorted({type(values[i]).__name__ for i in wrong})
        raise DataError(
            f"{source}: column {name!r} holds {', '.join(kinds)} values, not text, in {len(wrong)} row(s) "
            f"({_row_list(wrong)})."
        )
    texts = [v if isinstance(v, str) else str(v) for v in values]
    # JSON may spell a lone UTF-16 surrogate ("\udc00"): no Unicode text holds one, and pandas cannot store it.
    broken = [i for i, v in enumerate(texts) if not _encodable(v)]
    if broken:
        raise DataError(
            f"{source}: column {name!r} holds a lone surrogate code point (an escape like \\udc00 that is half of a "
            f"character, not text) in {len(broken)} row(s) ({_row_list(broken)})."
        )
    return texts


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ texts in chunks
def _txt_texts(stream: TextIO, path: Path, text_column: str, id_column: str | None) -> Iterator[tuple[Any, str]]:
    # One text per line; blank lines carry no text and are skipped, but the ids (line numbers) still count them.
    for number, line in enumerate(stream, start=1):
        text = line.rstrip("\r\n")
        if text.strip():
            yield number, text


def _csv_texts(stream: TextIO, path: Path, text_column: str, id_column: str | None) -> Iterator[tuple[Any, str]]:
    lines = _csv_rows(stream, path)
    _, columns = next(lines)
    if text_column not in columns:
        raise _no_column(path, text_column, columns, "choose one with data.predict_text_column")
    use_id = id_column is not None and id_column in columns
    text_at, id_at = columns.index(text_column), columns.index(id_column) if use_id else None
    for row, (line, fields) in enumerate(lines):
        # Every row has the header's number of fields, so that an unquoted comma cannot shift part of a text into
        # the id column unnoticed.
        if len(fields) != len(columns):
            raise DataError(
                f"{path}, line {line}: {len(fields)} fields where the header has {len(columns)} "
                "(an unquoted comma or quote in a text?)."
            )
        for name, at in [(text_column, text_at)] + ([(id_column, id_at)] if use_id else []):
            if _blank(fields[at]):
                raise DataError(f"{path}: column {name!r} is empty in 1 row(s) ({_row_list([row])}).")
        yield (fields[id_at] if use_id else row), fields[text_at]


def _jsonl_texts(stream: TextIO, path: Path, text_column: str, id_column: str | None) -> Iterator[tuple[Any, str]]:
    use_id = None
    for number, record in _jsonl_records(stream, path):
        if use_id is None:  # the first record decides whether the file has ids
            use_id = id_column is not None and id_column in record
        if text_column not in record:
            raise DataError(
                f"{path}, line {number}: no field {text_column!r} (fields: {list(record)}); "
                "choose one with data.predict_text_column."
            )
        text = record[text_column]
        if _missing(text) or _blank(text):
            raise DataError(f"{path}, line {number}: field {text_column!r} is empty.")
        if not _is_text(text):
            raise DataError(f"{path}, line {number}: field {text_column!r} holds {type(text).__name__}, not text.")
        if use_id and id_column not in record:
            raise DataError(f"{path}, line {number}: no field {id_column!r}, which earlier lines have.")
        yield (record[id_column] if use_id else number), (text if isinstance(text, str) else str(text))


TEXT_READERS = {".txt": _txt_texts, ".csv": _csv_texts, ".jsonl": _jsonl_texts}


def _chunked(rows: Iterable[tuple[Any, str]], chunk_rows: int) -> Iterator[tuple[list[Any], list[str]]]:
    """(ids, texts) of at most ``chunk_rows`` rows at a time."""
    rows = iter(rows)
    while chunk := list(itertools.islice(rows, chunk_rows)):
        ids, texts = zip(*chunk, strict=True)
        yield list(ids), list(texts)


def read_text_chunks(
    path: str | Path, text_column: str = "text", id_column: str | None = "id", chunk_rows: int = 10_000
) -> Iterator[tuple[list[Any], list[str]]]:
    """(ids, texts) chunks of at most ``chunk_rows`` rows, in file order: a file larger than memory can be read.

    ``.txt``: one text per line, id = line number (1-based; blank lines skipped). ``.csv`` / ``.jsonl``: the text in
    ``text_column``, id = the ``id_column`` value when the file has that column, else the 0-based data row (.csv) or
    the line number (.jsonl). Raises ``DataError`` naming the file, column and rows for anything unusable.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Prediction input {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix not in TEXT_READERS:
        raise DataError(f"Cannot classify {path.name!r}: use a {', '.join(TEXT_READERS)} file.")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty: no texts to classify.")
    _refuse_disguised(path, suffix)
    rows = 0
    # newline="" for CSV: the csv module splits rows itself (a quoted text may hold line breaks).
    with open_text(path, newline="" if suffix == ".csv" else None) as stream:
        for ids, texts in _chunked(TEXT_READERS[suffix](stream, path, text_column, id_column), chunk_rows):
            rows += len(texts)
            yield ids, texts
    if rows == 0:
        raise DataError(f"{path} has no texts to classify (only a header or blank lines).")
