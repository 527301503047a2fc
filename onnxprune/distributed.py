"""Calibration and evaluation over shards of the data as Ray tasks (``--workers``,
``--ray-address``).

Rules:
    1. Ray is optional (``pip install 'onnxprune[ray]'``): it is imported only here, and
       :func:`require_ray` fails with the install line when it is missing, before any work.
    2. Shards are contiguous ranges of whole batches of :func:`onnxprune.runner.plan` for the
       model, in order (:func:`shard_ranges`): every shard runs exactly the batches one
       process would (a fixed-batch model drops its ragged tail once, at the end), so merged
       statistics equal a single-process run up to float64 rounding.
    3. Each task gets the model (packed once into the object store, its large weights as raw
       bytes beside a weightless skeleton, so models past protobuf's 2 GB travel too) and its
       shard of the data, and calls a module-level function of onnxprune on them: that
       function makes the task's own onnxruntime session (through :mod:`onnxprune.runtime`).
       Results come back in shard order (:meth:`Workers.map`); :meth:`Workers.merged`
       merges them in that order (per-channel statistics).
    4. The cluster: without an address, :class:`Workers` starts a local one with ``count``
       CPUs on first use and :meth:`Workers.close` stops it; with an address it joins that
       cluster and ``close`` only disconnects (the cluster stays up). A Ray already
       initialised in this process (by the caller) is used as it is, whatever ``address``
       says, and left running.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol, TypeVar

import onnx

from onnxprune.data import Dataset
from onnxprune.errors import ArgumentError, DeviceError, MissingDependency, first_line
from onnxprune.runner import plan

RAY_INSTALL = "pip install 'onnxprune[ray]'"
PACK_MIN_BYTES = 1 << 20  # initializers at least this large travel as raw bytes

Result = TypeVar("Result")
Merge = TypeVar("Merge", bound="Mergeable")
Packed = tuple[bytes, dict[str, bytes]]


class Mergeable(Protocol):
    """A partial result that combines with the next shard's (``ChannelStats.merge``)."""

    def merge(self: Merge, other: Merge, /) -> Merge: ...


def require_ray() -> ModuleType:
    """Import Ray now, or fail with the one-line install hint (rule 1).

    Raises:
        MissingDependency: Ray is not installed.
    """
    try:
        import ray  # noqa: PLC0415 - optional dependency, imported lazily
    except ImportError:
        raise MissingDependency(
            f"--workers needs Ray, which is not installed: {RAY_INSTALL}"
        ) from None
    return ray


def shard_ranges(batches: int, size: int, samples: int, parts: int) -> list[tuple[int, int]]:
    """Sample ranges ``[start, stop)`` of at most ``parts`` shards of whole batches (rule 2).

    ``batches`` batches of ``size`` samples cover ``samples`` samples (the last batch may be
    shorter); the shards split the batches as evenly as possible, in order, none empty.
    """
    parts = max(1, min(parts, batches))
    base, extra = divmod(batches, parts)
    ranges, first = [], 0
    for index in range(parts):
        last = first + base + (index < extra)
        ranges.append((first * size, min(last * size, samples)))
        first = last
    return ranges


def pack(model: onnx.ModelProto) -> Packed:
    """``model`` as a weightless skeleton (bytes) and its large weights' raw bytes by name.

    Every initializer of at least :data:`PACK_MIN_BYTES` stored in the model (``raw_data``)
    is left out of the skeleton, so the skeleton stays far below protobuf's 2 GB limit;
    :func:`unpack` puts them back. The model is not changed.
    """
    skeleton = onnx.ModelProto()
    weights: dict[str, bytes] = {}
    graph = model.graph
    _copy_fields(skeleton, model, skip="graph")
    _copy_fields(skeleton.graph, graph, skip="initializer")
    for tensor in graph.initializer:
        if tensor.HasField("raw_data") and tensor.ByteSize() >= PACK_MIN_BYTES:
            weights[tensor.name] = tensor.raw_data
            _copy_fields(skeleton.graph.initializer.add(), tensor, skip="raw_data")
        else:
            skeleton.graph.initializer.append(tensor)
    return skeleton.SerializeToString(), weights


def _copy_fields(dst: Any, src: Any, skip: str) -> None:
    """Every field set in message ``src`` but ``skip``, into ``dst`` (repeated ones appended)."""
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        repeated = getattr(fd, "is_repeated", None)  # protobuf >= 6; before: the label
        if repeated if repeated is not None else fd.label == fd.LABEL_REPEATED:
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def unpack(packed: Packed) -> onnx.ModelProto:
    """The model :func:`pack` packed, initializers in their original order."""
    blob, weights = packed
    model = onnx.ModelProto.FromString(blob)
    for tensor in model.graph.initializer:
        if tensor.name in weights:
            tensor.raw_data = weights[tensor.name]
    return model


