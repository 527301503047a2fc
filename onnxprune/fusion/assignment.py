"""The linear assignment problem: which column each row takes so that the total is largest.

SciPy's ``linear_sum_assignment`` when SciPy is installed (it is not a dependency of
onnxprune), else :func:`hungarian`, the O(n^3) shortest-augmenting-path method with its inner
loop in numpy (fine for the few thousand channels of a layer).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import numpy as np


def _scipy_solver() -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None:
    """SciPy's solver, or None when SciPy is not installed."""
    try:
        module = importlib.import_module("scipy.optimize")
    except ImportError:
        return None
    solver: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] = module.linear_sum_assignment
    return solver


SCIPY = _scipy_solver()
BACKEND = "scipy" if SCIPY is not None else "built-in"
"""Which solver :func:`best_assignment` uses, for reports."""


def best_assignment(gain: np.ndarray) -> np.ndarray:
    """For a square ``gain`` matrix, ``perm`` with ``gain[i, perm[i]]`` summing to the most."""
    if SCIPY is not None:
        rows, cols = SCIPY(-gain)
        out = np.empty(len(rows), dtype=np.int64)
        out[rows] = cols
        return out
    return hungarian(-gain)


def hungarian(cost: np.ndarray) -> np.ndarray:
    """For a square ``cost`` matrix, ``perm`` with ``cost[i, perm[i]]`` summing to the least
    (potentials and shortest augmenting paths; columns are 1-based inside, 0 is the root)."""
    cost = np.asarray(cost, dtype=np.float64)
    n = cost.shape[0]
    if cost.shape != (n, n):
        raise ValueError(f"hungarian: cost matrix must be square, got {cost.shape}")
    u = np.zeros(n + 1)
    v = np.zeros(n + 1)
    match = np.zeros(n + 1, dtype=np.int64)  # column -> row (1-based), 0: free
    way = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        match[0] = i
        col = 0
        minv = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[col] = True
            row = match[col]
            free = ~used[1:]
            reduced = cost[row - 1] - u[row] - v[1:]
            better = free & (reduced < minv[1:])
            minv[1:][better] = reduced[better]
            way[1:][better] = col
            candidates = np.where(free, minv[1:], np.inf)
            nxt = int(np.argmin(candidates)) + 1
            delta = candidates[nxt - 1]
            u[match[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            col = nxt
            if match[col] == 0:
                break
        while col:
            prev = way[col]
            match[col] = match[prev]
            col = prev
    perm = np.empty(n, dtype=np.int64)
    perm[match[1:] - 1] = np.arange(n)
    return perm
