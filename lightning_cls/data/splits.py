"""The split plan: which rows of the labelled source go to train, validation and test, with which class ids.

Labels selected (by name or count), a seeded subsample, then a random stratified split (iterative stratification
for label sets) or a split by time (`split_by`); feedback rows from the service are added to the training split
only. Pure data logic on pandas and numpy: the same settings and seed give the same rows, on any machine.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_cls.data.feedback import FeedbackRows, FeedbackSummary
from lightning_cls.data.label_sets import arxiv_subject_sets, iterative_split, label_counts, multi_hot, parse_label_sets
from lightning_cls.data.labels import (
    DEFAULT_LABELS,
    label_maps,
    ordered_split,
    select_labels,
    stratified_split,
    stratified_subsample,
)


@dataclass
class SplitPlan:
    """Which rows of a table go to which split, and with which class ids."""

    names: list[str]  # the selected label names, in id order
    table: pd.DataFrame  # the rows with a selected label (columns row_id, text, label), re-indexed from 0
    label_ids: np.ndarray  # class id of each row of `table` (label sets: its multi-hot row)
    rows: dict[str, np.ndarray]  # positions in `table` of the train / val / test rows
    kept: np.ndarray  # mask over the source rows: True where the label was selected

    @property
    def multi_label(self) -> bool:
        return self.label_ids.ndim == 2

    def with_training_rows(self, added: pd.DataFrame, first_row_id: int) -> SplitPlan:
        """The plan with ``added`` (columns text, label: a name, or a tuple of names for label sets) appended to the
        table and to the training split only, with row ids from ``first_row_id`` on."""
        row_ids = np.arange(first_row_id, first_row_id + len(added))
        table = pd.DataFrame({"row_id": row_ids, "text": added["text"], "label": added["label"]})
        if self.multi_label:
            ids = multi_hot(added["label"].tolist(), self.names).astype(self.label_ids.dtype)
        else:
            ids = added["label"].map(label_maps(self.names)[1]).to_numpy(dtype=self.label_ids.dtype)
        positions = len(self.table) + np.arange(len(added))
        return SplitPlan(
            self.names,
            pd.concat([self.table, table], ignore_index=True),
            np.concatenate([self.label_ids, ids]),
            {**self.rows, "train": np.concatenate([self.rows["train"], positions])},
            self.kept,
        )


def plan_from_settings(table: pd.DataFrame, settings: Mapping[str, Any], source: str) -> SplitPlan:
    """The split the data module's settings give of the source ``table`` (named ``source`` in messages)."""
    s = settings
    fractions = s["val_fraction"], s["test_fraction"]
    if s.get("multi_label"):
        return plan_multilabel_splits(
            table,
            s["label_separator"],
            s["arxiv_subjects"],
            s["labels"],
            s["min_count"],
            s["max_samples"],
            *fractions,
            s["seed"],
            source,
            s["label_column"],
            split_by=s["split_by"],
        )
    return plan_splits(
        table, s["labels"], s["min_count"], s["max_samples"], *fractions, s["seed"], source, split_by=s["split_by"]
    )


def plan_splits(
    table: pd.DataFrame,
    labels: list[str] | None,
    min_count: int | None,
    max_samples: int | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    source: str,
    split_by: str | None = None,
) -> SplitPlan:
    """Select labels, subsample and split, exactly as the data module does.

    With ``split_by`` (the name of the column the table's ``order`` column was read from), the newest rows are the
    test split and the next newest the validation split; otherwise the split is random and stratified.
    """
    names = select_labels(
        table["label"],
        names=None if min_count is not None else (labels or list(DEFAULT_LABELS)),
        min_count=min_count,
        source=source,
    )
    keep = table["label"].isin(names).to_numpy()
    dropped = Counter(table.loc[~keep, "label"])
    rank_zero_info(
        f"{source}: kept {int(keep.sum())} rows with {len(names)} labels; dropped {int((~keep).sum())} rows "
        f"with {len(dropped)} other labels."
    )
    table = table[keep].reset_index(drop=True)
    label_ids = table["label"].map(label_maps(names)[1]).to_numpy()
    subsample = stratified_subsample(label_ids, max_samples, seed)
    if split_by:
        parts = ordered_split(table["order"].to_numpy()[subsample], val_fraction, test_fraction)
    else:
        parts = stratified_split(label_ids[subsample], val_fraction, test_fraction, seed)
    rows = {name: subsample[split] for name, split in parts.items()}
    return SplitPlan(names, table, label_ids, rows, keep)


def plan_multilabel_splits(
    table: pd.DataFrame,
    separator: str | None,
    arxiv_subjects: bool,
    labels: list[str] | None,
    min_count: int | None,
    max_samples: int | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    source: str,
    label_column: str,
    split_by: str | None = None,
) -> SplitPlan:
    """The multi-label twin of `plan_splits`: label sets parsed from the `label` column (`multilabel`), mapped to
    arXiv subjects if asked, labels selected by name or count; rows left without a selected label are dropped; a
    seeded random subsample; then split by time or by iterative stratification (rare labels in every split). The
    plan's `label_ids` is the multi-hot matrix (rows, labels)."""
    sets = parse_label_sets(table["label"].tolist(), separator, source, label_column)
    if arxiv_subjects:
        sets, ignored = arxiv_subject_sets(sets, source, label_column)
        if ignored:
            common = sorted(ignored, key=ignored.get, reverse=True)[:5]
            rank_zero_warn(
                f"{source}: column {label_column!r}: {sum(ignored.values())} tokens of {len(ignored)} kinds are not "
                f"arXiv categories (MSC/ACM classes spilled from arXiv's metadata, e.g. {common}); left out, the rows "
                "keep their categories."
            )
    counts = label_counts(sets)
    names = select_labels(
        [label for labels_ in sets for label in labels_],
        names=None if min_count is not None else (labels or list(DEFAULT_LABELS)),
        min_count=min_count,
        source=source,
    )
    y = multi_hot(sets, names)
    keep = y.any(1)
    rank_zero_info(
        f"{source}: kept {int(keep.sum())} rows with {len(names)} labels (label sets of {y[keep].sum(1).mean():.2f} "
        f"labels on average); dropped {int((~keep).sum())} rows with none of them; {len(counts) - len(names)} "
        "other labels left out."
    )
    table, y = table[keep].reset_index(drop=True), y[keep]
    subsample = np.arange(len(y))
    if max_samples is not None and max_samples < len(y):
        subsample = np.sort(np.random.default_rng(seed).permutation(len(y))[:max_samples])
    if split_by:
        parts = ordered_split(table["order"].to_numpy()[subsample], val_fraction, test_fraction)
    else:
        parts = iterative_split(y[subsample], val_fraction, test_fraction, seed)
    rows = {name: subsample[split] for name, split in parts.items()}
    return SplitPlan(names, table, y.astype(np.int64), rows, keep)


def with_feedback_rows(
    plan: SplitPlan, feedback: FeedbackRows, source: pd.DataFrame
) -> tuple[SplitPlan, FeedbackSummary]:
    """The plan with the feedback rows (`feedback.prepare_feedback`: labels checked, the latest per text, none
    repeating a text of the ``source`` table) appended to its training split, with row ids after the source's; and
    what became of the feedback read."""
    rows, summary = feedback.training_rows(source["text"], plan.names, plan.multi_label)
    rank_zero_info(summary.line())
    first = int(source["row_id"].max()) + 1 if len(source) else 0
    # `label` as `prepare_feedback` gives it (a name, or a tuple of names): the split is made, nothing parses it again.
    return plan.with_training_rows(rows, first), summary
