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
from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.context import Context
from onnxprune.data import Dataset
from onnxprune.pruning.channel_stats import ChannelStats, channels_last, check_axis
from onnxprune.pruning.fingerprints import fingerprint
from onnxprune.pruning.masks import positions
from onnxprune.pruning.reservoir import Reservoir
from onnxprune.runner import DEFAULT_BATCH, plan, stream

log = logging.getLogger(__name__)

SYNTHETIC_WARNING = (
    "no --data: activation statistics come from synthetic inputs; data-driven criteria are weak"
)
CACHE_PREFIX = "calibrate.activation_stats:"
BATCH_BYTES = 32 << 20  # float32 bytes of the streamed tensors one calibration batch may hold
MAX_BATCH = 1024  # samples per calibration batch, at most


def calibration_batch(bytes_per_sample: float) -> int:
    """Samples per calibration batch for a model with a dynamic batch: ``DEFAULT_BATCH``,
    doubled while the streamed tensors of one batch stay within :data:`BATCH_BYTES`, at most
    :data:`MAX_BATCH` (larger runs keep onnxruntime's kernels busy; never below the default,
    so large activations stream as before)."""
    size = DEFAULT_BATCH
    while size * 2 <= MAX_BATCH and size * 2 * bytes_per_sample <= BATCH_BYTES:
        size *= 2
    return size


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
    outputs: dict[str, np.ndarray] | None = None,
    max_outputs: int = 0,
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
        outputs, max_outputs: a dict given as ``outputs`` receives, from the same run, the
            model's outputs on its first ``max_outputs`` samples when they could be kept
            (:func:`collect_sample`; left empty otherwise).

    Returns:
        name -> :class:`ChannelStats`, in the order of ``tensors``.

    Raises:
        ValueError: an unknown tensor name or an out-of-range axis.
        DataError: the data gives no batch or lacks an input.
        PassFailedError: onnxruntime cannot run the model.
    """
    got = collect_sample(
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
        outputs=max_outputs if outputs is not None else 0,
    )
    if rows is not None:
        rows.update(got.rows or {})
    if outputs is not None:
        outputs.update(got.outputs or {})
    return got.stats


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
    got = collect_sample(
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
    return got.rows or {}


@dataclass
class Sample:
    """What one calibration pass gives: statistics, sampled rows, and the model's outputs on
    its first samples (``outputs``: None when not asked for, or not cut along axis 0)."""

    stats: dict[str, ChannelStats]
    rows: dict[str, np.ndarray] | None
    outputs: dict[str, np.ndarray] | None = None


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
    outputs: int = 0,
) -> Sample:
    """:func:`collect` and :func:`collect_rows` in one pass over the data: the statistics
    (empty with ``stats=False``), at most ``max_rows`` sampled rows per tensor (none with
    ``max_rows=0``) and, with ``outputs > 0``, the model's outputs on its first ``outputs``
    samples (what :func:`onnxprune.runner.outputs` gives on them: no second run). Statistics
    are mergeable (:meth:`ChannelStats.merge`), so shards of the data may be collected apart
    and merged."""
    out: dict[str, ChannelStats] = {}
    rngs = dict(zip(tensors, np.random.default_rng(seed).spawn(len(tensors)), strict=True))
    pools = {name: Reservoir(max_rows, rngs[name]) for name in tensors} if max_rows else {}
    heads = _Heads(model, data, outputs, batch_size)
    names = list(tensors) + ([mask] if mask and mask not in tensors else []) + heads.names
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
        heads.add(values)
        for name, axis in tensors.items():
            value = values[name]
            real = positions(values[mask] if mask else None, value, axis)
            if stats:
                if name not in out:
                    out[name] = ChannelStats.empty(value.shape[check_axis(axis, value.ndim)])
                out[name].update(value, axis, real)
            if pools:
                block = channels_last(value, axis)
                pools[name].add(block if real is None else block[real])
        del values  # nothing of this batch outlives the next run
    sampled = {name: pool.result() for name, pool in pools.items()}
    return Sample(out, sampled, heads.result())


class _Heads:
    """The graph outputs of the first ``samples`` samples, copied batch by batch from a run
    that streams other tensors. Given up (None) unless every input has its samples on axis 0
    and every output has exactly the batch's samples on axis 0."""

    def __init__(
        self, model: onnx.ModelProto, data: Dataset, samples: int, batch_size: int | None
    ) -> None:
        axis_zero = all(data.sample_axis(name) in (0, None) for name in data.inputs)
        wanted = samples > 0 and axis_zero and len(model.graph.output) > 0
        self.names = [o.name for o in model.graph.output] if wanted else []
        self.plan = plan(model, data, batch_size=batch_size)
        self.wanted = plan(model, data, limit=samples).samples if wanted else 0
        self.batch = 0
        self.parts: dict[str, list[np.ndarray]] | None = {n: [] for n in self.names}

    def add(self, values: Mapping[str, np.ndarray]) -> None:
        """Keep this batch's share of the first samples (a copy)."""
        start = self.batch * self.plan.size
        self.batch += 1
        if self.parts is None or start >= self.wanted:
            return
        count = min(self.plan.size, self.plan.samples - start)  # samples in this batch
        take = min(count, self.wanted - start)
        for name in self.names:
            value = values[name]
            if not isinstance(value, np.ndarray) or value.ndim == 0 or len(value) != count:
                self.parts = None  # not cut along axis 0: the caller runs the model itself
                return
            self.parts[name].append(np.array(value[:take]))

    def result(self) -> dict[str, np.ndarray] | None:
        """The outputs by name, or None (not asked for, or given up)."""
        if not self.names or self.parts is None:
            return None
        if sum(len(p) for p in self.parts[self.names[0]]) < self.wanted:
            return None  # fewer batches ran (max_batches)
        return {n: np.concatenate(p) for n, p in self.parts.items()}


