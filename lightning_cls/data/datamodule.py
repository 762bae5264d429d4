"""The LightningDataModule: read (hub or local file) -> select labels -> subsample -> split -> tokenize (cached).

Each step belongs to its own module: the labelled source (`sources`), the split plan (`splits`), feedback rows as
training data (`feedback`), the cache of tokenized splits (`split_cache`), files of texts to classify
(`predict_inputs`). The data module holds the settings, runs the steps in Lightning's order and makes the loaders.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Sampler

from lightning_cls.data.feedback import FeedbackRows, parse_time
from lightning_cls.data.labels import DEFAULT_LABELS, label_maps
from lightning_cls.data.paper_subjects import subjects_of_settings
from lightning_cls.data.predict_inputs import (
    load_predict_inputs,
    predict_cache_key,
    predict_file_index,
    prepare_predict_inputs,
    read_predict_texts,
)
from lightning_cls.data.samplers import (
    LengthGroupedSampler,
    LengthSortedSampler,
    ResumableDataLoader,
    SeededShuffleSampler,
)
from lightning_cls.data.sources import LabelledSource
from lightning_cls.data.split_cache import (
    SPLITS,
    cache_meta,
    cache_spec,
    default_cache_dir,
    reuse_cache,
    split_index,
    write_splits,
)
from lightning_cls.data.splits import SplitPlan, plan_from_settings, with_feedback_rows
from lightning_cls.data.tables import HUB_DATASET
from lightning_cls.data.token_cache import TokenizedSplit, cache_key
from lightning_cls.data.tokenization import PadCollator, load_tokenizer
from lightning_cls.data.windows import WindowSpec
from lightning_cls.errors import ConfigError, DataError


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
        subjects_path: str | None = None,
        subjects_column: str = "all_categories",
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
            subjects_path: A file of every paper's arXiv categories (`subjects_column`, separated by whitespace;
                joined by `join_column`): validation and test also report `top_label_in_set`, the share of texts
                whose answer is one of the paper's subjects (`paper_subjects`). `subjects_column`: that column.
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
        after = parse_time(feedback_after)  # a malformed time fails now, not after reading the data
        # Read once per module: the cache key and the rows added come from the same reading.
        self._feedback = FeedbackRows(feedback_db, after, bool(feedback_drop_unknown)) if feedback_db else None
        self.splits: dict[str, TokenizedSplit] = {}
        self._label_names: list[str] | None = None
        self.feedback_summary: dict[str, Any] | None = None

    # ----------------------------------------------------------------------------------------- labels and sources
    @property
    def source(self) -> str:
        return self._labelled.name

    @property
    def _labelled(self) -> LabelledSource:
        return LabelledSource.of(self.hparams)

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

    @property
    def window_spec(self) -> WindowSpec:
        h = self.hparams
        return WindowSpec(h.max_length, h.max_windows, h.window_stride)

    def plan(self) -> SplitPlan:
        """The splits these settings give (labels selected, subsampled, split; `splits.plan_from_settings`), without
        tokenizing: what `export` and the experiment scripts rebuild the validation or test texts from. Read once
        per module."""
        if getattr(self, "_plan", None) is None:
            self._plan = self._split(self._labelled.read())
        return self._plan

    def _split(self, table: pd.DataFrame) -> SplitPlan:
        plan = plan_from_settings(table, self.hparams, self.source)
        if self._feedback is not None:  # feedback rows join the training split only
            plan, summary = with_feedback_rows(plan, self._feedback, table)
            self.feedback_summary = summary.to_dict()
        return plan

    def split_texts(self, split: str) -> tuple[np.ndarray, list[str], np.ndarray | None]:
        """A split's row ids (as its batches carry them), raw texts and class ids, for what reads text rather than
        tokens (the lexical expert, `model.lexical`). `predict` of a `predict_path`: the file's texts, their row ids
        their positions, no class ids."""
        h = self.hparams
        if split == "predict" and h.predict_path:
            texts = read_predict_texts(h.predict_path, h.predict_text_column or h.text_column, h.predict_id_column)
            return np.arange(len(texts)), texts, None
        plan = self.plan()
        rows = plan.rows["test" if split == "predict" else split]
        return plan.table["row_id"].to_numpy()[rows], plan.table["text"].to_numpy()[rows].tolist(), plan.label_ids[rows]

    def paper_subjects(self) -> np.ndarray | None:  # every data row's subjects by row id, or None: not asked for
        if getattr(self, "_paper_subjects", None) is None:
            self._paper_subjects = subjects_of_settings(self.hparams, self.label_names)
        return self._paper_subjects

    # ------------------------------------------------------------------------------------------------ the cache
    def cache_path(self) -> Path:
        """The cache folder for exactly these inputs, settings and tokenizer (`split_cache.cache_spec`)."""
        spec = cache_spec(self.hparams, self._labelled, self._feedback)
        return Path(self.hparams.cache_dir or default_cache_dir()) / cache_key(spec)

    def prepare_data(self) -> None:
        """Read, select, split and tokenize once (rank 0 only); reused while inputs and tokenizer are unchanged."""
        h = self.hparams
        if self._predicting_file():  # `predict` on a file of texts needs neither the labelled data nor its splits
            tokenizer, column = load_tokenizer(h.tokenizer), h.predict_text_column or h.text_column
            rows = prepare_predict_inputs(
                h.predict_path, self.predict_cache_path(), tokenizer, self.window_spec, column, h.predict_id_column
            )
            rank_zero_info(f"{rows} texts to classify from {h.predict_path}")
            return
        folder = self.cache_path()
        if reuse_cache(folder):
            return
        table = self._labelled.read()
        if table.attrs.get("duplicates"):
            rank_zero_info(f"{self.source}: {table.attrs['duplicates']}")
        plan = self._split(table)
        meta = cache_meta(plan, str(self.source), table, self.feedback_summary)
        write_splits(folder, plan, load_tokenizer(h.tokenizer), self.window_spec, meta)

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
        stage = self.trainer.state.fn if self.trainer is not None else None
        return bool(self.hparams.predict_path) and stage == TrainerFn.PREDICTING

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
        """The row ids of the prediction inputs in input order, their ids as the predictions show them (lazily), and
        for texts read as windows each text's window count and cut flag: of the file `predict_path`
        (`predict_inputs.predict_file_index`), else of the test split (`split_cache.split_index`)."""
        if self.hparams.predict_path:
            return predict_file_index(self.predict_cache_path(), self.splits.get("predict"))
        return split_index(self.cache_path(), "test", self.splits["test"], self.hparams.max_windows > 1)


def data_module_from_settings(settings: Mapping[str, Any], where: str | None = None) -> ScientificTextDataModule:
    """The data module of a config's or a checkpoint's data settings, to rebuild its splits from (`plan`,
    `split_texts`): how `compare`, `export` and the experiment scripts get the texts a model was trained and tested
    on. A setting the data module does not take is an error naming ``where`` (a config given by hand); without
    ``where`` (a checkpoint's saved settings, perhaps of another version) it is left out."""
    known = set(inspect.signature(ScientificTextDataModule.__init__).parameters) - {"self"}
    unknown = sorted(set(settings) - known)
    if unknown and where:
        raise ConfigError(f"{where}: data.{unknown[0]} is not a data setting (of {sorted(known)}).")
    return ScientificTextDataModule(**{k: v for k, v in settings.items() if k in known})
