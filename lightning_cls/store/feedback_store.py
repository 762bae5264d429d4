"""Ground truth for served predictions: the embedded SQLite database of predictions and of the true labels sent to
POST /feedback, shared by the service's processes.

Who writes what (one SQLite file in WAL mode: readers never wait for the writer, writers wait for each other up to
a busy timeout):

- the logger process (`metrics.MonitoringLogger`) inserts every server batch's predictions off the inference path
  (the inference worker only sends it one message per batch), from the writer thread of its `prediction_log`
  (retried, spilled to a file, never dropped silently when the database is busy), and deletes the oldest beyond the
  retention bound;
- the HTTP server process(es) (`http.FeedbackEndpoint`) insert the true labels, with their own connection, then
  tell the logger process that feedback arrived (a message on LitServe's logger queue);
- the logger process then reads the new feedback rows (their `seq` only grows: SQLite has one writer at a time and
  AUTOINCREMENT never reuses a number) into its window and sets the live accuracy gauges, so that every
  prediction-side gauge keeps a single writer.

Texts are never stored: a prediction row holds its id, time, label and probabilities, token and window counts, and
which model made it. Plain `sqlite3` (standard library); nothing here imports the web or torch stacks.

A multi-label model's answers are label sets: the prediction row keeps its set (`labels`, a JSON list, most probable
first) beside its most probable label, and a true label set is stored as a JSON list in `feedback.labels` (in the
model's label order) with `feedback.label` the same names joined by "; " (as `predict` writes sets in CSV), so that a
plain `SELECT prediction_id, label FROM feedback` still reads. A true label is a `str`, a true set a `tuple` of names.

Schema versions (`PRAGMA user_version`): 1, single labels; 2 adds the two `labels` columns (NULL for single-label
models). 3 adds `predictions.text` (NULL unless `serve --keep_texts`: the texts `fit` retrains on,
`lightning_cls.data.feedback`), the `shadow_predictions` of a challenger run in shadow (`serving.router`) and the
`deployments` history (`serving.deployment`). Opening an older file adds what it lacks (`ALTER TABLE ... ADD COLUMN`,
`CREATE TABLE IF NOT EXISTS`: no row is rewritten); a file of a newer version than this code writes is refused.

Which model answered: every prediction row names its `model_version`. With two models in the service (a canary),
each answer's row names the version that produced it, so feedback on it lands against that version, also after the
version is retired.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_cls.errors import InputError

# PRAGMA user_version; a newer database is refused (2: the `labels` columns; 3: texts, shadows, deployments)
SCHEMA_VERSION = 3
BUSY_TIMEOUT = 10.0  # seconds a writer waits for another one before "database is locked"
SHADOW_ROW = "shadow"  # first value of a shadow answer's row in the prediction log (a prediction id is hex)
_CHUNK = 500  # ids per `IN (...)` query, well under SQLite's limit on bound parameters

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    model_version TEXT PRIMARY KEY,
    labels TEXT NOT NULL,            -- JSON list: the order of each prediction's `probabilities`
    model_dir TEXT,
    first_served REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS predictions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,         -- the answer's prediction_id
    time REAL NOT NULL,              -- Unix time of the forward pass
    label TEXT NOT NULL,             -- the predicted label
    probability REAL NOT NULL,       -- its probability (calibrated when a temperature was in use)
    probabilities TEXT NOT NULL,     -- JSON list over the model's labels (models.labels)
    num_tokens INTEGER NOT NULL,
    windows INTEGER NOT NULL,
    truncated INTEGER NOT NULL,
    abstained INTEGER NOT NULL,
    temperature REAL,                -- the temperature applied (NULL: plain softmax)
    model_version TEXT NOT NULL,
    labels TEXT,                     -- JSON list: a multi-label answer's label set, most probable first
    text TEXT                        -- the text itself, only with serve --keep_texts (retraining from feedback)
);
CREATE INDEX IF NOT EXISTS predictions_time ON predictions (time);
CREATE TABLE IF NOT EXISTS shadow_predictions (
    id TEXT NOT NULL,                -- the prediction_id of the answer it shadows (the answered request's)
    model_version TEXT NOT NULL,     -- the shadow (challenger) model that made it, never returned to the client
    time REAL NOT NULL,
    label TEXT NOT NULL,
    probability REAL NOT NULL,
    labels TEXT,                     -- JSON list: a multi-label shadow answer's set
    PRIMARY KEY (id, model_version)
);
CREATE INDEX IF NOT EXISTS shadow_predictions_time ON shadow_predictions (time);
CREATE TABLE IF NOT EXISTS deployments (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    state TEXT NOT NULL,             -- JSON: `deployment.Deployment` (champion, challenger, mode, share, previous)
    action TEXT NOT NULL,            -- start, set, promote, rollback
    reason TEXT
);
CREATE TABLE IF NOT EXISTS secrets (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL              -- hex. prediction_ids: the key that tags the ids this database's servers issue
);
CREATE TABLE IF NOT EXISTS feedback (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    prediction_id TEXT NOT NULL UNIQUE REFERENCES predictions (id) ON DELETE CASCADE,
    label TEXT NOT NULL,             -- the true label (a label set: its names, semicolon-separated)
    time REAL NOT NULL,              -- Unix time it was received
    labels TEXT                      -- JSON list: the true label set, in the model's label order (NULL: one label)
);
"""
# Columns added by a schema version after the table's first: (table, column, type), added to older files on open.
_ADDED_COLUMNS = (("predictions", "labels", "TEXT"), ("feedback", "labels", "TEXT"), ("predictions", "text", "TEXT"))
_ROW_FIELDS = 13  # values of a `predictions` row (`rows_of`); rows spilled by version 1 have 11, by version 2 12

