"""The LitAPI, run in the inference worker process(es): tokenizes, runs the exported model, answers top-k.

Dynamic batching: the worker collects up to `max_batch_size` requests within `batch_timeout` seconds; `batch`
flattens their texts, `predict` runs them (`inference.Runner`: the chosen backend and precision, longest first, at
most `max_batch_tokens` tokens per forward pass), `unbatch` gives each
request its answers back. A text longer than the model's window is read as up to `max_windows` overlapping
windows (`lightning_cls.windows`; 1: truncated), the windows of all texts batched together, and answered with the
mean of its windows' logits (plus the lexical expert's, times its weight, when the export fuses one:
`lightning_cls.fusion`), divided by the export's temperature when it has one (calibrated probabilities). Each
answer has a `prediction_id`, the key of POST /feedback. Each batch is sent to the logger process
(`metrics.MonitoringLogger`) with `self.log`, which stores its predictions and updates the metrics.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass

import litserve as ls
import torch

from lightning_cls.fusion import FolderFusion
from lightning_cls.inference import InferenceSettings, Runner
from lightning_cls.serving.http import PREDICT_PATH
from lightning_cls.serving.prediction_log import IdIssuer
from lightning_cls.tokenization import load_tokenizer
from lightning_cls.windows import WindowSpec, mean_logits_per_text, window_token_ids

log = logging.getLogger(__name__)


@dataclass
class TextBatch:
    """The texts of several requests, flattened, and how to give each request its answers back."""

    texts: list[str]
    sizes: list[int]  # texts per request
    top_ks: list[int]  # top-k per request


class ClassifierAPI(ls.LitAPI):
    """Tokenizes, runs the exported classifier in fp32 under `torch.inference_mode`, answers top-k.

    ``temperature``: answer softmax(logits / temperature), the calibrated probabilities (None: the plain softmax).
    ``min_confidence``: an answer whose probability is below it says ``"abstained": true`` (and keeps its label).
    ``id_key``: the feedback database's key for prediction ids (`FeedbackStore.id_key`).
    """

    def __init__(
        self,
        model_dir: str,
        max_length: int,
        max_batch_size: int = 16,
        batch_timeout: float = 0.002,
        inference: InferenceSettings | None = None,
        num_threads: int | None = None,
        max_windows: int = 1,
        window_stride: int | None = None,
        temperature: float | None = None,
        min_confidence: float | None = None,
        id_key: bytes | None = None,
    ) -> None:
        with warnings.catch_warnings():  # LitServe warns when batch/unbatch exist but max_batch_size is 1: fine here
            warnings.simplefilter("ignore", UserWarning)
            super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=PREDICT_PATH)
        self.model_dir, self.max_length = str(model_dir), max_length
        self.inference, self.num_threads = inference or InferenceSettings(), num_threads
        self.max_windows, self.window_stride = max_windows, window_stride
        # softmax(logits / temperature): the calibrated probabilities (None: the plain softmax, T = 1).
        self.temperature, self.min_confidence = temperature, min_confidence
        # Ids POST /feedback can recognise as this database's (`prediction_log.IdIssuer`; None: a key of its own).
        self.ids = IdIssuer(id_key)

    def setup(self, device: str) -> None:
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        self.device_name = device
        # transformers' loading bar (tqdm) makes a multiprocessing lock in this process, which LitServe ends with
        # SIGTERM at a stop: the lock is never released, and Python warns of a leaked semaphore. No bar, no lock.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.tokenizer = load_tokenizer(self.model_dir)
        # The backend (torch or ONNX Runtime) and precision, chosen once (`lightning_cls.inference`).
        self.runner = Runner(self.model_dir, self.inference, device=device, tokenizer=self.tokenizer)
        log.info(self.runner.describe())
        # A folder that fuses a lexical expert (lightning_cls.json `lexical`): checked and loaded here, or refused.
        self.fusion = FolderFusion.from_folder(self.model_dir, self.runner.metadata)
        # A multi-label export's per-label thresholds: each answer is a label set (None: one label, a softmax).
        thresholds = getattr(self.runner.metadata, "thresholds", None)
        self.thresholds = torch.tensor(thresholds, dtype=torch.float32) if thresholds is not None else None
        self.names = self.runner.labels
        self.special_tokens = self.tokenizer.num_special_tokens_to_add()
        self.windows = WindowSpec(self.max_length, self.max_windows, self.window_stride)
        self.windows.step(self.tokenizer)  # a stride longer than a window fails here, at start, not per request
        self._logits(window_token_ids(self.tokenizer, ["warm up"], self.windows).input_ids)  # the slow first pass
        self.log("start", None)  # the monitoring process makes its metrics now, so /metrics lists them from the start

    def decode_request(self, request: dict) -> tuple[list[str], int]:
        # Already checked and made canonical by RequestGuard in the HTTP process.
        return request["texts"], request["top_k"]

    def batch(self, inputs: list[tuple[list[str], int]]) -> TextBatch:
        return TextBatch(
            texts=[t for texts, _ in inputs for t in texts],
            sizes=[len(texts) for texts, _ in inputs],
            top_ks=[k for _, k in inputs],
        )

    def predict(self, x: TextBatch | tuple[list[str], int]) -> list[list[dict]] | list[dict]:
        """Answers per request (a list per request when batched; one request's list when `max_batch_size` is 1)."""
        batched = isinstance(x, TextBatch)
        batch = x if batched else self.batch([x])
        windows = window_token_ids(self.tokenizer, batch.texts, self.windows)
        # The windows of every text of every request are batched together; each text's answer is its windows' mean.
        logits = mean_logits_per_text(self._logits(windows.input_ids), windows.text_index, windows.num_texts)
        if self.fusion is not None:  # plus the lexical expert's logits of the whole texts, times its weight
            logits = self.fusion.fused(logits, batch.texts)
        probs = self.probabilities(logits)  # (N, num_labels)
        order = probs.argsort(dim=-1, descending=True).tolist()
        probs = probs.tolist()
        top = [p[o[0]] for p, o in zip(probs, order, strict=True)]
        abstained = [self.min_confidence is not None and p < self.min_confidence for p in top]
        now = time.time()
        # The issue time, random digits and a tag: an id says nothing about the text or the traffic.
        ids = [self.ids.new(now) for _ in top]
        tokens = (windows.tokens + self.special_tokens).tolist()  # as the model read them, special tokens included
        counts, cut = windows.counts.tolist(), windows.cut.tolist()
        sets = self.label_sets(probs) if self.thresholds is not None else None
        answers, start = [], 0
        for size, k in zip(batch.sizes, batch.top_ks, strict=True):
            answers.append(
                [
                    {
                        **self._answer(probs[i], order[i], k, tokens[i], counts[i], cut[i]),
                        **(self._set_answer(sets[i], probs[i]) if sets else {}),
                        "abstained": abstained[i],
                        "prediction_id": ids[i],
                    }
                    for i in range(start, start + size)
                ]
            )
            start += size
        # One message per batch to the logger process: it stores the predictions and updates the metrics there.
        self.log(
            "batch",
            {
                "time": now,
                "requests": len(batch.sizes),
                "ids": ids,
                "labels": [self.names[o[0]] for o in order],
                "probabilities": top,
                "all_probabilities": probs,
                "lengths": tokens,
                "windows": counts,
                "truncated": cut,
                "abstained": abstained,
                "label_sets": sets,  # a multi-label model's answers (None: one label each)
            },
        )
        return answers if batched else answers[0]

    def label_sets(self, probs: list[list[float]]) -> list[list[str]]:
        """A multi-label answer per text: every label whose probability reaches its threshold (its most probable
        label when none does), most probable first, as `predict` writes them (`multilabel.decide`)."""
        p = torch.tensor(probs)
        chosen = p >= self.thresholds
        chosen[torch.arange(len(p)), p.argmax(-1)] |= ~chosen.any(-1)
        order = p.argsort(-1, descending=True).tolist()
        return [[self.names[j] for j in row if chosen[i, j]] for i, row in enumerate(order)]

    def _set_answer(self, labels: list[str], probs: list[float]) -> dict:
        """A multi-label answer's set and scores; its `label` is the set's most probable, as in `predict`."""
        scores = [probs[self.names.index(name)] for name in labels]
        return {"labels": labels, "scores": scores, "label": labels[0], "probability": scores[0]}

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """softmax(logits / temperature) over the labels: `lightning_cls.calibration.calibrated_probabilities`
        (a test checks they agree), written out here because importing that module loads torchmetrics, seconds of
        start-up for every worker. A multi-label model's: each label's sigmoid."""
        if self.thresholds is not None:
            return logits.float().sigmoid()
        t = 1.0 if self.temperature is None else self.temperature
        return (logits.float() / t).softmax(-1)  # (N, num_labels)

    def _logits(self, ids: list[list[int]]) -> torch.Tensor:
        """Logits (N, num_labels) of token id lists (whole texts or windows), float32, in input order: the runner
        runs them longest first, at most `max_batch_tokens` tokens per forward pass."""
        return self.runner.logits(ids)

    def _answer(self, probs: list[float], order: list[int], k: int, tokens: int, windows: int, cut: bool) -> dict:
        return {
            "label": self.names[order[0]],
            "probability": probs[order[0]],
            "top_k": [{"label": self.names[j], "probability": probs[j]} for j in order[:k]],
            "num_tokens": tokens,
            "windows": windows,
            "truncated": cut,
        }

    def unbatch(self, output: list[list[dict]]) -> list[list[dict]]:
        return output  # predict already answers per request

    def encode_response(self, output: list[dict]) -> dict:
        return {"predictions": output}
