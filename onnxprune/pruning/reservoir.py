"""A uniform random subset of a stream of rows, kept in bounded memory (bottom-k random keys)."""

from __future__ import annotations

import numpy as np


class Reservoir:
    """A uniform random subset of at most ``size`` rows of a stream (bottom-k random keys).

    Every row offered gets a key (``rng.random``, one per row in stream order, so the subset
    does not depend on how the stream is cut into batches); the rows with the ``size``
    smallest keys are kept, as float64, in one buffer allocated once: evicted rows are
    replaced in place, nothing kept is copied again.
    """

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size = size
        self.rng = rng
        self.keys = np.empty(0)
        self.index = np.empty(0, np.int64)
        self.rows: np.ndarray | None = None
        self.filled = 0
        self.seen = 0

    def add(self, rows: np.ndarray) -> None:
        """Offer the next rows of the stream; keeps the ``size`` with the smallest keys."""
        keys = self.rng.random(len(rows))
        if self.rows is None:
            self.rows = np.empty((self.size, rows.shape[1]))
            self.keys = np.empty(self.size)
            self.index = np.empty(self.size, np.int64)
        take = min(len(rows), self.size - self.filled)  # free slots first
        if take:
            at = slice(self.filled, self.filled + take)
            self.rows[at] = rows[:take]
            self.keys[at] = keys[:take]
            self.index[at] = self.seen + np.arange(take)
            self.filled += take
        rest = keys[take:]  # offered to a full reservoir: those below its largest key
        pick = take + np.flatnonzero(rest < self.keys.max()) if len(rest) else rest[:0]
        if len(pick):
            pick = smallest(keys, pick, self.size)
            keys_all = np.concatenate([self.keys, keys[pick]])
            keep = smallest(keys_all, np.arange(len(keys_all)), self.size)
            new = keep[keep >= self.size] - self.size
            out = np.setdiff1d(np.arange(self.size), keep[keep < self.size])
            self.keys[out] = keys[pick[new]]
            self.index[out] = self.seen + pick[new]
            self.rows[out] = rows[pick[new]]
        self.seen += len(rows)

    def result(self) -> np.ndarray:
        """The kept rows in stream order."""
        assert self.rows is not None
        order = np.argsort(self.index[: self.filled], kind="stable")
        return self.rows[: self.filled][order]


def smallest(keys: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """The (at most ``k``) candidates with the smallest keys, in no particular order."""
    if len(candidates) <= k:
        return candidates
    return candidates[np.argpartition(keys[candidates], k - 1)[:k]]
