"""The LightningDataModule: read (hub or local file) -> select labels -> subsample -> split -> tokenize (cached)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_cls.errors import DataError
from lightning_cls.export_format import SplitReference
from lightning_cls.labels import (
    DEFAULT_LABELS,
    label_maps,
    ordered_split,
    select_labels,
    stratified_split,
    stratified_subsample,
)
from lightning_cls.predict_inputs import (
    iter_predict_ids,
    load_predict_inputs,
    predict_cache_key,
    prepare_predict_inputs,
)
from lightning_cls.resume import ResumableDataLoader
from lightning_cls.sources import HUB_DATASET, file_fingerprint, read_hub, read_table
from lightning_cls.tokenization import PadCollator, load_tokenizer, tokenize, tokenizer_fingerprint

# Bump when the cache layout or the meaning of its contents changes.
CACHE_VERSION = 2  # 2: duplicate texts dropped, labels stripped, stricter file reading
SPLITS = ("train", "val", "test")


def default_cache_dir() -> Path:
    return Path(os.environ.get("LIGHTNING_CLS_CACHE", Path.home() / ".cache" / "lightning_cls"))


class TokenizedSplit(Dataset):
    """Token ids of many texts stored flat (one array plus offsets), memory-mapped from the cache."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, labels: np.ndarray, row_ids: np.ndarray) -> None:
        self.tokens, self.offsets, self.labels, self.row_ids = tokens, offsets, labels, row_ids

    @classmethod
    def from_lists(cls, ids: list[list[int]], labels: np.ndarray, row_ids: np.ndarray) -> TokenizedSplit:
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in ids], out=offsets[1:])
        tokens = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(offsets[-1]))
        return cls(tokens, offsets, np.asarray(labels, dtype=np.int64), np.asarray(row_ids, dtype=np.int64))

    @classmethod
    def from_texts(
        cls, tokenizer, texts: list[str], max_length: int, labels: np.ndarray, row_ids: np.ndarray, chunk: int = 4096
    ) -> TokenizedSplit:
        """Tokenize in chunks straight into the flat arrays: the tokenizer's per-text objects (tokens, offsets) for
        the whole data set would take gigabytes, one chunk's take a few megabytes."""
        tokens, lengths = [], []
        for start in range(0, len(texts), chunk):
            ids = tokenize(tokenizer, texts[start : start + chunk], max_length)
            lengths.append(np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)))
            tokens.append(np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(lengths[-1].sum())))
        offsets = np.zeros(len(texts) + 1, dtype=np.int64)
        if texts:
            np.cumsum(np.concatenate(lengths), out=offsets[1:])
        flat = np.concatenate(tokens) if tokens else np.zeros(0, dtype=np.int32)
        return cls(flat, offsets, np.asarray(labels, dtype=np.int64), np.asarray(row_ids, dtype=np.int64))

    def save(self, folder: Path, name: str) -> None:
        for field in ("tokens", "offsets", "labels", "row_ids"):
            np.save(folder / f"{name}.{field}.npy", getattr(self, field))

    @classmethod
    def load(cls, folder: Path, name: str) -> TokenizedSplit:
        return cls(
            *(np.load(folder / f"{name}.{f}.npy", mmap_mode="r") for f in ("tokens", "offsets", "labels", "row_ids"))
        )

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict:
        start, end = self.offsets[i], self.offsets[i + 1]
        item = {"input_ids": self.tokens[start:end], "row_id": int(self.row_ids[i])}
        if len(self.labels):
            item["label"] = int(self.labels[i])
        return item


def length_grouped_order(
    lengths: np.ndarray, batch_size: int, seed: int, epoch: int, megabatches: int = 50
) -> np.ndarray:
    """A permutation in which each run of ``batch_size`` indices has similar lengths, batches in random order.

    Shuffle, sort by length inside windows of ``megabatches`` batches, cut into batches, shuffle the batches. The last
    partial batch stays last so every other batch is full and batch boundaries line up with the DataLoader's.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    window = batch_size * megabatches
    order = np.concatenate(
        [
            chunk[np.argsort(-lengths[chunk], kind="stable")]
            for chunk in np.split(order, range(window, len(order), window))
        ]
    )
    batches = np.split(order, range(batch_size, len(order), batch_size))
    tail = [batches.pop()] if len(batches[-1]) < batch_size else []
    return np.concatenate([batches[i] for i in rng.permutation(len(batches))] + tail)


class LengthGroupedSampler(Sampler[int]):
    """Seeded, epoch-aware length grouping.

    Give it the *global* batch size (per-device batch x world size): under several devices Lightning deals its
    indices out round-robin, so each device still gets a batch of similar lengths.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int) -> None:
        self.lengths, self.batch_size, self.seed, self.epoch = np.asarray(lengths), batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        return iter(length_grouped_order(self.lengths, self.batch_size, self.seed, self.epoch).tolist())


