"""Reading labelled text tables from local files or the Hugging Face hub, with errors that name the culprit."""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from lightning_cls.errors import DataError, first_line

HUB_DATASET = "knowledgator/Scientific-text-classification"
TABLE_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet")


def json_object_line(path: str | Path, number: int, line: str) -> dict:
    """One line of a JSON lines file, which must hold a JSON object; errors name the file and the line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}, line {number}: not valid JSON ({err.msg}).") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}, line {number}: expected one JSON object per line, got {type(record).__name__}.")
    return record


# What a file is when its first bytes say so, whatever its name: refused with that name, not parsed as garbage.
MAGIC_BYTES = {
    b"PAR1": "a Parquet file",
    b"PK\x03\x04": "a ZIP archive (an Excel .xlsx file?)",
    b"\x1f\x8b": "gzip-compressed (decompress it first)",
    b"\x89PNG": "a PNG image",
    b"%PDF": "a PDF document",
    b"SQLite format 3": "an SQLite database",
}


def _read_local(path: Path) -> pd.DataFrame:
    """The file's table, every value as read (str, int, float, None...): nothing is converted or guessed here."""
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(f"Unsupported file type {path.name!r}: use one of {', '.join(TABLE_SUFFIXES)}.")
    with open(path, "rb") as f:
        head = f.read(16)
    for magic, what in MAGIC_BYTES.items():
        if head.startswith(magic) and not (suffix == ".parquet" and magic == b"PAR1"):
            raise DataError(f"{path} is {what}, not {suffix[1:]}: give the file its real extension or convert it.")
    if suffix == ".parquet":
        if not head.startswith(b"PAR1"):
            raise DataError(f"{path} is not a Parquet file (it does not start with PAR1): is it CSV or JSON?")
        return _read_parquet(path)
    text = decode_text(path.read_bytes(), path)
    if suffix == ".csv":
        return _read_csv(text, path)
    return _read_json(text, path, lines=suffix == ".jsonl")


def decode_text(data: bytes, path: Path | str) -> str:
    """The file's text: UTF-8, or UTF-16 / UTF-8 with a byte-order mark (dropped). Other bytes are refused with the
    line where they are, since guessing an encoding silently changes texts."""
    encoding = "utf-8"
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        byte = data[err.start : err.start + 1]
        raise DataError(
            f"{path}, line {line} (byte {err.start}): not valid {encoding.upper()} (byte {byte!r}); a binary file, or "
            "text in another encoding? Save it as UTF-8."
        ) from None


def _read_csv(text: str, path: Path) -> pd.DataFrame:
    # The csv module rather than pandas: pandas takes a first data row with one field too many for an index column
    # (shifting every value left), and its errors do not always say which line.
    csv.field_size_limit(2**31 - 1)  # very long texts are read whole (and truncated by the tokenizer)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[list[str]] = []
    try:
        header = next((row for row in reader if row), None)
        if header is None:
            raise DataError(f"{path} is empty: no header, no rows.")
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise DataError(f"{path}: the header names column(s) {repeated} more than once.")
        for fields in reader:
            if not fields:
                continue  # a blank line is no row (as in pandas)
            if len(fields) != len(header):
                raise DataError(
                    f"{path}, line {reader.line_num} (data row {len(rows)}): {len(fields)} field(s) where the header "
                    f"has {len(header)} {header}. A comma in an unquoted text? Quote texts that contain commas."
                )
            rows.append(fields)
    except csv.Error as err:
        raise DataError(
            f"{path}, line {reader.line_num} (data row {len(rows)}): CSV quoting error ({err}); a quote opened "
            'and never closed, or text right after a closing quote? Inside a quoted text, write " as "".'
        ) from None
    return pd.DataFrame(rows, columns=header, dtype=object)


def _read_json(text: str, path: Path, lines: bool) -> pd.DataFrame:
    if not lines:
        try:
            return _json_table(json.loads(text), path)
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":
                raise DataError(f"{path}, line {err.lineno} column {err.colno}: not valid JSON ({err.msg}).") from None
        # Several JSON values one after the other: JSON lines in a .json file.
    records = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028 etc.
        if not line.strip():
            continue
        records.append(json_object_line(path, number, line))
    return _records_frame(records)


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
    path: str | Path, text_column: str, label_column: str | None, order_column: str | None = None
) -> pd.DataFrame:
    """A local CSV/JSON/JSONL/Parquet file as a frame with columns ``text``, ``label`` (if asked), ``order`` (the
    values of ``order_column``, if asked: what a split by time orders rows by) and ``row_id``.

    ``row_id`` is the 0-based row number in the file, kept so that predictions can be traced back to their input.
    Missing or blank texts and missing labels raise ``DataError`` with the file, column and row numbers.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Data file {path} does not exist.")
    return validate_table(_read_local(path), str(path), text_column, label_column, order_column=order_column)


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
        raise DataError(f"{source} has no column {missing[0]!r} (columns: {list(frame.columns)}).")
    if frame.empty:
        raise DataError(f"{source} has no rows.")
    out = pd.DataFrame({"row_id": range(len(frame))})
    out["text"] = _checked_strings(frame[text_column], source, text_column, allow_blank=False)
    if label_column:
        labels = _checked_strings(frame[label_column], source, label_column, allow_blank=False)
        out["label"] = [label.strip() for label in labels]  # " physics" and "physics" are one label
    if order_column:
        # As text: the values are compared, and a number read back as text keeps its digits (2503.10 stays "2503.10").
        out["order"] = _checked_strings(frame[order_column], source, order_column, allow_blank=False)
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
                f"keeping the first of each: 0-based data rows {rows[:10]}{' ...' if duplicates > 10 else ''}"
            )
    out.attrs.update(rows_read=rows_read, duplicate_rows=duplicates)
    return out


def _checked_strings(column: pd.Series, source: str, name: str, allow_blank: bool) -> list[str]:
    values = column.tolist()
    bad = [i for i, v in enumerate(values) if v is None or (isinstance(v, float) and v != v)]
    if not allow_blank:
        bad += [i for i, v in enumerate(values) if isinstance(v, str) and not v.strip()]
    if bad:
        rows = sorted(bad)
        raise DataError(
            f"{source}: column {name!r} is empty or missing in {len(rows)} row(s) "
            f"(0-based data rows {rows[:10]}{' ...' if len(rows) > 10 else ''})."
        )
    # Numbers are read as their text (a label 1 is the label "1"); lists, objects or bytes are not text.
    wrong = [i for i, v in enumerate(values) if not isinstance(v, (str, int, float, np.number))]
    if wrong:
        kinds = sorted({type(values[i]).__name__ for i in wrong})
        raise DataError(
            f"{source}: column {name!r} holds {', '.join(kinds)} values, not text, in {len(wrong)} row(s) "
            f"(0-based data rows {wrong[:10]}{' ...' if len(wrong) > 10 else ''})."
        )
    return [v if isinstance(v, str) else str(v) for v in values]


def file_fingerprint(path: str | Path) -> str:
    """SHA-256 of the file's bytes: the tokenization cache is reused only for identical inputs."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
