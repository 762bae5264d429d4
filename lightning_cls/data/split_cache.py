"""The cache of the tokenized splits: the key that names its folder, the splits written into it (each text truncated,
or read as windows with its window count and whether the cap cut it), its `meta.json`, and what `predict` on a split
reports per text. The files' format is `token_cache`'s; what the splits hold is `splits`'.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from lightning.pytorch.utilities import rank_zero_info
from transformers import PreTrainedTokenizerBase

from lightning_cls.atomic import atomic_folder
from lightning_cls.data.feedback import FeedbackRows, FeedbackSummary
from lightning_cls.data.sources import LabelledSource
from lightning_cls.data.split_reference import SplitReference
from lightning_cls.data.splits import SplitPlan
from lightning_cls.data.token_cache import TokenizedSplit, file_fingerprint
from lightning_cls.data.tokenization import load_tokenizer, tokenize, tokenizer_fingerprint
from lightning_cls.data.windows import WindowedTexts, WindowSpec

# Bump when the meaning of the cached splits changes (their file format has its own version, in token_cache).
CACHE_VERSION = 2  # 2: duplicate texts dropped, labels stripped, stricter file reading
SPLITS = ("train", "val", "test")
# Per text of a split read as windows: its row id, windows read, and whether the window cap cut it.
TEXTS_DTYPE = np.dtype([("row_id", "<i8"), ("windows", "<i4"), ("cut", "?")])


def default_cache_dir() -> Path:
    return Path(os.environ.get("LIGHTNING_CLS_CACHE", Path.home() / ".cache" / "lightning_cls"))


def cache_spec(settings: Mapping[str, Any], source: LabelledSource, feedback: FeedbackRows | None) -> dict:
    """What the cached splits depend on (`token_cache.cache_key` names the folder from it): the source's and the
    tokenizer's fingerprints, the feedback rows read, and the data module's settings that change the splits.

    An entry added by a later version is absent while its setting is unset, so that older caches stay valid."""
    h = settings
    return {
        "version": CACHE_VERSION,
        "source": source.fingerprint(),
        "columns": [h["text_column"], h["label_column"]],
        "labels": h["labels"],
        "min_count": h["min_count"],
        "max_samples": h["max_samples"],
        "fractions": [h["val_fraction"], h["test_fraction"]],
        "seed": h["seed"],
        **({"split_by": h["split_by"]} if h["split_by"] else {}),
        **(
            {
                "multi_label": [h["multi_label"], h["label_separator"], h["arxiv_subjects"]],
                "joined": [file_fingerprint(h["labels_path"]), h["join_column"]] if h["labels_path"] else None,
                "title": h["title_column"],
            }
            if h.get("multi_label") or h.get("labels_path") or h.get("title_column")
            else {}
        ),
        "tokenizer": tokenizer_fingerprint(load_tokenizer(h["tokenizer"])),
        "max_length": h["max_length"],
        **({"feedback": [feedback.fingerprint(), feedback.drop_unknown]} if feedback is not None else {}),
        **({"windows": [h["max_windows"], h["window_stride"]]} if h["max_windows"] > 1 else {}),
    }


def cache_meta(plan: SplitPlan, source: str, table: pd.DataFrame, feedback: dict | None) -> dict[str, Any]:
    """The head of `meta.json` (`write_splits` adds each split's summary): the labels, where the rows came from and
    what became of them. Every row read is accounted for: rows_read = duplicate_rows + dropped_rows + subsampled
    out + split rows (less feedback.added: the feedback rows in the training split, `feedback.FeedbackSummary`)."""
    meta = {"labels": plan.names, "source": source, "dropped_rows": int((~plan.kept).sum()), "splits": {}}
    meta.update(rows_read=table.attrs.get("rows_read", len(table)), duplicate_rows=table.attrs.get("duplicate_rows", 0))
    if feedback is not None:
        meta["feedback"] = feedback
    return meta


def reuse_cache(folder: Path) -> bool:
    """Whether the splits are cached in ``folder`` already (its `meta.json` is written last); if so, says so in the
    log with the feedback they hold: the same rows as when the cache was made, since its key hashes them."""
    if not (folder / "meta.json").is_file():
        return False
    rank_zero_info(f"Reusing tokenized splits from {folder}")
    feedback = json.loads((folder / "meta.json").read_text()).get("feedback")
    if feedback:
        rank_zero_info(FeedbackSummary(**feedback).line())
    return True


def write_splits(
    folder: Path, plan: SplitPlan, tokenizer: PreTrainedTokenizerBase, windows: WindowSpec, meta: dict
) -> None:
    """Tokenize each split of ``plan`` into ``folder``, with `meta.json` (``meta`` and each split's summary), written
    atomically: a reader never sees a half-written cache."""
    names, label_ids = plan.names, plan.label_ids
    texts, source_rows = plan.table["text"].to_numpy(), plan.table["row_id"].to_numpy()
    with atomic_folder(folder, exist_ok=True) as tmp:
        for name, rows in plan.rows.items():
            text_chunks = (texts[part].tolist() for part in _chunks(rows))
            if windows.max_windows == 1:
                chunks = (tokenize(tokenizer, chunk, windows.max_length) for chunk in text_chunks)
                split = TokenizedSplit.write(tmp, name, chunks, label_ids[rows], source_rows[rows])
                meta["splits"][name] = split_summary(split, names)
                continue
            # One row per window, each with its text's label and row id (the row id says which text it is).
            windowed = WindowedTexts(tokenizer, windows)
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
    rank_zero_info(f"Tokenized splits cached in {folder}: " + ", ".join(f"{k}={len(v)}" for k, v in plan.rows.items()))


def split_index(
    folder: Path, name: str, split: TokenizedSplit, windowed: bool
) -> tuple[np.ndarray, Iterator[Any], tuple[np.ndarray, np.ndarray] | None]:
    """A cached split's texts as `predict` reports them: their row ids in data file order (each identified by its
    0-based row in the data file) and, for texts read as windows, each text's window count and cut flag."""
    if not windowed:
        row_ids = np.sort(np.asarray(split.row_ids))
        return row_ids, iter(row_ids.tolist()), None
    texts = np.load(folder / f"{name}.texts.npy")  # per text, in row id order: row id, windows, cut
    return texts["row_id"], iter(texts["row_id"].tolist()), (texts["windows"], texts["cut"])


def split_summary(split: TokenizedSplit, names: list[str]) -> dict:
    """Row count, label distribution and token length statistics of a split (the training split's summary is the
    reference that monitoring compares live traffic with; its format belongs to `export.folder`)."""
    return SplitReference.of(split.labels, split.lengths, names).to_dict()


def _chunks(rows: np.ndarray, size: int = 4096) -> list[np.ndarray]:
    """Tokenizing a few thousand texts at a time keeps memory small: the tokenizer's per-text objects (tokens,
    offsets) for a whole data set would take gigabytes, one chunk's a few megabytes."""
    return [rows[start : start + size] for start in range(0, len(rows), size)]
