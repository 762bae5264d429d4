"""The `"explain"` option of POST /predict: which evidence a request asks for, and adding it to the answers.

Off by default, and free when off: a batch none of whose requests asks runs nothing here. When asked, each answer
gets `"evidence"`, ``{label: {"lexical": [...], "network": [...]}}`` for the labels it shows (its `top_k`, and for a
label set every label of the set), computed by `lightning_cls.export.explain` from the very model that answered it
(the champion's, or a canary challenger's).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning_cls.export.explain import KINDS, explain
from lightning_cls.model.lexical_evidence import shown_labels

Kinds = tuple[str, ...]  # a request's evidence kinds, in KINDS order; () when it asks for none


def parse_explain(value: Any) -> Kinds:
    """A /predict body's ``"explain"``: false (the default), true (every kind), a kind's name or a list of them.
    Raises ValueError with the message of a 422."""
    if value is None or value is False:
        return ()
    if value is True:
        return KINDS
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or set(names) - set(KINDS):
        shown = value if isinstance(value, str | bool | int | float) else type(value).__name__
        raise ValueError(
            f'"explain" must be true, false, one of {list(KINDS)} or a list of them, got {shown!r} ("lexical": the '
            'lexical expert\'s exact n-gram shares; "network": occlusion of word spans, some forward passes more).'
        )
    return tuple(k for k in KINDS if k in names)


def add_evidence(answers: list[dict], models: Sequence[Any], texts: Sequence[str], kinds: Sequence[Kinds]) -> None:
    """Give ``answers[i]`` (answered by ``models[i]``, a `Scorer`, for ``texts[i]``) the evidence ``kinds[i]`` asks
    for; texts of one model and the same kinds are explained in one call (one batched pass for the network)."""
    groups: dict[tuple[int, Kinds], list[int]] = {}
    for i, asked in enumerate(kinds):
        if asked:
            groups.setdefault((id(models[i]), asked), []).append(i)
    for (_, asked), rows in groups.items():
        model = models[rows[0]]
        labels = [shown_labels(answers[i], model.names) for i in rows]
        found = explain(model.model, [texts[i] for i in rows], labels, asked)
        for i, evidence in zip(rows, found, strict=True):
            answers[i]["evidence"] = evidence
