"""Helpers for the evidence and page tests: a tiny exported model that fuses a lexical expert, made in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from serving_helpers import fabricate_export

from lightning_cls.data.labels import DEFAULT_LABELS
from lightning_cls.data.sample_data import generate_texts
from lightning_cls.model.lexical import LexicalExpert, LexicalSettings

NAMES = sorted(DEFAULT_LABELS)
WEIGHT = 0.7  # the fusion weight of the folders made here


def fitted_expert() -> LexicalExpert:
    texts, labels = generate_texts(rows_per_label=30, seed=3, rare_rows=0)
    ids = np.asarray([NAMES.index(label) for label in labels])
    return LexicalExpert.fit(texts, ids, len(NAMES), LexicalSettings(min_df=1, max_iter=500))


def fused_export(tokenizer_dir: str | Path, out: str | Path, train_steps: int = 40) -> Path:
    """`serving_helpers.fabricate_export`'s tiny network with a lexical expert fused at `WEIGHT`, written as `export`
    writes one (`lexical.safetensors`, its record in lightning_cls.json)."""
    folder = fabricate_export(tokenizer_dir, out, train_steps=train_steps)
    meta_path = folder / "lightning_cls.json"
    meta = json.loads(meta_path.read_text())
    meta["lexical"] = {**fitted_expert().save(folder, NAMES), "weight": WEIGHT}
    meta["format_version"] = 2
    meta_path.write_text(json.dumps(meta, indent=2))
    return folder