def run_shard(
    fn: Callable[..., Result], packed: Packed, data: Dataset, kwargs: dict[str, Any]
) -> Result:
    """One task: ``fn(model, data=data, **kwargs)`` on the unpacked model (rule 3)."""
    return fn(unpack(packed), data=data, **kwargs)


def reachable(address: str, timeout: float = 10.0) -> None:
    """Check that ``host:port`` (``ray://host:port`` too) accepts connections, so a wrong
    ``--ray-address`` fails in seconds instead of Ray's minutes of retries; ``auto`` and
    addresses without a port are left to Ray.

    Raises:
        DeviceError: nothing listens there.
    """
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise DeviceError(
            f"--ray-address {address}: no Ray cluster answers there ({first_line(exc)}); give "
            "the address of a running cluster's head (host:6379, or ray://host:10001)"
        ) from None


@dataclass
class Workers:
    """Where shards run: ``count`` Ray tasks, on a local cluster or the one at ``address``.

    Attributes:
        count: shards (tasks) per call of :meth:`map`, at least 1; also the CPUs of a local
            cluster.
        address: a Ray cluster to join (``ray://host:10001``, ``host:6379`` or ``auto``);
            None starts a local cluster on first use.
    """

    count: int
    address: str | None = None
    _ray: ModuleType | None = field(default=None, repr=False)
    _owned: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ArgumentError(
                f"onnxprune.run: workers must be an integer >= 1, got {self.count!r:.40}"
            )
        if self.address is not None and (not isinstance(self.address, str) or not self.address):
            raise ArgumentError(
                f"onnxprune.run: ray_address must be a non-empty string, got {self.address!r:.60}"
            )
        require_ray()
        if self.address is not None:
            reachable(self.address)  # a wrong address fails before any work

    def connect(self) -> ModuleType:
        """Ray, initialised: joins ``address`` or starts a local cluster (rule 4), once.

        Raises:
            DeviceError: the cluster at ``address`` cannot be reached, or a local one cannot
                be started.
        """
        ray = require_ray()
        if self._ray is not None:
            return ray
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
            try:
                if self.address:
                    ray.init(address=self.address, **quiet)
                else:  # "local": a new cluster, never one that `ray start` left running
                    ray.init(address="local", num_cpus=self.count, include_dashboard=False, **quiet)
            except Exception as exc:  # noqa: BLE001 - Ray raises many kinds (ConnectionError...)
                what = f"join the Ray cluster at {self.address}" if self.address else "start Ray"
                raise DeviceError(f"--workers: cannot {what}: {first_line(exc)}") from exc
            self._owned = True
        self._ray = ray
        return ray

    def map(
        self,
        fn: Callable[..., Result],
        model: onnx.ModelProto,
        data: Dataset,
        *,
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> list[Result]:
        """``fn(model, data=shard, batch_size=batch_size, **kwargs)`` per shard of ``data``, as
        Ray tasks; the results in shard order.

        ``fn`` must be a module-level function the workers can import (onnxprune's own), its
        keyword arguments and result picklable.

        Raises:
            Exception: the one a task raised (a DataError, a PassFailedError...), as ``fn``
                raises it in one process.
            DeviceError: the cluster cannot be reached, or lost a task.
        """
        p = plan(model, data, batch_size=batch_size)
        ranges = shard_ranges(p.count, p.size, p.samples, self.count)
        ray = self.connect()
        task = ray.remote(num_cpus=1, max_retries=0)(run_shard)
        packed = ray.put(pack(model))
        kwargs = {**kwargs, "batch_size": batch_size}
        refs = [
            task.remote(fn, packed, data.rows(a, b, f"{data.source}[{a}:{b}]"), kwargs)
            for a, b in ranges
        ]
        try:
            return list(ray.get(refs))
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, Exception):  # what the same call raises in one process
                raise cause from exc
            raise DeviceError(f"--workers: a Ray task failed: {first_line(exc)}") from exc
        except ray.exceptions.RayError as exc:
            raise DeviceError(f"--workers: the Ray cluster lost a task: {first_line(exc)}") from exc

    def merged(
        self,
        fn: Callable[..., Mapping[str, Merge]],
        model: onnx.ModelProto,
        data: Dataset,
        **kw: Any,
    ) -> dict[str, Merge]:
        """:meth:`map` of a function that returns mergeable values by name (per-channel
        statistics), merged in shard order (``a.merge(b)``; names in the first shard's order).

        Raises:
            as :meth:`map`.
        """
        out: dict[str, Merge] = {}
        for part in self.map(fn, model, data, **kw):
            for name, value in part.items():
                out[name] = out[name].merge(value) if name in out else value
        return out

    def close(self) -> None:
        """Stop the local cluster this object started, or disconnect from the one it joined;
        a Ray that the caller had initialised stays as it is."""
        if self._ray is not None and self._owned:
            self._ray.shutdown()
        self._ray, self._owned = None, False
