"""REPAIR (Jordan et al. 2023) for a model whose weights were averaged: each producer's output
channels rescaled and shifted so that their mean and standard deviation on data are the mean
of the members' own (the average of aligned weights shrinks activations' variance)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.data import Dataset
from onnxprune.graph import attr, node_name
from onnxprune.runner import exposed_session, run_batches
from onnxprune.runtime import CPU

EPS = 1e-8


def producers(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, int]]:
    """Conv and Gemm nodes with their own weight and bias initializers (read by them alone),
    whose output is no graph output, with the weight's output-channel axis."""
    inits = {t.name for t in model.graph.initializer}
    readers = Counter(name for n in model.graph.node for name in set(n.input))
    outputs = {o.name for o in model.graph.output}
    out = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        if len(node.input) < 3 or node.output[0] in outputs:
            continue
        if any(t not in inits or readers[t] != 1 for t in node.input[1:3]):
            continue
        if node.op_type == "Gemm" and attr(node, "transA", 0):
            continue
        axis = 0 if node.op_type == "Conv" or attr(node, "transB", 0) else 1
        out.append((node, axis))
    return out


def repair(
    merged: onnx.ModelProto,
    members: Sequence[onnx.ModelProto],
    data: Dataset,
    providers: Sequence[str] = (CPU,),
) -> list[str]:
    """In place, producer by producer in graph order (see :func:`producers`): the merged
    model's output channels get the members' mean per-channel mean and standard deviation on
    ``data`` (``members``: the aligned checkpoints, same tensor names). Returns the nodes."""
    found = producers(merged)
    tensors = [n.output[0] for n, _ in found]
    targets = [moments(m, tensors, data, providers) for m in members]
    inits = {t.name: t for t in merged.graph.initializer}
    done = []
    for node, axis in found:
        name = node.output[0]
        mean_t = np.mean([t[name][0] for t in targets], axis=0)
        std_t = np.mean([np.sqrt(t[name][1]) for t in targets], axis=0)
        mean_m, var_m = moments(merged, [name], data, providers)[name]
        scale = std_t / np.sqrt(var_m + EPS)
        w, b = (numpy_helper.to_array(inits[t]) for t in node.input[1:3])
        shape = [1] * w.ndim
        shape[axis] = -1
        new_w = (w * scale.reshape(shape)).astype(w.dtype)
        new_b = ((b - mean_m) * scale + mean_t).astype(b.dtype)
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(new_w, node.input[1]))
        inits[node.input[2]].CopyFrom(numpy_helper.from_array(new_b, node.input[2]))
        done.append(node_name(node))
    return done


def moments(
    model: onnx.ModelProto, tensors: Sequence[str], data: Dataset, providers: Sequence[str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per channel (axis 1) mean and population variance of each of ``tensors`` over ``data``."""
    sess = exposed_session(model, list(tensors), providers, optimize=False)
    sums: dict[str, list[np.ndarray]] = {}
    count: Counter[str] = Counter()
    for _, (values,) in run_batches([sess], model, data, fetch=list(tensors)):
        for name in tensors:
            x = np.asarray(values[name], dtype=np.float64)
            axes = tuple(a for a in range(x.ndim) if a != 1)
            s, q = x.sum(axis=axes), (x * x).sum(axis=axes)
            if name in sums:
                sums[name][0] += s
                sums[name][1] += q
            else:
                sums[name] = [s, q]
            count[name] += x.size // x.shape[1]
    out = {}
    for name, (s, q) in sums.items():
        mean = s / count[name]
        out[name] = (mean, np.maximum(q / count[name] - mean * mean, 0.0))
    return out
