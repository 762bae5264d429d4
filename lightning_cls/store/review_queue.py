"""The review queue's queries: served answers whose texts were kept (`serve --keep_texts`) and that have no true
label yet, and the claims that keep two reviewers off the same item.

A claim is a row of ``review_claims`` (`schema`, version 4): the item, the reviewer (a random id the
page makes per browser tab) and when it was claimed. An item claimed by another reviewer less than ``hold`` seconds
ago is not offered; a claim older than that lapses (a reviewer who closed the tab). Claiming runs in a write
transaction under the store's named lock (`Database.transaction`: SQLite's write lock, a PostgreSQL advisory lock),
so of two reviewers asking at once one gets the item and the other the next. A labelled item leaves the queue by its
feedback row (the page sends the label to POST /feedback, as any client does); a skipped one by its claim's
``skipped``. The SQL is the same on both engines (`sa.text` with bound parameters).
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from lightning_cls.store.feedback_store import FeedbackStore

HOLD_SECONDS = 600.0  # a claim keeps an item from other reviewers this long
REVIEW_LOCK = "review_claims"

# The columns of a candidate, and what keeps an item in the queue: a kept text, no feedback, not skipped, not held by
# another reviewer's live claim.
_SELECT = (
    "SELECT p.id, p.time, p.model_version, p.label, p.labels, p.probability, p.probabilities, p.temperature, "
    "p.abstained, p.text, "
    "(SELECT s.label FROM shadow_predictions s WHERE s.id = p.id AND s.label <> p.label LIMIT 1) AS other, "
    "p.num_tokens "
    "FROM predictions p LEFT JOIN review_claims c ON c.prediction_id = p.id "
    "WHERE p.text IS NOT NULL AND NOT EXISTS (SELECT 1 FROM feedback f WHERE f.prediction_id = p.id) "
    "AND (c.prediction_id IS NULL OR (c.skipped = 0 AND (c.claimed_at < :lapsed OR c.reviewer = :reviewer))) "
)
# Four pools, each from its own index-friendly order: the least certain, the answers a challenger gave otherwise,
# the abstentions, and the newest (the drift monitor's low-confidence answers are among the least certain; the
# answers where recent traffic drifted, `serving.review_drift`, among the newest).
_POOLS = {
    "least_certain": "ORDER BY p.probability ASC LIMIT :n",
    "newest": "ORDER BY p.time DESC LIMIT :n",
    "challenger": "AND EXISTS (SELECT 1 FROM shadow_predictions s WHERE s.id = p.id AND s.label <> p.label) "
    "ORDER BY p.time DESC LIMIT :n",
    "abstained": "AND p.abstained = 1 ORDER BY p.time DESC LIMIT :n",
}


@dataclass
class Candidate:
    """A served answer that may go to a reviewer."""

    id: str
    time: float
    version: str
    label: str
    labels: str | None  # JSON list: a label set's answer
    probability: float
    probabilities: str  # JSON list over the model's labels
    temperature: float | None  # the temperature the answer was given under
    abstained: bool
    text: str
    challenger_label: str | None  # a shadow model's other label, if one answered differently
    num_tokens: int  # tokens read (truncated), as the drift window counts them


def candidates(store: FeedbackStore, reviewer: str, now: float, pool: int = 100, hold: float = HOLD_SECONDS) -> list:
    """Up to ``pool`` items of each pool, deduplicated (least certain first)."""
    params = {"lapsed": now - hold, "reviewer": reviewer, "n": pool}
    found: dict[str, Candidate] = {}
    with store.transaction(write=False) as conn:
        for order in _POOLS.values():
            for row in conn.execute(sa.text(_SELECT + order), params):
                found.setdefault(row[0], Candidate(*row[:8], bool(row[8]), *row[9:]))
    return list(found.values())


def claim(store: FeedbackStore, prediction_id: str, reviewer: str, now: float, hold: float = HOLD_SECONDS) -> bool:
    """Claim an item for ``reviewer``: False when another reviewer holds it, it was skipped or labelled meanwhile."""
    with store.transaction(lock=REVIEW_LOCK) as conn:
        labelled = conn.execute(
            sa.text("SELECT 1 FROM feedback WHERE prediction_id = :id"), {"id": prediction_id}
        ).first()
        held = conn.execute(
            sa.text("SELECT reviewer, claimed_at, skipped FROM review_claims WHERE prediction_id = :id"),
            {"id": prediction_id},
        ).first()
        if labelled or (held and (held[2] or (held[0] != reviewer and held[1] >= now - hold))):
            return False
        values = {"id": prediction_id, "reviewer": reviewer, "at": now}
        if held is None:
            conn.execute(
                sa.text(
                    "INSERT INTO review_claims (prediction_id, reviewer, claimed_at, skipped) "
                    "VALUES (:id, :reviewer, :at, 0)"
                ),
                values,
            )
        else:
            conn.execute(
                sa.text("UPDATE review_claims SET reviewer = :reviewer, claimed_at = :at WHERE prediction_id = :id"),
                values,
            )
        return True


def skip(store: FeedbackStore, prediction_id: str, reviewer: str) -> bool:
    """Take an item out of the queue without a label (only its claimant may): True when it was."""
    with store.transaction(lock=REVIEW_LOCK) as conn:
        done = conn.execute(
            sa.text("UPDATE review_claims SET skipped = 1 WHERE prediction_id = :id AND reviewer = :reviewer"),
            {"id": prediction_id, "reviewer": reviewer},
        )
        return done.rowcount == 1


def remaining(store: FeedbackStore, reviewer: str, now: float, hold: float = HOLD_SECONDS) -> int:
    """Items in the queue for ``reviewer`` (kept texts without a label, not skipped, not held by others)."""
    with store.transaction(write=False) as conn:
        query = sa.text("SELECT count(*) FROM (" + _SELECT + ") q")
        return int(conn.execute(query, {"lapsed": now - hold, "reviewer": reviewer}).scalar())


def model_dir_of(store: FeedbackStore, version: str) -> str | None:
    """The export folder a model version was served from (`FeedbackStore.register_model`)."""
    with store.transaction(write=False) as conn:
        return conn.execute(
            sa.text("SELECT model_dir FROM models WHERE model_version = :v"), {"v": version}
        ).scalar_one_or_none()


def recent_answers(store: FeedbackStore, version: str, limit: int) -> list[tuple[str, str | None, int]]:
    """A version's newest ``limit`` answers (label, label set JSON or None, token length): the window its drift
    reason is read from (`serving.review_drift`)."""
    with store.transaction(write=False) as conn:
        rows = conn.execute(
            sa.text(
                "SELECT label, labels, num_tokens FROM predictions WHERE model_version = :v ORDER BY seq DESC LIMIT :n"
            ),
            {"v": version, "n": limit},
        ).all()
    return [tuple(r) for r in rows]
