"""Shared fixtures: tiny generated data, tokenizers trained on it in well under a second, tiny model configs."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from lightning_cls.data.sample_data import generate_texts, train_bpe_tokenizer, train_wordpiece_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never reach for the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_DISTILBERT = {"model_type": "distilbert", "n_layers": 2, "n_heads": 2, "dim": 32, "hidden_dim": 64}
TINY_GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 256}
TINY_CONFIGS = {"distilbert": TINY_DISTILBERT, "gpt2": TINY_GPT2}


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    """abstracts.csv (30 rows per subject + 6 rare rows) and both tokenizers, made once per test session."""
    root = tmp_path_factory.mktemp("sample")
    texts, labels = generate_texts(rows_per_label=30, seed=0)
    pd.DataFrame({"text": texts, "label": labels}).to_csv(root / "abstracts.csv", index=False)
    train_wordpiece_tokenizer(texts, root / "wordpiece", vocab_size=400)
    train_bpe_tokenizer(texts, root / "bpe", vocab_size=400)
    return root


@pytest.fixture(scope="session")
def sample_csv(sample_dir) -> Path:
    return sample_dir / "abstracts.csv"


@pytest.fixture(params=["distilbert", "gpt2"])
def family(request) -> str:
    return request.param


def tokenizer_for(sample_dir: Path, family: str) -> str:
    return str(sample_dir / ("bpe" if family == "gpt2" else "wordpiece"))


def tiny_classifier(tokenizer: str, model_config: dict, **kwargs):
    """A TextClassifier with random weights from a tiny config, seeded, in eval mode."""
    import torch

    from lightning_cls.data.labels import DEFAULT_LABELS
    from lightning_cls.model.classifier import TextClassifier

    torch.manual_seed(0)
    name = f"tiny-{model_config['model_type']}"
    return TextClassifier(name, list(DEFAULT_LABELS), tokenizer=tokenizer, model_config=model_config, **kwargs).eval()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_CLS_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def trained(sample_dir, tmp_path_factory):
    """A factory: ``trained(family, *cli_args)`` fits a tiny model once per session and settings -> its run folder
    (``ckpt/last.ckpt`` inside). Shared by the evaluation, prediction and export tests, which only need a checkpoint."""
    from test_cli import fit  # the CLI helpers live with the CLI tests

    runs: dict[tuple, Path] = {}

    def get(family: str, *extra: str) -> Path:
        key = (family, *extra)
        if key not in runs:
            folder = tmp_path_factory.mktemp(f"trained-{family}")
            # Session-scoped: the per-test cache fixture does not apply, so the cache goes in the run's own folder.
            fit(folder, sample_dir, family, "--trainer.max_epochs=1", f"--data.cache_dir={folder / 'cache'}", *extra)
            runs[key] = folder
        return runs[key]

    return get


@pytest.fixture(scope="session")
def postgres():
    """One real PostgreSQL server for the session (tests/postgres_server.py); skipped without the binaries, failed
    instead with LIGHTNING_CLS_REQUIRE_POSTGRES set."""
    from postgres_server import PostgresServer, missing

    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing("the psycopg driver is not installed (pip install -e '.[postgres]')")
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def db_location(request, tmp_path) -> str:
    """The store's location on each engine: a SQLite file, or a fresh database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "f.sqlite3")
    return request.getfixturevalue("postgres").new_database()
