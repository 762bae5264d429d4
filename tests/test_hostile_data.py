"""Messy, broken or disguised data files: each is read faithfully or refused with an error naming the file (and the
row or line); no row is lost or invented without being counted."""

from __future__ import annotations

import codecs
import csv
import io
import json
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lightning_cls.data.datamodule import ScientificTextDataModule
from lightning_cls.data.tables import read_table
from lightning_cls.errors import DataError

# Texts: any Unicode text (control characters, quotes, commas, line breaks, U+2028, emoji...), numbers, very long.
TEXT = st.one_of(
    st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=40),
    st.text(st.characters(max_codepoint=0x1F), min_size=1, max_size=5).map(lambda t: "x" + t),  # NUL, BEL, ESC...
    st.integers(-5, 5).map(str),
    st.sampled_from(['"', '""', "a,b", 'say "hi"', "line\r\nbreak", "x" * 5000]),
).filter(lambda t: t.strip())
LABEL = st.one_of(
    st.sampled_from(["physics", "mathematics", " physics ", "ünïcode", "1", "2.0"]),
    st.integers(0, 2),  # numbers as labels (JSON and Parquet keep them as numbers)
)
BLANKS = ["", "  ", "\t\n"]


@st.composite
def tables(draw) -> list[tuple]:
    """Rows of (text, label); some repeated (duplicates), now and then a blank text or label."""
    rows = draw(st.lists(st.tuples(TEXT, LABEL), max_size=12))
    if rows:
        rows += draw(st.lists(st.sampled_from(rows), max_size=3))
    if rows and draw(st.integers(0, 9)) == 0:
        i, blank, column = draw(st.integers(0, len(rows) - 1)), draw(st.sampled_from(BLANKS)), draw(st.booleans())
        rows[i] = (blank, rows[i][1]) if column else (rows[i][0], blank)
    return rows


FORMATS = ["csv", "csv-bom", "csv-utf16", "csv-latin1", "json", "jsonl", "json-columns", "parquet"]
DAMAGE = ["none", "truncate", "quote", "bytes", "parquet-as-csv", "csv-as-parquet", "json-not-a-table", "binary"]


def encode(rows: list[tuple], fmt: str) -> tuple[bytes, str]:
    """The bytes of a file holding ``rows`` in format ``fmt``, and its suffix."""
    if fmt.startswith("csv"):
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer)
        writer.writerow(["text", "label"])
        writer.writerows([[t, str(label)] for t, label in rows])
        text = buffer.getvalue()
        encoded = {
            "csv": lambda: text.encode(),
            "csv-bom": lambda: codecs.BOM_UTF8 + text.encode(),
            "csv-utf16": lambda: text.encode("utf-16"),  # with its byte-order mark
            "csv-latin1": lambda: text.encode("latin-1", errors="replace"),
        }[fmt]()
        return encoded, ".csv"
    records = [{"text": t, "label": label} for t, label in rows]
    if fmt == "json":
        return json.dumps(records).encode(), ".json"
    if fmt == "json-columns":
        return json.dumps({"text": [t for t, _ in rows], "label": [la for _, la in rows]}).encode(), ".json"
    if fmt == "jsonl":
        return "\n".join(json.dumps(r) for r in records).encode(), ".jsonl"
    buffer = io.BytesIO()
    frame = pd.DataFrame({"text": [t for t, _ in rows], "label": [str(la) for _, la in rows]})
    frame.to_parquet(buffer)
    return buffer.getvalue(), ".parquet"


def damage(data: bytes, suffix: str, how: str, where: float) -> tuple[bytes, str]:
    at = int(len(data) * where)
    if how == "truncate":
        return data[:at], suffix
    if how == "quote":
        return data[:at] + b'"' + data[at:], suffix
    if how == "bytes":
        return data[:at] + b"\xff\xfe\x00\x80" + data[at:], suffix
    if how == "parquet-as-csv":
        buffer = io.BytesIO()
        pd.DataFrame({"text": ["a"], "label": ["b"]}).to_parquet(buffer)
        return buffer.getvalue(), ".csv"
    if how == "csv-as-parquet":
        return b"text,label\nhello,physics\n", ".parquet"
    if how == "json-not-a-table":
        return json.dumps([{"text": "a", "label": "b"}, 3] if where < 0.5 else {"text": "a"}).encode(), ".json"
    if how == "binary":
        return bytes(range(256)) * 4, suffix
    return data, suffix


