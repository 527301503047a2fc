"""The layer diff of ``validate:layers=true``: where, in graph order, the two models part ways.

Rules:
    1. The tensors compared are those both main graphs produce under the same name, in the
       original's node order; graph inputs are left out (both models take the same feeds).
    2. Both models run on the first ``samples`` samples of the validation data, a few small
       batches, with those tensors exposed (:func:`onnxprune.runner.exposed_session`).
    3. A tensor whose shape differs between the models (pruned channels), or that is not a
       numeric tensor (a sequence, strings), is skipped and counted, never compared.
    4. Per tensor: ``cosine`` (per sample when axis 0 is the batch, else the tensor as one
       vector; averaged over samples) and ``max_abs`` (the largest absolute difference);
       NaN/Inf values count as 0 in the cosine and are left out of ``max_abs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxprune.data import Dataset, input_specs, sample_count
from onnxprune.errors import PassFailedError, RunFailed
from onnxprune.runner import exposed_session, run_batches
from onnxprune.validation.compare import cosine_similarity

LAYER_BATCH = 8  # samples per batch of the layer diff (every tensor is held for one batch)


@dataclass
class _Tensor:
    name: str
    op: str
    shape: list[int] | None = None
    cosines: list[float] = field(default_factory=list)
    max_abs: float | None = None
    skipped: bool = False


def shared_tensors(original: onnx.ModelProto, model: onnx.ModelProto) -> list[tuple[str, str]]:
    """Rule 1: ``(name, op)`` of every tensor both main graphs produce, in the original's order."""
    produced = {out for node in model.graph.node for out in node.output if out}
    inputs = set(input_specs(original))
    seen: dict[str, str] = {}
    for node in original.graph.node:
        for out in node.output:
            if out and out in produced and out not in inputs and out not in seen:
                seen[out] = node.op_type
    return list(seen.items())


def compare_layers(
    original: onnx.ModelProto,
    model: onnx.ModelProto,
    data: Dataset,
    providers: Sequence[str],
    samples: int,
) -> dict[str, Any]:
    """Rules 1-4: ``{samples, skipped, layers: [{tensor, op, shape, cosine, max_abs}]}``.

    Raises:
        PassFailedError: onnxruntime cannot run a model with the tensors exposed.
    """
    tensors = [_Tensor(name, op) for name, op in shared_tensors(original, model)]
    names = [t.name for t in tensors]
    sessions = [exposed_session(m, names, providers) for m in (original, model)]
    count = 0
    try:
        for feed, (ref, new) in run_batches(
            sessions, original, data, fetch=names, batch_size=LAYER_BATCH, limit=samples
        ):
            batch = sample_count(feed) if feed else 1
            count += batch
            for t in tensors:
                _add(t, ref[t.name], new[t.name], batch)
    except RunFailed as exc:
        which = "original" if exc.index == 0 else "pruned"
        raise PassFailedError(
            f"validate: layers=true: the {which} model cannot run with its tensors exposed: "
            f"{exc.reason}"
        ) from exc
    kept = [t for t in tensors if not t.skipped]
    return {
        "samples": count,
        "skipped": len(tensors) - len(kept),
        "layers": [
            {
                "tensor": t.name,
                "op": t.op,
                "shape": t.shape,
                "cosine": float(np.mean(t.cosines)) if t.cosines else None,
                "max_abs": t.max_abs,
            }
            for t in kept
        ],
    }


def _add(t: _Tensor, ref: Any, new: Any, batch: int) -> None:
    """One batch of tensor ``t`` (rules 3 and 4)."""
    if t.skipped:
        return
    if not (isinstance(ref, np.ndarray) and isinstance(new, np.ndarray)):
        t.skipped = True
        return
    numeric = all(np.issubdtype(a.dtype, np.number) or a.dtype == bool for a in (ref, new))
    if ref.shape != new.shape or not numeric:
        t.skipped = True
        return
    if t.shape is None:
        t.shape = list(ref.shape)
    r, n = ref.astype(np.float64), new.astype(np.float64)
    finite = np.isfinite(r) & np.isfinite(n)
    r, n = np.where(finite, r, 0.0), np.where(finite, n, 0.0)
    rows = (r, n) if r.ndim >= 1 and r.shape[0] == batch else (r.reshape(1, -1), n.reshape(1, -1))
    if rows[0].size:
        t.cosines.extend(cosine_similarity(*rows).tolist())
        diff = float(np.max(np.abs(r - n)))
        t.max_abs = diff if t.max_abs is None else max(t.max_abs, diff)
