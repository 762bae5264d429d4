"""The review queue's "drift" reason: an answer that falls where its version's recent traffic drifted from training.

The drift monitor raises an alert when a window of a version's answers has a label PSI or a token-length PSI above
``psi_warning`` (`monitoring.drift`). A PSI is a sum of one term per bin, ``(a - e) * ln(a / e)`` (live share a,
training share e), each term >= 0. So, for a window in alert, a label (or a length bin) is *drifted* when its live
share is above its training share and its term is at least an even share (1 / bins) of the terms of all such bins:
where the traffic went that training did not prepare the model for. (Only the bins that gained count: a bin that
emptied can hold most of the index, and no answer falls in it; a bin a point or two over its share is noise beside
the one that doubled.) An answer
whose label (any label of a set) is drifted, or whose token length falls in a drifted bin, gets the reason, with the
shares that make it one. No alert (or fewer than ``min_texts`` answers, as the drift gauges wait): no reason.

Everything is read from the store (the version's newest answers: labels and token lengths, as the service's drift
window holds them) and the version's own reference (`lightning_cls.json`); PSI and the binning are the monitor's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lightning_cls.data.split_reference import length_histogram
from lightning_cls.monitoring.drift import PSI_EPSILON, psi


@dataclass(frozen=True)
class DriftedBins:
    """The labels and token-length bins of a window in alert: name or (low, high) -> (live share, training share)."""

    label_psi: float | None = None
    labels: dict[str, tuple[float, float]] = field(default_factory=dict)
    length_psi: float | None = None
    edges: tuple[int, ...] = ()
    bins: dict[int, tuple[float, float]] = field(default_factory=dict)  # bin index (`length_histogram`) -> shares


def _drifted(reference: Sequence[float], live: Sequence[float], warning: float) -> tuple[float, dict[int, tuple]]:
    """The PSI of ``live`` against ``reference`` and, when it is over ``warning``, its drifted bins."""
    index = psi(reference, live)
    if index <= warning:
        return index, {}
    e, a = np.asarray(reference, dtype=np.float64), np.asarray(live, dtype=np.float64)
    e, a = np.maximum(e / e.sum(), PSI_EPSILON), np.maximum(a / a.sum(), PSI_EPSILON)  # as `psi` reads them
    gained = a > e
    terms = np.where(gained, (a - e) * np.log(a / e), 0.0)
    return index, {int(i): (float(a[i]), float(e[i])) for i in np.flatnonzero(gained & (terms >= terms.sum() / len(e)))}


def drifted_bins(
    window: Sequence[tuple[str, str | None, int]],
    names: Sequence[str],
    reference: dict | None,
    psi_warning: float,
    min_texts: int,
) -> DriftedBins:
    """The drifted labels and length bins of a version's ``window`` of answers (label, label set JSON or None, token
    length), against its training ``reference`` (`SplitReference.to_dict()`)."""
    if reference is None or len(window) < min_texts:
        return DriftedBins()
    counts = dict.fromkeys(names, 0)
    for label, labels, _ in window:  # a label set counts each of its labels, as its reference does
        for name in json.loads(labels) if labels else (label,):
            counts[name] = counts.get(name, 0) + 1
    ref_counts = [reference["label_counts"].get(n, 0) for n in names]
    label_psi, labels = _drifted(ref_counts, [counts[n] for n in names], psi_warning)
    found = DriftedBins(label_psi, {names[i]: shares for i, shares in labels.items()})
    lengths = reference.get("token_length") or {}
    if lengths.get("bin_edges") is None:  # a reference made before the bins were recorded
        return found
    edges = tuple(lengths["bin_edges"])
    live = length_histogram([n for _, _, n in window], edges)
    length_psi, bins = _drifted(lengths["bin_counts"], live, psi_warning)
    return DriftedBins(found.label_psi, found.labels, length_psi, edges, bins)


def drift_reason(drifted: DriftedBins, labels: Sequence[str], num_tokens: int) -> str | None:
    """The reason a reviewer reads for an answer of ``labels`` (its label, or its set) and ``num_tokens``, or None."""
    parts = [
        f"{name} is {a:.0%} of recent answers against {e:.0%} in training (label PSI {drifted.label_psi:.2f})"
        for name in labels
        if name in drifted.labels
        for a, e in [drifted.labels[name]]
    ]
    if drifted.bins:
        at = int(length_histogram([num_tokens], drifted.edges).argmax())
        if at in drifted.bins:
            a, e = drifted.bins[at]
            parts.append(
                f"its length ({num_tokens} tokens) is in a bin of {a:.0%} of recent answers against {e:.0%} in "
                f"training (length PSI {drifted.length_psi:.2f})"
            )
    return "drift: " + "; ".join(parts) if parts else None