def expected_rows(rows: list[tuple], fmt: str) -> list[tuple[str, str]] | None:
    """What a faithful reader returns (text, stripped label) after dropping repeated texts; None if it must refuse."""
    if any(not t.strip() or not str(la).strip() for t, la in rows):
        return None  # a blank text or label is refused, naming the rows
    kept, seen = [], set()
    for text, label in rows:
        if text not in seen:
            seen.add(text)
            kept.append((text, str(label).strip()))
    return kept


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=tables(),
    fmt=st.sampled_from(FORMATS),
    how=st.one_of(st.just("none"), st.sampled_from(DAMAGE)),  # intact files half of the time
    where=st.floats(0, 1),
)
def test_any_file_is_read_faithfully_or_refused_naming_it(rows, fmt, how, where):
    data, suffix = encode(rows, fmt)
    data, suffix = damage(data, suffix, how, where)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        path.write_bytes(data)
        try:
            table = read_table(path, "text", "label")
        except DataError as err:  # the only error allowed, and it names the file
            event(f"refused {how}")
            assert str(path) in str(err)
            assert "\n" not in str(err)
            return
    # Accepted: every row read is either in the table or counted as a duplicate.
    assert table.attrs["rows_read"] == len(table) + table.attrs["duplicate_rows"]
    assert table["row_id"].is_unique and table["row_id"].is_monotonic_increasing
    assert all(isinstance(t, str) and t.strip() for t in table["text"])
    assert all(isinstance(la, str) and la == la.strip() and la for la in table["label"])
    faithful = how == "none" and not (fmt == "csv-latin1" and not all(t.isascii() for t, _ in rows))
    event("read faithfully" if faithful else f"read despite {how}")
    if faithful:  # an intact file in a supported encoding: exactly the rows written, in order
        assert list(zip(table["text"], table["label"], strict=True)) == expected_rows(rows, fmt)
        assert table.attrs["rows_read"] == len(rows)


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        (b"text,label\na,b,c\nd,y\n", ".csv", r"line 2 \(data row 0\): 3 field\(s\) where the header has 2"),
        (b'text,label\n"open quote,x\nd,y\n', ".csv", r"line 3 \(data row 0\): CSV quoting error"),
        (b'text,label\n"closed"then more,x\n', ".csv", "CSV quoting error"),
        (b"text,label\nok,x\ncaf\xe9,y\n", ".csv", r"line 3 \(byte 19\): not valid UTF-8"),
        (b"PAR1\x00\x00", ".csv", "is a Parquet file, not csv"),
        (b"PK\x03\x04rest", ".csv", "ZIP archive"),
        (b"text,label\nhello,x\n", ".parquet", "is not a Parquet file"),
        (b'{"text": "a", "label": "b"}', ".json", "is JSON but not a table"),
        (b'[{"text": "a", "label": "b"}, 3]', ".json", r"not a table \(row 1 is not an object\)"),
        (b'{"text": "a", "label": "b"}\n[1]\n', ".jsonl", "line 2: expected one JSON object per line, got list"),
        (b'{"text": "a", "label": "b"}\n{"text": \n', ".jsonl", "line 2: not valid JSON"),
        (b'[{"text": ["a", "list"], "label": "b"}]', ".json", r"column 'text' holds list values, not text.*\[0\]"),
        (b"text,text\na,b\n", ".csv", r"names column\(s\) \['text'\] more than once"),
        (b"", ".csv", "is empty"),
    ],
)
def test_broken_files_are_refused_naming_file_and_place(tmp_path, content, suffix, message):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        read_table(path, "text", "label")
    assert str(path) in str(err.value)


