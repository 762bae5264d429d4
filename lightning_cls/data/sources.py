"""The labelled source a data module reads: a local file or the hub's dataset, a second file's columns joined to it
(`labels_path`), titles put before the texts, repeated texts dropped; and the fingerprint its token cache is keyed
by. The reading itself (file formats, hostile input, the join's checks) is `tables`'."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from lightning.pytorch.utilities import rank_zero_info

from lightning_cls.data.tables import HUB_DATASET, join_columns, read_hub, read_table
from lightning_cls.data.token_cache import file_fingerprint
from lightning_cls.data.tokenization import load_tokenizer
from lightning_cls.errors import ConfigError, DataError


@dataclass(frozen=True)
class LabelledSource:
    """Where the labelled texts are and which columns hold what (the data module's settings of the same names)."""

    tokenizer: str  # whose separator goes between a title and its text
    path: str | None = None
    dataset: str = HUB_DATASET
    text_column: str = "text"
    label_column: str = "label"
    split_by: str | None = None  # read as the table's `order` column
    labels_path: str | None = None
    join_column: str = "arxiv_id"
    title_column: str | None = None

    @classmethod
    def of(cls, settings: Mapping[str, Any]) -> LabelledSource:
        """From the data module's settings; those added later may be missing (the settings of an older checkpoint)."""
        later = {k: settings[k] for k in ("labels_path", "join_column", "title_column") if k in settings}
        return cls(
            settings["tokenizer"],
            settings["path"],
            settings["dataset"],
            settings["text_column"],
            settings["label_column"],
            settings["split_by"],
            **later,
        )

    @property
    def name(self) -> str:
        """The source as messages name it."""
        return self.path or f"hub dataset {self.dataset!r}"

    def fingerprint(self) -> str:
        """The file's bytes hashed, or the hub dataset's own fingerprint: the token cache is reused only for these."""
        if self.path:
            if not Path(self.path).is_file():
                raise DataError(f"Data file {self.path} does not exist.")
            return file_fingerprint(self.path)
        import datasets  # slow to import: only for the hub

        return datasets.load_dataset(self.dataset, split="train")._fingerprint

    def read(self) -> pd.DataFrame:
        """The rows (columns row_id, text, label, and `order` with `split_by`); its attrs count the rows read and
        dropped (`tables.validate_table`)."""
        if not self.path:
            if self.labels_path or self.title_column:
                raise ConfigError("data.labels_path and data.title_column read local files: set data.path.")
            return read_hub(self.dataset, self.text_column, self.label_column, order_column=self.split_by)
        if not self.labels_path:
            key = self.title_column  # the title, read as the key column
            table = read_table(self.path, self.text_column, self.label_column, self.split_by, key_column=key)
            return with_titles(table, "key", self.tokenizer) if key else table
        return self._joined()

    def _joined(self) -> pd.DataFrame:
        table = read_table(self.path, self.text_column, None, self.split_by, key_column=self.join_column)
        columns = [self.label_column] + ([self.title_column] if self.title_column else [])
        table = join_columns(table, self.labels_path, self.join_column, columns, self.name)
        table = table.rename(columns={self.label_column: "label"})
        if self.title_column:
            table = with_titles(table, self.title_column, self.tokenizer)
        # As for a single file: a text repeated with its labels would land in training and test alike.
        repeated = table["text"].duplicated(keep="first").to_numpy()
        if repeated.any():
            rank_zero_info(f"{self.name}: dropped {int(repeated.sum())} row(s) repeating an earlier row's text.")
        out = table[~repeated].reset_index(drop=True)
        out.attrs.update(table.attrs, duplicate_rows=int(repeated.sum()))
        return out


def with_titles(table: pd.DataFrame, column: str, tokenizer: str) -> pd.DataFrame:
    """Texts as `title [SEP] text`, with the tokenizer's own separator (a newline if it has none)."""
    sep = load_tokenizer(tokenizer).sep_token or "\n"
    out = table.copy()
    out["text"] = [f"{title} {sep} {text}" for title, text in zip(table[column], table["text"], strict=True)]
    out.attrs = dict(table.attrs)
    return out
