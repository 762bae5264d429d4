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


def multi_hot(sets: Sequence[Sequence[str]], names: Sequence[str]) -> np.ndarray:
    """(N, len(names)) uint8: 1 where the row has the label. Labels not in `names` are left out (filtered)."""
    index = {name: i for i, name in enumerate(names)}
    out = np.zeros((len(sets), len(names)), dtype=np.uint8)
    for row, labels in enumerate(sets):
        for label in labels:
            if label in index:
                out[row, index[label]] = 1
    return out


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


# ------------------------------------------------------------------------------------------------ decisions, metrics
def fit_thresholds(probs: np.ndarray, y: np.ndarray, grid: np.ndarray | None = None) -> np.ndarray:
    """Per label, the probability threshold in `grid` that maximises that label's F1 on these rows (validation,
    never test); 0.5 for a label with no positive row."""
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y, dtype=bool)
    grid = np.round(np.arange(0.05, 0.96, 0.05), 2) if grid is None else np.asarray(grid)
    thresholds = np.full(y.shape[1], 0.5)
    for j in range(y.shape[1]):
        if not y[:, j].any():
            continue
        predicted = probs[:, j][None, :] >= grid[:, None]  # (grid, N)
        tp = (predicted & y[:, j]).sum(1)
        f1 = 2 * tp / np.maximum(predicted.sum(1) + y[:, j].sum(), 1)
        thresholds[j] = grid[int(np.argmax(f1))]
    return thresholds


def decide(probs: np.ndarray, thresholds: np.ndarray | float) -> np.ndarray:
    """Multi-hot decisions: a label where its probability reaches its threshold; a row with none gets its most
    probable label (every text is tagged with at least one subject)."""
    probs = np.asarray(probs)
    out = probs >= np.asarray(thresholds)
    empty = ~out.any(1)
    out[empty, probs[empty].argmax(1)] = True
    return out


def multilabel_scores(predicted: np.ndarray, y: np.ndarray, names: Sequence[str]) -> dict:
    """Micro- and macro-F1, subset accuracy, Hamming loss, label cardinality (predicted and true) and per-label
    precision, recall, F1 and support of multi-hot decisions against the truth."""
    p, t = np.asarray(predicted, dtype=bool), np.asarray(y, dtype=bool)
    tp, fp, fn = (p & t).sum(0), (p & ~t).sum(0), (~p & t).sum(0)

    def ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.divide(a, b, out=np.zeros(np.shape(a), dtype=float), where=np.asarray(b) > 0)

    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    f1 = ratio(2 * tp, 2 * tp + fp + fn)
    micro = float(ratio(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum()))
    return {
        "rows": len(t),
        "micro_f1": micro,
        "macro_f1": float(f1.mean()) if len(f1) else 0.0,
        "subset_accuracy": float((p == t).all(1).mean()) if len(t) else 0.0,
        "hamming_loss": float((p != t).mean()) if t.size else 0.0,
        "cardinality": {"predicted": float(p.sum(1).mean()), "true": float(t.sum(1).mean())} if len(t) else {},
        "per_label": {
            name: {
                "precision": float(precision[j]),
                "recall": float(recall[j]),
                "f1": float(f1[j]),
                "support": int(t[:, j].sum()),
            }
            for j, name in enumerate(names)
        },
    }


def label_ece(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> np.ndarray:
    """Per label, the expected calibration error of its probability: the row-weighted mean, over equal-width bins
    of the probability, of |share of positives - mean probability| (0 is calibrated)."""
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y, dtype=np.float64)
    which = np.minimum((probs * bins).astype(int), bins - 1)
    out = np.zeros(probs.shape[1])
    for j in range(probs.shape[1]):
        counts = np.bincount(which[:, j], minlength=bins)
        gap = np.abs(np.bincount(which[:, j], y[:, j], bins) - np.bincount(which[:, j], probs[:, j], bins))
        out[j] = gap.sum() / max(counts.sum(), 1)
    return out


def epoch_report(probs: np.ndarray, y: np.ndarray, names: Sequence[str], thresholds: np.ndarray) -> dict:
    """A multi-label split's report: the scores of the thresholded decisions, the thresholds, and calibration per
    label (ECE of each label's probability)."""
    report = multilabel_scores(decide(probs, thresholds), y, names)
    ece = label_ece(probs, y)
    for j, name in enumerate(names):
        report["per_label"][name].update(threshold=float(thresholds[j]), ece=float(ece[j]))
    report["mean_label_ece"] = float(ece.mean()) if len(ece) else 0.0
    return report


def format_report(report: dict) -> str:
    """The report as text: per-label precision, recall, F1, support, threshold and ECE, then the set scores."""
    width = max([len(name) for name in report["per_label"]] + [10])
    lines = [f"{'':{width}s} {'precision':>9s} {'recall':>9s} {'f1':>9s} {'support':>9s} {'threshold':>9s} {'ece':>9s}"]
    for name, m in report["per_label"].items():
        lines.append(
            f"{name:{width}s} {m['precision']:9.4f} {m['recall']:9.4f} {m['f1']:9.4f} {m['support']:9d} "
            f"{m['threshold']:9.2f} {m['ece']:9.4f}"
        )
    c = report["cardinality"]
    lines += [
        "",
        f"micro-F1 {report['micro_f1']:.4f}, macro-F1 {report['macro_f1']:.4f}, subset accuracy "
        f"{report['subset_accuracy']:.4f}, Hamming loss {report['hamming_loss']:.4f}, labels per text "
        f"{c.get('predicted', 0):.2f} predicted / {c.get('true', 0):.2f} true, mean label ECE "
        f"{report['mean_label_ece']:.4f}; {report['rows']} rows",
    ]
    parts = report.get("components")
    if parts:  # a fused lexical expert (`lightning_cls.fusion`): each part at a 0.5 threshold
        lines += ["", f"fusion: neural logits + {parts['lexical_weight']:.3f} x lexical logits (at a 0.5 threshold):"]
        lines += [
            f"  {name:8s} micro-F1 {parts[name]['micro_f1']:.4f}, macro-F1 {parts[name]['macro_f1']:.4f}"
            for name in ("neural", "lexical", "fused")
        ]
    return "\n".join(lines) + "\n"
