"""Every paper's subjects, for scoring a one-label model as a tagger: its top subject is right when it is any of the
paper's subjects (`data.subjects_path`: e.g. categories.csv's `all_categories`, every arXiv category of the paper,
cross-lists included), not only the primary one the model was trained on.

Read beside the splits, never into them: the labels a model trains on and the token cache stay as they were. The
file is joined to the data file by `data.join_column` (`tables.join_columns`: a key it lacks, a repeated key with
other values, or an empty value is an error naming the file, the column and the rows), its categories mapped to
subjects as `data.arxiv_subjects` maps them (`label_sets.arxiv_subject_sets`), and each row's own label added to its
set (the primary subject is one of the paper's, whatever the file says).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from lightning_cls.data.label_sets import arxiv_subject_sets, multi_hot, parse_label_sets
from lightning_cls.data.tables import join_columns, read_table
from lightning_cls.errors import ConfigError, DataError


def read_paper_subjects(
    path: str,
    text_column: str,
    label_column: str,
    subjects_path: str,
    join_column: str,
    subjects_column: str,
    names: Sequence[str],
) -> np.ndarray:
    """(rows of the data file, len(names)) uint8, indexed by row id (the file's 0-based data row): 1 where the
    paper has the subject. Subjects not in `names` are left out; a row the data module dropped is all zeros."""
    if not Path(subjects_path).is_file():
        raise DataError(f"{subjects_path} (data.subjects_path) does not exist.")
    table = read_table(path, text_column, label_column, key_column=join_column)
    joined = join_columns(table, subjects_path, join_column, [subjects_column], path)
    source = f"{subjects_path} (data.subjects_path)"
    sets = parse_label_sets(joined[subjects_column].tolist(), None, source, subjects_column)
    subjects, _ = arxiv_subject_sets(sets, source, subjects_column)  # tokens that are not categories: left out
    own = multi_hot([[label] for label in joined["label"]], names)
    out = np.zeros((int(joined["row_id"].max()) + 1 if len(joined) else 0, len(names)), dtype=np.uint8)
    out[joined["row_id"].to_numpy()] = multi_hot(subjects, names) | own
    return out


def subjects_of_settings(settings: Mapping, names: Sequence[str]) -> np.ndarray | None:
    """`read_paper_subjects` of a data module's settings (`data.subjects_path` and the columns), or None: not set, or
    a label-set model (its own labels are the sets)."""
    h = settings
    if not h.get("subjects_path") or h.get("multi_label"):
        return None
    if not h.get("path"):
        raise ConfigError("data.subjects_path is joined to a local file: set data.path.")
    columns = (h["text_column"], h["label_column"])
    return read_paper_subjects(h["path"], *columns, h["subjects_path"], h["join_column"], h["subjects_column"], names)
