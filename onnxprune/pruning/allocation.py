"""Allocations of pruning across groups, shared by budget mode's two searches.

Rules:
    1. A uniform ratio prunes every group's largest allowed count at or below that share
       (:func:`grid`: every ratio some ladder can take exactly).
    2. A global threshold on the standardised scores prunes, in every group, the classes
       scoring at most it, rounded down to an allowed count (FLAP's allocation).
    3. A group's damage curve interpolates its sensitivity points (pruned alone), made
       monotone, extended past the last point by the last slope.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from onnxprune.pruning.sensitivity import Judge, Ladder, Measure


def grid(lads: Sequence[Ladder]) -> list[float]:
    """Uniform ratios from 0 to the largest any ladder allows, one per allowed count."""
    ratios = {k / lad.total for lad in lads for k in lad.steps}
    return sorted(ratios)


def uniform_levels(lads: Sequence[Ladder]) -> list[tuple[int, ...]]:
    """Rule 1: each ratio of :func:`grid` as per-group counts, ascending."""
    return [tuple(lad.count(r) for lad in lads) for r in grid(lads)]


def threshold(lads: Sequence[Ladder], t: float) -> tuple[int, ...]:
    """Rule 2: each ladder's count when every class scoring at most ``t`` goes."""
    out = []
    for lad in lads:
        n = int(np.searchsorted(lad.scores, t, side="right"))
        out.append(max(k for k in lad.steps if k <= n))
    return tuple(out)


def threshold_levels(lads: Sequence[Ladder]) -> list[tuple[int, ...]]:
    """Rule 2 at every pooled score, ascending, the empty choice first."""
    pooled = np.unique(np.concatenate([lad.scores for lad in lads])) if lads else np.zeros(0)
    return [tuple(0 for _ in lads), *(threshold(lads, t) for t in pooled)]


def bisect(levels: Sequence[tuple[int, ...]], holds: Any) -> tuple[int, ...]:
    """The last of ``levels`` (growing; the first holds) that holds, by bisection."""
    unique = list(dict.fromkeys(levels))
    if not unique:
        return ()
    if holds(unique[-1]):
        return unique[-1]
    lo, hi = 0, len(unique) - 1  # unique[0]: nothing pruned, assumed to hold
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if holds(unique[mid]):
            lo = mid
        else:
            hi = mid
    return unique[lo]


def points(judge: Judge, lad: Ladder, table_row: dict[str, Any]) -> list[tuple[float, Measure]]:
    """A group's sensitivity points as (ratio, measure), from the judge's cache (the table
    judged them already)."""
    return [(p["ratio"], judge.measure(lad.take(p["pruned"]))) for p in table_row["points"]]


def curve(
    pts: Sequence[tuple[float, Measure]], damage: Callable[[Measure], float]
) -> Callable[[float], float]:
    """Rule 3: damage of one group pruned alone at a ratio, from its sensitivity points."""
    xs = [0.0] + [r for r, _ in pts]
    ys = [0.0] + [damage(m) for _, m in pts]
    order = np.argsort(xs, kind="stable")
    x, y = np.asarray(xs)[order], np.maximum.accumulate(np.asarray(ys)[order])
    slope = (y[-1] - y[-2]) / max(x[-1] - x[-2], 1e-9) if len(x) > 1 else 0.0

    def at(r: float) -> float:
        return float(np.interp(r, x, y)) + max(r - x[-1], 0.0) * max(slope, 1e-3)

    return at
