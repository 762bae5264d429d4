"""The lexical expert's evidence: for each label shown, the n-grams of a text that pushed it up, and by how much.

Exact. The expert's logit of label c is ``sum_j x_j * coef[c, j] + intercept[c]`` over the text's TF-IDF row ``x``,
and the fused logit adds ``weight`` times it; so an n-gram's share, ``weight * x_j * coef[c, j]``, is exactly what it
adds to label c's fused logit. The shares of all n-grams and the weighted intercept sum to the expert's part of the
logit (tested).

It lives in `model/` because two stages ask it: `export.explain` (POST /predict's ``"explain"``, the review page)
with an exported folder's expert, and `predict --prediction_writer.explain lexical` with a checkpoint's. One copy,
so that a checkpoint and its export show the same phrases.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

import numpy as np

from lightning_cls.model.lexical import LexicalExpert

TOP_N = 6  # phrases shown per label and kind


def lexical_shares(expert: LexicalExpert, weight: float, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One text's n-grams (their feature ids), TF-IDF values and shares (labels, n-grams): ``weight * x_j *
    coef[c, j]``, what each adds to each label's fused logit."""
    row = expert.features([text]).tocsr()
    columns, values = row.indices, row.data.astype(np.float32)
    shares = weight * values[None, :] * expert.coef[:, columns]  # (labels, n-grams of the text)
    return columns, values, shares


def lexical_evidence(
    expert: LexicalExpert,
    weight: float,
    texts: Sequence[str],
    label_ids: Sequence[Sequence[int]],
    top_n: int = TOP_N,
) -> list[dict[int, list[dict[str, Any]]]]:
    """Per text, ``{label id: [phrase, ...]}`` for its labels ``label_ids[i]``: the ``top_n`` n-grams with a positive
    share, largest first, each with its share (``weight``), TF-IDF value and coefficient."""
    out = []
    for text, labels in zip(texts, label_ids, strict=True):
        columns, values, shares = lexical_shares(expert, weight, text)
        found = {}
        for c in labels:
            order = np.argsort(-shares[c], kind="stable")[:top_n]
            found[c] = [
                {
                    "text": expert.vocabulary[columns[j]],
                    "weight": round(float(shares[c, j]), 4),
                    "tfidf": round(float(values[j]), 4),
                    "coefficient": round(float(expert.coef[c, columns[j]]), 4),
                }
                for j in order
                if shares[c, j] > 0
            ]
        out.append(found)
    return out


def shown_labels(answer: dict[str, Any], names: Sequence[str]) -> list[int]:
    """The label ids an answer shows (a /predict answer or a `predict` row: the same keys): its top-k, then any
    label of its set not among them."""
    shown = [a["label"] for a in answer["top_k"]] + list(answer.get("labels") or [])
    return [names.index(name) for name in dict.fromkeys(shown)]


def with_lexical_evidence(
    rows: Iterable[dict[str, Any]],
    texts: Sequence[str],
    expert: LexicalExpert,
    weight: float,
    names: Sequence[str],
    chunk: int = 1024,
) -> Iterator[dict[str, Any]]:
    """`predict`'s rows (in input order; ``texts[i]`` is row i's text), each given ``"evidence"``: ``{label:
    {"lexical": [phrase, ...]}}`` for the labels it shows, the shape POST /predict's ``"explain"`` answers with.
    Lazily, ``chunk`` rows at a time, as the writer streams them."""
    rows = iter(rows)
    done = 0
    while batch := list(islice(rows, chunk)):
        shown = [shown_labels(row, names) for row in batch]
        found = lexical_evidence(expert, weight, texts[done : done + len(batch)], shown)
        for row, evidence in zip(batch, found, strict=True):
            row["evidence"] = {names[c]: {"lexical": phrases} for c, phrases in evidence.items()}
            yield row
        done += len(batch)
