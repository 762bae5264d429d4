"""Helpers for the serving and monitoring tests: a tiny exported model folder, a free port, a server process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from lightning_cls.data.labels import DEFAULT_LABELS
from lightning_cls.data.sample_data import generate_texts
from lightning_cls.data.split_cache import split_summary
from lightning_cls.data.token_cache import TokenizedSplit
from lightning_cls.data.tokenization import PadCollator, load_tokenizer, tokenize
from lightning_cls.model.classifier import build_classifier

TINY_SERVE_CONFIG = {"model_type": "distilbert", "n_layers": 2, "n_heads": 2, "dim": 32, "hidden_dim": 64}
MAX_LENGTH = 96


def fabricate_export(
    tokenizer_dir: str | Path,
    out: str | Path,
    train_steps: int = 0,
    max_length: int = MAX_LENGTH,
    seed: int = 0,
    model_config: dict | None = None,
) -> Path:
    """An exported model folder as `python -m lightning_cls export` writes it (HF model + tokenizer +
    lightning_cls.json with the training reference), from a tiny model (default: DistilBERT-shaped) trained
    ``train_steps`` steps on generated texts, so that its predictions follow the texts' subjects."""
    out = Path(out)
    names = sorted(DEFAULT_LABELS)
    texts, labels = generate_texts(rows_per_label=30, seed=seed, rare_rows=0)
    label_ids = np.asarray([names.index(label) for label in labels])
    tokenizer = load_tokenizer(str(tokenizer_dir))
    ids = tokenize(tokenizer, texts, max_length)
    torch.manual_seed(seed)
    model = build_classifier("tiny-model", names, tokenizer, False, model_config or TINY_SERVE_CONFIG)
    if train_steps:
        collate = PadCollator(tokenizer.pad_token_id)
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
        rng = np.random.default_rng(seed)
        model.train()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a model this small trains several times faster on one thread than on two
        for _ in range(train_steps):
            rows = rng.choice(len(ids), size=32, replace=False)
            batch = collate([{"input_ids": ids[i], "row_id": int(i), "label": int(label_ids[i])} for i in rows])
            loss = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
            ).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        torch.set_num_threads(threads)
        model.eval()
    model.save_pretrained(out)
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(out)
    reference = split_summary(TokenizedSplit.from_lists(ids, label_ids, np.arange(len(ids))), names)
    metadata = {
        "format_version": 1,
        "labels": names,
        "max_length": max_length,
        "model_name_or_path": "tiny-distilbert",
        "checkpoint": "none (made by the tests)",
        "exported_at": "2026-01-01T00:00:00+00:00",
        "lightning_cls_version": "0.1.0",
        "reference": reference,
    }
    (out / "lightning_cls.json").write_text(json.dumps(metadata, indent=2))
    return out


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m <module> ...` in its own process group, ready once GET /health answers 200; stopped with
    SIGTERM, then SIGKILL for the whole group if anything is left."""

    def __init__(self, args: list[str], port: int, log_path: Path, startup_timeout: float = 180.0) -> None:
        self.args, self.port, self.log_path, self.startup_timeout = args, port, log_path, startup_timeout
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, *self.args], stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            self.wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"The server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"The server was not ready within {self.startup_timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-5000:]

    def __exit__(self, *exc: object) -> None:
        if self.process is None:
            return
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=20)
        finally:
            with contextlib.suppress(ProcessLookupError):  # what the server left behind: its process group is ours
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
            self._log.close()
