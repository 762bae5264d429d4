"""Where the service's state lives: a SQLite file (the default: one machine, nothing to run) or a PostgreSQL server
(``postgresql://user@host:port/db``: several replicas share one truth), behind one SQLAlchemy engine.

Everything that reads or writes the state (the store, `fit --data.feedback_db`'s reader, `monitor`, `compare`) asks
a `Database` for a transaction and runs the same SQL on either engine; this module alone knows their differences:

- **how a write takes its lock.** SQLite has one writer at a time: a write transaction is ``BEGIN IMMEDIATE`` (the
  lock taken first, so that a check and the write that depends on it see the same rows), and waits for another
  writer up to the busy timeout. PostgreSQL lets writers run side by side, so a write that needs the SQLite
  guarantee names a lock (``transaction(lock="feedback")``), a transaction-scoped advisory lock that the same
  writers of every replica take, waited for up to the same timeout (``lock_timeout``). Rows numbered by a sequence
  then commit in the order of their numbers, which is what a reader that follows a growing ``seq`` relies on (with
  writers side by side, seq 7 could commit after seq 8 was read, and never be read).
- **the schema version**: SQLite's ``PRAGMA user_version``; a one-row ``schema_version`` table on PostgreSQL.
- **the connection settings**: WAL, ``synchronous = NORMAL`` and foreign keys on every SQLite connection; a lock
  timeout and a connect timeout on PostgreSQL's; a read-only reader opens either read-only.

A URL never appears with its password in an error or a log line (`redacted`); better, keep the password out of it
(``PGPASSWORD``, ``~/.pgpass``: command lines are visible to every user of the machine). Errors of either engine
come out as one `StoreError` whose message names the database.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, make_url

POSTGRES_SCHEMES = ("postgresql", "postgres")
_DRIVER = "postgresql+psycopg"  # psycopg 3 (the `postgres` extra); a URL may name another driver SQLAlchemy knows
_VERSION_TABLE = "schema_version"  # PostgreSQL's user_version: one row


class StoreError(Exception):
    """The database refused or failed an operation (locked past the timeout, unreachable, a full disk, not a
    database of ours); the message names it, never with a password, then the ``reason``."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


def is_url(location: str | Path) -> bool:
    """A PostgreSQL URL (``postgresql://...``, ``postgres://...``, ``postgresql+DRIVER://...``), not a file path."""
    scheme = str(location).split("://", 1)[0] if "://" in str(location) else ""
    return scheme.split("+", 1)[0] in POSTGRES_SCHEMES


def redacted(location: str | Path) -> str:
    """The location as it may be shown: a path as given, a URL with its password (if any) as ***."""
    if not is_url(location):
        return str(location)
    try:
        return make_url(str(location)).render_as_string(hide_password=True)
    except Exception:  # not parseable: show only the scheme, it may hold anything
        return str(location).split("://", 1)[0] + "://..."


def absolute(location: str | Path) -> str:
    """A location that means the same in another process or folder: a path resolved, a URL as given."""
    return str(location) if is_url(location) else str(Path(location).resolve())


def _lock_key(name: str) -> int:
    """A stable 32-bit key per lock name (PostgreSQL advisory locks are numbered)."""
    return zlib.crc32(f"lightning_cls:{name}".encode())


