"""Calibration: per-channel activation statistics and activation samples, computed by onnxruntime.

Data-driven criteria (Wanda-style ``|W| * ||X||``, APoZ, variance, least-squares refit) need
activations of intermediate tensors. :func:`collect` streams the wanted tensors over the data
(:func:`onnxprune.runner.stream`: exposure, batches, per-sample retry) and folds each batch into
per-channel accumulators (:class:`ChannelStats`) before the next batch runs: memory does not grow
with the number of samples. :func:`collect_rows` keeps a uniform random subset of activation
vectors instead (bounded by ``max_rows``), for refitting the next layer. :func:`activation_stats`
is the cached entry point for passes.

A tensor's channel axis is given by the caller (``Labels.axis`` from the channel analysis), so
NCHW, NHWC, ``[N, F]`` and ``[N, L, D]`` activations are all handled the same way: statistics
run over every element except the channel axis.
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
from onnxprune.runner import stream

log = logging.getLogger(__name__)

SYNTHETIC_WARNING = (
    "no --data: activation statistics come from synthetic inputs; data-driven criteria are weak"
)
CACHE_PREFIX = "calibrate.activation_stats:"


# --------------------------------------------------------------------------------------------
# per-channel accumulators


def _channels_first(x: np.ndarray, axis: int) -> np.ndarray:
    """``x`` as a float64 matrix [C, elements], the channel axis first."""
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError("a scalar has no channel axis")
    axis = _check_axis(axis, x.ndim)
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1).astype(np.float64)


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

    def update(self, x: np.ndarray, axis: int) -> None:
        """Fold every element of ``x`` into the accumulators of its index along ``axis``.

        Raises:
            ValueError: ``axis`` is out of range, or ``x`` has another number of channels.
        """
        block = _channels_first(x, axis)
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


# --------------------------------------------------------------------------------------------
# public entry points


def collect(
    model: onnx.ModelProto,
    tensors: Mapping[str, int],
    data: Dataset,
    providers: Sequence[str] | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    max_batches: int | None = None,
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

    Returns:
        name -> :class:`ChannelStats`, in the order of ``tensors``.

    Raises:
        ValueError: an unknown tensor name or an out-of-range axis.
        DataError: the data gives no batch or lacks an input.
        PassFailedError: onnxruntime cannot run the model.
    """
    stats: dict[str, ChannelStats] = {}
    batched = stream(
        model,
        list(tensors),
        data,
        providers,
        batch_size=batch_size,
        max_batches=max_batches,
        progress=progress,
    )
    for values in batched:
        for name, axis in tensors.items():
            value = values[name]
            if name not in stats:
                stats[name] = ChannelStats.empty(value.shape[_check_axis(axis, value.ndim)])
            stats[name].update(value, axis)
        del values  # nothing of this batch outlives the next run
    return stats


class _Reservoir:
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
        if len(self.keys) >= self.size:
            pick = pick[keys < self.keys.max()]
        pick = _smallest(keys, pick, self.size)
        new_rows = rows[pick].astype(np.float64)
        if self.rows is None:
            self.rows = np.empty((0, rows.shape[1]))
        keys_all = np.concatenate([self.keys, keys[pick]])
        keep = _smallest(keys_all, np.arange(len(keys_all)), self.size)
        self.keys = keys_all[keep]
        self.index = np.concatenate([self.index, self.seen + pick])[keep]
        self.rows = np.concatenate([self.rows, new_rows])[keep]
        self.seen += len(rows)

    def result(self) -> np.ndarray:
        """The kept rows in stream order."""
        assert self.rows is not None
        return self.rows[np.argsort(self.index, kind="stable")]


def _smallest(keys: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """The (at most ``k``) candidates with the smallest keys, in no particular order."""
    if len(candidates) <= k:
        return candidates
    return candidates[np.argpartition(keys[candidates], k - 1)[:k]]


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
) -> dict[str, np.ndarray]:
    """Activation vectors of ``tensors`` (name -> channel axis), for least-squares refits.

    Each row is the channel vector at one position (spatial, sequence...) of one sample. When
    there are more than ``max_rows`` positions in all, a uniform random subset without
    replacement is kept while streaming (memory stays ``O(max_rows * C)`` plus one batch).

    Args:
        model, tensors, data, providers, batch_size, progress: as :func:`collect`.
        max_rows: most rows kept per tensor.
        seed: seed of the subsampling.

    Returns:
        name -> float64 matrix ``[rows, C]``, rows in stream order (sample, then position).

    Raises:
        ValueError: as :func:`collect`, or ``max_rows < 1``.
        DataError, PassFailedError: as :func:`collect`.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be positive, got {max_rows}")
    rngs = dict(zip(tensors, np.random.default_rng(seed).spawn(len(tensors)), strict=True))
    pools = {name: _Reservoir(max_rows, rngs[name]) for name in tensors}
    batched = stream(
        model, list(tensors), data, providers, batch_size=batch_size, progress=progress
    )
    for values in batched:
        for name, axis in tensors.items():
            pools[name].add(_channels_last(values[name], axis))
        del values
    return {name: pool.result() for name, pool in pools.items()}


def fingerprint(model: onnx.ModelProto) -> str:
    """A digest of everything that decides a model's activations, weight values included.

    Hashes nodes (subgraphs included), inputs, outputs, initializers (all bytes: a sample could
    miss a zeroed channel and serve stale statistics), functions and opsets, part by part so no
    serialised copy of the whole model is made. BLAKE2 hashes over 1 GB/s, far below the cost
    of the runs it saves.
    """
    digest = hashlib.blake2b(digest_size=20)
    graph = model.graph
    parts = (
        graph.node,
        graph.input,
        graph.output,
        graph.initializer,
        graph.sparse_initializer,
        model.functions,
        model.opset_import,
    )
    for group in parts:
        digest.update(len(group).to_bytes(8, "little"))
        for item in group:
            blob = item.SerializeToString()
            digest.update(len(blob).to_bytes(8, "little"))
            digest.update(blob)
    return digest.hexdigest()


def activation_stats(
    ctx: Context,
    model: onnx.ModelProto,
    tensors: Mapping[str, int],
    *,
    progress: bool = False,
) -> dict[str, ChannelStats]:
    """Statistics of ``tensors`` on ``ctx``'s data, computed once per model and tensor set.

    The result is cached in ``ctx.cache`` under the model's :func:`fingerprint` and the sorted
    (name, axis) pairs, so passes that ask for the same thing share one run; treat it as
    read-only. Without a data file the inputs are synthetic, and a warning says so.

    Raises:
        ValueError, DataError, PassFailedError: as :func:`collect`.
    """
    key = _cache_key(model, tensors)
    if key in ctx.cache:
        return ctx.cache[key]
    data = ctx.data(model)
    if data.synthetic:
        log.warning(SYNTHETIC_WARNING)
    if ctx.workers is None:
        stats = collect(model, tensors, data, providers=ctx.providers, progress=progress)
    else:  # one Ray task per shard of the data, merged in shard order
        stats = ctx.workers.merged(collect, model, data, tensors=tensors, providers=ctx.providers)
    ctx.cache[key] = stats
    return stats


def _cache_key(model: onnx.ModelProto, tensors: Mapping[str, int]) -> str:
    """``ctx.cache`` key: model fingerprint plus the sorted (name, axis) pairs."""
    pairs = repr(sorted((name, int(axis)) for name, axis in tensors.items()))
    tensor_digest = hashlib.blake2b(pairs.encode(), digest_size=12).hexdigest()
    return f"{CACHE_PREFIX}{fingerprint(model)}:{tensor_digest}"
