"""The one answer path of an exported folder: texts -> windows -> runtime -> mean over windows -> fusion -> the
task's probabilities and decision.

    model = ExportedModel.load("outputs/model")            # fp32 torch; or settings=InferenceSettings(...)
    answers = model.answer(["An abstract ...", ...])
    answers.probs, answers.decided, model.task.labels_of(answers.decided, answers.probs)

`serve` (each deployed model), `compare`, the variant measurements of `export` and the benchmarks answer through
this class; `predict` on a checkpoint shares the task's probabilities and decision with it (`lightning_cls.task`).
Each part is read from the folder: the tokenizer, the windows (`max_windows`, `window_stride`), the runtime
(`lightning_cls.export.runtime.Runner`: backend and precision), the lexical expert and its weight, and the task
(temperature or thresholds).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_cls.data.tokenization import load_tokenizer
from lightning_cls.data.windows import Windows, WindowSpec, mean_logits_per_text, window_token_ids
from lightning_cls.errors import ExportError
from lightning_cls.export.folder import STUDENT_DIR, ExportMetadata, read_export_metadata
from lightning_cls.export.runtime import Choice, InferenceSettings, Runner, choose
from lightning_cls.hardware import detect_hardware
from lightning_cls.model.fusion import FolderFusion, fuse
from lightning_cls.task import Task

# Texts per pass through the path: bounds the memory of one call's tokenized windows (the runner plans its own
# forward passes inside each chunk, by tokens).
CHUNK = 1024


@dataclass
class Answers:
    """A model's answers to a list of texts, in their order."""

    logits: torch.Tensor  # (N, C) float32: each text's windows' mean logits, the lexical expert fused in
    probs: torch.Tensor  # (N, C) float32: the task's probabilities (calibrated softmax, or each label's sigmoid)
    decided: np.ndarray  # (N,) class ids, or (N, C) multi-hot label sets
    tokens: np.ndarray  # (N,) tokens read, special tokens included
    windows: np.ndarray  # (N,) windows read
    cut: np.ndarray  # (N,) bool: the text was longer than what was read


def student_choice(
    settings: InferenceSettings | None, meta: ExportMetadata, model_dir: str | Path, device: str | torch.device
) -> Choice | None:
    """`auto`'s choice when it takes the folder's distilled student (`runtime.choose` with students), else None."""
    if settings is None or settings.precision != "auto":
        return None
    choice = choose(settings, detect_hardware(torch.device(device)), meta.inference, model_dir, students=True)
    return choice if choice.student else None


def check_student(teacher: ExportMetadata, student: ExportMetadata, folder: Path) -> None:
    """A student answers for its teacher only with the same labels, in the same order, and the same task."""
    if list(student.labels) != list(teacher.labels) or student.multi_label != teacher.multi_label:
        raise ExportError(
            f"{folder}: the student answers {list(student.labels)} "
            f"({'label sets' if student.multi_label else 'one label'}), its teacher {list(teacher.labels)} "
            f"({'label sets' if teacher.multi_label else 'one label'}): distill it from this teacher."
        )