Truth = str | tuple[str, ...]  # a true (or predicted) label, or a label set


@dataclass(frozen=True)
class LabelledAnswer:
    """One model's answer to a request that got feedback: which version, whether it was the answer returned to the
    client (False: a shadow's), what it said and the true label."""

    version: str
    answered: bool
    predicted: Truth
    true: Truth


def model_version(model_dir: str | Path) -> str:
    """A short fingerprint of an exported folder: the first 12 hex digits of the SHA-256 of its `lightning_cls.json`
    (which records the checkpoint, the export time and the temperature, so another export is another version)."""
    from lightning_cls.export.folder import METADATA_FILE

    return hashlib.sha256((Path(model_dir) / METADATA_FILE).read_bytes()).hexdigest()[:12]


@dataclass(frozen=True)
class StoreSettings:
    """Where the logger process keeps predictions, and for how long (pickled to that process)."""

    path: str
    model_version: str
    max_rows: int = 1_000_000  # predictions kept; the oldest (with their feedback) are deleted beyond it
    max_days: float | None = None  # and those older than this many days
    temperature: float | None = None  # the temperature the worker applies, recorded with each prediction
    model_dir: str = ""  # recorded with the model version


@dataclass
class FeedbackResult:
    """What a feedback write did: ``stored`` new labels, ``repeated`` ones already stored with the same label (or
    label set); or, with nothing stored, the ``unknown`` ids and the ``conflicts`` (id, stored, sent)."""

    stored: int = 0
    repeated: int = 0
    unknown: list[str] = field(default_factory=list)
    conflicts: list[tuple[str, Truth, Truth]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unknown and not self.conflicts


class FeedbackStore:
    """One connection to the database (one per process and thread: SQLite connections do not cross a fork).

    Opening creates the tables if needed and checks the schema version (a write: it waits for the lock); errors name
    the file. ``setup=False`` skips that, for the service's processes once the main process has done it (they must
    open the database even while another writer holds it).
    """

    def __init__(self, path: str | Path, busy_timeout: float = BUSY_TIMEOUT, setup: bool = True) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit mode (isolation_level=None): transactions are begun and ended here, explicitly.
            self.conn = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
            self.conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            mode = self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise sqlite3.OperationalError(f"the journal mode stays {mode!r}, not WAL (a network file system?)")
            # In WAL mode NORMAL cannot corrupt the database; a power cut may lose the last transactions.
            self.conn.execute("PRAGMA synchronous = NORMAL")
            self.conn.execute("PRAGMA foreign_keys = ON")  # feedback rows go with their prediction
            if not setup:
                return
            with self.transaction():
                version = self.conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise InputError(
                        f"--feedback_db {self.path} has schema version {version}, newer than this lightning_cls "
                        f"writes ({SCHEMA_VERSION}): upgrade lightning_cls or give another file."
                    )
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self.conn.execute(statement)
                self._add_missing_columns()
                self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as err:
            raise InputError(f"--feedback_db {self.path} cannot be used as a SQLite database: {err}.") from None
        except OSError as err:
            raise InputError(f"--feedback_db {self.path}: {err.strerror or err}.") from None

    def _add_missing_columns(self) -> None:
        """Migrate an older file: the columns later versions added (nullable, so no row is rewritten)."""
        for table, column, kind in _ADDED_COLUMNS:
            have = {row[1] for row in self.conn.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self.conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE (takes the write lock now, so that a check and the write that depends on it see the same
        rows) or a plain read transaction (one consistent snapshot); COMMIT, or ROLLBACK on any error."""
        self.conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()

    # -------------------------------------------------------------------------------------------- predictions
    def register_model(self, version: str, labels: Sequence[str], model_dir: str) -> None:
        with self.transaction():
            self.conn.execute(
                "INSERT OR IGNORE INTO models (model_version, labels, model_dir, first_served) VALUES (?, ?, ?, ?)",
                (version, json.dumps(list(labels)), model_dir, time.time()),
            )

    def id_key(self) -> bytes:
        """The key that tags the prediction ids issued by servers on this database (`prediction_log.IdIssuer`),
        made once, at the first start, and kept: ids issued before a restart stay recognisable after it."""
        with self.transaction():
            self.conn.execute(
                "INSERT OR IGNORE INTO secrets (name, value) VALUES ('prediction_ids', ?)", (secrets.token_hex(32),)
            )
            return bytes.fromhex(
                self.conn.execute("SELECT value FROM secrets WHERE name = 'prediction_ids'").fetchone()[0]
            )

    @staticmethod
    def rows_of(batch: dict[str, Any], version: str, temperature: float | None) -> list[tuple]:
        """The `predictions` rows of one server batch (the inference worker's message): plain JSON-able values. A
        multi-label model's message has ``label_sets`` (each answer's set), stored as JSON lists; ``versions`` (each
        answer's model, when two models answer) overrides ``version``; ``texts`` (serve --keep_texts) are stored."""
        n = len(batch["ids"])
        sets = batch.get("label_sets") or [None] * n
        versions = batch.get("versions") or [version] * n
        texts = batch.get("texts") or [None] * n
        return [
            (
                pid,
                batch["time"],
                label,
                p,
                json.dumps([round(q, 6) for q in probs]),
                n,
                w,
                int(cut),
                int(abstained),
                temperature,
                v,
                json.dumps(list(label_set)) if label_set is not None else None,
                text,
            )
            for pid, label, p, probs, n, w, cut, abstained, label_set, v, text in zip(
                batch["ids"],
                batch["labels"],
                batch["probabilities"],
                batch["all_probabilities"],
                batch["lengths"],
                batch["windows"],
                batch["truncated"],
                batch["abstained"],
                sets,
                versions,
                texts,
                strict=True,
            )
        ]

    @staticmethod
    def shadow_rows_of(shadow: dict[str, Any]) -> list[tuple]:
        """The `shadow_predictions` rows of one shadow message (`serving.router`): the challenger's answers to
        copies of answered requests, keyed by the answered prediction's id. Tagged ``SHADOW_ROW`` first, so that
        they travel with the predictions through the prediction log (`insert_rows` tells them apart)."""
        sets = shadow.get("label_sets") or [None] * len(shadow["ids"])
        return [
            (
                SHADOW_ROW,
                pid,
                shadow["version"],
                shadow["time"],
                label,
                p,
                json.dumps(list(s)) if s is not None else None,
            )
            for pid, label, p, s in zip(shadow["ids"], shadow["labels"], shadow["probabilities"], sets, strict=True)
        ]

    def insert_rows(self, rows: Sequence[Sequence[Any]]) -> int:
        """Insert `rows_of` rows inside the caller's transaction; a row whose id is stored already is skipped (a
        spill file replayed twice stores each row once; a row spilled by an older version, without a label set, is
        stored without one). `shadow_rows_of` rows among them go to `shadow_predictions`. Returns how many were new."""
        shadows = [r[1:] for r in rows if r and r[0] == SHADOW_ROW]
        if shadows:
            rows = [r for r in rows if not (r and r[0] == SHADOW_ROW)]
        before = self.conn.total_changes
        self.conn.executemany(
            "INSERT OR IGNORE INTO shadow_predictions (id, model_version, time, label, probability, labels) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            shadows,
        )
        self.conn.executemany(
            "INSERT OR IGNORE INTO predictions (id, time, label, probability, probabilities, num_tokens, windows, "
            "truncated, abstained, temperature, model_version, labels, text) "
            f"VALUES ({', '.join('?' * _ROW_FIELDS)})",
            [(*r, *[None] * (_ROW_FIELDS - len(r))) for r in rows],
        )
        return self.conn.total_changes - before

    def insert_batch(self, batch: dict[str, Any], version: str, temperature: float | None) -> int:
        """The predictions of one server batch, in one transaction (the service goes through `PredictionLog`)."""
        with self.transaction():
            return self.insert_rows(self.rows_of(batch, version, temperature))

    def oldest_time(self) -> float | None:
        """The time of the oldest stored prediction (the retention front; None: none stored). Indexed: cheap."""
        with self.transaction(write=False):
            return self.conn.execute("SELECT min(time) FROM predictions").fetchone()[0]

    def prune(self, max_rows: int, max_days: float | None = None, now: float | None = None) -> int:
        """Delete the predictions beyond the newest ``max_rows`` and those older than ``max_days`` (their feedback
        goes with them); returns how many. Freed pages are reused, so the file stops growing at the bound."""
        now = time.time() if now is None else now
        with self.transaction():
            # seq grows by one per prediction: the newest max_rows (at most) are those above max(seq) - max_rows,
            # found through the primary key without stepping over the kept rows (as a count or an OFFSET would).
            deleted = self.conn.execute(
                "DELETE FROM predictions WHERE seq <= (SELECT max(seq) FROM predictions) - ?", (max_rows,)
            ).rowcount
            if max_days is not None:
                cutoff = now - max_days * 86400
                deleted += self.conn.execute("DELETE FROM predictions WHERE time < ?", (cutoff,)).rowcount
            # Shadow answers go with the answers they shadowed (older than the oldest kept prediction).
            self.conn.execute(
                "DELETE FROM shadow_predictions WHERE time < (SELECT coalesce(min(time), 1e300) FROM predictions)"
            )
        return deleted

    # -------------------------------------------------------------------------------------------- feedback
    def known_ids(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` are stored predictions (a read: it never waits for a writer)."""
        with self.transaction(write=False):
            return {r[0] for r in self._where_in("SELECT id FROM predictions WHERE id IN ({})", ids)}

    def record_feedback(self, items: Sequence[tuple[str, Truth]], now: float | None = None) -> FeedbackResult:
        """Store true labels, (prediction id, label) pairs with distinct ids, where a label is a name or, for a
        multi-label model, a tuple of names (a label set), all or nothing: nothing is stored if an id is not a stored
        prediction or already has another label (a set in another order is the same set). The same label sent again
        is not stored twice (`repeated`)."""
        now = time.time() if now is None else now
        ids = [pid for pid, _ in items]
        with self.transaction():
            known = {r[0] for r in self._where_in("SELECT id FROM predictions WHERE id IN ({})", ids)}
            stored = {
                pid: _truth(label, labels)
                for pid, label, labels in self._where_in(
                    "SELECT prediction_id, label, labels FROM feedback WHERE prediction_id IN ({})", ids
                )
            }
            unknown = [pid for pid in ids if pid not in known]
            conflicts = [
                (pid, stored[pid], label) for pid, label in items if pid in stored and not _same(stored[pid], label)
            ]
            if unknown or conflicts:
                return FeedbackResult(unknown=unknown, conflicts=conflicts)
            new = [(pid, *_columns(label), now) for pid, label in items if pid not in stored]
            self.conn.executemany("INSERT INTO feedback (prediction_id, label, labels, time) VALUES (?, ?, ?, ?)", new)
        return FeedbackResult(stored=len(new), repeated=len(items) - len(new))

    def feedback_since(self, after_seq: int, version: str, limit: int) -> tuple[list[tuple[Truth, Truth]], int]:
        """The (predicted, true) labels of the feedback rows after ``after_seq`` on answers of model ``version``,
        oldest first, at most the newest ``limit``; and the last feedback seq read (of any model)."""
        answers, seq = self.answers_since(after_seq, limit)
        pairs = [(a.predicted, a.true) for a in answers if a.answered and a.version == version]
        return pairs[-limit:], seq

    def answers_since(self, after_seq: int, limit: int) -> tuple[list[LabelledAnswer], int]:
        """The feedback rows after ``after_seq``, oldest first, at most the newest ``limit``, each as the answers it
        judges: the answered prediction's (its model version, answered=True) and every shadow answer to the same
        request (answered=False); and the last feedback seq read. A label set (a multi-label prediction, or a true
        set) is a tuple of names; a single label a string."""
        with self.transaction(write=False):
            top = self.conn.execute("SELECT coalesce(max(seq), 0) FROM feedback").fetchone()[0]
            rows = self.conn.execute(
                "SELECT f.seq, p.model_version, 1, p.label, p.labels, f.label, f.labels FROM feedback f "
                "JOIN predictions p ON p.id = f.prediction_id WHERE f.seq > ? AND f.seq <= ? "
                "UNION ALL SELECT f.seq, s.model_version, 0, s.label, s.labels, f.label, f.labels FROM feedback f "
                "JOIN shadow_predictions s ON s.id = f.prediction_id WHERE f.seq > ? AND f.seq <= ? "
                "ORDER BY 1 DESC LIMIT ?",
                (after_seq, top, after_seq, top, 2 * limit),
            ).fetchall()
        answers = [
            LabelledAnswer(v, bool(answered), _truth(p, ps), _truth(t, ts))
            for _, v, answered, p, ps, t, ts in reversed(rows)
        ]
        return answers, max(top, after_seq)

    def _where_in(self, sql: str, ids: Sequence[str]) -> Iterator[tuple]:
        """The rows of ``sql`` with its ``{}`` filled by placeholders for ``ids``, queried in chunks."""
        ids = list(ids)
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            yield from self.conn.execute(sql.format(",".join("?" * len(chunk))), chunk)

    def counts(self) -> dict[str, int]:
        """Rows in each table (for /info-like summaries and tests)."""
        with self.transaction(write=False):
            return {
                table: self.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in ("predictions", "feedback")
            }


def _truth(label: str, labels: str | None) -> Truth:
    """A stored label: its set (a tuple) when the row has one, else the name."""
    return tuple(json.loads(labels)) if labels is not None else label


def _columns(truth: Truth) -> tuple[str, str | None]:
    """The `feedback` columns (label, labels) of a true label or label set."""
    if isinstance(truth, str):
        return truth, None
    return "; ".join(truth), json.dumps(list(truth))


def _same(a: Truth, b: Truth) -> bool:
    """The same label, or the same set whatever its order (a name and the set of that one name are the same: a
    multi-label model's feedback stored as a single label before sets were taken)."""
    return ({a} if isinstance(a, str) else set(a)) == ({b} if isinstance(b, str) else set(b))
