"""Moving a store to another database: `python -m lightning_cls store copy --source feedback.sqlite3 --target
postgresql://user@host:5432/lightning_cls`, the way from one machine's SQLite file to the PostgreSQL database that
replicas share.

Every table is copied whole, in the order of the foreign keys, with its sequence numbers (`seq`) kept, and the id key
with it (`secrets`): ids issued before the move stay recognisable, feedback on old predictions lands on them, the
deployment history goes on from its last row. The target's sequences are then moved past the copied rows. The target
must hold no predictions, feedback or deployments (a copy never merges two stores). Stop the service first: it stores
what it holds at a stop, or leaves it in a spill file beside the SQLite file, which only a `serve` on that file
replays (start and stop it once there before copying).
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa

from lightning_cls.arg_parser import run_command
from lightning_cls.errors import InputError
from lightning_cls.store.feedback_store import FeedbackStore
from lightning_cls.store.schema import metadata

_CHUNK = 5_000  # rows read and written per round trip


def copy(source: str, target: str) -> dict[str, Any]:
    """copy a store (predictions, feedback, shadow answers, deployments, the id key) into an empty one

    Args:
        source: the store to copy: a SQLite file or a PostgreSQL URL (brought to this version's schema first)
        target: the store to fill: a SQLite file or a PostgreSQL URL (created if needed; it must hold no rows)
    """
    src, dst = FeedbackStore(source), FeedbackStore(target)
    try:
        held = {t: n for t, n in _counts(dst).items() if n and t in ("predictions", "feedback", "deployments")}
        if held:
            raise InputError(f"--target {dst.name} is not empty ({held}): a copy never merges two stores.")
        copied = {}
        with src.transaction(write=False) as read, dst.transaction(lock="feedback") as write:
            for table in metadata.sorted_tables:  # the tables a foreign key names come first
                copied[table.name] = _copy_table(read, write, table)
                if "seq" in table.c:
                    dst.db.move_sequence_past(write, table.name, "seq")
        return {"source": src.name, "target": dst.name, "copied": copied}
    finally:
        src.close()
        dst.close()


def _copy_table(read: sa.Connection, write: sa.Connection, table: sa.Table) -> int:
    """Every row of ``table``, in key order, chunk by chunk. The source's id key replaces the one the target made
    when it was created (ids issued on the source must stay recognisable); a model the target has registered already
    is kept."""
    if table.name == "secrets":
        write.execute(table.delete())
    ordered = sa.select(table).order_by(*table.primary_key.columns)  # `seq` where there is one
    result = read.execution_options(yield_per=_CHUNK).execute(ordered)
    count = 0
    for rows in result.partitions():
        values = [dict(r._mapping) for r in rows]
        if table.name == "models":
            keys = [v["model_version"] for v in values]
            have = set(write.execute(sa.select(table.c.model_version).where(table.c.model_version.in_(keys))).scalars())
            values = [v for v in values if v["model_version"] not in have]
        if values:
            write.execute(table.insert(), values)
        count += len(values)
    return count


def _counts(store: FeedbackStore) -> dict[str, int]:
    with store.transaction(write=False) as conn:
        return {t: conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar() for t in metadata.tables}


def main(argv: list[str]) -> None:
    """`python -m lightning_cls store copy --source FILE_OR_URL --target FILE_OR_URL`: move the service's store (a
    SQLite file to a PostgreSQL database for replicas, or back)."""
    print(json.dumps(run_command({"copy": copy}, argv, "store", description=main.__doc__), indent=2))