class ExportedModel:
    """An exported folder, loaded: `answer(texts)` answers them as every caller of the folder does."""

    def __init__(
        self,
        model_dir: str | Path,
        runner: Runner,
        task: Task,
        windows: WindowSpec,
        fusion: FolderFusion | None,
    ) -> None:
        self.model_dir, self.runner, self.task, self.windows, self.fusion = (
            Path(model_dir),
            runner,
            task,
            windows,
            fusion,
        )
        self.tokenizer = runner.tokenizer
        self.special_tokens = self.tokenizer.num_special_tokens_to_add()
        self.windows.step(self.tokenizer)  # a stride longer than a window fails here, at load, not per request

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        settings: InferenceSettings | None = None,
        device: str | torch.device = "cpu",
        *,
        max_windows: int | None = None,
        window_stride: int | None = None,
        use_temperature: bool = True,
        metadata: ExportMetadata | None = None,
        tokenizer: Any = None,
        fusion: FolderFusion | bool | None = True,
    ) -> ExportedModel:
        """The folder with the runtime `settings` say (default: torch fp32). `max_windows` / `window_stride`
        override the folder's; `fusion` an already loaded expert (None: none; True: the folder's). With precision
        `auto`, the folder's distilled student (`STUDENT_DIR`) when it is the fastest variant that passes the gate:
        the student's own folder, whole (weights, tokenizer, windows, fusion, calibration), in torch fp32."""
        meta = metadata or read_export_metadata(model_dir)
        # Nothing given that is the folder's own (an expert, a tokenizer): the student brings its own.
        taken = student_choice(settings, meta, model_dir, device) if fusion is True and tokenizer is None else None
        if taken is not None:
            folder = Path(model_dir) / STUDENT_DIR
            check_student(meta, read_export_metadata(folder), folder)
            fp32 = dataclasses.replace(settings, precision="fp32", backend="torch")
            student = cls.load(
                folder,
                fp32,
                device,
                max_windows=max_windows,
                window_stride=window_stride,
                use_temperature=use_temperature,
            )
            student.runner.choice = taken  # what runs and why, as the log and /info say it: auto took the student
            return student
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(str(model_dir))
        settings = settings or InferenceSettings(precision="fp32", backend="torch")
        runner = Runner(model_dir, settings, device=device, tokenizer=tokenizer, metadata=meta)
        spec = WindowSpec(
            int(meta.max_length),
            int(max_windows if max_windows is not None else meta.max_windows or 1),
            window_stride if window_stride is not None else meta.window_stride,
        )
        if fusion is True:  # a folder that fuses a lexical expert (`lexical`): checked and loaded here, or refused
            fusion = FolderFusion.from_folder(model_dir, meta)
        return cls(model_dir, runner, meta.task(use_temperature), spec, fusion or None)

    def with_runner(self, runner: Runner) -> ExportedModel:
        """The same folder answered by another runtime (a precision or backend), all else shared."""
        return ExportedModel(self.model_dir, runner, self.task, self.windows, self.fusion)

    def with_windows(self, windows: WindowSpec) -> ExportedModel:
        """The same folder read with other windows (a window size, count or stride), all else shared."""
        return ExportedModel(self.model_dir, self.runner, self.task, windows, self.fusion)

    def with_temperature(self, temperature: float | None) -> None:
        """Answer under another temperature (serve's --temperature for the folder it was started with); not a label
        set's: its thresholds were fitted on the probabilities its own temperature gives."""
        if not self.task.multi_label:
            self.task = dataclasses.replace(self.task, temperature=temperature)

    @property
    def names(self) -> tuple[str, ...]:
        return self.task.names

    def network_logits(self, texts: Sequence[str]) -> tuple[torch.Tensor, Windows]:
        """Each text's mean logits over its windows (N, C), the network alone, and the windows read."""
        windows = window_token_ids(self.tokenizer, list(texts), self.windows)
        # The windows of every text run together; each text's answer is its windows' mean.
        logits = mean_logits_per_text(self.runner.logits(windows.input_ids), windows.text_index, windows.num_texts)
        return logits, windows

    def lexical_scores(self, texts: Sequence[str]) -> np.ndarray | None:
        """The lexical expert's logits of the texts (None: the folder fuses none)."""
        return None if self.fusion is None else self.fusion.expert.scores(list(texts))

    def answer(self, texts: Sequence[str], lexical: np.ndarray | None = None) -> Answers:
        """The answers to `texts`, in CHUNKs. `lexical`: the expert's logits of the same texts, if already scored
        (the variant measurements score them once for every runtime)."""
        texts = list(texts)
        parts = [self._answer(texts[i : i + CHUNK], lexical, i) for i in range(0, len(texts), CHUNK)]
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return self._answer([], lexical, 0)
        return Answers(
            *(torch.cat([getattr(p, f) for p in parts]) for f in ("logits", "probs")),
            *(np.concatenate([getattr(p, f) for p in parts]) for f in ("decided", "tokens", "windows", "cut")),
        )

    def _answer(self, texts: list[str], lexical: np.ndarray | None, start: int) -> Answers:
        if not texts:
            empty = torch.zeros(0, self.task.num_labels)
            probs, decided = self.task.answer(empty)
            none = np.zeros(0, dtype=np.int64)
            return Answers(empty, probs, decided, none, none, none.astype(bool))
        logits, windows = self.network_logits(texts)
        if self.fusion is not None:  # plus the lexical expert's logits of the whole texts, times its weight
            scores = lexical[start : start + len(texts)] if lexical is not None else self.lexical_scores(texts)
            logits = fuse(logits, scores, self.fusion.weight)
        probs, decided = self.task.answer(logits)
        return Answers(
            logits, probs, decided, windows.tokens + self.special_tokens, windows.counts, windows.cut.astype(bool)
        )
