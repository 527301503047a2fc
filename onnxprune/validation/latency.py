"""Latency of two models measured fairly: warm-up, interleaved rounds, median and p90.

Timing one model after the other lets drift (CPU frequency, caches, other processes) favour one
of them. Here every round runs each callable once, and the order rotates from round to round
(``a, b`` then ``b, a``...), so neither always goes first. Statistics are robust ones: the
median, and the 90th percentile (linear interpolation between closest ranks, as numpy's
default) for the tail.

Whether two models differ is a statistical question, not a comparison of two medians: the
ratio of the medians comes with a bootstrap confidence interval (:func:`ratio_interval`) that
resamples the interleaved rounds as pairs, so drift shared by a round cancels out. A slowdown
or a latency gate is judged by that interval (:class:`LatencyComparison`), never by the point
estimate alone, so a model against itself gives the same verdict run after run.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from onnxprune import progress

Clock = Callable[[], float]
CONFIDENCE = 0.99  # two-sided: each tail of the interval holds 0.5%
RESAMPLES = 2000
MARGIN = 0.05  # differences within 5% are not told apart from noise (two sessions of one model)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, interpolating linearly between ranks.

    Raises:
        ValueError: no values, or ``q`` outside 0-100.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q={q} is outside 0-100")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class LatencyStats:
    """Statistics of one model's timed runs, in milliseconds."""

    runs: int
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float

    @classmethod
    def from_seconds(cls, samples: Sequence[float]) -> LatencyStats:
        """Statistics of durations given in seconds.

        Raises:
            ValueError: no samples.
        """
        if not samples:
            raise ValueError("no timed runs")
        ms = [s * 1e3 for s in samples]
        return cls(
            runs=len(ms),
            median_ms=statistics.median(ms),
            p90_ms=percentile(ms, 90),
            mean_ms=statistics.fmean(ms),
            min_ms=min(ms),
            max_ms=max(ms),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures."""
        return asdict(self)


def round_order(n: int, round_index: int) -> list[int]:
    """Indices of ``n`` callables in the order round ``round_index`` runs them (rotated)."""
    shift = round_index % n if n else 0
    return list(range(shift, n)) + list(range(shift))


def interleaved(
    fns: Sequence[Callable[[], object]],
    runs: int,
    warmup: int = 3,
    clock: Clock = time.perf_counter,
) -> list[list[float]]:
    """Time each callable ``runs`` times, interleaved; returns durations (seconds) per callable.

    First ``warmup`` untimed rounds (each callable once, in order), then ``runs`` timed rounds
    whose order rotates (see :func:`round_order`).

    Raises:
        ValueError: ``runs`` < 1 or ``warmup`` < 0.
    """
    if runs < 1:
        raise ValueError("runs must be at least 1")
    if warmup < 0:
        raise ValueError("warmup must be >= 0")
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    with progress.task(runs, "latency runs") as advance:
        for r in range(runs):
            for i in round_order(len(fns), r):
                start = clock()
                fns[i]()
                times[i].append(clock() - start)
            advance()
    return times


def ratio_interval(
    original: Sequence[float],
    pruned: Sequence[float],
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Bootstrap ``confidence`` interval of median(pruned) / median(original).

    Round ``i`` timed ``original[i]`` and ``pruned[i]`` next to each other, so rounds are
    resampled as pairs (``resamples`` times, with replacement; a fixed ``seed`` makes the
    interval reproducible); the interval is the percentile interval of the resampled ratios.

    Raises:
        ValueError: no rounds, or the two lists differ in length.
    """
    a, b = np.asarray(original, np.float64), np.asarray(pruned, np.float64)
    if not len(a) or len(a) != len(b):
        raise ValueError(f"need paired rounds, got {len(a)} and {len(b)} timings")
    idx = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    num, den = np.median(b[idx], axis=1), np.median(a[idx], axis=1)
    ratios = np.divide(num, den, out=np.full(resamples, np.inf), where=den > 0)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(ratios, [tail, 100 - tail])
    return float(lo), float(hi)


def within_limit(low: float, limit: float) -> bool:
    """Whether a ratio whose interval starts at ``low`` is allowed under ``limit``."""
    return low <= limit * (1 + MARGIN)


@dataclass
class LatencyComparison:
    """Latency of the original and the pruned model; truthy when the ratio is allowed.

    ``ratio`` is pruned median / original median (below 1 = faster) and ``interval`` its
    confidence interval (:func:`ratio_interval`; None when only statistics are known). The ratio
    is allowed unless it exceeds ``max_ratio`` beyond doubt: the whole interval (without one,
    the ratio itself) lies more than ``MARGIN`` above it, so two sessions of one model, which
    may differ by a few percent however long they are timed, pass a limit of 1. Whether the
    pruned model counts as slower is :func:`onnxprune.validation.slow.is_slower`.
    """

    original: LatencyStats
    pruned: LatencyStats
    max_ratio: float | None = None
    interval: tuple[float, float] | None = None

    @property
    def ratio(self) -> float:
        """Pruned median over original median."""
        return (
            self.pruned.median_ms / self.original.median_ms if self.original.median_ms else math.inf
        )

    @property
    def within_noise(self) -> bool:
        """Whether the medians differ by less than either model's median-to-p90 spread."""
        spread = max(
            self.original.p90_ms - self.original.median_ms,
            self.pruned.p90_ms - self.pruned.median_ms,
        )
        return abs(self.pruned.median_ms - self.original.median_ms) <= spread

    @property
    def low(self) -> float:
        """The smallest ratio the timings allow: the interval's lower end (or the ratio)."""
        return self.interval[0] if self.interval is not None else self.ratio

    def __bool__(self) -> bool:
        return self.max_ratio is None or within_limit(self.low, self.max_ratio)

    def __str__(self) -> str:
        o, p = self.original, self.pruned
        ci = ""
        if self.interval is not None:
            ci = f", {CONFIDENCE:.0%} interval {self.interval[0]:.3f}-{self.interval[1]:.3f}"
        return (
            f"median {o.median_ms:.3f} -> {p.median_ms:.3f} ms (ratio {self.ratio:.3f}{ci}), p90 "
            f"{o.p90_ms:.3f} -> {p.p90_ms:.3f} ms, {o.runs} interleaved runs each: "
            f"{'PASSED' if self else 'FAILED'}"
        )


def compare_latency(
    run_original: Callable[[], object],
    run_pruned: Callable[[], object],
    runs: int,
    warmup: int = 3,
    *,
    max_ratio: float | None = None,
    clock: Clock = time.perf_counter,
) -> LatencyComparison:
    """Time both callables interleaved; their statistics and the ratio's interval."""
    t_orig, t_new = interleaved([run_original, run_pruned], runs, warmup, clock)
    return LatencyComparison(
        LatencyStats.from_seconds(t_orig),
        LatencyStats.from_seconds(t_new),
        max_ratio,
        ratio_interval(t_orig, t_new),
    )