def activation_sample(
    ctx: Context,
    model: onnx.ModelProto,
    tensors: Mapping[str, int],
    *,
    progress: bool = False,
    mask: str | None = None,
    rows: int = 0,
    outputs: int = 0,
    batch_size: int | None = None,
) -> Sample:
    """Statistics of ``tensors`` on ``ctx``'s data, computed once per model and tensor set.

    The result is cached in ``ctx.cache`` under the model's :func:`fingerprint`, the sorted
    (name, axis) pairs and the ``mask`` input (see :func:`collect`), so passes that ask for the
    same thing share one run; treat it as read-only. ``rows > 0`` samples that many rows per
    tensor in the same run (cached for :func:`activation_rows`; None when the run was cached
    without them, or ran on Ray workers); ``outputs > 0`` keeps the model's outputs on that
    many first samples (:func:`collect_sample`; None where not kept). Without a data file the
    inputs are synthetic, and a warning says so. ``batch_size``: as :func:`collect` (see
    :func:`calibration_batch`). Raises as :func:`collect`.
    """
    key = _cache_key(model, tensors, mask)
    rows_key, outputs_key = f"{key}:rows{rows}", f"{key}:outputs{outputs}"
    if key in ctx.cache:
        return Sample(ctx.cache[key], ctx.cache.get(rows_key), ctx.cache.get(outputs_key))
    data = ctx.data(model)
    if data.synthetic:
        log.warning(SYNTHETIC_WARNING)
    if ctx.workers is not None:  # Ray tasks per shard, merged in shard order; rows are not
        # mergeable into one run's sample, so activation_rows draws them in this process
        run = ctx.workers.merged
        stats = run(collect, model, data, tensors=tensors, providers=ctx.providers, mask=mask)
        got = Sample(stats, None)
    else:  # through collect: the one entry point of a calibration run
        sampled: dict[str, np.ndarray] = {}
        heads: dict[str, np.ndarray] = {}
        stats = collect(
            model, tensors, data, ctx.providers, batch_size, progress, mask=mask,
            rows=sampled if rows else None, max_rows=rows, seed=ctx.seed,
            outputs=heads if outputs else None, max_outputs=outputs,
        )  # fmt: skip
        got = Sample(stats, sampled if rows else None, heads or None)
        if rows:
            ctx.cache[rows_key] = sampled
        if heads:
            ctx.cache[outputs_key] = heads
    ctx.cache[key] = got.stats
    return got


def activation_stats(
    ctx: Context,
    model: onnx.ModelProto,
    tensors: Mapping[str, int],
    *,
    progress: bool = False,
    mask: str | None = None,
    rows: int = 0,
) -> dict[str, ChannelStats]:
    """The statistics of :func:`activation_sample` (same cache; ``rows``: as there)."""
    return activation_sample(ctx, model, tensors, progress=progress, mask=mask, rows=rows).stats


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
