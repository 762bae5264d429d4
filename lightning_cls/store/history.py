"""What the model page plots, read from the store: the newest answers and the newest true labels (with the answers
they judge). Plain SELECTs, the same on both engines; `serving.model_page` buckets them by time."""

from __future__ import annotations

import sqlalchemy as sa

from lightning_cls.store.feedback_store import FeedbackStore


def recent_answers(store: FeedbackStore, limit: int) -> list[tuple]:
    """The newest ``limit`` answers, oldest first: (time, model version, label, labels JSON, probability,
    abstained)."""
    with store.transaction(write=False) as conn:
        rows = conn.execute(
            sa.text(
                "SELECT time, model_version, label, labels, probability, abstained FROM predictions "
                "ORDER BY seq DESC LIMIT :n"
            ),
            {"n": limit},
        ).all()
    return [tuple(r) for r in reversed(rows)]


def recent_feedback(store: FeedbackStore, limit: int) -> list[tuple]:
    """The newest ``limit`` true labels, oldest first: (time received, model version, predicted label, predicted
    labels JSON, true label, true labels JSON)."""
    with store.transaction(write=False) as conn:
        rows = conn.execute(
            sa.text(
                "SELECT f.time, p.model_version, p.label, p.labels, f.label, f.labels FROM feedback f "
                "JOIN predictions p ON p.id = f.prediction_id ORDER BY f.seq DESC LIMIT :n"
            ),
            {"n": limit},
        ).all()
    return [tuple(r) for r in reversed(rows)]
