"""The prediction writer: one row per input, in input order, to CSV or JSONL, from any number of devices.

Each rank streams its predictions (row id and logits: fixed-size binary records, one per text, or one per window
of a text read as windows) to its own part file while `predict` runs longest-first. At the end rank 0 adds every
record into its input position of a memory-mapped array, checks that each row got exactly its number of records,
takes each row's mean logits (`lightning_cls.data.windows`: a text's answer is the mean of its windows'), and writes the
file in input order, chunk by chunk, with the inputs' ids. Nothing is held in memory for the whole input but a
count and a row id per row.
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
from lightning_cls.model.lexical_evidence import with_lexical_evidence
from lightning_cls.task import Task

OUTPUT_SUFFIXES = (".csv", ".jsonl")
CHUNK_ROWS = 65_536
WINDOW_COLUMNS = ("windows", "truncated")
EXPLAIN_KINDS = (None, "lexical")  # network occlusion needs the exported runtime (`export.explain`), not Lightning


def record_dtype(num_labels: int) -> np.dtype:
    """One prediction: the input's row id and the logits of one text (or of one window of a long text)."""
    return np.dtype([("row_id", "<i8"), ("logits", "<f4", (num_labels,))])


def logit_records(row_ids: Sequence[int] | torch.Tensor, logits: torch.Tensor) -> np.ndarray:
    """The records of a batch of logits (B, num_labels)."""
    records = np.empty(len(logits), dtype=record_dtype(logits.shape[-1]))
    records["row_id"] = torch.as_tensor(row_ids).cpu().numpy()
    records["logits"] = logits.float().cpu().numpy()
    return records


def merge_in_input_order(
    parts: Iterable[Path], row_ids: np.ndarray, num_labels: int, scratch: Path, windows: np.ndarray | None = None
) -> np.ndarray:
    """Each input's mean logits over its records (its windows; one record for a text read whole), at its input
    position, memory-mapped at ``scratch``; each row checked to have exactly its number of records.

    ``row_ids``: the inputs' row ids in input order (ascending); ``windows``: records expected per row (default 1).
    The mean does not depend on which device or batch a window was in. Raises ``RuntimeError`` naming lost,
    duplicated or unknown rows.
    """
    dtype = record_dtype(num_labels)
    n = len(row_ids)
    sums = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.float64, shape=(n, num_labels))
    seen = np.zeros(n, dtype=np.int64)
    for part in parts:
        records = np.memmap(part, dtype=dtype, mode="r") if part.stat().st_size else np.zeros(0, dtype)
        for start in range(0, len(records), CHUNK_ROWS):
            chunk = records[start : start + CHUNK_ROWS]
            position = np.minimum(np.searchsorted(row_ids, chunk["row_id"]), max(n - 1, 0))
            unknown = chunk["row_id"][row_ids[position] != chunk["row_id"]] if n else chunk["row_id"]
            if len(unknown):
                raise RuntimeError(f"{part}: predictions for rows that are not in the input: {unknown[:10].tolist()}")
            np.add.at(seen, position, 1)
            np.add.at(sums, position, chunk["logits"].astype(np.float64))
    expected = np.ones(n, dtype=np.int64) if windows is None else np.asarray(windows, dtype=np.int64)
    lost, duplicated = np.flatnonzero(seen < expected), np.flatnonzero(seen > expected)
    if len(lost) or len(duplicated):
        raise RuntimeError(
            f"Predictions do not cover the input once: {len(lost)} row(s) lost (row ids {row_ids[lost][:10].tolist()}),"
            f" {len(duplicated)} duplicated (row ids {row_ids[duplicated][:10].tolist()})."
        )
    for start in range(0, n, CHUNK_ROWS):
        sums[start : start + CHUNK_ROWS] /= expected[start : start + CHUNK_ROWS, None]
    sums.flush()
    return sums


def prediction_rows(
    mean_logits: np.ndarray,
    ids: Iterator[Any],
    task: Task,
    k: int,
    windows: tuple[np.ndarray, np.ndarray] | None = None,
) -> Iterator[dict[str, Any]]:
    """Readable rows (id, label, probability, top_k; with ``windows`` = (counts, cut) also `windows` and
    `truncated`) of mean logits in input order, read in chunks; probabilities and decisions are the task's
    (`lightning_cls.task`: the calibrated softmax, or each label's sigmoid).

    A label-set task's rows also have `labels`: the label set (every label whose probability reaches its threshold,
    the most probable one if none does), most probable first, with `scores`, their probabilities; `label` is the
    set's first."""
    for start in range(0, len(mean_logits), CHUNK_ROWS):
        logits = torch.from_numpy(np.asarray(mean_logits[start : start + CHUNK_ROWS]))
        probs, decided = task.answer(logits)
        sets = task.labels_of(decided, probs) if task.multi_label else None
        top_probs, top_ids = probs.topk(k, dim=-1)  # most probable first
        chunk_ids = list(islice(ids, len(probs)))
        if len(chunk_ids) != len(probs):
            raise RuntimeError(f"The inputs have fewer ids ({start + len(chunk_ids)}) than predictions.")
        for i, (id_, class_ids, p) in enumerate(zip(chunk_ids, top_ids.tolist(), top_probs.tolist(), strict=True)):
            top = [{"label": task.names[c], "probability": round(q, 6)} for c, q in zip(class_ids, p, strict=True)]
            row = {"id": id_, "label": top[0]["label"], "probability": top[0]["probability"], "top_k": top}
            if sets is not None:
                row["labels"] = sets[i]
                row["scores"] = [round(float(probs[i, task.names.index(n)]), 6) for n in sets[i]]
                row["label"], row["probability"] = row["labels"][0], row["scores"][0]  # the set's most probable
            if windows is not None:
                row.update(windows=int(windows[0][start + i]), truncated=bool(windows[1][start + i]))
            yield row


