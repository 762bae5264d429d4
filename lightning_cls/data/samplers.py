"""The orders in which batches are drawn: length-grouped or seeded-shuffled for training, longest first otherwise.

Every order is a pure function of (seed, epoch), so a resumed epoch draws the same batches and can skip those it
already used (`ResumableDataLoader` skips them).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Sampler


def length_grouped_order(
    lengths: np.ndarray, batch_size: int, seed: int, epoch: int, megabatches: int = 50
) -> np.ndarray:
    """A permutation in which each run of ``batch_size`` indices has similar lengths, batches in random order.

    Shuffle, sort by length inside windows of ``megabatches`` batches, cut into batches, shuffle the batches. The last
    partial batch stays last so every other batch is full and batch boundaries line up with the DataLoader's.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    window = batch_size * megabatches
    order = np.concatenate(
        [
            chunk[np.argsort(-lengths[chunk], kind="stable")]
            for chunk in np.split(order, range(window, len(order), window))
        ]
    )
    batches = np.split(order, range(batch_size, len(order), batch_size))
    tail = [batches.pop()] if len(batches[-1]) < batch_size else []
    return np.concatenate([batches[i] for i in rng.permutation(len(batches))] + tail)


class LengthGroupedSampler(Sampler[int]):
    """Seeded, epoch-aware length grouping.

    Give it the *global* batch size (per-device batch x world size): under several devices Lightning deals its
    indices out round-robin, so each device still gets a batch of similar lengths.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int) -> None:
        self.lengths, self.batch_size, self.seed, self.epoch = np.asarray(lengths), batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        return iter(length_grouped_order(self.lengths, self.batch_size, self.seed, self.epoch).tolist())


class SeededShuffleSampler(Sampler[int]):
    """A random order seeded by (seed, epoch), unlike DataLoader(shuffle=True): a resumed epoch gets the same order
    and can skip the batches it already used."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist())


class LengthSortedSampler(Sampler[int]):
    """Longest first: evaluation and prediction need no shuffling and waste less compute on padding."""

    def __init__(self, lengths: np.ndarray) -> None:
        self.order = np.argsort(-np.asarray(lengths), kind="stable")

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        return iter(self.order.tolist())


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning can checkpoint mid-epoch.

    ``state_dict`` records the sampler's epoch and how many batches this epoch has served; after
    ``load_state_dict`` the next iteration over the same epoch skips that many, so a resumed epoch goes on with the
    first batch the interrupted one never used. The sampler must be seeded by epoch (``set_epoch``) for the skipped
    batches to be the same ones. Lightning's fit loop calls both methods (it saves the state of stateful loaders).
    """

    # Class attributes rather than an `__init__`: Lightning re-creates the loader from DataLoader's own signature when
    # it adds a distributed sampler.
    _served = 0
    _resume_from: dict[str, Any] | None = None

    def _epoch(self) -> int | None:
        return getattr(self.sampler, "epoch", None)

    def __iter__(self) -> Iterator[Any]:
        # A generator: this runs at the first `next()`, after Lightning has called `set_epoch` for the new epoch.
        state, self._resume_from = self._resume_from, None
        skip = state["batches"] if state is not None and state.get("epoch") == self._epoch() else 0
        batches = super().__iter__()
        for _ in range(skip):
            next(batches, None)
        self._served = skip
        for batch in batches:
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch(), "batches": self._served}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_from = dict(state_dict)
