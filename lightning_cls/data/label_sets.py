"""Multi-label data and metrics, as pure functions on lists and numpy arrays (testable without Lightning or torch).

A text's labels are a set: a paper is listed in several arXiv categories, and so belongs to several subjects. Label
sets are read from a column of separated names (`parse_label_sets`), optionally mapped from arXiv categories to
their subjects (`arxiv_subject`), turned into a multi-hot matrix (`multi_hot`), split so that every label keeps its
share in every split (`iterative_split`: iterative stratification, Sechidis et al. 2011), and scored with the usual
multi-label metrics (`multilabel_scores`) under per-label decision thresholds fitted on validation
(`fit_thresholds`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from lightning_cls.errors import DataError
from lightning_cls.task.scores import multi_hot  # noqa: F401  (label sets as rows: the task's encoding)

# arXiv archives (the part of a category before the dot) and the subject names of the hub dataset's `label` column.
ARXIV_SUBJECTS: dict[str, str] = {
    "astro-ph": "astrophysics",
    "cond-mat": "condensed matter",
    "cs": "computer science",
    "eess": "electrical engineering and systems science",
    "hep-ph": "high energy physics phenomenology",
    "hep-th": "high energy physics theory",
    "math": "mathematics",
    "physics": "physics",
    "quant-ph": "quantum physics",
    "stat": "statistics",
    "gr-qc": "general relativity and quantum cosmology",
    "hep-lat": "high energy physics lattice",
    "nlin": "nonlinear sciences",
    "q-bio": "quantitative biology",
    "q-fin": "quantitative finance",
    "math-ph": "mathematical physics",
    "hep-ex": "high energy physics experiment",
    "nucl-th": "nuclear theory",
    "nucl-ex": "nuclear experiment",
    "econ": "economics",
}


def arxiv_subject(category: str) -> str:
    """The subject of an arXiv category: its archive's name (`cs.LG` -> computer science, `hep-th` -> high energy
    physics theory). Raises KeyError for an archive not in `ARXIV_SUBJECTS`."""
    return ARXIV_SUBJECTS[category.split(".", 1)[0]]


def arxiv_subject_sets(
    sets: Sequence[Sequence[str]], source: str, column: str, first_row: int = 0
) -> tuple[list[list[str]], dict[str, int]]:
    """Label sets of arXiv categories as sets of subjects, and the tokens that were not categories (with counts).

    arXiv's own metadata has MSC and ACM classes and words of the comments field spilled into the category list of
    some papers (`math.NT 11N35 (Primary) 11M20`: 1,086 rows of the shared data); a token whose archive is not an arXiv
    archive is not a category and is left out (the caller says how many), so the row keeps its real categories. A row
    left with no category at all is an error naming the file, the column and the rows: dropping it would lose a text.
    """
    subjects, ignored, empty = [], Counter(), []
    for i, labels in enumerate(sets):
        known = [c for c in labels if c.split(".", 1)[0] in ARXIV_SUBJECTS]
        ignored.update(c for c in labels if c.split(".", 1)[0] not in ARXIV_SUBJECTS)
        if not known:
            empty.append(i)
        subjects.append(list(dict.fromkeys(arxiv_subject(c) for c in known)))
    if empty:
        shown = ", ".join(str(first_row + r) for r in empty[:5]) + (" ..." if len(empty) > 5 else "")
        raise DataError(
            f"{source}: column {column!r} has no arXiv category (no known archive such as cs or hep-th) in "
            f"{len(empty)} row(s) (rows {shown}; 0-based data rows); e.g. {list(sets[empty[0]])[:5]}."
        )
    return subjects, dict(ignored)


def parse_label_sets(
    values: Sequence[object], separator: str | None, source: str, column: str, first_row: int = 0
) -> list[list[str]]:
    """Each value (`"cs.LG stat.ML"`, `"physics, statistics"`) as its labels in order, duplicates dropped.

    `separator` None splits on whitespace; "," on commas (names with spaces, such as subject names). An empty or
    missing value is an error naming the file, the column and the rows (up to five), as is a value that is not text.
    """
    sets, empty, malformed = [], [], []
    for i, value in enumerate(values):
        if not isinstance(value, str):
            (empty if value is None or (isinstance(value, float) and np.isnan(value)) else malformed).append(i)
            sets.append([])
            continue
        parts = value.split(separator) if separator is not None else value.split()
        labels = list(dict.fromkeys(p.strip() for p in parts if p.strip()))
        if not labels:
            empty.append(i)
        elif separator is not None and any(not p.strip() for p in parts):  # "a,,b" or a trailing comma
            malformed.append(i)
        sets.append(labels)
    for rows, what in ((empty, "no labels"), (malformed, "a malformed label set")):
        if rows:
            shown = ", ".join(str(first_row + r) for r in rows[:5]) + (" ..." if len(rows) > 5 else "")
            sep = "whitespace" if separator is None else repr(separator)
            raise DataError(
                f"{source}: column {column!r} has {what} in {len(rows)} row(s) (rows {shown}; 0-based data rows); "
                f"label sets are names separated by {sep}."
            )
    return sets


def label_counts(sets: Sequence[Sequence[str]]) -> Counter:
    return Counter(label for labels in sets for label in labels)


def iterative_split(y: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Sorted row indices of ``train``/``val``/``test`` by iterative stratification (Sechidis, Tsoumakas and
    Vlahavas 2011): the rarest label first, each of its rows goes to the split that most lacks that label (ties: the
    split that lacks the most rows, then at random). Every label with at least one row per split's share keeps it in
    every split, which a random split does not promise rare labels. Rows without a label are dealt out as rows.

    Depends only on the matrix, the fractions and the seed: the same inputs give the same rows on every rank.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in [0, 1) and sum below 1."
        )
    y = np.asarray(y, dtype=bool)
    n = len(y)
    rng = np.random.default_rng(seed)
    ratios = np.array([1 - val_fraction - test_fraction, val_fraction, test_fraction])
    wanted_rows = ratios * n  # rows each split still lacks
    wanted = np.outer(ratios, y.sum(0)).astype(float)  # (3, labels): label rows each split still lacks
    assigned = np.full(n, -1)
    remaining = y.copy()
    while True:
        counts = remaining.sum(0)
        left = np.flatnonzero(counts)
        if not len(left):
            break
        label = left[np.argmin(counts[left])]  # the rarest label still to deal out
        for row in rng.permutation(np.flatnonzero(remaining[:, label])):
            need = wanted[:, label]
            best = np.flatnonzero(need == need.max())
            if len(best) > 1:
                rows_need = wanted_rows[best]
                best = best[rows_need == rows_need.max()]
            split = best[rng.integers(len(best))] if len(best) > 1 else best[0]
            assigned[row] = split
            wanted[split] -= y[row]
            wanted_rows[split] -= 1
            remaining[row] = False
    for row in rng.permutation(np.flatnonzero(assigned < 0)):  # rows with no label
        split = int(np.argmax(wanted_rows))
        assigned[row] = split
        wanted_rows[split] -= 1
    names = ("train", "val", "test")
    return {name: np.flatnonzero(assigned == i).astype(np.int64) for i, name in enumerate(names)}
