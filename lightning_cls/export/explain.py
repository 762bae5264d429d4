"""Why an exported model answered what it did: for each label shown, the words and phrases that pushed it up.

Both kinds of evidence are read from the `ExportedModel` that answered (its lexical expert, its runtime), never from
a second copy of the answer path:

- **lexical** (a folder that fuses a lexical expert, `model.fusion`): exact and nearly free. An n-gram's share,
  ``weight * x_j * coef[c, j]`` (its TF-IDF value times its coefficient, times the fusion weight), is exactly what
  it adds to label c's fused logit: `model.lexical_evidence`, which `predict --prediction_writer.explain lexical`
  asks too (one copy: a checkpoint and its export show the same phrases).
- **network** (asked for separately: it costs forward passes): occlusion. The text is read again once per span of
  a few consecutive words, with that span deleted, every variant of every text in one batched call of the model's
  runtime (`ExportedModel.network_logits`, the backend and precision that answer). A span's weight for label c is
  how much the log-probability of c under the network alone (the task's probabilities of its logits: calibrated
  softmax, or the label's sigmoid) drops without it: positive, it pushed c up. Deletion, not a mask token, so that
  it means the same for every tokenizer (GPT-2 has no mask token). Only the part of a text the model reads (its
  windows) is occluded: deleting words it never reads changes nothing. Spans widen on long texts so that a text
  costs at most `max_spans` + 1 sequences: on this CPU a whole abstract then takes well under a second on MiniLM
  (docs/pages.md has the measurement).

Each label's evidence is its `top_n` phrases by weight, positive ones only (what pushed it up), largest first.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lightning_cls.model.lexical_evidence import TOP_N, lexical_evidence

if TYPE_CHECKING:
    from lightning_cls.export.answer import ExportedModel

KINDS = ("lexical", "network")
WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class ExplainSettings:
    """How much evidence, and how fine the network's.

    top_n: Phrases shown per label and kind.
    span_words: Words per occluded span on a short text (spans widen on long ones: see max_spans).
    max_spans: Most spans (extra sequences through the network) per text.
    """

    top_n: int = TOP_N
    span_words: int = 3
    max_spans: int = 32


def explain(
    model: ExportedModel,
    texts: Sequence[str],
    label_ids: Sequence[Sequence[int]],
    kinds: Collection[str],
    settings: ExplainSettings | None = None,
) -> list[dict[str, dict[str, list[dict[str, Any]]]]]:
    """Per text, ``{label name: {kind: [phrase, ...]}}`` for the labels ``label_ids[i]`` of text i and the
    ``kinds`` asked for (lexical: only when the folder fuses an expert)."""
    settings = settings or ExplainSettings()
    texts = list(texts)
    parts: dict[str, list[dict[int, list[dict[str, Any]]]]] = {}
    if "lexical" in kinds and model.fusion is not None:
        fusion = model.fusion
        parts["lexical"] = lexical_evidence(fusion.expert, fusion.weight, texts, label_ids, settings.top_n)
    if "network" in kinds:
        parts["network"] = occlusion_evidence(model, texts, label_ids, settings)
    names = model.names
    return [
        {names[c]: {kind: found[i][c] for kind, found in parts.items()} for c in label_ids[i]}
        for i in range(len(texts))
    ]


def read_chars(model: ExportedModel, text: str) -> int:
    """How many characters of ``text`` the model reads (all but what its windows cut off)."""
    tokenizer, spec = model.tokenizer, model.windows
    if not getattr(tokenizer, "is_fast", False):  # no offsets: treat the whole text as read
        return len(text)
    limit = spec.body(tokenizer) + (spec.max_windows - 1) * spec.step(tokenizer)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)["offset_mapping"]
    return len(text) if len(offsets) <= limit else int(offsets[limit - 1][1])


def word_spans(text: str, limit: int, span_words: int, max_spans: int) -> list[tuple[int, int]]:
    """Character spans of consecutive words within ``text[:limit]``: ``span_words`` words each (fewer on a text of
    few words, so that it still has several spans), wider when that would make more than ``max_spans``."""
    words = [m.span() for m in WORD.finditer(text) if m.start() < limit]
    if not words:
        return []
    width = max(math.ceil(len(words) / max_spans), min(span_words, max(1, len(words) // 4)))
    return [(words[i][0], words[min(i + width, len(words)) - 1][1]) for i in range(0, len(words), width)]


def occlusion_evidence(
    model: ExportedModel, texts: Sequence[str], label_ids: Sequence[Sequence[int]], settings: ExplainSettings
) -> list[dict[int, list[dict[str, Any]]]]:
    spans = [word_spans(t, read_chars(model, t), settings.span_words, settings.max_spans) for t in texts]
    variants, first = [], []  # every text, then each of its occluded variants; where each text's block starts
    for text, text_spans in zip(texts, spans, strict=True):
        first.append(len(variants))
        variants.append(text)
        variants.extend(_without(text, a, b) for a, b in text_spans)
    logits, _ = model.network_logits(variants)  # one call: the runtime batches every variant by tokens
    log_p = model.task.probabilities(logits).clamp_min(1e-12).log()  # (variants, labels)
    out = []
    for i, (text, text_spans, labels) in enumerate(zip(texts, spans, label_ids, strict=True)):
        start = first[i]
        drop = log_p[start] - log_p[start + 1 : start + 1 + len(text_spans)]  # (spans, labels): > 0 pushed it up
        found = {}
        for c in labels:
            weights = drop[:, c] if len(text_spans) else torch.zeros(0)
            order = torch.argsort(-weights, stable=True)[: settings.top_n].tolist()
            found[c] = [
                {
                    "text": text[text_spans[j][0] : text_spans[j][1]],
                    "start": text_spans[j][0],
                    "end": text_spans[j][1],
                    "weight": round(float(weights[j]), 4),
                }
                for j in order
                if weights[j] > 0
            ]
        out.append(found)
    return out


def _without(text: str, start: int, end: int) -> str:
    rest = (text[:start] + " " + text[end:]).strip()
    return rest or "."  # a text that was one span: the network still reads something (an empty text has no windows)
