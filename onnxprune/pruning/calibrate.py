"""Calibration: per-channel activation statistics and activation samples, computed by onnxruntime.

:func:`collect` streams tensors over the data and folds each batch into per-channel
accumulators (:class:`ChannelStats`, mergeable) before the next runs; :func:`collect_rows`
keeps a bounded uniform subset of activation vectors; :func:`collect_sample` does both in one
pass; :func:`activation_stats` / :func:`activation_rows` are the cached entry points. Padded
tokens are skipped when a mask input is named (:mod:`onnxprune.pruning.masks`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.context import Context
from onnxprune.data import Dataset
from onnxprune.pruning.fingerprints import fingerprint
from onnxprune.pruning.masks import positions
from onnxprune.pruning.reservoir import Reservoir
from onnxprune.runner import stream

log = logging.getLogger(__name__)

SYNTHETIC_WARNING = (
    "no --data: activation statistics come from synthetic inputs; data-driven criteria are weak"
)
CACHE_PREFIX = "calibrate.activation_stats:"


# --------------------------------------------------------------------------------------------
# per-channel accumulators


def _channels_first(x: np.ndarray, axis: int, where: np.ndarray | None = None) -> np.ndarray:
    """``x`` as a float64 matrix [C, elements], the channel axis first; ``where`` (one bool per
    element of a channel, row-major over the other axes) keeps only those elements."""
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError("a scalar has no channel axis")
    axis = _check_axis(axis, x.ndim)
    block = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
    return (block if where is None else block[:, where]).astype(np.float64)


def _channels_last(x: np.ndarray, axis: int) -> np.ndarray:
    """``x`` as a matrix [positions, C] (not converted), the channel axis last."""
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError("a scalar has no channel axis")
    axis = _check_axis(axis, x.ndim)
    return np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])


def _check_axis(axis: int, ndim: int) -> int:
    """``axis`` normalised to ``[0, ndim)``.

    Raises:
        ValueError: ``axis`` is out of range for a tensor of rank ``ndim``.
    """
    if not -ndim <= axis < ndim:
        raise ValueError(f"channel axis {axis} is out of range for a rank-{ndim} tensor")
    return axis % ndim


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
        stats = cls.empty(x.shape[_check_axis(axis, x.ndim)] if x.ndim else 0)
        stats.update(x, axis)
        return stats

    @property
    def channels(self) -> int:
        """Number of channels."""
        return len(self.sum)

    def update(self, x: np.ndarray, axis: int, where: np.ndarray | None = None) -> None:
        """Fold every element of ``x`` into the accumulators of its index along ``axis``
        (only the positions ``where`` is true, when given: see :func:`_channels_first`).

        Raises:
            ValueError: ``axis`` is out of range, or ``x`` has another number of channels.
        """
        block = _channels_first(x, axis, where)
        if block.shape[0] != self.channels:
            raise ValueError(
                f"tensor has {block.shape[0]} channels on axis {axis}, the statistics "
                f"{self.channels}"
            )
        if block.shape[1] == 0:
            return
        self._absorb(_block_stats(block))

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


def _block_stats(block: np.ndarray) -> ChannelStats:
    """Statistics of a float64 matrix [C, n] with ``n > 0`` (two-pass ``m2``)."""
    n = block.shape[1]
    total = block.sum(axis=1)
    centred = block - (total / n)[:, None]
    return ChannelStats(
        count=n,
        sum=total,
        sumsq=np.einsum("ij,ij->i", block, block),
        zeros=np.count_nonzero(block == 0, axis=1).astype(np.int64),
        min=block.min(axis=1),
        max=block.max(axis=1),
        m2=np.einsum("ij,ij->i", centred, centred),
    )


def collect(
    model: onnx.ModelProto,
    tensors: Mapping[str, int],
    data: Dataset,
    providers: Sequence[str] | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    max_batches: int | None = None,
    *,
    mask: str | None = None,
    rows: dict[str, np.ndarray] | None = None,
    max_rows: int = 2048,
    seed: int = 0,
) -> dict[str, ChannelStats]:
    """Per-channel statistics of ``tensors`` (name -> channel axis) over ``data``.

    Args:
        model: the model; not modified (its tensors are exposed only while the session is
            created, see :mod:`onnxprune.runner`).
        tensors: tensor name -> channel axis (negative counts from the end). Graph inputs and
            main-graph node outputs are accepted.
        data: the inputs; batched by :func:`onnxprune.runner.plan` (a model declared with a
            fixed batch runs on batches of that size).
        providers: onnxruntime providers, best first (CPU when None).
        batch_size: samples per run for a model with a dynamic batch
            (:data:`onnxprune.runner.DEFAULT_BATCH` when None).
        progress: show a progress bar on stderr when it is a terminal.
        max_batches: stop after this many batches.
        mask: a padding-mask input ``[batch, sequence]``: positions where it is 0 are left
            out of every tensor shaped ``[batch, sequence]`` besides its channel axis
            (:func:`onnxprune.pruning.masks.positions`).
        rows, max_rows, seed: a dict given as ``rows`` receives, from the same run, at most
            ``max_rows`` sampled rows per tensor (:func:`collect_rows`).

    Returns:
        name -> :class:`ChannelStats`, in the order of ``tensors``.

    Raises:
        ValueError: an unknown tensor name or an out-of-range axis.
        DataError: the data gives no batch or lacks an input.
        PassFailedError: onnxruntime cannot run the model.
    """
    stats, sampled = collect_sample(
        model,
        tensors,
        data,
        providers,
        max_rows=max_rows if rows is not None else 0,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
        max_batches=max_batches,
        mask=mask,
    )
    if rows is not None:
        rows.update(sampled)
    return stats


def collect_rows(
    model: onnx.ModelProto,
    tensors: Mapping[str, int],
    data: Dataset,
    max_rows: int = 4096,
    seed: int = 0,
    providers: Sequence[str] | None = None,
    *,
    batch_size: int | None = None,
    progress: bool = False,
    mask: str | None = None,
) -> dict[str, np.ndarray]:
    """Activation vectors of ``tensors`` (name -> channel axis), for least-squares refits.

    Each row is the channel vector at one position of one sample; past ``max_rows`` positions
    a uniform random subset (seeded by ``seed``) is kept while streaming (memory
    ``O(max_rows * C)`` plus one batch). Other arguments as :func:`collect`.

    Returns name -> float64 matrix ``[rows, C]``, rows in stream order (sample, then position).
    Raises as :func:`collect` (ValueError also for ``max_rows < 1``).
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be positive, got {max_rows}")
    _, rows = collect_sample(
        model,
        tensors,
        data,
        providers,
        max_rows=max_rows,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
        mask=mask,
        stats=False,
    )
    return rows


