"""The prediction writer: one row per input, in input order, to CSV or JSONL, from any number of devices.

Each rank streams its predictions (row id, top-k class ids and probabilities: fixed-size binary records) to its own
part file while `predict` runs longest-first. At the end rank 0 places every record at its input position in a
memory-mapped array, checks that each row came exactly once, and writes the file in input order, chunk by chunk,
with the inputs' ids. Nothing is held in memory for the whole input but one byte and one row id per row.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from lightning_cls.errors import ConfigError

OUTPUT_SUFFIXES = (".csv", ".jsonl")
CHUNK_ROWS = 65_536


def record_dtype(k: int) -> np.dtype:
    """One prediction: the input's row id, then the k most probable class ids and their probabilities."""
    return np.dtype([("row_id", "<i8"), ("class_ids", "<i4", (k,)), ("probs", "<f4", (k,))])


def top_k_records(row_ids: Sequence[int] | torch.Tensor, probs: torch.Tensor, k: int) -> np.ndarray:
    """The records of a batch of class probabilities (B, num_labels)."""
    top_probs, top_ids = probs.float().topk(k, dim=-1)  # (B, k) each, most probable first
    records = np.empty(len(top_ids), dtype=record_dtype(k))
    records["row_id"] = torch.as_tensor(row_ids).cpu().numpy()
    records["class_ids"] = top_ids.cpu().numpy()
    records["probs"] = top_probs.cpu().numpy()
    return records


def merge_in_input_order(parts: Iterable[Path], row_ids: np.ndarray, k: int, scratch: Path) -> np.ndarray:
    """All parts' records at their input position (memory-mapped at ``scratch``), each row checked to come once.

    ``row_ids``: the inputs' row ids in input order (ascending). Raises ``RuntimeError`` naming lost, duplicated or
    unknown rows.
    """
    dtype = record_dtype(k)
    n = len(row_ids)
    merged = np.lib.format.open_memmap(scratch, mode="w+", dtype=dtype, shape=(n,))
    seen = np.zeros(n, dtype=np.uint8)
    for part in parts:
        records = np.memmap(part, dtype=dtype, mode="r") if part.stat().st_size else np.zeros(0, dtype)
        for start in range(0, len(records), CHUNK_ROWS):
            chunk = records[start : start + CHUNK_ROWS]
            position = np.minimum(np.searchsorted(row_ids, chunk["row_id"]), max(n - 1, 0))
            unknown = chunk["row_id"][row_ids[position] != chunk["row_id"]] if n else chunk["row_id"]
            if len(unknown):
                raise RuntimeError(f"{part}: predictions for rows that are not in the input: {unknown[:10].tolist()}")
            np.add.at(seen, position, 1)
            merged[position] = chunk
    lost, duplicated = np.flatnonzero(seen == 0), np.flatnonzero(seen > 1)
    if len(lost) or len(duplicated):
        raise RuntimeError(
            f"Predictions do not cover the input once: {len(lost)} row(s) lost (row ids {row_ids[lost][:10].tolist()}),"
            f" {len(duplicated)} duplicated (row ids {row_ids[duplicated][:10].tolist()})."
        )
    merged.flush()
    return merged


def prediction_rows(records: np.ndarray, ids: Iterator[Any], label_names: list[str]) -> Iterator[dict[str, Any]]:
    """Readable rows (id, label, probability, top_k) of records in input order, read in chunks."""
    for start in range(0, len(records), CHUNK_ROWS):
        chunk = records[start : start + CHUNK_ROWS]
        chunk_ids = list(islice(ids, len(chunk)))
        if len(chunk_ids) != len(chunk):
            raise RuntimeError(f"The inputs have fewer ids ({start + len(chunk_ids)}) than predictions.")
        for id_, class_ids, probs in zip(chunk_ids, chunk["class_ids"].tolist(), chunk["probs"].tolist(), strict=True):
            top = [{"label": label_names[c], "probability": round(p, 6)} for c, p in zip(class_ids, probs, strict=True)]
            yield {"id": id_, "label": top[0]["label"], "probability": top[0]["probability"], "top_k": top}


def write_rows(rows: Iterable[dict[str, Any]], path: Path, k: int) -> int:
    """Write rows to ``path`` as JSONL (one object per row) or CSV (``id, label, probability, label_2,
    probability_2, ...``), atomically; returns the number of rows."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    count = 0
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            if path.suffix.lower() == ".jsonl":
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    count += 1
            else:
                writer = csv.writer(f)
                names = (f"{c}_{i}" for i in range(2, k + 1) for c in ("label", "probability"))
                writer.writerow(["id", "label", "probability", *names])
                for row in rows:
                    rest = [v for t in row["top_k"][1:] for v in (t["label"], t["probability"])]
                    writer.writerow([row["id"], row["label"], row["probability"], *rest])
                    count += 1
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write leaves nothing behind (and never a file under the final name)
        raise
    tmp.replace(path)
    return count


class PredictionWriter(BasePredictionWriter):
    """Writes `predict`'s output, one row per input in input order, to a CSV or JSONL file."""

    def __init__(self, output_path: str | None = None, top_k: int = 3) -> None:
        """
        Args:
            output_path: The predictions file, `.csv` or `.jsonl` (default: predictions.csv in the run's log folder).
                Each row: the input's id (its `id` column, else its line or row number), the predicted label, its
                probability, and the next most probable labels with their probabilities.
            top_k: How many of the most probable labels each row lists (at most the number of labels).
        """
        super().__init__(write_interval="batch")
        if top_k < 1:
            raise ConfigError(f"prediction_writer.top_k must be at least 1, got {top_k}.")
        if output_path is not None and Path(output_path).suffix.lower() not in OUTPUT_SUFFIXES:
            raise ConfigError(f"prediction_writer.output_path {output_path!r} must end in .csv or .jsonl.")
        self.output_path, self.top_k = output_path, top_k
        self._file = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        log_dir = trainer.log_dir  # a broadcast: every rank asks, and all agree on the folder
        self.path = Path(self.output_path) if self.output_path else Path(log_dir or ".") / "predictions.csv"
        self.k = min(self.top_k, len(pl_module.label_names))
        self.parts = self.path.with_name(f".{self.path.name}.parts")
        self.parts.mkdir(parents=True, exist_ok=True)
        self._file = open(self.parts / f"rank{trainer.global_rank}.bin", "wb")  # noqa: SIM115 (open until predict ends)

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: dict[str, Any],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        self._file.write(top_k_records(prediction["row_id"], prediction["probs"], self.k).tobytes())

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()
        trainer.strategy.barrier("prediction_writer")  # every rank's part file is complete
        if not trainer.is_global_zero:
            return
        index = getattr(trainer.datamodule, "predict_index", None)
        parts = [self.parts / f"rank{r}.bin" for r in range(trainer.world_size)]
        if index is not None:
            row_ids, ids = index()
        else:  # dataloaders passed by hand: the row ids are all we know
            row_ids = np.unique(np.concatenate([np.fromfile(p, dtype=record_dtype(self.k))["row_id"] for p in parts]))
            ids = iter(row_ids.tolist())
        merged = merge_in_input_order(parts, np.asarray(row_ids), self.k, self.parts / "merged.npy")
        count = write_rows(prediction_rows(merged, ids, pl_module.label_names), self.path, self.k)
        del merged
        shutil.rmtree(self.parts, ignore_errors=True)
        rank_zero_info(f"Wrote {count} predictions to {self.path}")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
