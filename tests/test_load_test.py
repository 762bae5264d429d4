"""The load test's pure parts: mixed traffic and label agreement against the naive server (benchmarks/load_test.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from load_test import label_agreement, mix_short


def test_mix_short_cuts_the_asked_share_to_prefixes_of_4_to_12_words():
    texts = [" ".join(f"w{i}_{j}" for j in range(40)) for i in range(400)]
    assert mix_short(texts, 0.0, seed=0) == texts
    mixed = mix_short(texts, 0.5, seed=0)
    short = [(m, t) for m, t in zip(mixed, texts, strict=True) if m != t]
    assert 150 < len(short) < 250  # about half
    for cut, whole in short:
        assert 4 <= len(cut.split()) <= 12
        assert whole.startswith(cut)
    assert mixed == mix_short(texts, 0.5, seed=0)  # the same requests for every server and round


def test_label_agreement_compares_each_answer_with_the_reference_answer_for_the_same_text():
    reference = [[{"labels": {0: "a", 1: "b", 2: "c"}}]]  # one round, one level
    runs = [
        [{"labels": {0: "a", 1: "b"}}, {"labels": {0: "a", 2: "x"}}],  # round 1, two levels: one of four differs
        [{"labels": {1: "b", 3: "d"}}],  # text 3 has no reference answer: left out
    ]
    share, compared = label_agreement(runs, reference)
    assert compared == 5
    assert share == 4 / 5
