"""The LitAPI, run in the inference worker process(es): tokenizes, runs the exported model, answers top-k.

Dynamic batching: the worker collects up to `max_batch_size` requests within `batch_timeout` seconds; `batch`
flattens their texts, `predict` runs them (`inference.Runner`: the chosen backend and precision, longest first, at
most `max_batch_tokens` tokens per forward pass), `unbatch` gives each
request its answers back. A text longer than the model's window is read as up to `max_windows` overlapping
windows (`lightning_cls.data.windows`; 1: truncated), the windows of all texts batched together, and answered with the
mean of its windows' logits (plus the lexical expert's, times its weight, when the export fuses one:
`lightning_cls.model.fusion`), divided by the export's temperature when it has one (calibrated probabilities). Each
answer has a `prediction_id`, the key of POST /feedback. Each batch is sent to the logger process
(`metrics.MonitoringLogger`) with `self.log`, which stores its predictions and updates the metrics.

Two models: the worker answers with the deployment recorded in the feedback database (`serving.deployment`): the
champion's `Scorer`, and a challenger's beside it as a canary (it answers its share of the requests) or in shadow
(a copy of its share goes to `router.ShadowRunner`, off the answer path). Every answer says which `model_version`
produced it. A thread of the worker looks for a newer deployment; its models load while the old ones answer, then
take over: each batch is answered by the models it began with, so no request is dropped or failed by a swap.
"""

from __future__ import annotations

import logging
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import litserve as ls
import torch

from lightning_cls.export.runtime import InferenceSettings
from lightning_cls.serving.deployment import Deployment, DeploymentWatch, local_slot
from lightning_cls.serving.evidence import Kinds, add_evidence
from lightning_cls.serving.http import PREDICT_PATH
from lightning_cls.serving.prediction_log import IdIssuer
from lightning_cls.serving.router import ShadowJob, ShadowRunner, canary_routes, shadow_sample
from lightning_cls.serving.scorer import Scorer, ScorerSettings, Scores

log = logging.getLogger(__name__)


@dataclass
class TextBatch:
    """The texts of several requests, flattened, and how to give each request its answers back."""

    texts: list[str]
    sizes: list[int]  # texts per request
    top_ks: list[int]  # top-k per request
    client_ids: list[str | None] | None = None  # per request (canary routing is sticky per client)
    explains: list[Kinds] | None = None  # per request: the evidence it asks for (`serving.evidence`)


@dataclass
class Models:
    """The models of one deployment, loaded: the champion's scorer, and the challenger's with its shadow thread."""

    deployment: Deployment
    champion: Scorer
    challenger: Scorer | None = None
    shadow: ShadowRunner | None = None


