"""Per-channel activation statistics: mergeable float64 accumulators (:class:`ChannelStats`).

One batch is folded in with as few passes over it as the statistics allow: when the channel
axis is the last one (dense layers, token sequences) the batch is read where it lies, as a
``[positions, C]`` view, and never copied to float64 (only the centred values that the
variance needs are); other layouts are moved channel-first once. Every sum is float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def check_axis(axis: int, ndim: int) -> int:
    """``axis`` normalised to ``[0, ndim)``.

    Raises:
        ValueError: ``axis`` is out of range for a tensor of rank ``ndim``.
    """
    if not -ndim <= axis < ndim:
        raise ValueError(f"channel axis {axis} is out of range for a rank-{ndim} tensor")
    return axis % ndim


def channels_first(x: np.ndarray, axis: int, where: np.ndarray | None = None) -> np.ndarray:
    """``x`` as a float64 matrix [C, elements], the channel axis first; ``where`` (one bool per
    element of a channel, row-major over the other axes) keeps only those elements."""
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError("a scalar has no channel axis")
    axis = check_axis(axis, x.ndim)
    block = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
    return (block if where is None else block[:, where]).astype(np.float64)


def channels_last(x: np.ndarray, axis: int) -> np.ndarray:
    """``x`` as a matrix [positions, C] (not converted), the channel axis last; a view when it
    is already last."""
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError("a scalar has no channel axis")
    axis = check_axis(axis, x.ndim)
    return np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])


@dataclass(eq=False)
class ChannelStats:
    """Per-channel accumulators over every element of a tensor except its channel axis.

    All sums are float64. Besides the plain sums, ``m2`` (the sum of squared deviations from the
    mean, merged with Chan's parallel formula) keeps the variance accurate when a channel's mean
    is large against its spread, where ``sumsq / n - mean**2`` cancels catastrophically.

    Attributes:
        count: elements seen per channel (the same for every channel).
        sum: per-channel sum.
        sumsq: per-channel sum of squares.
        zeros: per-channel count of exact zeros.
        min: per-channel minimum (``+inf`` before any update).
        max: per-channel maximum (``-inf`` before any update).
        m2: per-channel sum of squared deviations from the running mean.
    """

    count: int
    sum: np.ndarray
    sumsq: np.ndarray
    zeros: np.ndarray
    min: np.ndarray
    max: np.ndarray
    m2: np.ndarray = field(default_factory=lambda: np.empty(0))  # empty: derive from the sums

    def __post_init__(self) -> None:
        if self.m2.shape != np.shape(self.sum):
            # built from sums only: derive it (less accurate, never negative)
            with np.errstate(invalid="ignore", divide="ignore"):
                m2 = self.sumsq - self.sum * self.sum / self.count if self.count else 0.0
            self.m2 = np.maximum(np.zeros_like(self.sum) + m2, 0.0)

    @classmethod
    def empty(cls, channels: int) -> ChannelStats:
        """Accumulators for ``channels`` channels with nothing seen yet."""
        zero = np.zeros(channels, np.float64)
        return cls(
            count=0,
            sum=zero.copy(),
            sumsq=zero.copy(),
            zeros=np.zeros(channels, np.int64),
            min=np.full(channels, np.inf),
            max=np.full(channels, -np.inf),
            m2=zero.copy(),
        )

    @classmethod
    def of(cls, x: np.ndarray, axis: int) -> ChannelStats:
        """Statistics of one array along ``axis`` (one pass)."""
        x = np.asarray(x)
        stats = cls.empty(x.shape[check_axis(axis, x.ndim)] if x.ndim else 0)
        stats.update(x, axis)
        return stats

    @property
    def channels(self) -> int:
        """Number of channels."""
        return len(self.sum)

    def update(self, x: np.ndarray, axis: int, where: np.ndarray | None = None) -> None:
        """Fold every element of ``x`` into the accumulators of its index along ``axis``
        (only the positions ``where`` is true, when given: see :func:`channels_first`).

        Raises:
            ValueError: ``axis`` is out of range, or ``x`` has another number of channels.
        """
        x = np.asarray(x)
        last = x.ndim > 0 and check_axis(axis, x.ndim) == x.ndim - 1
        if last:  # a [positions, C] view: no copy, no conversion of the batch
            block = channels_last(x, axis)
            block = block if where is None else block[where]
            channels, n = block.shape[1], block.shape[0]
        else:
            block = channels_first(x, axis, where)
            channels, n = block.shape
        if channels != self.channels:
            raise ValueError(
                f"tensor has {channels} channels on axis {axis}, the statistics {self.channels}"
            )
        if n == 0:
            return
        self._absorb(block_stats(block, 0 if last else 1))

    def merge(self, other: ChannelStats) -> ChannelStats:
        """The statistics of both data sets together (neither operand changes).

        Raises:
            ValueError: the operands have different channel counts.
        """
        if other.channels != self.channels:
            raise ValueError(f"cannot merge {self.channels} channels with {other.channels}")
        out = self.copy()
        out._absorb(other)
        return out

    def copy(self) -> ChannelStats:
        """An independent copy."""
        return ChannelStats(
            self.count,
            self.sum.copy(),
            self.sumsq.copy(),
            self.zeros.copy(),
            self.min.copy(),
            self.max.copy(),
            self.m2.copy(),
        )

    def _absorb(self, other: ChannelStats) -> None:
        """Fold ``other`` into ``self`` in place (Chan et al.'s pairwise update for ``m2``)."""
        if other.count == 0:
            return
        if self.count == 0:
            self.m2 = other.m2.copy()
        else:
            n = self.count + other.count
            delta = other.sum / other.count - self.sum / self.count
            self.m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / n)
        self.count += other.count
        self.sum = self.sum + other.sum
        self.sumsq = self.sumsq + other.sumsq
        self.zeros = self.zeros + other.zeros
        self.min = np.minimum(self.min, other.min)
        self.max = np.maximum(self.max, other.max)

    def _per_element(self, values: np.ndarray) -> np.ndarray:
        """``values / count``, NaN where nothing was seen."""
        if self.count == 0:
            return np.full(self.channels, np.nan)
        return values / self.count

    @property
    def mean(self) -> np.ndarray:
        """Per-channel mean."""
        return self._per_element(self.sum)

    @property
    def var(self) -> np.ndarray:
        """Per-channel population variance (clipped at 0)."""
        return np.maximum(self._per_element(self.m2), 0.0)

    @property
    def std(self) -> np.ndarray:
        """Per-channel population standard deviation."""
        return np.sqrt(self.var)

    @property
    def rms(self) -> np.ndarray:
        """Per-channel root mean square, ``sqrt(sumsq / count)``."""
        return np.sqrt(self._per_element(self.sumsq))

    @property
    def l2(self) -> np.ndarray:
        """Per-channel L2 norm over all samples and positions (Wanda's ``||X_j||``)."""
        return np.sqrt(self.sumsq)

    @property
    def apoz(self) -> np.ndarray:
        """Per-channel share of exact zeros (average percentage of zeros, as a fraction)."""
        return self._per_element(self.zeros.astype(np.float64))


def block_stats(block: np.ndarray, axis: int = 1) -> ChannelStats:
    """Statistics of a matrix with ``n > 0`` elements per channel along ``axis`` ([C, n] for
    1, [n, C] for 0; any float dtype, summed in float64). ``m2`` is two-pass (the centred
    values), and ``sumsq = m2 + sum * mean``: two non-negative terms, so as exact as a direct
    sum of squares without a second pass over the squares."""
    n = block.shape[axis]
    total = block.sum(axis=axis, dtype=np.float64)
    mean = total / n
    centred = block - (mean if axis == 0 else mean[:, None])  # float64
    subscripts = "ij,ij->j" if axis == 0 else "ij,ij->i"
    m2 = np.einsum(subscripts, centred, centred)
    del centred
    zeros = np.count_nonzero(block == 0, axis=axis).astype(np.int64)
    return ChannelStats(
        count=n,
        sum=total,
        sumsq=m2 + total * mean,
        zeros=zeros,
        min=block.min(axis=axis).astype(np.float64),
        max=block.max(axis=axis).astype(np.float64),
        m2=m2,
    )
