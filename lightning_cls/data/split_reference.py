"""A split's summary: row count, label counts, token lengths in decile bins and windows per text. The training
split's is the reference that monitoring compares live traffic with (the export writes it into `lightning_cls.json`).
`length_bin_edges` / `length_histogram` are the one binning used to make the reference and to bin live traffic, so
that the two always agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


# ------------------------------------------------------------------------------------------------ token lengths
def length_bin_edges(lengths: Sequence[int]) -> list[int]:
    """Decile edges of the lengths: equal-mass bins, the usual choice for a population stability index."""
    return np.unique(np.percentile(np.asarray(lengths), np.arange(10, 100, 10)).round().astype(int)).tolist()


def length_histogram(lengths: Sequence[int], edges: Sequence[int]) -> np.ndarray:
    """Counts of token lengths in bins: bin i holds [edges[i-1], edges[i]), with edges[-1] = 0 and the last open."""
    index = np.searchsorted(np.asarray(edges), np.asarray(lengths, dtype=np.int64), side="right")
    return np.bincount(index, minlength=len(edges) + 1)


def window_histogram(windows: Sequence[int]) -> dict[str, int]:
    """Texts by the number of windows read: {"1": texts read as one window, "2": ..., ...} (JSON keys are text)."""
    counts = np.bincount(np.asarray(windows, dtype=np.int64))
    return {str(n): int(c) for n, c in enumerate(counts) if c}


@dataclass
class TokenLengths:
    """Token length statistics of a split (as the model saw them: truncated) and its decile histogram."""

    mean: float
    p5: float
    p25: float
    p50: float
    p75: float
    p95: float
    max: int
    bin_edges: list[int] | None = None  # None in references made before the bins were recorded
    bin_counts: list[int] | None = None

    @classmethod
    def of(cls, lengths: np.ndarray) -> TokenLengths:
        edges = length_bin_edges(lengths)
        percentiles = {f"p{q}": float(np.percentile(lengths, q)) for q in (5, 25, 50, 75, 95)}
        return cls(
            mean=float(np.mean(lengths)),
            **percentiles,
            max=int(np.max(lengths)),
            bin_edges=edges,
            bin_counts=length_histogram(lengths, edges).tolist(),
        )


@dataclass
class SplitReference:
    """Row count, label distribution and token lengths of a split; the training split's is monitoring's reference."""

    rows: int
    label_counts: dict[str, int]
    token_length: TokenLengths | None = None
    # Texts by the number of windows read ({"1": ..., "2": ...}), when texts are read as windows; the token lengths
    # are then the tokens read per text (all its windows).
    window_counts: dict[str, int] | None = None

    @classmethod
    def of(
        cls, label_ids: np.ndarray, lengths: np.ndarray, names: Sequence[str], windows: np.ndarray | None = None
    ) -> SplitReference:
        """From per-text class ids (or a multi-hot matrix: texts x labels) and token lengths (and window counts, for
        texts read as windows). A multi-label split counts each label's texts."""
        label_ids = np.asarray(label_ids, dtype=np.int64)
        counts = label_ids.sum(0) if label_ids.ndim == 2 else np.bincount(label_ids, minlength=len(names))
        return cls(
            rows=len(lengths),
            label_counts={name: int(c) for name, c in zip(names, counts, strict=True)},
            token_length=TokenLengths.of(np.asarray(lengths)) if len(lengths) else None,
            window_counts=window_histogram(windows) if windows is not None else None,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SplitReference:
        lengths = data.get("token_length")
        known = set(TokenLengths.__dataclass_fields__)
        return cls(
            rows=int(data.get("rows", sum(data["label_counts"].values()))),
            label_counts={str(k): int(v) for k, v in data["label_counts"].items()},
            token_length=TokenLengths(**{k: v for k, v in lengths.items() if k in known}) if lengths else None,
            window_counts=data.get("window_counts"),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