def collect_sample(
    model: onnx.ModelProto,
    tensors: Mapping[str, int],
    data: Dataset,
    providers: Sequence[str] | None = None,
    *,
    max_rows: int = 2048,
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool = False,
    max_batches: int | None = None,
    mask: str | None = None,
    stats: bool = True,
) -> tuple[dict[str, ChannelStats], dict[str, np.ndarray]]:
    """:func:`collect` and :func:`collect_rows` in one pass over the data: the statistics
    (empty with ``stats=False``) and at most ``max_rows`` sampled rows per tensor (none with
    ``max_rows=0``). Statistics are mergeable (:meth:`ChannelStats.merge`), so shards of the
    data may be collected apart and merged."""
    out: dict[str, ChannelStats] = {}
    rngs = dict(zip(tensors, np.random.default_rng(seed).spawn(len(tensors)), strict=True))
    pools = {name: Reservoir(max_rows, rngs[name]) for name in tensors} if max_rows else {}
    names = list(tensors) + ([mask] if mask and mask not in tensors else [])
    batched = stream(
        model,
        names,
        data,
        providers,
        batch_size=batch_size,
        max_batches=max_batches,
        progress=progress,
    )
    for values in batched:
        for name, axis in tensors.items():
            value = values[name]
            real = positions(values[mask] if mask else None, value, axis)
            if stats:
                if name not in out:
                    out[name] = ChannelStats.empty(value.shape[_check_axis(axis, value.ndim)])
                out[name].update(value, axis, real)
            if pools:
                rows = _channels_last(value, axis)
                pools[name].add(rows if real is None else rows[real])
        del values  # nothing of this batch outlives the next run
    return out, {name: pool.result() for name, pool in pools.items()}


def activation_stats(
    ctx: Context,
    model: onnx.ModelProto,
    tensors: Mapping[str, int],
    *,
    progress: bool = False,
    mask: str | None = None,
    rows: int = 0,
) -> dict[str, ChannelStats]:
    """Statistics of ``tensors`` on ``ctx``'s data, computed once per model and tensor set.

    The result is cached in ``ctx.cache`` under the model's :func:`fingerprint`, the sorted
    (name, axis) pairs and the ``mask`` input (see :func:`collect`), so passes that ask for the
    same thing share one run; treat it as read-only. ``rows > 0`` samples that many rows per
    tensor in the same run, for :func:`activation_rows`. Without a data file the inputs are
    synthetic, and a warning says so. Raises as :func:`collect`.
    """
    key = _cache_key(model, tensors, mask)
    if key in ctx.cache:
        return ctx.cache[key]
    data = ctx.data(model)
    if data.synthetic:
        log.warning(SYNTHETIC_WARNING)
    sampled: dict[str, np.ndarray] = {}
    if ctx.workers is not None:  # Ray tasks per shard, merged in shard order; rows are not
        # mergeable into one run's sample, so activation_rows draws them in this process
        run = ctx.workers.merged
        stats = run(collect, model, data, tensors=tensors, providers=ctx.providers, mask=mask)
        rows = 0
    else:
        out = sampled if rows else None
        stats = collect(
            model, tensors, data, ctx.providers, progress=progress, mask=mask, rows=out,
            max_rows=rows, seed=ctx.seed,
        )  # fmt: skip
    ctx.cache[key] = stats
    if rows:
        ctx.cache[f"{key}:rows{rows}"] = sampled
    return stats


def activation_rows(
    ctx: Context,
    model: onnx.ModelProto,
    tensors: Mapping[str, int],
    max_rows: int,
    *,
    mask: str | None = None,
) -> dict[str, np.ndarray]:
    """Sampled rows of ``tensors`` (:func:`collect_rows`, seeded by ``ctx.seed``), cached like
    :func:`activation_stats` (which fills this cache too when asked for ``rows``)."""
    key = f"{_cache_key(model, tensors, mask)}:rows{max_rows}"
    if key not in ctx.cache:
        data = ctx.data(model)
        ctx.cache[key] = collect_rows(
            model, tensors, data, max_rows, ctx.seed, ctx.providers, mask=mask
        )
    return ctx.cache[key]


def _cache_key(model: onnx.ModelProto, tensors: Mapping[str, int], mask: str | None = None) -> str:
    """``ctx.cache`` key: model fingerprint plus the sorted (name, axis) pairs (and mask)."""
    pairs = repr(sorted((name, int(axis)) for name, axis in tensors.items()))
    tensor_digest = hashlib.blake2b(pairs.encode(), digest_size=12).hexdigest()
    masked = f":mask={mask}" if mask else ""
    return f"{CACHE_PREFIX}{fingerprint(model)}:{tensor_digest}{masked}"
