"""Ground truth for served predictions: the database of predictions and of the true labels sent to POST /feedback,
shared by the service's processes, and by its replicas.

The database is a SQLite file (the default: one machine; WAL mode, so readers never wait for the writer, writers wait
for each other up to a busy timeout) or a PostgreSQL server named by a URL (``postgresql://user@host:port/db``: every
replica's processes read and write the same rows). The same SQL runs on both (`lightning_cls.database` owns their
differences, `schema` the tables). Who writes what:

- the logger process (`metrics.MonitoringLogger`) inserts every server batch's predictions off the inference path
  (the inference worker only sends it one message per batch), from the writer thread of its `prediction_log`
  (retried, spilled to a file, never dropped silently when the database is busy), and deletes the oldest beyond the
  retention bound;
- the HTTP server process(es) (`http.FeedbackEndpoint`) insert the true labels, with their own connection, then
  tell the logger process that feedback arrived (a message on LitServe's logger queue);
- the logger process then reads the new feedback rows (their `seq` only grows and commits in order: SQLite has one
  writer at a time, PostgreSQL's writers of feedback take one lock, and neither reuses a number) into its window and
  sets the live accuracy gauges, so that every prediction-side gauge keeps a single writer. With replicas on one
  PostgreSQL database, each one's logger reads every replica's feedback.

Texts are never stored: a prediction row holds its id, time, label and probabilities, token and window counts, and
which model made it. SQLAlchemy Core; nothing here imports the web or torch stacks.

A multi-label model's answers are label sets: the prediction row keeps its set (`labels`, a JSON list, most probable
first) beside its most probable label, and a true label set is stored as a JSON list in `feedback.labels` (in the
model's label order) with `feedback.label` the same names joined by "; " (as `predict` writes sets in CSV), so that a
plain `SELECT prediction_id, label FROM feedback` still reads. A true label is a `str`, a true set a `tuple` of names.

Schema versions (`schema`): 1, single labels; 2 adds the two `labels` columns (NULL for single-label models). 3 adds
`predictions.text` (NULL unless `serve --keep_texts`: the texts `fit` retrains on, `lightning_cls.data.feedback`),
the `shadow_predictions` of a challenger run in shadow (`serving.router`) and the `deployments` history
(`deployment_history`). Opening an older database adds what it lacks (no row is rewritten); a database of a newer
version than this code writes is refused.

Which model answered: every prediction row names its `model_version`. With two models in the service (a canary),
each answer's row names the version that produced it, so feedback on it lands against that version, also after the
version is retired.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from lightning_cls.database import Database, StoreError, is_url
from lightning_cls.errors import InputError
from lightning_cls.store.schema import SCHEMA_VERSION, migrate

BUSY_TIMEOUT = 10.0  # seconds a writer waits for another one's lock ("database is locked", "lock timeout")
SHADOW_ROW = "shadow"  # first value of a shadow answer's row in the prediction log (a prediction id is hex)
_CHUNK = 500  # ids per `IN (...)` query, well under SQLite's limit on bound parameters
FEEDBACK_LOCK = "feedback"  # writers of feedback rows (and of deletions that take feedback with them) take turns

# The `predictions` columns in the order of a `rows_of` row; rows spilled by version 1 have the first 11, by
# version 2 the first 12.
_ROW_COLUMNS = (
    "id", "time", "label", "probability", "probabilities", "num_tokens", "windows", "truncated", "abstained",
    "temperature", "model_version", "labels", "text",
)  # fmt: skip
_SHADOW_COLUMNS = ("id", "model_version", "time", "label", "probability", "labels")


def _insert(table: str, columns: Sequence[str]) -> sa.TextClause:
    """An insert that skips a row whose key is stored already (SQLite 3.24+ and PostgreSQL spell it alike)."""
    values = ", ".join(f":{c}" for c in columns)
    return sa.text(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({values}) ON CONFLICT DO NOTHING")


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

    path: str  # a SQLite file or a PostgreSQL URL (`lightning_cls.database`)
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
    """The store on one database (a SQLite file or a PostgreSQL URL); open one per process (no connection crosses a
    fork), and use it from one thread at a time.

    Opening creates the tables if needed and checks the schema version (a write: it waits for the lock); errors name
    the database. ``setup=False`` skips that, for the service's processes once the main process has done it (they
    must open the database even while another writer holds it). Every method runs in its own transaction, or in the
    one `transaction` opened around it.
    """

    def __init__(self, path: str | Path, busy_timeout: float = BUSY_TIMEOUT, setup: bool = True) -> None:
        self.path = str(path)
        self._local = threading.local()  # the transaction open in this thread (`transaction`), if any
        kind = "a PostgreSQL" if is_url(self.path) else "a SQLite"
        try:
            self.db = Database(path, busy_timeout)
            self.name = self.db.name  # the location as it may be shown (no password)
            if setup:
                with self.transaction(lock="schema") as conn:
                    version = self.db.schema_version(conn)
                    if version > SCHEMA_VERSION:
                        raise InputError(
                            f"--feedback_db {self.name} has schema version {version}, newer than this lightning_cls "
                            f"writes ({SCHEMA_VERSION}): upgrade lightning_cls or give another database."
                        )
                    migrate(self.db, conn)
            else:  # connect now: a database that cannot be reached fails here, not at the first answer
                with self.transaction(write=False):
                    pass
        except StoreError as err:
            raise InputError(f"--feedback_db {err.name} cannot be used as {kind} database: {err.reason}.") from None
        except OSError as err:
            raise InputError(f"--feedback_db {self.path}: {err.strerror or err}.") from None

    @contextmanager
    def transaction(self, write: bool = True, lock: str | None = None) -> Iterator[Connection]:
        """A transaction (`Database.transaction`: SQLite's write lock first with ``write``, PostgreSQL's named
        ``lock``), committed at the end, rolled back on any error; the store's methods called inside it join it."""
        open_now = getattr(self._local, "conn", None)
        if open_now is not None:
            yield open_now
            return
        with self.db.transaction(write, lock) as conn:
            self._local.conn = conn
            try:
                yield conn
            finally:
                self._local.conn = None

    def close(self) -> None:
        if hasattr(self, "db"):
            self.db.close()

    # -------------------------------------------------------------------------------------------- predictions
    def register_model(self, version: str, labels: Sequence[str], model_dir: str) -> None:
        with self.transaction() as conn:
            conn.execute(
                _insert("models", ("model_version", "labels", "model_dir", "first_served")),
                {"model_version": version, "labels": json.dumps(list(labels)), "model_dir": model_dir,
                 "first_served": time.time()},
            )  # fmt: skip

    def id_key(self) -> bytes:
        """The key that tags the prediction ids issued by servers on this database (`prediction_log.IdIssuer`),
        made once, at the first start, and kept: ids issued before a restart, or by another replica on the same
        database, are recognisable."""
        with self.transaction() as conn:
            conn.execute(
                _insert("secrets", ("name", "value")), {"name": "prediction_ids", "value": secrets.token_hex(32)}
            )
            value = conn.execute(sa.text("SELECT value FROM secrets WHERE name = 'prediction_ids'")).scalar_one()
        return bytes.fromhex(value)

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
        """Insert `rows_of` rows (in the transaction open around it, if any); a row whose id is stored already is
        skipped (a spill file replayed twice stores each row once; a row spilled by an older version, without a label
        set, is stored without one). `shadow_rows_of` rows among them go to `shadow_predictions`. Returns how many
        were new."""
        shadows = [dict(zip(_SHADOW_COLUMNS, r[1:], strict=True)) for r in rows if r and r[0] == SHADOW_ROW]
        answers = [
            dict(zip(_ROW_COLUMNS, [*r, *[None] * (len(_ROW_COLUMNS) - len(r))], strict=True))
            for r in rows
            if not (r and r[0] == SHADOW_ROW)
        ]
        new = 0
        with self.transaction() as conn:
            if shadows:
                new += conn.execute(_insert("shadow_predictions", _SHADOW_COLUMNS), shadows).rowcount
            if answers:
                new += conn.execute(_insert("predictions", _ROW_COLUMNS), answers).rowcount
        return new

    def insert_batch(self, batch: dict[str, Any], version: str, temperature: float | None) -> int:
        """The predictions of one server batch, in one transaction (the service goes through `PredictionLog`)."""
        return self.insert_rows(self.rows_of(batch, version, temperature))

    def oldest_time(self) -> float | None:
        """The time of the oldest stored prediction (the retention front; None: none stored). Indexed: cheap."""
        with self.transaction(write=False) as conn:
            return conn.execute(sa.text("SELECT min(time) FROM predictions")).scalar()

    def prune(self, max_rows: int, max_days: float | None = None, now: float | None = None) -> int:
        """Delete the predictions beyond the newest ``max_rows`` and those older than ``max_days`` (their feedback
        goes with them); returns how many. Freed pages are reused, so the database stops growing at the bound."""
        now = time.time() if now is None else now
        # The feedback lock: feedback being written for a prediction deleted here would fail its foreign key.
        with self.transaction(lock=FEEDBACK_LOCK) as conn:
            # seq grows by one per prediction: the newest max_rows (at most) are those above max(seq) - max_rows,
            # found through the primary key without stepping over the kept rows (as a count or an OFFSET would).
            deleted = conn.execute(
                sa.text("DELETE FROM predictions WHERE seq <= (SELECT max(seq) FROM predictions) - :n"), {"n": max_rows}
            ).rowcount
            if max_days is not None:
                cutoff = now - max_days * 86400
                deleted += conn.execute(sa.text("DELETE FROM predictions WHERE time < :t"), {"t": cutoff}).rowcount
            # Shadow answers go with the answers they shadowed (older than the oldest kept prediction).
            conn.execute(
                sa.text(
                    "DELETE FROM shadow_predictions WHERE time < (SELECT coalesce(min(time), 1e300) FROM predictions)"
                )
            )
        return deleted

    # -------------------------------------------------------------------------------------------- feedback
    def known_ids(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` are stored predictions (a read: it never waits for a writer)."""
        with self.transaction(write=False) as conn:
            return {r[0] for r in _where_in(conn, "SELECT id FROM predictions WHERE id IN :ids", ids)}

    def record_feedback(self, items: Sequence[tuple[str, Truth]], now: float | None = None) -> FeedbackResult:
        """Store true labels, (prediction id, label) pairs with distinct ids, where a label is a name or, for a
        multi-label model, a tuple of names (a label set), all or nothing: nothing is stored if an id is not a stored
        prediction or already has another label (a set in another order is the same set). The same label sent again
        is not stored twice (`repeated`), also when two replicas receive it at once (they take turns)."""
        now = time.time() if now is None else now
        ids = [pid for pid, _ in items]
        with self.transaction(lock=FEEDBACK_LOCK) as conn:
            known = {r[0] for r in _where_in(conn, "SELECT id FROM predictions WHERE id IN :ids", ids)}
            stored = {
                pid: _truth(label, labels)
                for pid, label, labels in _where_in(
                    conn, "SELECT prediction_id, label, labels FROM feedback WHERE prediction_id IN :ids", ids
                )
            }
            unknown = [pid for pid in ids if pid not in known]
            conflicts = [
                (pid, stored[pid], label) for pid, label in items if pid in stored and not _same(stored[pid], label)
            ]
            if unknown or conflicts:
                return FeedbackResult(unknown=unknown, conflicts=conflicts)
            new = [
                dict(zip(("prediction_id", "label", "labels", "time"), (pid, *_columns(label), now), strict=True))
                for pid, label in items
                if pid not in stored
            ]
            if new:
                conn.execute(
                    sa.text(
                        "INSERT INTO feedback (prediction_id, label, labels, time) "
                        "VALUES (:prediction_id, :label, :labels, :time)"
                    ),
                    new,
                )
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
        with self.transaction(write=False) as conn:
            top = conn.execute(sa.text("SELECT coalesce(max(seq), 0) FROM feedback")).scalar()
            rows = conn.execute(
                sa.text(
                    "SELECT f.seq, p.model_version, 1, p.label, p.labels, f.label, f.labels FROM feedback f "
                    "JOIN predictions p ON p.id = f.prediction_id WHERE f.seq > :after AND f.seq <= :top "
                    "UNION ALL SELECT f.seq, s.model_version, 0, s.label, s.labels, f.label, f.labels FROM feedback f "
                    "JOIN shadow_predictions s ON s.id = f.prediction_id WHERE f.seq > :after AND f.seq <= :top "
                    "ORDER BY 1 DESC LIMIT :limit"
                ),
                {"after": after_seq, "top": top, "limit": 2 * limit},
            ).all()
        answers = [
            LabelledAnswer(v, bool(answered), _truth(p, ps), _truth(t, ts))
            for _, v, answered, p, ps, t, ts in reversed(rows)
        ]
        return answers, max(top, after_seq)

    def counts(self) -> dict[str, int]:
        """Rows in each table (for /info-like summaries and tests)."""
        with self.transaction(write=False) as conn:
            return {
                table: conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar()
                for table in ("predictions", "feedback")
            }


def _where_in(conn: Connection, sql: str, ids: Sequence[str]) -> Iterator[tuple]:
    """The rows of ``sql`` with its ``:ids`` bound to ``ids``, queried in chunks."""
    statement = sa.text(sql).bindparams(sa.bindparam("ids", expanding=True))
    ids = list(ids)
    for start in range(0, len(ids), _CHUNK):
        yield from conn.execute(statement, {"ids": ids[start : start + _CHUNK]})


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
