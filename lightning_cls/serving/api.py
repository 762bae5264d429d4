"""The LitAPI, run in the inference worker process(es): tokenizes, runs the exported model, answers top-k.

Dynamic batching: the worker collects up to `max_batch_size` requests within `batch_timeout` seconds; `batch`
flattens their texts, `predict` runs them longest-first in chunks of `forward_batch_size`, `unbatch` gives each
request its answers back. Each batch is sent to the logger process (`metrics.MonitoringLogger`) with `self.log`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import litserve as ls
import torch

from lightning_cls.export_format import load_classifier
from lightning_cls.serving.http import PREDICT_PATH
from lightning_cls.tokenization import load_tokenizer


@dataclass
class TextBatch:
    """The texts of several requests, flattened, and how to give each request its answers back."""

    texts: list[str]
    sizes: list[int]  # texts per request
    top_ks: list[int]  # top-k per request


class ClassifierAPI(ls.LitAPI):
    """Tokenizes, runs the exported classifier in fp32 under `torch.inference_mode`, answers top-k."""

    def __init__(
        self,
        model_dir: str,
        max_length: int,
        max_batch_size: int = 16,
        batch_timeout: float = 0.002,
        forward_batch_size: int = 64,
        num_threads: int | None = None,
    ) -> None:
        with warnings.catch_warnings():  # LitServe warns when batch/unbatch exist but max_batch_size is 1: fine here
            warnings.simplefilter("ignore", UserWarning)
            super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=PREDICT_PATH)
        self.model_dir, self.max_length = str(model_dir), max_length
        self.forward_batch_size, self.num_threads = forward_batch_size, num_threads

    def setup(self, device: str) -> None:
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        self.device_name = device
        self.tokenizer = load_tokenizer(self.model_dir)
        self.model = load_classifier(self.model_dir, dtype=torch.float32)
        self.model.to(device).eval()
        self.names = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self._probabilities(self._tokenize(["warm up"])[0])  # the first forward pass is slow: not a user's
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
        ids, truncated = self._tokenize(batch.texts)
        probs = self._probabilities(ids)  # (N, num_labels)
        order = probs.argsort(dim=-1, descending=True).tolist()
        probs = probs.tolist()
        answers, start = [], 0
        for size, k in zip(batch.sizes, batch.top_ks, strict=True):
            answers.append(
                [self._answer(probs[i], order[i], k, len(ids[i]), truncated[i]) for i in range(start, start + size)]
            )
            start += size
        self.log(
            "batch",
            {
                "requests": len(batch.sizes),
                "labels": [self.names[o[0]] for o in order],
                "probabilities": [p[o[0]] for p, o in zip(probs, order, strict=True)],
                "lengths": [len(i) for i in ids],
                "truncated": truncated,
            },
        )
        return answers if batched else answers[0]

    def _tokenize(self, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids truncated at max_length, and whether each text was longer than that."""
        n = self.max_length
        ids = self.tokenizer(texts, truncation=True, max_length=n, return_attention_mask=False)["input_ids"]
        # Only a text that fills max_length exactly may have been cut: tokenizing it to n + 1 tells.
        full = [i for i, x in enumerate(ids) if len(x) >= n]
        truncated = [False] * len(texts)
        if full:
            longer = self.tokenizer([texts[i] for i in full], truncation=True, max_length=n + 1)["input_ids"]
            for i, x in zip(full, longer, strict=True):
                truncated[i] = len(x) > n
        return ids, truncated

    def _probabilities(self, ids: list[list[int]]) -> torch.Tensor:
        probs = torch.empty(len(ids), len(self.names))
        # Longest first, in chunks: texts of similar length share a chunk, so little compute goes to padding.
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        with torch.inference_mode():
            for start in range(0, len(order), self.forward_batch_size):
                rows = order[start : start + self.forward_batch_size]
                inputs = self.tokenizer.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt")
                inputs = {k: v.to(self.device_name) for k, v in inputs.items()}
                logits = self.model(**inputs).logits  # (B, num_labels)
                probs[rows] = logits.float().softmax(-1).cpu()
        return probs

    def _answer(self, probs: list[float], order: list[int], k: int, tokens: int, truncated: bool) -> dict:
        return {
            "label": self.names[order[0]],
            "probability": probs[order[0]],
            "top_k": [{"label": self.names[j], "probability": probs[j]} for j in order[:k]],
            "num_tokens": tokens,
            "truncated": truncated,
        }

    def unbatch(self, output: list[list[dict]]) -> list[list[dict]]:
        return output  # predict already answers per request

    def encode_response(self, output: list[dict]) -> dict:
        return {"predictions": output}
