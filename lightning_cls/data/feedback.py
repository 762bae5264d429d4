"""Training rows from the feedback store: the served texts whose true labels users sent to POST /feedback.

The service keeps a served text only when it runs with `serve --keep_texts` (`serving.feedback`, schema 3: the
`predictions.text` column); a labelled row for retraining is a feedback row joined to its prediction, with a text.
Pure functions on pandas tables and one read-only query (`lightning_cls.database`: the service's SQLite file or its
PostgreSQL URL): no Lightning, no torch, and the database is opened read-only, so that a running service is never
blocked or changed.

    raw = read_feedback("feedback.sqlite3", after=parse_time("2026-03-01"))   # every labelled row with a text
    rows, summary = prepare_feedback(raw, original_texts, names, multi_label=False)
    print(summary.line())

What `prepare_feedback` does, in order:

1. **True labels** as the training data has them: a name (single-label data) or a tuple of names in the training
   label order (multi-label data; the store's JSON list, or a single label as a set of one). A true label that is
   not one of the training labels is an error naming the prediction id and the label: the feedback is then of
   another label set (another model, or a typo in a client), and silently training without it would hide that.
   ``drop_unknown`` drops such rows instead (for label sets: the unknown names, and the row if none is left), and
   counts them. A set of several labels for single-label data is always an error.
2. **Among the feedback**, one row per text (whitespace normalised: `" ".join(text.split())`): the latest feedback
   wins (by feedback time, then by arrival order), the older ones are counted (`repeated`).
3. **Against the original data**: a feedback text that is the text of any row of the data (whitespace normalised)
   is dropped and counted (`duplicates`): the original row wins, so that a text never lands in two splits (a test
   row served and labelled again would otherwise leak into training) and the data's own label is kept.

Rows come back with the data's columns `text`, `label` and the provenance columns `source` ("feedback"),
`prediction_id`, `model_version` (the version that answered) and `feedback_time` (Unix seconds). `with_feedback`
puts them after the original rows, which get `source` = "original" (and empty provenance).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa

from lightning_cls.database import Database, StoreError, is_url, redacted
from lightning_cls.errors import ConfigError, DataError

# The labelled rows with texts (schema 3 of `serving.feedback`), oldest feedback first.
QUERY = (
    "SELECT p.text, f.label, f.labels, f.time, p.id, p.model_version, f.seq FROM feedback f "
    "JOIN predictions p ON p.id = f.prediction_id WHERE p.text IS NOT NULL{where} ORDER BY f.time, f.seq"
)
RAW_COLUMNS = ["text", "true_label", "true_labels", "feedback_time", "prediction_id", "model_version", "seq"]
PROVENANCE = ["source", "prediction_id", "model_version", "feedback_time"]
COLUMNS = ["text", "label", *PROVENANCE]


@dataclass(frozen=True)
class FeedbackSummary:
    """What became of the labelled rows read: ``read`` (with texts, after the time filter) = ``added`` +
    ``duplicates`` (of an original text) + ``repeated`` (an older feedback on a text with a later one) +
    ``unknown`` (dropped for a label that is not a training label); ``without_text`` labelled rows were served
    without `--keep_texts` and cannot be used."""

    path: str
    read: int
    added: int
    duplicates: int
    repeated: int
    unknown: int
    without_text: int
    after: float | None = None
    newest: float | None = None  # the latest feedback time read (None: none read)

    def line(self) -> str:
        """One line for the log."""
        after = f" after {format_time(self.after)}" if self.after is not None else ""
        unknown = f", {self.unknown} with labels outside the training labels dropped" if self.unknown else ""
        without = f"; {self.without_text} labelled rows have no text (served without --keep_texts)"
        return (
            f"feedback {self.path}: added {self.added} rows to the training split ({self.read} labelled rows with "
            f"texts{after} read; {self.duplicates} duplicates of the data's texts and {self.repeated} older "
            f"feedback on a repeated text dropped{unknown}{without if self.without_text else ''})."
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ times
def parse_time(value: str | float | date | None, option: str = "data.feedback_after") -> float | None:
    """A time as Unix seconds: a number (Unix seconds), or an ISO 8601 date or date and time (`2026-03-01`,
    `2026-03-01T12:00:00+01:00`; without an offset: UTC). None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{option}={value!r} is not a time: give Unix seconds or an ISO 8601 date.")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ConfigError(f"{option}={value!r} is not a time: give Unix seconds or an ISO 8601 date.")
        return float(value)
    if isinstance(value, date) and not isinstance(value, datetime):  # YAML reads 2026-03-01 as a date
        value = datetime(value.year, value.month, value.day)
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        try:
            value = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(
                f"{option}={value!r} is not a time: give Unix seconds or an ISO 8601 date or date and time "
                "(2026-03-01, 2026-03-01T12:00:00+01:00; UTC when no offset is given)."
            ) from None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.timestamp()
    raise ConfigError(f"{option}={value!r} is not a time: give Unix seconds or an ISO 8601 date.")