class SeededShuffleSampler(Sampler[int]):
    """A random order seeded by (seed, epoch), unlike DataLoader(shuffle=True): a resumed epoch gets the same order
    and can skip the batches it already used."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist())


class LengthSortedSampler(Sampler[int]):
    """Longest first: evaluation and prediction need no shuffling and waste less compute on padding."""

    def __init__(self, lengths: np.ndarray) -> None:
        self.order = np.argsort(-np.asarray(lengths), kind="stable")

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        return iter(self.order.tolist())


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
        max_length: int = 256,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pad_to_multiple_of: int | None = 8,
        group_by_length: bool = True,
        cache_dir: str | None = None,
        predict_path: str | None = None,
        predict_text_column: str | None = None,
        predict_id_column: str | None = "id",
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
            max_length: Texts are truncated to this many tokens.
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
        """
        super().__init__()
        if labels is not None and min_count is not None:
            raise ValueError("Set either `data.labels` or `data.min_count`, not both.")
        self.save_hyperparameters()
        self.splits: dict[str, TokenizedSplit] = {}
        self._label_names: list[str] | None = None

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
                table = self._read_source()
                self._label_names = select_labels(table["label"], min_count=self.hparams.min_count, source=self.source)
        return self._label_names

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def id2label(self) -> dict[int, str]:
        return label_maps(self.label_names)[0]

    def _read_source(self) -> pd.DataFrame:
        h = self.hparams
        if h.path:
            return read_table(h.path, h.text_column, h.label_column, order_column=h.split_by)
        return read_hub(h.dataset, h.text_column, h.label_column, order_column=h.split_by)

    def _source_fingerprint(self) -> str:
        if self.hparams.path:
            if not Path(self.hparams.path).is_file():
                raise DataError(f"Data file {self.hparams.path} does not exist.")
            return file_fingerprint(self.hparams.path)
        import datasets

        return datasets.load_dataset(self.hparams.dataset, split="train")._fingerprint

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
            "tokenizer": tokenizer_fingerprint(load_tokenizer(h.tokenizer)),
            "max_length": h.max_length,
        }
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
        return Path(h.cache_dir or default_cache_dir()) / key

    def prepare_data(self) -> None:
        """Read, select, split and tokenize once (rank 0 only); reused while inputs and tokenizer are unchanged."""
        if self._predicting_file():  # `predict` on a file of texts needs neither the labelled data nor its splits
            rows = prepare_predict_inputs(
                self.hparams.predict_path,
                self.predict_cache_path(),
                load_tokenizer(self.hparams.tokenizer),
                self.hparams.max_length,
                self.hparams.predict_text_column or self.hparams.text_column,
                self.hparams.predict_id_column,
            )
            rank_zero_info(f"{rows} texts to classify from {self.hparams.predict_path}")
            return
        folder = self.cache_path()
        if (folder / "meta.json").is_file():
            rank_zero_info(f"Reusing tokenized splits from {folder}")
            return
        h = self.hparams
        fractions = h.val_fraction, h.test_fraction
        source = self._read_source()
        if source.attrs.get("duplicates"):
            rank_zero_info(f"{self.source}: {source.attrs['duplicates']}")
        plan = plan_splits(
            source, h.labels, h.min_count, h.max_samples, *fractions, h.seed, self.source, split_by=h.split_by
        )
        names, table, label_ids, split_rows, keep = plan.names, plan.table, plan.label_ids, plan.rows, plan.kept

        tokenizer = load_tokenizer(h.tokenizer)
        texts, source_rows = table["text"].to_numpy(), table["row_id"].to_numpy()

        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        meta = {"labels": names, "source": str(self.source), "dropped_rows": int((~keep).sum()), "splits": {}}
        # Every row read is accounted for: rows_read = duplicate_rows + dropped_rows + subsampled out + split rows.
        meta.update(
            rows_read=source.attrs.get("rows_read", len(source)), duplicate_rows=source.attrs.get("duplicate_rows", 0)
        )
        for name, rows in split_rows.items():
            split = TokenizedSplit.from_texts(
                tokenizer, texts[rows].tolist(), h.max_length, label_ids[rows], source_rows[rows]
            )
            split.save(tmp, name)
            meta["splits"][name] = split_summary(split, names)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            tmp.rename(folder)  # atomic: a reader never sees a half-written cache
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process got there first with the same content
        rank_zero_info(
            f"Tokenized splits cached in {folder}: " + ", ".join(f"{k}={len(v)}" for k, v in split_rows.items())
        )

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and self.hparams.predict_path:
            tokens, offsets = load_predict_inputs(self.predict_cache_path())
            n = len(offsets) - 1
            # Row ids are positions in the file's texts: the prediction writer puts rows back in that order.
            self.splits = {"predict": TokenizedSplit(tokens, offsets, np.zeros(0, np.int64), np.arange(n))}
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

    # ------------------------------------------------------------------------------------------------ loaders
    @property
    def collator(self) -> PadCollator:
        return PadCollator(load_tokenizer(self.hparams.tokenizer).pad_token_id, self.hparams.pad_to_multiple_of)

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
                h.predict_path, load_tokenizer(h.tokenizer), h.max_length, text_column, h.predict_id_column
            )
            self._predict_folder = Path(h.cache_dir or default_cache_dir()) / key
        return self._predict_folder

    def predict_index(self) -> tuple[np.ndarray, Iterator[Any]]:
        """The row ids of the prediction inputs in input order, and their ids as the predictions show them (lazily).

        A file (`predict_path`): positions 0..N-1 and the file's ids. The test split: its rows in data file order, each
        identified by its 0-based row in the data file.
        """
        if self.hparams.predict_path:
            return np.arange(len(self.splits["predict"])), iter_predict_ids(self.predict_cache_path())
        row_ids = np.sort(np.asarray(self.splits["test"].row_ids))
        return row_ids, iter(row_ids.tolist())


def split_summary(split: TokenizedSplit, names: list[str]) -> dict:
    """Row count, label distribution and token length statistics of a split (the training split's summary is the
    reference that monitoring compares live traffic with; its format belongs to `export_format`)."""
    return SplitReference.of(split.labels, split.lengths, names).to_dict()