def test_messy_but_valid_files_are_read_as_meant(tmp_path):
    text = 'text,label\r\n"comma, ""quotes"" and\nnewline", physics \n\ttab\x07bell,1\n\nlong ' + "x" * 200_000 + ",2\n"
    path = tmp_path / "messy.csv"
    path.write_bytes(codecs.BOM_UTF8 + text.encode())
    table = read_table(path, "text", "label")
    assert table["text"].tolist() == ['comma, "quotes" and\nnewline', "\ttab\x07bell", "long " + "x" * 200_000]
    assert table["label"].tolist() == ["physics", "1", "2"]  # labels stripped; numbers are their text
    utf16 = tmp_path / "utf16.csv"
    utf16.write_bytes("text,label\nünï,x\n".encode("utf-16"))
    assert read_table(utf16, "text", "label")["text"].tolist() == ["ünï"]
    jsonl = tmp_path / "numbers.jsonl"
    jsonl.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": null}\n')
    with pytest.raises(
        DataError, match=r"column 'label' is empty or missing in 1 row\(s\) \(0-based data rows \[1\]\)"
    ):
        read_table(jsonl, "text", "label")


def test_duplicates_are_dropped_and_counted(tmp_path):
    path = tmp_path / "dups.csv"
    path.write_text("text,label\na,x\nb,y\na,x\na,y\nc,x\n")
    table = read_table(path, "text", "label")
    assert table["text"].tolist() == ["a", "b", "c"] and table["row_id"].tolist() == [0, 1, 4]
    assert table.attrs["rows_read"] == 5 and table.attrs["duplicate_rows"] == 2
    assert "(1 with another label)" in table.attrs["duplicates"] and "[2, 3]" in table.attrs["duplicates"]
    # Without labels (texts to classify), every row is kept.
    assert len(read_table(path, "text", None)) == 5


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from(["alpha beta", "gamma", "delta epsilon", "zeta", "eta theta"]),
            st.sampled_from(["physics", "mathematics", "statistics"]),
        ),
        min_size=3,
        max_size=40,
    ),
    drop_label=st.booleans(),
)
def test_data_module_accounts_for_every_row(sample_dir, rows, drop_label):
    """rows read = rows in the splits + duplicate rows + rows of unselected labels, and the log says so."""
    texts = [f"{text} {i % 7}" for i, (text, _) in enumerate(rows)]  # some texts repeat
    labels = [label for _, label in rows]
    if len(set(labels)) < 2:
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.csv"
        pd.DataFrame({"text": texts, "label": labels}).to_csv(path, index=False)
        kept = sorted(set(labels))[1:] if drop_label else sorted(set(labels))
        dm = ScientificTextDataModule(
            tokenizer=str(sample_dir / "wordpiece"),
            path=str(path),
            labels=kept,
            max_samples=None,
            cache_dir=str(Path(folder) / "cache"),
            max_length=16,
        )
        try:
            dm.prepare_data()
        except ValueError as err:  # e.g. the repeated texts left no row of a selected label
            event("refused")
            assert str(path) in str(err) or "not found" in str(err)
            return
        dm.setup("fit")
        event("prepared")
        meta = dm.meta
        in_splits = sum(s["rows"] for s in meta["splits"].values())
        assert meta["rows_read"] == len(rows)
        assert meta["rows_read"] == in_splits + meta["duplicate_rows"] + meta["dropped_rows"]
        assert meta["duplicate_rows"] == len(texts) - len(set(texts))


def test_a_lone_surrogate_in_json_is_refused_naming_the_row(tmp_path):
    """JSON can spell half a UTF-16 pair ("\\udc00"); that is no text (found by the property test above)."""
    path = tmp_path / "data.json"
    path.write_text('{"text": ["fine", "a\\udc00b"], "label": ["x", "y"]}')
    with pytest.raises(DataError, match=r"column 'text' holds a lone surrogate .* \(0-based data rows \[1\]\)"):
        read_table(path, "text", "label")
