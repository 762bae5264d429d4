"""The LightningDataModule: read (hub or local file) -> select labels -> subsample -> split -> tokenize (cached)."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Sampler

from lightning_cls.atomic import atomic_folder
from lightning_cls.errors import ConfigError, DataError
from lightning_cls.data.split_reference import SplitReference
from lightning_cls.data.feedback import FeedbackSummary, fingerprint, parse_time, prepare_feedback, read_feedback
from lightning_cls.data.labels import (
    DEFAULT_LABELS,
    label_maps,
    ordered_split,
    select_labels,
    stratified_split,
    stratified_subsample,
)
from lightning_cls.data.label_sets import (
    arxiv_subject_sets,
    iterative_split,
    label_counts,
    multi_hot,
    parse_label_sets,
)
from lightning_cls.data.predict_inputs import (
    iter_predict_ids,
    load_predict_inputs,
    load_window_counts,
    predict_cache_key,
    prepare_predict_inputs,
)
from lightning_cls.data.samplers import LengthGroupedSampler, ResumableDataLoader, LengthSortedSampler, SeededShuffleSampler
from lightning_cls.data.tables import HUB_DATASET, join_columns, read_hub, read_table, read_text_chunks
from lightning_cls.data.token_cache import TokenizedSplit, cache_key, file_fingerprint
from lightning_cls.data.tokenization import PadCollator, load_tokenizer, tokenize, tokenizer_fingerprint
from lightning_cls.data.windows import WindowedTexts, WindowSpec

# Bump when the meaning of the cached splits changes (their file format has its own version, in token_cache).
CACHE_VERSION = 2  # 2: duplicate texts dropped, labels stripped, stricter file reading
SPLITS = ("train", "val", "test")
# Per text of a split read as windows: its row id, windows read, and whether the window cap cut it.
TEXTS_DTYPE = np.dtype([("row_id", "<i8"), ("windows", "<i4"), ("cut", "?")])


def default_cache_dir() -> Path:
    return Path(os.environ.get("LIGHTNING_CLS_CACHE", Path.home() / ".cache" / "lightning_cls"))


@dataclass
class SplitPlan:
    """Which rows of a table go to which split, and with which class ids."""

    names: list[str]  # the selected label names, in id order
    table: pd.DataFrame  # the rows with a selected label (columns row_id, text, label), re-indexed from 0
    label_ids: np.ndarray  # class id of each row of `table`
    rows: dict[str, np.ndarray]  # positions in `table` of the train / val / test rows
    kept: np.ndarray  # mask over the source rows: True where the label was selected


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
    """Select labels, subsample and split, exactly as the data module does (the TF-IDF baseline uses it too).

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


