"""validate's evaluation as Ray tasks (``--workers``): both models' outputs over shards of
the eval data, joined in shard order.

Each task makes its own sessions on the original and the pruned model (through
:mod:`onnxprune.runtime`) and runs :func:`onnxprune.validation.pair.run_pair` on its shard
(contiguous whole batches, :mod:`onnxprune.distributed`), so the joined outputs are those of
one process, batch for batch; its errors (a pruned model that refuses the data...) come back
as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from onnxprune.data import Dataset
from onnxprune.distributed import Packed, Workers, pack, unpack
from onnxprune.runtime import session
from onnxprune.validation.pair import run_pair

Outputs = dict[str, np.ndarray]


def pair_outputs(
    model: onnx.ModelProto,
    data: Dataset,
    *,
    pruned: Packed,
    providers: Sequence[str],
    threads: int = 0,
    batch_size: int | None = None,
) -> tuple[Outputs, Outputs, int]:
    """One task: the original ``model``'s and the ``pruned`` one's outputs on ``data`` and
    the sample count (``batch_size`` must be None: :func:`run_pair` cuts the default batches).
    """
    assert batch_size is None, "run_pair cuts the default batches"
    ref = session(model, providers, threads=threads, share_weights=False)
    new = session(unpack(pruned), providers, threads=threads, share_weights=False)
    return run_pair(ref, new, model, data)


def sharded_pair(
    workers: Workers,
    original: onnx.ModelProto,
    model: onnx.ModelProto,
    data: Dataset,
    providers: Sequence[str],
    threads: int = 0,
) -> tuple[Outputs, Outputs, int]:
    """:func:`run_pair`'s result, computed by ``workers`` shard by shard and joined.

    Raises:
        as :func:`run_pair`; DeviceError: the cluster cannot be reached, or lost a task.
    """
    parts = workers.map(
        pair_outputs, original, data, pruned=pack(model), providers=list(providers), threads=threads
    )
    refs, news, counts = zip(*parts, strict=True)
    return _join(refs), _join(news), sum(counts)


def _join(parts: Sequence[Outputs]) -> Outputs:
    """Each output's shards concatenated along axis 0, in shard order."""
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
