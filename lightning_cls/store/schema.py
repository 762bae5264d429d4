"""The store's tables, written once for both engines (SQLAlchemy renders each one's DDL: an INTEGER PRIMARY KEY
AUTOINCREMENT on SQLite, a BIGSERIAL on PostgreSQL), and the versions they went through.

Versions (SQLite's ``PRAGMA user_version``, PostgreSQL's ``schema_version`` table; `lightning_cls.database`): 1,
single labels; 2 adds the two ``labels`` columns (NULL for single-label models); 3 adds ``predictions.text`` (NULL
unless ``serve --keep_texts``), ``shadow_predictions`` and ``deployments``; 4 adds ``review_claims`` (the review
page's queue: `review_queue`). Opening an older database adds what it
lacks (`migrate`: ``CREATE TABLE`` for the missing tables, ``ALTER TABLE ... ADD COLUMN`` for the missing columns, all
nullable: no row is rewritten); a database of a newer version than this code writes is refused by the store.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from lightning_cls.database import Database

SCHEMA_VERSION = 4

# A sequence number: SQLite's AUTOINCREMENT must be spelled INTEGER (it never reuses a number, even after the row is
# deleted); 64 bits elsewhere (a service answering 100 requests a second would pass 2^31 in eight months).
_Seq = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

metadata = sa.MetaData()

models = sa.Table(
    "models",
    metadata,
    sa.Column("model_version", sa.Text, primary_key=True),
    sa.Column("labels", sa.Text, nullable=False),  # JSON list: the order of each prediction's `probabilities`
    sa.Column("model_dir", sa.Text),
    sa.Column("first_served", sa.Float, nullable=False),
)
predictions = sa.Table(
    "predictions",
    metadata,
    sa.Column("seq", _Seq, primary_key=True, autoincrement=True),
    sa.Column("id", sa.Text, nullable=False, unique=True),  # the answer's prediction_id
    sa.Column("time", sa.Float, nullable=False),  # Unix time of the forward pass
    sa.Column("label", sa.Text, nullable=False),  # the predicted label
    sa.Column("probability", sa.Float, nullable=False),  # its probability (calibrated with a temperature)
    sa.Column("probabilities", sa.Text, nullable=False),  # JSON list over the model's labels (models.labels)
    sa.Column("num_tokens", sa.Integer, nullable=False),
    sa.Column("windows", sa.Integer, nullable=False),
    sa.Column("truncated", sa.Integer, nullable=False),
    sa.Column("abstained", sa.Integer, nullable=False),
    sa.Column("temperature", sa.Float),  # the temperature applied (NULL: plain softmax)
    sa.Column("model_version", sa.Text, nullable=False),
    sa.Column("labels", sa.Text),  # JSON list: a multi-label answer's label set, most probable first (version 2)
    sa.Column("text", sa.Text),  # the text itself, only with serve --keep_texts (version 3)
    sa.Index("predictions_time", "time"),
    sqlite_autoincrement=True,
)
shadow_predictions = sa.Table(
    "shadow_predictions",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),  # the prediction_id of the answer it shadows
    sa.Column("model_version", sa.Text, primary_key=True),  # the shadow model, never returned to the client
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("label", sa.Text, nullable=False),
    sa.Column("probability", sa.Float, nullable=False),
    sa.Column("labels", sa.Text),  # JSON list: a multi-label shadow answer's set
    sa.Index("shadow_predictions_time", "time"),
)
deployments = sa.Table(
    "deployments",
    metadata,
    sa.Column("seq", _Seq, primary_key=True, autoincrement=True),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("state", sa.Text, nullable=False),  # JSON: `serving.deployment.Deployment`
    sa.Column("action", sa.Text, nullable=False),  # start, set, promote, rollback
    sa.Column("reason", sa.Text),
    sqlite_autoincrement=True,
)
secrets = sa.Table(
    "secrets",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),  # hex. prediction_ids: the key that tags this database's ids
)
feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("seq", _Seq, primary_key=True, autoincrement=True),
    sa.Column(
        "prediction_id", sa.Text, sa.ForeignKey("predictions.id", ondelete="CASCADE"), nullable=False, unique=True
    ),
    sa.Column("label", sa.Text, nullable=False),  # the true label (a label set: its names, "; "-separated)
    sa.Column("time", sa.Float, nullable=False),  # Unix time it was received
    sa.Column("labels", sa.Text),  # JSON list: the true label set, in the model's label order (version 2)
    sqlite_autoincrement=True,
)
review_claims = sa.Table(  # version 4: who reviews which kept answer (`review_queue`), one row per item
    "review_claims",
    metadata,
    sa.Column("prediction_id", sa.Text, primary_key=True),
    sa.Column("reviewer", sa.Text, nullable=False),  # a random id the page makes per browser tab
    sa.Column("claimed_at", sa.Float, nullable=False),  # Unix time; a claim older than the hold lapses
    sa.Column("skipped", sa.Integer, nullable=False, default=0),  # 1: the reviewer skipped it, it leaves the queue
)

# Columns added by a version after their table's first: added to an older database on open.
ADDED_COLUMNS = (("predictions", "labels"), ("feedback", "labels"), ("predictions", "text"))


def migrate(db: Database, conn: Connection) -> None:
    """Bring an empty or older database to `SCHEMA_VERSION` inside the caller's transaction (the caller checked
    that it is not newer): the missing tables and indexes, then the missing nullable columns."""
    metadata.create_all(conn, checkfirst=True)
    for table, column in ADDED_COLUMNS:
        if column not in db.columns(conn, table):
            kind = metadata.tables[table].c[column].type.compile(dialect=conn.dialect)
            conn.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {column} {kind}"))
    db.set_schema_version(conn, SCHEMA_VERSION)