class ClassifierAPI(ls.LitAPI):
    """Tokenizes, runs the deployed model(s) under `torch.inference_mode`, answers top-k.

    ``model_dir``: the export answering when there is no ``deployment_db`` (tests, tools); with one, the worker
    answers with the deployment recorded there (`serving.deployment`: serve records it at start).
    ``use_temperature``: answer softmax(logits / T) with each export's temperature T, the calibrated probabilities
    (False: the plain softmax; `serve` passes its --use_temperature, true by default). ``temperature``: the
    champion's temperature instead of its export's (None: its export's, as ``use_temperature`` says).
    ``min_confidence``: an answer whose probability is below it says ``"abstained": true`` (and keeps its label).
    ``id_key``: the feedback database's key for prediction ids (`FeedbackStore.id_key`).
    ``keep_texts``: send the texts to the logger process, which stores them with the predictions (retraining).
    """

    def __init__(
        self,
        model_dir: str,
        max_batch_size: int = 16,
        batch_timeout: float = 0.002,
        inference: InferenceSettings | None = None,
        num_threads: int | None = None,
        max_windows: int | None = None,
        window_stride: int | None = None,
        temperature: float | None = None,
        min_confidence: float | None = None,
        id_key: bytes | None = None,
        use_temperature: bool = False,
        deployment_db: str | None = None,
        keep_texts: bool = False,
    ) -> None:
        with warnings.catch_warnings():  # LitServe warns when batch/unbatch exist but max_batch_size is 1: fine here
            warnings.simplefilter("ignore", UserWarning)
            super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=PREDICT_PATH)
        self.model_dir = str(model_dir)
        self.inference, self.num_threads = inference or InferenceSettings(), num_threads
        self.max_windows, self.window_stride = max_windows, window_stride
        self.use_temperature = use_temperature
        self.temperature, self.min_confidence = temperature, min_confidence
        # Ids POST /feedback can recognise as this database's (`prediction_log.IdIssuer`; None: a key of its own).
        self.ids = IdIssuer(id_key)
        self.deployment_db, self.keep_texts = deployment_db, keep_texts
        self.rng = random.Random()

    def setup(self, device: str) -> None:
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        self.device_name = device
        # transformers' loading bar (tqdm) makes a multiprocessing lock in this process, which LitServe ends with
        # SIGTERM at a stop: the lock is never released, and Python warns of a leaked semaphore. No bar, no lock.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.settings = ScorerSettings(
            self.inference, device, self.max_windows, self.window_stride, self.use_temperature
        )
        self.watch = None
        if self.deployment_db is not None:
            self.watch = DeploymentWatch(self.deployment_db, self.load, self.switch)
            self.seq, _, self.models = self.watch.first()
        else:
            self.seq, self.models = 0, self.load(Deployment(local_slot(self.model_dir)))
        self.log("start", None)  # the monitoring process makes its metrics now, so /metrics lists them from the start
        self._report_deployed()
        if self.watch is not None:
            self.watch.start()

    def load(self, deployment: Deployment) -> Models:
        """The models of a deployment (a model already loaded is reused: a promotion loads nothing)."""
        loaded = {}
        current = getattr(self, "models", None)
        if current is not None:
            loaded = {s.version: s for s in (current.champion, current.challenger) if s is not None}

        def scorer(slot: Any) -> Scorer:
            return loaded.get(slot.version) or Scorer(slot.model_dir, slot.version, self.settings)

        champion = scorer(deployment.champion)
        if self.temperature is not None and deployment.champion.model_dir == str(Path(self.model_dir).resolve()):
            champion.model.with_temperature(self.temperature)  # explicit, for the folder it was given with
        challenger = scorer(deployment.challenger) if deployment.challenger is not None else None
        shadow = None
        if challenger is not None and deployment.mode == "shadow":
            shadow = ShadowRunner(challenger.score, challenger.version, list(challenger.names), self.log)
        return Models(deployment, champion, challenger, shadow)

    def _report_deployed(self) -> None:
        d = self.models.deployment
        self.log("deployed", {"seq": self.seq, "roles": d.roles(), "mode": d.mode, "share": d.share})

    def switch(self, seq: int, deployment: Deployment, models: Models) -> None:
        """A newer deployment's models, loaded, take over (from the watch's thread: a batch already begun keeps the
        models it read at its start)."""
        old, self.models, self.seq = self.models, models, seq
        if old.shadow is not None and old.shadow is not models.shadow:
            old.shadow.stop()
        log.info(f"Deployment {seq}: {deployment.roles()} ({deployment.mode})")
        self._report_deployed()

    # The champion's pieces, as callers of a one-model API know them.
    @property
    def runner(self) -> Any:
        return self.models.champion.runner

    @property
    def names(self) -> list[str]:
        return self.models.champion.names

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return self.models.champion.task.probabilities(logits)

    def decode_request(self, request: dict) -> tuple[list[str], int, str | None, Kinds]:
        # Already checked and made canonical by RequestGuard in the HTTP process.
        return request["texts"], request["top_k"], request.get("client_id"), tuple(request.get("explain") or ())

    def batch(self, inputs: list[tuple]) -> TextBatch:
        return TextBatch(
            texts=[t for texts, *_ in inputs for t in texts],
            sizes=[len(x[0]) for x in inputs],
            top_ks=[x[1] for x in inputs],
            client_ids=[x[2] if len(x) > 2 else None for x in inputs],
            explains=[x[3] if len(x) > 3 else () for x in inputs],
        )

    def predict(self, x: TextBatch | tuple) -> list[list[dict]] | list[dict]:
        """Answers per request (a list per request when batched; one request's list when `max_batch_size` is 1)."""
        batched = isinstance(x, TextBatch)
        batch = x if batched else self.batch([x])
        models = self.models  # this batch's models, whatever deployment arrives meanwhile
        if models.shadow is not None:
            models.shadow.busy()
        try:
            answers, message = self._answer_batch(batch, models)
        finally:
            if models.shadow is not None:
                models.shadow.idle()
        # One message per batch to the logger process: it stores the predictions and updates the metrics there.
        self.log("batch", message)
        if models.shadow is not None:
            self._copy_to_shadow(batch, message, models)
        return answers if batched else answers[0]

    def _answer_batch(self, batch: TextBatch, models: Models) -> tuple[list[list[dict]], dict]:
        d = models.deployment
        n = len(batch.sizes)
        canary = models.challenger is not None and d.mode == "canary"
        by_challenger = canary_routes(batch.client_ids or [None] * n, d.share, self.rng) if canary else [False] * n
        # Each text's model: its request's.
        text_model = [c for c, size in zip(by_challenger, batch.sizes, strict=True) for _ in range(size)]
        text_top_k = [k for k, size in zip(batch.top_ks, batch.sizes, strict=True) for _ in range(size)]
        scores: list[tuple[Scorer, Scores, list[int]]] = []
        for scorer, chosen in ((models.champion, False), (models.challenger, True)):
            rows = [i for i, c in enumerate(text_model) if c == chosen]
            if rows:
                started = time.perf_counter()
                result = scorer.score([batch.texts[i] for i in rows])
                scores.append((scorer, result, rows, time.perf_counter() - started))
        per_text: list[tuple[Scorer, Scores, int]] = [None] * len(batch.texts)  # type: ignore[list-item]
        for scorer, result, rows, _ in scores:
            for j, i in enumerate(rows):
                per_text[i] = (scorer, result, j)
        now = time.time()
        ids = [self.ids.new(now) for _ in batch.texts]
        fields: dict[str, list] = {k: [] for k in ("labels", "probabilities", "all_probabilities", "lengths")}
        fields.update({k: [] for k in ("windows", "truncated", "abstained", "label_sets", "versions")})
        answers, flat = [], []
        for i, (scorer, r, j) in enumerate(per_text):
            probs, order = r.probs[j], r.order[j]
            top = probs[order[0]]
            abstained = self.min_confidence is not None and top < self.min_confidence
            answer = {
                **self._answer(scorer.names, probs, order, text_top_k[i], r.tokens[j], r.windows[j], r.cut[j]),
                **(self._set_answer(scorer.names, r.sets[j], probs) if r.sets is not None else {}),
                "abstained": abstained,
                "prediction_id": ids[i],
                "model_version": scorer.version,
            }
            flat.append(answer)
            for key, value in (
                ("labels", scorer.names[order[0]]),
                ("probabilities", top),
                ("all_probabilities", probs),
                ("lengths", r.tokens[j]),
                ("windows", r.windows[j]),
                ("truncated", r.cut[j]),
                ("abstained", abstained),
                ("label_sets", r.sets[j] if r.sets is not None else None),
                ("versions", scorer.version),
            ):
                fields[key].append(value)
        if any(batch.explains or ()):  # asked for by a request: off by default, nothing runs here without it
            kinds = [k for k, size in zip(batch.explains, batch.sizes, strict=True) for _ in range(size)]
            add_evidence(flat, [scorer for scorer, _, _ in per_text], batch.texts, kinds)
        start = 0
        for size in batch.sizes:
            answers.append(flat[start : start + size])
            start += size
        message = {
            "time": now,
            "requests": n,
            "ids": ids,
            **fields,
            "label_sets": fields["label_sets"] if models.champion.task.multi_label else None,
            "seconds": {s.version: sec for s, _, _, sec in scores},  # forward time per model (latency by version)
            **({"texts": batch.texts} if self.keep_texts else {}),
        }
        return answers, message

    def _copy_to_shadow(self, batch: TextBatch, message: dict, models: Models) -> None:
        """A sampled share of the answered requests, copied to the shadow's queue (never waits)."""
        chosen = shadow_sample(len(batch.sizes), models.deployment.share, self.rng)
        rows, start = [], 0
        for take, size in zip(chosen, batch.sizes, strict=True):
            if take:
                rows.extend(range(start, start + size))
            start += size
        if not rows:
            return
        sets = message["label_sets"]
        labels = [tuple(sets[i]) if sets else message["labels"][i] for i in rows]
        job = ShadowJob([batch.texts[i] for i in rows], [message["ids"][i] for i in rows], labels)
        models.shadow.submit(job)

    @staticmethod
    def _set_answer(names: list[str], labels: list[str], probs: list[float]) -> dict:
        """A multi-label answer's set and scores; its `label` is the set's most probable, as in `predict`."""
        scores = [probs[names.index(name)] for name in labels]
        return {"labels": labels, "scores": scores, "label": labels[0], "probability": scores[0]}

    @staticmethod
    def _answer(
        names: list[str], probs: list[float], order: list[int], k: int, tokens: int, windows: int, cut: bool
    ) -> dict:
        return {
            "label": names[order[0]],
            "probability": probs[order[0]],
            "top_k": [{"label": names[j], "probability": probs[j]} for j in order[:k]],
            "num_tokens": tokens,
            "windows": windows,
            "truncated": cut,
        }

    def unbatch(self, output: list[list[dict]]) -> list[list[dict]]:
        return output  # predict already answers per request

    def encode_response(self, output: list[dict]) -> dict:
        return {"predictions": output}
