"""Reading a store's tables in tests, on either engine (a SQLite file or a PostgreSQL URL)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from lightning_cls.store.feedback_store import FeedbackStore


def query(store: FeedbackStore, sql: str, **params: Any) -> list[tuple]:
    """The rows of ``sql`` (named parameters, ``:name``) as tuples, in a transaction of its own."""
    with store.transaction(write=False) as conn:
        return [tuple(r) for r in conn.execute(sa.text(sql), params)]
