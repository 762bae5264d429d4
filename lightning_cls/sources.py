"""Reading labelled text tables from local files or the Hugging Face hub, with errors that name the culprit."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

HUB_DATASET = "knowledgator/Scientific-text-classification"
TABLE_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet")


class DataError(ValueError):
    """Input data that cannot be used as given; the message names the file, column, row or label."""


def _read_local(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    # Strings stay strings: a label "1" must not become the integer 1, and "NA" is a text, not a missing value.
    try:
        if suffix == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
        if suffix in (".json", ".jsonl"):
            lines = suffix == ".jsonl" or path.read_bytes()[:1].strip() != b"["
            return pd.read_json(path, lines=lines, dtype=False)
        if suffix == ".parquet":
            return pd.read_parquet(path)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, OSError) as err:
        raise DataError(f"Cannot read {path} as {suffix[1:]}: {err}") from err
    raise DataError(f"Unsupported file type {path.name!r}: use one of {', '.join(TABLE_SUFFIXES)}.")


def read_table(path: str | Path, text_column: str, label_column: str | None) -> pd.DataFrame:
    """A local CSV/JSON/JSONL/Parquet file as a frame with columns ``text``, ``label`` (if asked) and ``row_id``.

    ``row_id`` is the 0-based row number in the file, kept so that predictions can be traced back to their input.
    Missing or blank texts and missing labels raise ``DataError`` with the file, column and row numbers.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Data file {path} does not exist.")
    return validate_table(_read_local(path), str(path), text_column, label_column)


def read_hub(dataset: str, text_column: str, label_column: str | None, split: str = "train") -> pd.DataFrame:
    """A hub dataset split, validated like a local file (needs the hub or its local cache)."""
    import datasets

    frame = datasets.load_dataset(dataset, split=split).to_pandas()
    return validate_table(frame, f"hub dataset {dataset!r}", text_column, label_column)


def validate_table(frame: pd.DataFrame, source: str, text_column: str, label_column: str | None) -> pd.DataFrame:
    columns = [text_column] + ([label_column] if label_column else [])
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{source} has no column {missing[0]!r} (columns: {list(frame.columns)}).")
    if frame.empty:
        raise DataError(f"{source} has no rows.")
    out = pd.DataFrame({"row_id": range(len(frame))})
    out["text"] = _checked_strings(frame[text_column], source, text_column, allow_blank=False)
    if label_column:
        out["label"] = _checked_strings(frame[label_column], source, label_column, allow_blank=False)
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
    # Numbers as labels are read as their text; the label names are strings everywhere downstream.
    return [v if isinstance(v, str) else str(v) for v in values]


def file_fingerprint(path: str | Path) -> str:
    """SHA-256 of the file's bytes: the tokenization cache is reused only for identical inputs."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