class Database:
    """One engine on the store's database: a SQLite file or a PostgreSQL URL.

    Connections come from the engine's pool, one per transaction (a connection is never shared by two threads at
    once; none crosses a fork: open a `Database` in the process that uses it). ``busy_timeout``: seconds a write
    waits for another writer's lock. ``read_only``: the file is opened read-only (never created nor changed), the
    server's session is read-only.
    """

    def __init__(self, location: str | Path, busy_timeout: float = 10.0, read_only: bool = False) -> None:
        self.location, self.name = str(location), redacted(location)
        self.postgres = is_url(location)
        self.busy_timeout, self.read_only = busy_timeout, read_only
        self.engine = self._postgres_engine() if self.postgres else self._sqlite_engine()

    # -------------------------------------------------------------------------------------------- engines
    def _sqlite_engine(self) -> sa.Engine:
        path = Path(self.location)
        if self.read_only:
            url = f"sqlite:///file:{path.resolve()}?mode=ro&uri=true"
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            url = f"sqlite:///{path}"
        engine = sa.create_engine(url, connect_args={"timeout": self.busy_timeout, "check_same_thread": False})
        busy_ms, read_only = int(self.busy_timeout * 1000), self.read_only

        @sa.event.listens_for(engine, "connect")
        def _connect(dbapi_connection: Any, record: Any) -> None:
            # Transactions are begun here, not by the driver (which would begin them late, after a read).
            dbapi_connection.isolation_level = None
            dbapi_connection.execute(f"PRAGMA busy_timeout = {busy_ms}")
            if read_only:
                return
            mode = dbapi_connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise sa.exc.OperationalError(
                    "PRAGMA journal_mode", None, f"journal mode {mode!r}, not WAL (a network disk?)"
                )
            # In WAL mode NORMAL cannot corrupt the database; a power cut may lose the last transactions.
            dbapi_connection.execute("PRAGMA synchronous = NORMAL")
            dbapi_connection.execute("PRAGMA foreign_keys = ON")  # feedback rows go with their prediction

        @sa.event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            write = conn.get_execution_options().get("lightning_cls_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine

    def _postgres_engine(self) -> sa.Engine:
        url = make_url(self.location)
        if url.drivername in POSTGRES_SCHEMES:
            url = url.set(drivername=_DRIVER)
        options = f"-c lock_timeout={int(self.busy_timeout * 1000)}"
        if self.read_only:
            options += " -c default_transaction_read_only=on"
        return sa.create_engine(
            url,
            connect_args={"options": options, "connect_timeout": max(1, round(self.busy_timeout))},
            pool_pre_ping=True,  # a connection the server dropped (a restart) is replaced, not failed on
            pool_size=2,
            max_overflow=4,
        )

    # -------------------------------------------------------------------------------------------- transactions
    @contextmanager
    def transaction(self, write: bool = True, lock: str | None = None) -> Iterator[Connection]:
        """A transaction, committed at the end or rolled back on any error. ``write``: SQLite's write lock first
        (BEGIN IMMEDIATE); ``lock``: on PostgreSQL, the named advisory lock first (writers that must not overlap
        name the same one; on SQLite every write already excludes the others). Errors are `StoreError`."""
        try:
            with self.engine.connect() as conn:
                conn.execution_options(lightning_cls_write=write and not self.read_only)
                with conn.begin():
                    if self.postgres and lock is not None and write:
                        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key(lock)})
                    yield conn
        except sa.exc.SQLAlchemyError as err:
            raise StoreError(self.name, describe(err)) from err

    def close(self) -> None:
        self.engine.dispose()

    # -------------------------------------------------------------------------------------------- schema
    def tables(self, conn: Connection) -> set[str]:
        return set(sa.inspect(conn).get_table_names())

    def columns(self, conn: Connection, table: str) -> set[str]:
        return {c["name"] for c in sa.inspect(conn).get_columns(table)}

    def schema_version(self, conn: Connection) -> int:
        """The version the database's schema was written by (0: none yet)."""
        if not self.postgres:
            return int(conn.exec_driver_sql("PRAGMA user_version").scalar())
        if _VERSION_TABLE not in self.tables(conn):
            return 0
        return int(conn.execute(sa.text(f"SELECT coalesce(max(version), 0) FROM {_VERSION_TABLE}")).scalar())

    def set_schema_version(self, conn: Connection, version: int) -> None:
        if not self.postgres:
            conn.exec_driver_sql(f"PRAGMA user_version = {int(version)}")
            return
        conn.execute(sa.text(f"CREATE TABLE IF NOT EXISTS {_VERSION_TABLE} (version INTEGER NOT NULL)"))
        conn.execute(sa.text(f"DELETE FROM {_VERSION_TABLE}"))
        conn.execute(sa.text(f"INSERT INTO {_VERSION_TABLE} (version) VALUES (:v)"), {"v": int(version)})

    def move_sequence_past(self, conn: Connection, table: str, column: str) -> None:
        """After rows were inserted with their own numbers: the next number drawn is above them (PostgreSQL's
        sequence does not follow explicit values; SQLite's AUTOINCREMENT does)."""
        if self.postgres:
            conn.execute(
                sa.text(
                    f"SELECT setval(pg_get_serial_sequence(:table, :column), "
                    f"coalesce((SELECT max({column}) FROM {table}), 0) + 1, false)"
                ),
                {"table": table, "column": column},
            )


def describe(err: BaseException) -> str:
    """The driver's own message, on one line (SQLAlchemy's adds the statement and a link)."""
    orig = getattr(err, "orig", None) or err
    lines = [line.strip() for line in str(orig).splitlines() if line.strip()]
    return lines[0] if lines else type(orig).__name__