class ScientificTextDataModule(pl.LightningDataModule):
    """Labelled texts from the hub or a local file, label-filtered, subsampled, split and tokenized once."""

    def __init__(
        self,
        tokenizer: str,
        path: str | None = None,
        dataset: str = HUB_DATASET,
        text_column: str = "text",
        label_column: str = "label",
        labels: list[str] | None = None,
        min_count: int | None = None,
        max_samples: int | None = 50_000,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 42,
        split_by: str | None = None,
        multi_label: bool = False,
        label_separator: str | None = None,
        labels_path: str | None = None,
        join_column: str = "arxiv_id",
        arxiv_subjects: bool = False,
        title_column: str | None = None,
        max_length: int = 256,
        max_windows: int = 1,
        window_stride: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pad_to_multiple_of: int | None = 8,
        group_by_length: bool = True,
        cache_dir: str | None = None,
        predict_path: str | None = None,
        predict_text_column: str | None = None,
        predict_id_column: str | None = "id",
        feedback_db: str | None = None,
        feedback_after: str | float | None = None,
        feedback_drop_unknown: bool = False,
    ) -> None:
        """
        Args:
            tokenizer: Hub name or local folder of the (fast) tokenizer, normally the model's own.
            path: Local CSV, JSON, JSONL or Parquet file; when not set, the hub dataset `dataset` is used.
            dataset: Hugging Face hub dataset id (its `train` split), read when `path` is not set.
            text_column: Column holding the text.
            label_column: Column holding the label name.
            labels: Label names to keep; ids follow their alphabetical order. Default: the ten frequent subjects.
            min_count: Instead of `labels`, keep every label with at least this many rows.
            max_samples: Label-stratified random subsample of at most this many rows (null: all rows).
            val_fraction: Share of the (subsampled) rows for validation, stratified by label.
            test_fraction: Share of the (subsampled) rows for test, stratified by label.
            seed: Seed of the subsample and the split; the same seed gives the same rows on any number of devices.
            split_by: Split by time instead of at random: order the rows by this column (e.g. `arxiv_id`, whose
                `YYMM` prefix is the month) and put the newest `test_fraction` in test, the next newest
                `val_fraction` in validation. Values are compared as text, so they must sort by time as text.
            multi_label: Each text has a set of labels (`label_column` holds names separated by
                `label_separator`): a sigmoid per label, trained with binary cross-entropy, per-label thresholds
                fitted on validation. `labels` / `min_count` select labels; rows left with none are dropped; the
                split keeps every label's share in every split (iterative stratification) unless `split_by`.
            label_separator: What separates the labels of a set: null for whitespace (`cs.LG stat.ML`), "," for
                names that hold spaces (`computer science, statistics`).
            labels_path: A second file whose `label_column` (and `title_column`, if set) are joined to the data
                by `join_column`, e.g. ../shared/data/arxiv/categories.csv (`all_categories`) for every paper's
                cross-listed categories.
            join_column: The column both files identify a row by (for `labels_path`).
            arxiv_subjects: The labels are arXiv categories, each taken as its subject (its archive: `cs.LG` ->
                computer science): ten subjects instead of the fine-grained categories.
            title_column: Read each text as `title [SEP] text` (the tokenizer's separator), the title from this
                column (of `labels_path`, when set). Served texts must be given the same way.
            max_length: Texts are truncated to this many tokens (with `max_windows` > 1: tokens per window).
            max_windows: Read a text longer than `max_length` as up to this many overlapping windows (1: truncate).
                Each training window is an example with its text's label; validation, test and predict answer
                per text with the mean of its windows' logits, so their metrics are per text.
            window_stride: Text tokens between the starts of consecutive windows (default: three quarters of a
                window's text tokens).
            batch_size: Training batch size per device.
            eval_batch_size: Batch size for validation, test and predict (default: twice `batch_size`).
            num_workers: DataLoader worker processes.
            pad_to_multiple_of: Pad each batch to its longest text, rounded up to this multiple (null: no rounding).
            group_by_length: Batch training texts of similar length together (batches in random order).
            cache_dir: Where tokenized splits are cached (default: $LIGHTNING_CLS_CACHE or ~/.cache/lightning_cls).
            predict_path: A .txt (one text per line), .csv or .jsonl file for `predict` to classify instead of the
                test split; read in chunks and tokenized once (cached), so it may be larger than memory.
            predict_text_column: Column (CSV) or field (JSONL) of `predict_path` holding the text (default:
                `text_column`).
            predict_id_column: Column of `predict_path` whose values identify its rows in the predictions; files
                without it are identified by line number (.txt, .jsonl) or 0-based data row (.csv).
            feedback_db: The service's feedback database (`serve --feedback_db`, with `--keep_texts`): its labelled
                predictions are added to the training split only, after the split (validation and test stay the
                data's own rows), one per text (the latest feedback), none repeating a text of the data
                (`lightning_cls.data.feedback`). Read once per run: train on a copy of a live database
                (`sqlite3 DB ".backup copy.sqlite3"`) to make the run repeatable.
            feedback_after: Only feedback received after this time: Unix seconds or an ISO 8601 date or date and time
                (UTC unless it has an offset), e.g. `2026-03-01`.
            feedback_drop_unknown: Leave out feedback whose true label is not one of the training labels (for label
                sets: those names, and the row if none is left), counted in the summary; by default it is an error
                naming the prediction and the label.
        """
        super().__init__()
        if labels is not None and min_count is not None:
            raise ConfigError("Set either `data.labels` or `data.min_count`, not both.")
        self.save_hyperparameters()
        self.window_spec  # noqa: B018 (checks max_windows and window_stride now, not after reading the data)
        if feedback_after is not None and not feedback_db:
            raise ConfigError("data.feedback_after filters the feedback of data.feedback_db: set data.feedback_db.")
        parse_time(feedback_after)  # a malformed time fails now, not after reading the data
        self.splits: dict[str, TokenizedSplit] = {}
        self._label_names: list[str] | None = None
        self._feedback: pd.DataFrame | None = None
        self.feedback_summary: dict[str, Any] | None = None

    # ----------------------------------------------------------------------------------------- labels and sources
    @property
    def source(self) -> str:
        return self.hparams.path or f"hub dataset {self.hparams.dataset!r}"

    @property
    def label_names(self) -> list[str]:
        """Class names in id order; known without reading the data unless `min_count` selects them."""
        if self._label_names is None:
            if self.hparams.min_count is None:
                self._label_names = sorted(self.hparams.labels or DEFAULT_LABELS)
            else:
                self._label_names = self.plan().names
        return self._label_names

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def id2label(self) -> dict[int, str]:
        return label_maps(self.label_names)[0]

    def plan(self) -> SplitPlan:
        """The splits these settings give (labels selected, subsampled, split; `plan_splits`), without tokenizing:
        what `export` and the experiment scripts rebuild the validation or test texts from. Read once per module."""
        if getattr(self, "_plan", None) is None:
            self._plan = self._split(self._read_source())
        return self._plan

    def split_texts(self, split: str) -> tuple[np.ndarray, list[str], np.ndarray | None]:
        """A split's row ids (as its batches carry them), raw texts and class ids, for what reads text rather than
        tokens (the lexical expert, `model.lexical`). `predict` of a `predict_path`: the file's texts, their row ids
        their positions, no class ids."""
        if split == "predict" and self.hparams.predict_path:
            h = self.hparams
            column = h.predict_text_column or h.text_column
            texts = [t for _, chunk in read_text_chunks(h.predict_path, column, h.predict_id_column) for t in chunk]
            return np.arange(len(texts)), texts, None
        plan = self.plan()
        rows = plan.rows["test" if split == "predict" else split]
        return plan.table["row_id"].to_numpy()[rows], plan.table["text"].to_numpy()[rows].tolist(), plan.label_ids[rows]

    def _split(self, source: pd.DataFrame) -> SplitPlan:
        plan = self._split_source(source)
        if self.hparams.get("feedback_db"):
            plan = self._add_feedback(plan, source)
        return plan

    def _split_source(self, source: pd.DataFrame) -> SplitPlan:
        h = self.hparams
        fractions = h.val_fraction, h.test_fraction
        if h.get("multi_label"):
            return plan_multilabel_splits(
                source,
                h.label_separator,
                h.arxiv_subjects,
                h.labels,
                h.min_count,
                h.max_samples,
                *fractions,
                h.seed,
                self.source,
                h.label_column,
                split_by=h.split_by,
            )
        return plan_splits(
            source, h.labels, h.min_count, h.max_samples, *fractions, h.seed, self.source, split_by=h.split_by
        )

    # ------------------------------------------------------------------------------------------------ feedback
    def _read_feedback(self) -> pd.DataFrame:
        """The feedback database's labelled rows with texts, read once per module: the cache key and the rows
        added come from the same reading, however many rows the service adds meanwhile."""
        if self._feedback is None:
            h = self.hparams
            self._feedback = read_feedback(h.feedback_db, parse_time(h.get("feedback_after")))
        return self._feedback

    def _add_feedback(self, plan: SplitPlan, source: pd.DataFrame) -> SplitPlan:
        """The plan with the feedback rows (`feedback_data.prepare_feedback`: labels checked, the latest per text,
        none repeating a text of `source`) appended to its training split. They get row ids after the source's."""
        h = self.hparams
        multi = bool(h.get("multi_label"))
        rows, summary = prepare_feedback(
            self._read_feedback(), source["text"], plan.names, multi, bool(h.get("feedback_drop_unknown"))
        )
        rank_zero_info(summary.line())
        self.feedback_summary = summary.to_dict()
        first = int(source["row_id"].max()) + 1 if len(source) else 0
        # `label` as feedback_data gives it (a name, or a tuple of names): the split is made, nothing parses it again.
        added = pd.DataFrame(
            {"row_id": np.arange(first, first + len(rows)), "text": rows["text"], "label": rows["label"]}
        )
        if multi:
            ids = multi_hot(rows["label"].tolist(), plan.names).astype(plan.label_ids.dtype)
        else:
            ids = rows["label"].map(label_maps(plan.names)[1]).to_numpy(dtype=plan.label_ids.dtype)
        positions = len(plan.table) + np.arange(len(rows))
        return SplitPlan(
            plan.names,
            pd.concat([plan.table, added], ignore_index=True),
            np.concatenate([plan.label_ids, ids]),
            {**plan.rows, "train": np.concatenate([plan.rows["train"], positions])},
            plan.kept,
        )

    def _read_source(self) -> pd.DataFrame:
        h = self.hparams
        joined = bool(h.get("labels_path"))
        if not h.path:
            if joined or h.get("title_column"):
                raise ConfigError("data.labels_path and data.title_column read local files: set data.path.")
            return read_hub(h.dataset, h.text_column, h.label_column, order_column=h.split_by)
        if not joined:
            key = h.get("title_column")  # the title, read as the key column
            table = read_table(h.path, h.text_column, h.label_column, order_column=h.split_by, key_column=key)
            return with_titles(table, "key", h.tokenizer) if key else table
        table = read_table(h.path, h.text_column, None, order_column=h.split_by, key_column=h.join_column)
        columns = [h.label_column] + ([h.title_column] if h.title_column else [])
        table = join_columns(table, h.labels_path, h.join_column, columns, self.source)
        table = table.rename(columns={h.label_column: "label"})
        if h.title_column:
            table = with_titles(table, h.title_column, h.tokenizer)
        # As for a single file: a text repeated with its labels would land in training and test alike.
        repeated = table["text"].duplicated(keep="first").to_numpy()
        if repeated.any():
            rank_zero_info(f"{self.source}: dropped {int(repeated.sum())} row(s) repeating an earlier row's text.")
        out = table[~repeated].reset_index(drop=True)
        out.attrs.update(table.attrs, duplicate_rows=int(repeated.sum()))
        return out

    def _source_fingerprint(self) -> str:
        if self.hparams.path:
            if not Path(self.hparams.path).is_file():
                raise DataError(f"Data file {self.hparams.path} does not exist.")
            return file_fingerprint(self.hparams.path)
        import datasets

        return datasets.load_dataset(self.hparams.dataset, split="train")._fingerprint

    @property
    def window_spec(self) -> WindowSpec:
        h = self.hparams
        return WindowSpec(h.max_length, h.max_windows, h.window_stride)

    # ------------------------------------------------------------------------------------------------ the cache
    def cache_path(self) -> Path:
        """The cache folder for exactly these inputs, settings and tokenizer."""
        h = self.hparams
        spec = {
            "version": CACHE_VERSION,
            "source": self._source_fingerprint(),
            "columns": [h.text_column, h.label_column],
            "labels": h.labels,
            "min_count": h.min_count,
            "max_samples": h.max_samples,
            "fractions": [h.val_fraction, h.test_fraction],
            "seed": h.seed,
            **({"split_by": h.split_by} if h.split_by else {}),  # absent when unset: older caches stay valid
            **(
                {
                    "multi_label": [h.multi_label, h.label_separator, h.arxiv_subjects],
                    "joined": [file_fingerprint(h.labels_path), h.join_column] if h.labels_path else None,
                    "title": h.title_column,
                }
                if h.get("multi_label") or h.get("labels_path") or h.get("title_column")
                else {}
            ),
            "tokenizer": tokenizer_fingerprint(load_tokenizer(h.tokenizer)),
            "max_length": h.max_length,
            # absent without feedback: older caches stay valid
            **(
                {"feedback": [fingerprint(self._read_feedback()), bool(h.get("feedback_drop_unknown"))]}
                if h.get("feedback_db")
                else {}
            ),
            # absent when texts are truncated: older caches stay valid
            **({"windows": [h.max_windows, h.window_stride]} if h.max_windows > 1 else {}),
        }
        return Path(h.cache_dir or default_cache_dir()) / cache_key(spec)

    def prepare_data(self) -> None:
        """Read, select, split and tokenize once (rank 0 only); reused while inputs and tokenizer are unchanged."""
        if self._predicting_file():  # `predict` on a file of texts needs neither the labelled data nor its splits
            rows = prepare_predict_inputs(
                self.hparams.predict_path,
                self.predict_cache_path(),
                load_tokenizer(self.hparams.tokenizer),
                self.window_spec,
                self.hparams.predict_text_column or self.hparams.text_column,
                self.hparams.predict_id_column,
            )
            rank_zero_info(f"{rows} texts to classify from {self.hparams.predict_path}")
            return
        folder = self.cache_path()
        if (folder / "meta.json").is_file():
            rank_zero_info(f"Reusing tokenized splits from {folder}")
            feedback = json.loads((folder / "meta.json").read_text()).get("feedback")
            if feedback:  # the same feedback rows as when the cache was made (its key hashes them)
                rank_zero_info(FeedbackSummary(**feedback).line())
            return
        h = self.hparams
        source = self._read_source()
        if source.attrs.get("duplicates"):
            rank_zero_info(f"{self.source}: {source.attrs['duplicates']}")
        plan = self._split(source)
        names, table, label_ids, split_rows, keep = plan.names, plan.table, plan.label_ids, plan.rows, plan.kept

        tokenizer = load_tokenizer(h.tokenizer)
        texts, source_rows = table["text"].to_numpy(), table["row_id"].to_numpy()

        meta = {"labels": names, "source": str(self.source), "dropped_rows": int((~keep).sum()), "splits": {}}
        # Every row read is accounted for: rows_read = duplicate_rows + dropped_rows + subsampled out + split rows
        # (less feedback.added: the feedback rows in the training split, `feedback_data.FeedbackSummary`).
        meta.update(
            rows_read=source.attrs.get("rows_read", len(source)), duplicate_rows=source.attrs.get("duplicate_rows", 0)
        )
        if self.feedback_summary is not None:
            meta["feedback"] = self.feedback_summary
        with atomic_folder(folder, exist_ok=True) as tmp:  # a reader never sees a half-written cache
            for name, rows in split_rows.items():
                text_chunks = (texts[part].tolist() for part in _chunks(rows))
                if h.max_windows == 1:
                    chunks = (tokenize(tokenizer, chunk, h.max_length) for chunk in text_chunks)
                    split = TokenizedSplit.write(tmp, name, chunks, label_ids[rows], source_rows[rows])
                    meta["splits"][name] = split_summary(split, names)
                    continue
                # One row per window, each with its text's label and row id (the row id says which text it is).
                windowed = WindowedTexts(tokenizer, self.window_spec)
                TokenizedSplit.write(
                    tmp,
                    name,
                    windowed.chunks(text_chunks),
                    lambda rows=rows, w=windowed: label_ids[rows][w.text_index],
                    lambda rows=rows, w=windowed: source_rows[rows][w.text_index],
                )
                reference = SplitReference.of(label_ids[rows], windowed.tokens, names, windowed.counts)
                meta["splits"][name] = {**reference.to_dict(), "windows": int(windowed.counts.sum())}
                texts_of_split = np.empty(len(rows), dtype=TEXTS_DTYPE)  # what `predict` on the split reports per text
                texts_of_split["row_id"], texts_of_split["windows"] = source_rows[rows], windowed.counts
                texts_of_split["cut"] = windowed.cut
                np.save(tmp / f"{name}.texts.npy", np.sort(texts_of_split, order="row_id"))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        rank_zero_info(
            f"Tokenized splits cached in {folder}: " + ", ".join(f"{k}={len(v)}" for k, v in split_rows.items())
        )

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and self.hparams.predict_path:
            # Row ids are positions in the file's texts: the prediction writer puts rows back in that order.
            self.splits = {"predict": load_predict_inputs(self.predict_cache_path())}
            return
        folder = self.cache_path()
        meta_file = folder / "meta.json"
        if not meta_file.is_file():
            raise RuntimeError(f"No tokenized cache at {folder}: call prepare_data() first.")
        self.meta = json.loads(meta_file.read_text())
        if self._label_names is not None and self.meta["labels"] != self._label_names:
            raise DataError(f"Cached labels {self.meta['labels']} differ from the selected {self._label_names}.")
        self._label_names = self.meta["labels"]
        self.splits = {name: TokenizedSplit.load(folder, name) for name in SPLITS}

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: what feedback the training split holds (`FeedbackSummary.to_dict`: the
        database, the rows added and the latest feedback time read), so that `compare` can tell which feedback the
        model has seen. Empty without feedback (Lightning then saves nothing)."""
        feedback = getattr(self, "meta", {}).get("feedback") or self.feedback_summary
        return {"feedback": feedback} if feedback else {}

    # ------------------------------------------------------------------------------------------------ loaders
    @property
    def collator(self) -> PadCollator:
        tokenizer = load_tokenizer(self.hparams.tokenizer)
        return PadCollator(tokenizer.pad_token_id, self.hparams.pad_to_multiple_of, tokenizer.padding_side)

    def _loader(
        self, split: TokenizedSplit, batch_size: int, sampler: Sampler | None, resumable: bool = False
    ) -> DataLoader:
        workers = self.hparams.num_workers
        if workers:
            # Workers fork after the Rust tokenizer used its thread pool; this keeps it off in the children (pitfall 5)
            # while leaving the one big tokenization pass in prepare_data parallel.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # The training loader is resumable: a checkpoint taken mid-epoch resumes at the next unseen batch (resume.py).
        return (ResumableDataLoader if resumable else DataLoader)(
            split,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=self.collator,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self.trainer is not None and self.trainer.accelerator.__class__.__name__ == "CUDAAccelerator",
        )

    def train_dataloader(self) -> DataLoader:
        split, h = self.splits["train"], self.hparams
        if not h.group_by_length:
            return self._loader(split, h.batch_size, SeededShuffleSampler(len(split), h.seed), resumable=True)
        world = self.trainer.world_size if self.trainer is not None else 1
        sampler = LengthGroupedSampler(split.lengths, h.batch_size * world, h.seed)
        return self._loader(split, h.batch_size, sampler, resumable=True)

    def _eval_loader(self, name: str) -> DataLoader:
        split = self.splits[name]
        return self._loader(
            split, self.hparams.eval_batch_size or 2 * self.hparams.batch_size, LengthSortedSampler(split.lengths)
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("predict" if self.hparams.predict_path else "test")

    # ------------------------------------------------------------------------------------------------ predict inputs
    def _predicting_file(self) -> bool:
        return (
            bool(self.hparams.predict_path)
            and self.trainer is not None
            and self.trainer.state.fn == TrainerFn.PREDICTING
        )

    def predict_cache_path(self) -> Path:
        """The cache folder of `predict_path` tokenized with these settings."""
        h = self.hparams
        if getattr(self, "_predict_folder", None) is None:  # the key hashes the whole file: once is enough
            text_column = h.predict_text_column or h.text_column
            key = predict_cache_key(
                h.predict_path, load_tokenizer(h.tokenizer), self.window_spec, text_column, h.predict_id_column
            )
            self._predict_folder = Path(h.cache_dir or default_cache_dir()) / key
        return self._predict_folder

    def predict_index(self) -> tuple[np.ndarray, Iterator[Any], tuple[np.ndarray, np.ndarray] | None]:
        """The row ids of the prediction inputs in input order, and their ids as the predictions show them (lazily).

        A file (`predict_path`): positions 0..N-1 and the file's ids. The test split: its rows in data file order, each
        identified by its 0-based row in the data file. Third: for texts read as windows, each text's window count
        and whether the cap cut it (else None).
        """
        if self.hparams.predict_path:
            folder = self.predict_cache_path()
            windows = load_window_counts(folder)
            texts = len(windows[0]) if windows is not None else len(self.splits["predict"])
            return np.arange(texts), iter_predict_ids(folder), windows
        if self.hparams.max_windows == 1:
            row_ids = np.sort(np.asarray(self.splits["test"].row_ids))
            return row_ids, iter(row_ids.tolist()), None
        texts = np.load(self.cache_path() / "test.texts.npy")  # per text, in row id order: row id, windows, cut
        return texts["row_id"], iter(texts["row_id"].tolist()), (texts["windows"], texts["cut"])


def with_titles(table: pd.DataFrame, column: str, tokenizer: str) -> pd.DataFrame:
    """Texts as `title [SEP] text`, with the tokenizer's own separator (a newline if it has none)."""
    sep = load_tokenizer(tokenizer).sep_token or "\n"
    out = table.copy()
    out["text"] = [f"{title} {sep} {text}" for title, text in zip(table[column], table["text"], strict=True)]
    out.attrs = dict(table.attrs)
    return out


def split_summary(split: TokenizedSplit, names: list[str]) -> dict:
    """Row count, label distribution and token length statistics of a split (the training split's summary is the
    reference that monitoring compares live traffic with; its format belongs to `export_format`)."""
    return SplitReference.of(split.labels, split.lengths, names).to_dict()


def _chunks(rows: np.ndarray, size: int = 4096) -> list[np.ndarray]:
    """Tokenizing a few thousand texts at a time keeps memory small: the tokenizer's per-text objects (tokens,
    offsets) for a whole data set would take gigabytes, one chunk's a few megabytes."""
    return [rows[start : start + size] for start in range(0, len(rows), size)]
