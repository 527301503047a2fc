"""A uniform random subset of a stream of rows, kept in bounded memory (bottom-k random keys)."""

from __future__ import annotations

import numpy as np


class Reservoir:
    """A uniform random subset of at most ``size`` rows of a stream (bottom-k random keys)."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size = size
        self.rng = rng
        self.keys = np.empty(0)
        self.index = np.empty(0, np.int64)
        self.rows: np.ndarray | None = None
        self.seen = 0

    def add(self, rows: np.ndarray) -> None:
        """Offer the next rows of the stream; keeps the ``size`` with the smallest keys."""
        keys = self.rng.random(len(rows))
        pick = np.arange(len(rows))
        full = len(self.keys) >= self.size
        if full:
            pick = pick[keys < self.keys.max()]
        pick = smallest(keys, pick, self.size)
        if self.rows is None:
            self.rows = np.empty((0, rows.shape[1]))
        keys_all = np.concatenate([self.keys, keys[pick]])
        keep = smallest(keys_all, np.arange(len(keys_all)), self.size)
        if full:  # replace the evicted slots in place: no copy of the kept rows
            new = keep[keep >= self.size] - self.size
            out = np.setdiff1d(np.arange(self.size), keep[keep < self.size])
            self.keys[out] = keys[pick[new]]
            self.index[out] = self.seen + pick[new]
            self.rows[out] = rows[pick[new]]
        else:
            new_rows = rows[pick].astype(np.float64)
            self.keys = keys_all[keep]
            self.index = np.concatenate([self.index, self.seen + pick])[keep]
            self.rows = np.concatenate([self.rows, new_rows])[keep]
        self.seen += len(rows)

    def result(self) -> np.ndarray:
        """The kept rows in stream order."""
        assert self.rows is not None
        return self.rows[np.argsort(self.index, kind="stable")]


def smallest(keys: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """The (at most ``k``) candidates with the smallest keys, in no particular order."""
    if len(candidates) <= k:
        return candidates
    return candidates[np.argpartition(keys[candidates], k - 1)[:k]]
