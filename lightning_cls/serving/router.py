"""Two models in one service: which requests the challenger answers (canary) or sees (shadow), and the shadow's
thread that never delays an answer.

Canary: a share of the requests is answered by the challenger. A request with a ``client_id`` goes where its id's
hash falls (sticky: a client sees one model while the share stays), one without goes by chance.

Shadow: a sampled share of the answered requests is copied to the challenger, whose answers are stored beside the
champion's (`feedback.shadow_predictions`: the feedback on the request judges both) and compared with them (the
agreement gauge); they are never returned. The copies go to `ShadowRunner`, a thread of the inference worker with
a small bounded queue. It runs only once the worker has been idle for a moment (``quiet``: no batch answered for
20 ms; on a 2-core CPU a forward pass beside the answer's slows the answer, measured: benchmarks/lifecycle_bench.py),
one small slice of texts at a time, so that a batch arriving meanwhile shares the cores with one slice at most. Under
saturation the worker is never quiet: the queue fills and the oldest copies are dropped and counted, never queued
without bound. The shadow uses the spare capacity only.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

SHADOW_QUEUE = 4  # shadow jobs (one per answered batch) waiting at most; older ones are dropped beyond it
SHADOW_SLICE = 2  # texts per shadow forward pass: short, so that a new batch shares the cores with one slice at most
SHADOW_QUIET = 0.02  # seconds the worker must have been idle before a slice starts (saturated: never)


def sticky_fraction(client_id: str) -> float:
    """A client id's fixed place in [0, 1): the same id always falls on the same side of a share."""
    digest = hashlib.sha256(client_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def canary_routes(client_ids: list[str | None], share: float, rng: random.Random) -> list[bool]:
    """For each request, whether the challenger answers it (a canary's share; sticky for a client id)."""
    return [(sticky_fraction(c) if c is not None else rng.random()) < share for c in client_ids]


def shadow_sample(n: int, share: float, rng: random.Random) -> list[bool]:
    """For each of ``n`` answered requests, whether a copy goes to the shadow."""
    return [rng.random() < share for _ in range(n)]


@dataclass
class ShadowJob:
    """Copies of answered requests for the shadow: the texts, the answers' ids and the champion's labels."""

    texts: list[str]
    ids: list[str]
    labels: list[Any]  # the champion's label (or label set) per text


class ShadowRunner:
    """The shadow's thread in an inference worker. ``score(texts)`` runs the challenger (its `Scorer.score`);
    ``report(kind, value)`` sends the results to the logger process ("shadow": the answers, "shadow_dropped": how many
    texts were dropped). `busy()`/`idle()` bracket each answered batch; the thread waits while the worker is busy."""

    def __init__(
        self,
        score: Callable[[list[str]], Any],
        version: str,
        names: list[str],
        report: Callable[[str, Any], None],
        max_jobs: int = SHADOW_QUEUE,
        slice_size: int = SHADOW_SLICE,
        quiet: float = SHADOW_QUIET,
    ) -> None:
        self.score, self.version, self.names, self.report = score, version, names, report
        self.slice_size, self.quiet = slice_size, quiet
        self._idle_since = time.monotonic()
        self.jobs: queue.Queue[ShadowJob | None] = queue.Queue(maxsize=max_jobs)
        self._idle = threading.Event()
        self._idle.set()
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"shadow-{version}")
        self.thread.start()

    def busy(self) -> None:
        self._idle.clear()

    def idle(self) -> None:
        self._idle_since = time.monotonic()
        self._idle.set()

    def _wait_quiet(self) -> None:
        """Until the worker has been idle for ``quiet`` seconds (a batch in between starts the wait again)."""
        while True:
            self._idle.wait()
            left = self.quiet - (time.monotonic() - self._idle_since)
            if left <= 0 and self._idle.is_set():
                return
            time.sleep(max(left, 0.001))

    def submit(self, job: ShadowJob) -> None:
        """Never blocks: a full queue drops its oldest job (the newest traffic is the one worth comparing)."""
        while True:
            try:
                self.jobs.put_nowait(job)
                return
            except queue.Full:
                try:
                    old = self.jobs.get_nowait()
                except queue.Empty:
                    continue
                if old is not None:
                    self.report("shadow_dropped", {"version": self.version, "texts": len(old.texts)})

    def stop(self) -> None:
        """Ends the thread after the job it is on (the jobs waiting are dropped, uncounted: the version retires)."""
        while True:
            try:
                self.jobs.get_nowait()
            except queue.Empty:
                break
        self.jobs.put(None)

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            for start in range(0, len(job.texts), self.slice_size):
                self._wait_quiet()  # not beside an answered batch's forward pass
                end = start + self.slice_size
                try:
                    self._one(job.texts[start:end], job.ids[start:end], job.labels[start:end])
                except Exception as err:  # the shadow must never take the worker down
                    log.error(f"Shadow {self.version} failed on {end - start} texts: {type(err).__name__}: {err}")

    def _one(self, texts: list[str], ids: list[str], champion: list[Any]) -> None:
        started = time.perf_counter()
        scores = self.score(texts)
        seconds = time.perf_counter() - started
        if scores.sets is not None:
            labels = [s[0] for s in scores.sets]
            mine = [tuple(s) for s in scores.sets]
            agree = [tuple(sorted(m)) == tuple(sorted(c)) for m, c in zip(mine, champion, strict=True)]
        else:
            labels = [self.names[o[0]] for o in scores.order]
            agree = [m == c for m, c in zip(labels, champion, strict=True)]
        self.report(
            "shadow",
            {
                "time": time.time(),
                "version": self.version,
                "ids": ids,
                "labels": labels,
                "probabilities": [p[o[0]] for p, o in zip(scores.probs, scores.order, strict=True)],
                "label_sets": scores.sets,
                "agree": agree,
                "seconds": seconds,
            },
        )