def write_rows(
    rows: Iterable[dict[str, Any]],
    path: Path,
    k: int,
    windows: bool = False,
    label_sets: bool = False,
    evidence: bool = False,
) -> int:
    """Write rows to ``path`` as JSONL (one object per row) or CSV (``id, label, probability, label_2,
    probability_2, ...``, then ``windows, truncated`` when texts were read as windows, then ``labels`` (the label
    set, joined by "; ") for a multi-label model, then ``evidence`` (its JSON) when asked), atomically; returns the
    number of rows."""
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
                names = [f"{c}_{i}" for i in range(2, k + 1) for c in ("label", "probability")]
                extra = WINDOW_COLUMNS if windows else ()
                tail = [*(["labels"] if label_sets else []), *(["evidence"] if evidence else [])]
                writer.writerow(["id", "label", "probability", *names, *extra, *tail])
                for row in rows:
                    rest = [v for t in row["top_k"][1:] for v in (t["label"], t["probability"])]
                    sets = ["; ".join(row["labels"])] if label_sets else []
                    why = [json.dumps(row["evidence"], ensure_ascii=False)] if evidence else []
                    writer.writerow(
                        [row["id"], row["label"], row["probability"], *rest, *(row[c] for c in extra), *sets, *why]
                    )
                    count += 1
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write leaves nothing behind (and never a file under the final name)
        raise
    tmp.replace(path)
    return count


def texts_in_order(datamodule: Any, row_ids: np.ndarray) -> list[str]:
    """The raw texts of the prediction inputs with these row ids, in this order (what the lexical expert reads)."""
    if datamodule is None or not hasattr(datamodule, "split_texts"):
        raise ConfigError("--prediction_writer.explain needs the data module's texts (predict with --data ...).")
    ids, texts, _ = datamodule.split_texts("predict")
    order = np.argsort(ids, kind="stable")
    return [texts[i] for i in order[np.searchsorted(np.asarray(ids)[order], row_ids)]]


class PredictionWriter(BasePredictionWriter):
    """Writes `predict`'s output, one row per input in input order, to a CSV or JSONL file."""

    def __init__(self, output_path: str | None = None, top_k: int = 3, explain: str | None = None) -> None:
        """
        Args:
            output_path: The predictions file, `.csv` or `.jsonl` (default: predictions.csv in the run's log folder).
                Each row: the input's id (its `id` column, else its line or row number), the predicted label, its
                probability, and the next most probable labels with their probabilities.
            top_k: How many of the most probable labels each row lists (at most the number of labels).
            explain: `lexical`: also write each row's evidence (a checkpoint that fuses a lexical expert only): for
                each label the row shows, the n-grams that pushed it up and by how much of its fused logit, as
                POST /predict's "explain" gives them (JSONL: an `evidence` object; CSV: an `evidence` column of JSON).
        """
        super().__init__(write_interval="batch")
        if top_k < 1:
            raise ConfigError(f"prediction_writer.top_k must be at least 1, got {top_k}.")
        if output_path is not None and Path(output_path).suffix.lower() not in OUTPUT_SUFFIXES:
            raise ConfigError(f"prediction_writer.output_path {output_path!r} must end in .csv or .jsonl.")
        if explain not in EXPLAIN_KINDS:
            raise ConfigError(
                f"prediction_writer.explain must be one of {[k for k in EXPLAIN_KINDS if k]} or null, got {explain!r} "
                '(network occlusion runs on an exported model: POST /predict with "explain": "network").'
            )
        self.output_path, self.top_k, self.explain = output_path, top_k, explain
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

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Checked here, not in `setup`: the checkpoint (and the expert it holds) is restored between the two.
        if self.explain == "lexical" and pl_module.lexical is None:
            self._close()
            shutil.rmtree(self.parts, ignore_errors=True)
            raise ConfigError(
                "--prediction_writer.explain lexical: this checkpoint fuses no lexical expert, so there are no "
                "n-gram shares to write (fit or calibrate it with --model.lexical true, or leave the option out)."
            )

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
        self._file.write(logit_records(prediction["row_id"], prediction["logits"]).tobytes())

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()
        trainer.strategy.barrier("prediction_writer")  # every rank's part file is complete
        if not trainer.is_global_zero:
            return
        index = getattr(trainer.datamodule, "predict_index", None)
        parts = [self.parts / f"rank{r}.bin" for r in range(trainer.world_size)]
        num_labels, windows = len(pl_module.label_names), None
        if index is not None:
            row_ids, ids, windows = index()
        else:  # dataloaders passed by hand: the row ids are all we know
            records = [np.fromfile(p, dtype=record_dtype(num_labels))["row_id"] for p in parts]
            row_ids = np.unique(np.concatenate(records))
            ids = iter(row_ids.tolist())
        counts = windows[0] if windows is not None else None
        merged = merge_in_input_order(parts, np.asarray(row_ids), num_labels, self.parts / "merged.npy", counts)
        task = pl_module.task  # label sets at their thresholds (0.5 if none fitted), or the calibrated softmax
        rows = prediction_rows(merged, ids, task, self.k, windows)
        if self.explain == "lexical":
            texts = texts_in_order(trainer.datamodule, np.asarray(row_ids))
            rows = with_lexical_evidence(rows, texts, pl_module.lexical, pl_module.lexical_weight, task.names)
        count = write_rows(rows, self.path, self.k, windows is not None, task.multi_label, self.explain is not None)
        del merged
        shutil.rmtree(self.parts, ignore_errors=True)
        rank_zero_info(f"Wrote {count} predictions to {self.path}")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
