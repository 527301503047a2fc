"""Activation matching (git re-basin's other method): each set of interchangeable channels of
a checkpoint permuted onto the first model's by the correlation of their activations on data,
read at a weighted consumer's input. Each set is matched once: a checkpoint's activations do
not depend on how its own channels are ordered."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from onnxprune.data import Dataset
from onnxprune.fusion.assignment import best_assignment
from onnxprune.fusion.channels import ClassSet, features, permute
from onnxprune.runner import exposed_session, run_batches
from onnxprune.runtime import CPU

SAMPLES = 256
"""Samples of the data whose activations are compared (the first ones)."""


def activations(
    model: onnx.ModelProto, tensors: Sequence[str], data: Dataset, providers: Sequence[str]
) -> dict[str, np.ndarray]:
    """``tensors`` of ``model`` on the first :data:`SAMPLES` samples of ``data``, joined."""
    sess = exposed_session(model, list(tensors), providers, optimize=False)
    parts: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    for _, (values,) in run_batches([sess], model, data.head(SAMPLES), fetch=list(tensors)):
        for t in tensors:
            parts[t].append(np.asarray(values[t]))
    return {t: np.concatenate(p) for t, p in parts.items()}


def normalised(values: np.ndarray, cset: ClassSet) -> np.ndarray:
    """[classes, values]: each class's activations centred and scaled to unit norm."""
    assert cset.activation is not None
    rows = features(values, cset.activation)
    rows = rows - rows.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


def align_by_activations(
    ref: onnx.ModelProto,
    other: onnx.ModelProto,
    params: dict[str, np.ndarray],
    sets: list[ClassSet],
    data: Dataset,
    providers: Sequence[str] = (CPU,),
) -> dict[str, np.ndarray]:
    """``params`` (``other``'s) with each set that has an activation tensor permuted so that
    its channels correlate best with ``ref``'s on ``data``; a set is left when no permutation
    beats its order."""
    usable = [c for c in sets if c.activation is not None]
    tensors = sorted({c.activation.init for c in usable if c.activation is not None})
    if not tensors:
        return dict(params)
    a, b = activations(ref, tensors, data, providers), activations(other, tensors, data, providers)
    out = dict(params)
    for cset in usable:
        assert cset.activation is not None
        name = cset.activation.init
        corr = normalised(a[name], cset) @ normalised(b[name], cset).T
        perm = best_assignment(corr)
        if corr[np.arange(len(perm)), perm].sum() > np.trace(corr) + 1e-9 * len(perm):
            permute(out, cset, perm)
    return out