def format_time(seconds: float | None) -> str:
    """Unix seconds as an ISO 8601 UTC time to the second."""
    if seconds is None:
        return "never"
    return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# ------------------------------------------------------------------------------------------------ reading
def read_feedback(path: str | Path, after: float | None = None) -> pd.DataFrame:
    """Every labelled row with a text (feedback received after ``after``, Unix seconds, if given), oldest feedback
    first, with the columns `RAW_COLUMNS` (the true label as stored: `true_label` a name, `true_labels` a JSON list
    or None); possibly none. ``attrs["without_text"]``: labelled rows whose text was not kept.

    ``path`` is the service's SQLite file or its PostgreSQL URL, opened read-only (never created, migrated or
    locked for writing). Errors name it: it does not exist, is not a database, is not a feedback database, or is
    older than the texts (schema 3).
    """
    option, name = "--feedback_db", redacted(path)
    if not is_url(path) and not Path(path).is_file():
        raise DataError(f"{option} {path} does not exist (or is not a file): give the service's feedback database.")
    kind = "a PostgreSQL" if is_url(path) else "a SQLite"
    db = Database(path, read_only=True)
    try:
        with db.transaction(write=False) as conn:
            if not {"predictions", "feedback"} <= db.tables(conn):
                raise DataError(
                    f"{option} {name} is {kind} database but not a feedback database (no `predictions` and "
                    "`feedback` tables): give the database `serve --feedback_db` writes."
                )
            if "text" not in db.columns(conn, "predictions") or "labels" not in db.columns(conn, "feedback"):
                raise DataError(
                    f"{option} {name} has schema version {db.schema_version(conn)}, which keeps no texts: start "
                    "`serve --keep_texts` on it with this lightning_cls (it adds the column) and collect feedback on "
                    "new predictions."
                )
            where, params = (" AND f.time > :after", {"after": after}) if after is not None else ("", {})
            rows = conn.execute(sa.text(QUERY.format(where=where)), params).all()
            without = conn.execute(
                sa.text(
                    "SELECT count(*) FROM feedback f JOIN predictions p ON p.id = f.prediction_id "
                    "WHERE p.text IS NULL" + where
                ),
                params,
            ).scalar()
    except StoreError as err:
        raise DataError(f"{option} {name} cannot be read as {kind} database: {err.reason}.") from None
    finally:
        db.close()
    table = pd.DataFrame([tuple(r) for r in rows], columns=RAW_COLUMNS)
    table.attrs.update(path=name, after=after, without_text=int(without))
    return table


def fingerprint(raw: pd.DataFrame) -> str:
    """A hash of the rows `read_feedback` read (ids, labels, times, texts): the token cache's key changes with them."""
    digest = hashlib.sha256()
    for row in raw.itertuples(index=False):
        digest.update(json.dumps([row.prediction_id, row.true_label, row.true_labels, row.feedback_time]).encode())
        digest.update(hashlib.sha256(str(row.text).encode()).digest())
    return digest.hexdigest()[:16]


def normalise(text: str) -> str:
    """Whitespace normalised: runs of whitespace as one space, none at the ends (what two copies of a text that
    differ only by line breaks or spacing have in common)."""
    return " ".join(str(text).split())


# ------------------------------------------------------------------------------------------------ labels
def true_labels(
    raw: pd.DataFrame, names: Sequence[str], multi_label: bool, drop_unknown: bool = False
) -> tuple[pd.DataFrame, int]:
    """The rows with a `label` column as the training data has it (a name, or for multi-label data a tuple of names
    in the order of ``names``), and how many rows were dropped for labels outside ``names`` (with
    ``drop_unknown``; otherwise such a label is a ``DataError`` naming the prediction id and the label)."""
    index = {name: i for i, name in enumerate(names)}
    where = raw.attrs.get("path", "the feedback database")
    labels: list[Any] = []
    keep: list[bool] = []
    for pid, label, stored in zip(raw["prediction_id"], raw["true_label"], raw["true_labels"], strict=True):
        given = [str(n) for n in json.loads(stored)] if isinstance(stored, str) else [str(label)]  # None: NaN here
        unknown = [n for n in given if n not in index]
        if not multi_label and len(given) > 1:
            raise DataError(
                f"{where}: prediction {pid} has the true label set {given}, but the training data is single-label: "
                "this feedback is of a multi-label model (set data.multi_label true, or give another database)."
            )
        if unknown and not drop_unknown:
            raise DataError(
                f"{where}: prediction {pid} has the true label {unknown[0]!r}, which is not a training label "
                f"({', '.join(names)}): feedback of another label set? Set data.feedback_drop_unknown (fit) or "
                "--feedback_drop_unknown (compare) true to leave such rows out."
            )
        known = sorted((n for n in set(given) if n in index), key=index.get)
        keep.append(bool(known))
        labels.append(tuple(known) if multi_label else (known[0] if known else None))
    out = raw.assign(label=labels).loc[pd.Series(keep, index=raw.index, dtype=bool)].reset_index(drop=True)
    out.attrs = dict(raw.attrs)
    return out, len(raw) - len(out)


