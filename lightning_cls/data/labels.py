"""Pure functions for label selection, id<->name maps and stratified subsampling/splitting.

Everything here works on plain sequences and numpy arrays, so it can be tested without Lightning or torch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from lightning_cls.errors import ConfigError, DataError

# The ten frequent subjects of knowledgator/Scientific-text-classification (~5,000 rows each).
DEFAULT_LABELS: tuple[str, ...] = (
    "astrophysics",
    "computer science",
    "condensed matter",
    "electrical engineering and systems science",
    "high energy physics phenomenology",
    "high energy physics theory",
    "mathematics",
    "physics",
    "quantum physics",
    "statistics",
)


def select_labels(
    labels: Sequence[str],
    names: Sequence[str] | None = None,
    min_count: int | None = None,
    source: str = "the data",
) -> list[str]:
    """The label names to keep, sorted alphabetically (sorted order defines the class ids).

    Give either explicit ``names`` (each must occur in ``labels``) or ``min_count`` (keep the labels with at least
    that many rows). Raises ``DataError`` naming the labels missing from the data or the empty selection, and
    ``ConfigError`` for a label list that names a label twice or for both or neither of the two settings.
    """
    if (names is None) == (min_count is None):
        raise ConfigError("Give exactly one of `labels` (a list of label names) or `min_count`.")
    counts = Counter(labels)
    if names is not None:
        if len(set(names)) != len(names):
            duplicates = sorted(n for n, c in Counter(names).items() if c > 1)
            raise ConfigError(f"The label list names {duplicates} more than once.")
        missing = sorted(set(names) - counts.keys())
        if missing:
            raise DataError(
                f"Label(s) {missing} not found in {source}. Labels present: {sorted(counts)[:20]}"
                + (" ..." if len(counts) > 20 else "")
            )
        return sorted(names)
    kept = sorted(name for name, count in counts.items() if count >= min_count)
    if not kept:
        top = counts.most_common(5)
        raise DataError(f"No label in {source} has at least {min_count} rows (most frequent: {top}).")
    return kept


def label_maps(names: Sequence[str]) -> tuple[dict[int, str], dict[str, int]]:
    """``id2label`` and ``label2id`` for names in their given order."""
    id2label = dict(enumerate(names))
    return id2label, {name: i for i, name in id2label.items()}


def _allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` over classes in proportion to ``counts`` (largest remainder), never above a class count."""
    exact = counts * (total / counts.sum())
    alloc = np.floor(exact).astype(int)
    order = np.argsort(-(exact - alloc), kind="stable")
    alloc[order[: total - alloc.sum()]] += 1
    return np.minimum(alloc, counts)


def stratified_subsample(label_ids: np.ndarray, max_samples: int | None, seed: int) -> np.ndarray:
    """Sorted row indices of a label-stratified random subsample of at most ``max_samples`` rows."""
    label_ids = np.asarray(label_ids)
    if max_samples is None or max_samples >= len(label_ids):
        return np.arange(len(label_ids))
    classes, counts = np.unique(label_ids, return_counts=True)
    rng = np.random.default_rng(seed)
    keep = [
        rng.permutation(np.flatnonzero(label_ids == c))[:n]
        for c, n in zip(classes, _allocate(counts, max_samples), strict=True)
    ]
    return np.sort(np.concatenate(keep))


def stratified_split(
    label_ids: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Sorted row indices of ``train``/``val``/``test``, each class split in the same proportions.

    Depends only on the labels, the fractions and the seed: the same inputs give the same rows on every rank.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in [0, 1) and sum below 1."
        )
    label_ids = np.asarray(label_ids)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in np.unique(label_ids):
        rows = rng.permutation(np.flatnonzero(label_ids == c))
        n_val, n_test = round(len(rows) * val_fraction), round(len(rows) * test_fraction)
        parts["val"].append(rows[:n_val])
        parts["test"].append(rows[n_val : n_val + n_test])
        parts["train"].append(rows[n_val + n_test :])
    return {name: np.sort(np.concatenate(chunks)).astype(np.int64) for name, chunks in parts.items()}


def ordered_split(order_keys: Sequence, val_fraction: float, test_fraction: float) -> dict[str, np.ndarray]:
    """Sorted row indices of ``train``/``val``/``test`` by time: the rows with the largest keys go to test, the next
    largest to validation, the rest to training (not stratified: later rows have the label mix of their time).

    A deployed model classifies texts written after its training data; this split measures exactly that. Keys are
    compared as given (strings of equal shape, such as arXiv ids ``YYMM.NNNNN``, sort by time); ties keep file order.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in [0, 1) and sum below 1."
        )
    order = np.argsort(np.asarray(order_keys), kind="stable")  # oldest first
    n = len(order)
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    parts = {
        "train": order[: n - n_val - n_test],
        "val": order[n - n_val - n_test : n - n_test],
        "test": order[n - n_test :],
    }
    return {name: np.sort(rows).astype(np.int64) for name, rows in parts.items()}
