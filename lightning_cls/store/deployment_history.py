"""The deployment history: one row per change of which models a service answers with (`serving.deployment` says
what a state means; here it is a JSON text). Every replica on one database reads the same rows, so a change
recorded through any replica (or its `deployment` command) is the newest for all of them: each inference worker
looks for a newer ``seq`` every half second (`serving.deployment.DeploymentWatch`)."""

from __future__ import annotations

import time

import sqlalchemy as sa

from lightning_cls.store.feedback_store import FeedbackStore

# Writers of the history take turns (PostgreSQL; SQLite has one writer anyway): a row's seq then commits before any
# higher one, so a watcher that has read seq N has seen every change before it.
DEPLOYMENT_LOCK = "deployments"


class Superseded(Exception):
    """Another change was recorded after the one a new change was computed from (`record`'s ``after``)."""

    def __init__(self, expected: int, found: int) -> None:
        super().__init__(f"the deployment changed meanwhile (seq {found}, not {expected})")
        self.expected, self.found = expected, found


def record(store: FeedbackStore, state: str, action: str, reason: str = "", after: int | None = None) -> int:
    """Append a change; returns its seq (the workers load the newest). ``after``: the seq of the change this one was
    computed from; if another was recorded since, nothing is recorded and `Superseded` is raised (a compare-and-set:
    two replicas changing the deployment at once cannot both start from the same state, as a promote computed from a
    state that a concurrent set replaced would undo the set). The check and the insert share the writers' lock."""
    with store.transaction(lock=DEPLOYMENT_LOCK) as conn:
        if after is not None:
            found = int(conn.execute(sa.text("SELECT coalesce(max(seq), 0) FROM deployments")).scalar())
            if found != after:
                raise Superseded(after, found)
        return int(
            conn.execute(
                sa.text(
                    "INSERT INTO deployments (time, state, action, reason) VALUES (:time, :state, :action, :reason) "
                    "RETURNING seq"
                ),
                {"time": time.time(), "state": state, "action": action, "reason": reason},
            ).scalar_one()
        )


def latest_seq(store: FeedbackStore) -> int:
    """The newest change's seq (0: none); one indexed read."""
    with store.transaction(write=False) as conn:
        return int(conn.execute(sa.text("SELECT coalesce(max(seq), 0) FROM deployments")).scalar())


def latest(store: FeedbackStore) -> tuple[int, str] | None:
    """The newest change: its seq and state."""
    with store.transaction(write=False) as conn:
        row = conn.execute(sa.text("SELECT seq, state FROM deployments ORDER BY seq DESC LIMIT 1")).first()
    return (int(row[0]), row[1]) if row else None


def history(store: FeedbackStore, limit: int = 100) -> list[tuple[int, float, str, str, str]]:
    """The last ``limit`` changes, oldest first: (seq, time, action, reason, state)."""
    with store.transaction(write=False) as conn:
        rows = conn.execute(
            sa.text("SELECT seq, time, action, reason, state FROM deployments ORDER BY seq DESC LIMIT :n"),
            {"n": limit},
        ).all()
    return [tuple(r) for r in reversed(rows)]