# ------------------------------------------------------------------------------------------------ deduplication
def latest_per_text(rows: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """One row per (whitespace-normalised) text: the latest feedback (by time, then arrival); and how many older
    ones were dropped. The rows keep their order (oldest feedback first)."""
    order = rows.sort_values(["feedback_time", "seq"], kind="stable")
    keys = order["text"].map(normalise)
    out = order[~keys.duplicated(keep="last")].reset_index(drop=True)
    out.attrs = dict(rows.attrs)
    return out, len(rows) - len(out)


def drop_original_texts(rows: pd.DataFrame, original_texts: Iterable[str]) -> tuple[pd.DataFrame, int]:
    """The rows whose text (whitespace normalised) is no text of the original data, and how many were dropped."""
    known = {normalise(t) for t in original_texts}
    repeated = rows["text"].map(normalise).isin(known)
    out = rows[~repeated].reset_index(drop=True)
    out.attrs = dict(rows.attrs)
    return out, int(repeated.sum())


def prepare_feedback(
    raw: pd.DataFrame,
    original_texts: Iterable[str],
    names: Sequence[str],
    multi_label: bool = False,
    drop_unknown: bool = False,
) -> tuple[pd.DataFrame, FeedbackSummary]:
    """The rows of `read_feedback` ready to train on (labels checked, one per text, none repeating the original
    data; the module's docstring gives the rules) with the columns `COLUMNS`, and what became of the others.

    No labelled row with a text at all is a ``DataError`` naming the file: asking for feedback and getting none
    is a mistake to see (a database of a service without --keep_texts, or a time filter after the last feedback)."""
    path, after = raw.attrs.get("path", "?"), raw.attrs.get("after")
    if raw.empty:
        since = f" received after {format_time(after)}" if after is not None else ""
        without = raw.attrs.get("without_text", 0)
        hint = (
            f" ({without} labelled rows have none: served without --keep_texts)"
            if without
            else " (no feedback stored yet?)"
        )
        raise DataError(f"--feedback_db {path} has no labelled predictions with texts{since}{hint}.")
    labelled, unknown = true_labels(raw, names, multi_label, drop_unknown)
    latest, repeated = latest_per_text(labelled)
    kept, duplicates = drop_original_texts(latest, original_texts)
    rows = kept.assign(source="feedback")[COLUMNS].reset_index(drop=True)
    summary = FeedbackSummary(
        path=str(path),
        read=len(raw),
        added=len(rows),
        duplicates=duplicates,
        repeated=repeated,
        unknown=unknown,
        without_text=int(raw.attrs.get("without_text", 0)),
        after=after,
        newest=float(raw["feedback_time"].max()),
    )
    return rows, summary


def with_feedback(
    original: pd.DataFrame,
    path: str | Path,
    names: Sequence[str],
    multi_label: bool = False,
    after: float | None = None,
    drop_unknown: bool = False,
) -> tuple[pd.DataFrame, FeedbackSummary]:
    """The original rows (columns `text`, `label`, as given; `source` = "original") followed by the feedback rows
    of the database at ``path`` (`read_feedback`, then `prepare_feedback` against the original texts)."""
    raw = read_feedback(path, after)
    rows, summary = prepare_feedback(raw, original["text"], names, multi_label, drop_unknown)
    base = original[["text", "label"]].assign(source="original", prediction_id=None, model_version=None)
    base["feedback_time"] = float("nan")
    return pd.concat([base, rows], ignore_index=True)[COLUMNS], summary


class FeedbackRows:
    """The feedback of one training run, read once: the token cache's key (`fingerprint`) and the rows added to the
    training split (`training_rows`) come from the same reading, however many rows the service adds meanwhile."""

    def __init__(self, path: str | Path, after: float | None = None, drop_unknown: bool = False) -> None:
        self.path, self.after, self.drop_unknown = path, after, drop_unknown
        self._raw: pd.DataFrame | None = None

    @property
    def raw(self) -> pd.DataFrame:
        """`read_feedback`'s rows, read on first use."""
        if self._raw is None:
            self._raw = read_feedback(self.path, self.after)
        return self._raw

    def fingerprint(self) -> str:
        return fingerprint(self.raw)  # the module's function: a hash of the rows read

    def training_rows(
        self, original_texts: Iterable[str], names: Sequence[str], multi_label: bool
    ) -> tuple[pd.DataFrame, FeedbackSummary]:
        """`prepare_feedback` of the rows read."""
        return prepare_feedback(self.raw, original_texts, names, multi_label, self.drop_unknown)
