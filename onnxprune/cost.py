"""What a model costs: nodes, parameters, MACs (from inferred shapes), bytes, opset, origin."""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxprune.graph import attr, iter_graphs, iter_initializers
from onnxprune.model import FLOAT_TYPES, model_nbytes, skeleton, tensor_nbytes

SYMBOLIC_NOTE = "MACs per sample, symbolic dims counted as 1"
"""How ``macs_note`` starts: the names of the dims that no shape fixed follow it."""

# producer_name written by each exporter -> the framework a user would name
_PRODUCERS = {
    "pytorch": "PyTorch",
    "tf2onnx": "TensorFlow (tf2onnx)",
    "keras2onnx": "Keras (keras2onnx)",
    "paddle2onnx": "PaddlePaddle (paddle2onnx)",
    "paddlepaddle": "PaddlePaddle (paddle2onnx)",
    "mxnet": "MXNet",
    "skl2onnx": "scikit-learn (skl2onnx)",
    "jax2tf": "JAX (jax2tf)",
    "onnx.quantize": "onnxruntime quantizer",
    "spox": "Spox",
    "onnx-example": "onnx.helper",
}


@dataclass
class ModelSummary:
    """Size and cost figures of one model, as shown before and after the passes."""

    nodes: int
    parameters: int
    macs: int
    bytes: int
    opset: int
    ir_version: int
    framework: str
    op_histogram: dict[str, int] = field(default_factory=dict)
    macs_by_op: dict[str, int] = field(default_factory=dict)
    macs_note: str = ""  # which symbolic dims the MACs counted as 1 (SYMBOLIC_NOTE), or ""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (``macs_note`` only when some dim was counted as 1)."""
        out = asdict(self)
        if not self.macs_note:
            del out["macs_note"]
        return out


def summarize(
    model: onnx.ModelProto,
    dims: Mapping[str, int] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> ModelSummary:
    """Count nodes (all subgraphs), parameters (float initializers), MACs and bytes.

    MACs follow :func:`count_macs`; ``macs_note`` names the dims counted as 1, if any.
    """
    ops: collections.Counter[str] = collections.Counter()
    for g in iter_graphs(model.graph):
        ops.update(n.op_type for n in g.node)
    unknown: list[str] = []
    macs = count_macs(model, dims, input_shapes, unknown)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ModelSummary(
        nodes=sum(ops.values()),
        parameters=count_parameters(model),
        macs=sum(macs.values()),
        bytes=model_nbytes(model) + _proto_overhead(model),
        opset=opset,
        ir_version=model.ir_version,
        framework=guess_framework(model),
        op_histogram=dict(sorted(ops.items())),
        macs_by_op=dict(sorted(macs.items())),
        macs_note=f"{SYMBOLIC_NOTE}: {', '.join(unknown)}" if unknown else "",
    )


def _proto_overhead(model: onnx.ModelProto) -> int:
    """Serialised size minus the large tensors' data, measured on the weightless skeleton
    (``ByteSize`` of the whole model would serialise every weight once more)."""
    light = skeleton(model)
    small = sum(tensor_nbytes(t) for t in light.graph.initializer)
    return max(light.ByteSize() - small, 0)


def count_parameters(model: onnx.ModelProto) -> int:
    """Elements of the weights, in every graph: floating-point initializers and Constant-node
    tensors, and the quantized data (int8/uint8 weights, int32 biases) a DequantizeLinear
    reads; the scale of a QuantizeLinear/DequantizeLinear is no parameter (so a QDQ model
    counts about what its float model does)."""
    quantized: set[str] = set()
    scales: set[str] = set()
    for g in iter_graphs(model.graph):
        for n in g.node:
            if n.op_type == "DequantizeLinear" and n.input:
                quantized.add(n.input[0])
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 1:
                scales.add(n.input[1])
    total = 0
    for t in iter_initializers(model.graph):
        if t.name in quantized or (_is_float(t.data_type) and t.name not in scales):
            total += int(np.prod(t.dims, dtype=np.int64))
    for g in iter_graphs(model.graph):
        for n in g.node:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value" and _is_float(a.t.data_type):
                        total += int(np.prod(a.t.dims, dtype=np.int64))
                    elif a.name in ("value_float", "value_floats"):
                        total += 1 if a.name == "value_float" else len(a.floats)
    return total


def _is_float(data_type: int) -> bool:
    return data_type in FLOAT_TYPES


def guess_framework(model: onnx.ModelProto) -> str:
    """The framework that exported ``model``, from producer_name, else from naming habits."""
    producer = model.producer_name.strip().lower()
    for key, name in _PRODUCERS.items():
        if producer.startswith(key):
            return name
    names = [n.name for n in model.graph.node]
    inits = {t.name for t in model.graph.initializer}
    if any(n.startswith("p2o.") for n in names) or any(i.startswith("p2o.") for i in inits):
        return "PaddlePaddle (paddle2onnx)"
    listed = inits and sum(i.name in inits for i in model.graph.input) >= len(inits) // 2
    mxnet_names = any(
        i.endswith(("_weight", "_gamma", "_running_mean", "_moving_mean")) for i in inits
    )
    fwd_outputs = any(o.name.endswith("_fwd") for o in model.graph.output)  # after cleanup
    if mxnet_names and (listed or fwd_outputs):
        return "MXNet (likely)"
    return model.producer_name or "unknown"


def count_macs(
    model: onnx.ModelProto,
    dims: Mapping[str, int] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    unknown: list[str] | None = None,
) -> dict[str, int]:
    """Multiply-accumulates per op type of the main graph, from shapes onnx can infer.

    Inputs named in ``input_shapes`` have those shapes; a symbolic dimension takes its value
    from ``dims`` (by name), else 1, and so does an unknown or negative one (``-1``): MACs are
    never negative. The dims counted as 1 on the way to a counted op are appended to
    ``unknown`` (their names, ``?`` for an unnamed one). Ops whose shapes are not known count 0.
    """
    shapes, open_dims = infer_shapes_noting(model, dims, input_shapes)
    macs: collections.Counter[str] = collections.Counter()
    seen: dict[str, None] = {}
    for node in model.graph.node:
        n = node_macs(node, shapes)
        if n:
            macs[node.op_type] += n
            for t in [*node.input, *node.output]:
                seen.update(dict.fromkeys(open_dims.get(t, ())))
    if unknown is not None:
        unknown.extend(seen)
    return dict(macs)


def infer_shapes(
    model: onnx.ModelProto,
    dims: Mapping[str, int] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, list[int]]:
    """Static shapes of every tensor of the main graph that onnx shape inference can find
    (dims as :func:`count_macs` counts them)."""
    return infer_shapes_noting(model, dims, input_shapes)[0]


def infer_shapes_noting(
    model: onnx.ModelProto,
    dims: Mapping[str, int] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> tuple[dict[str, list[int]], dict[str, list[str]]]:
    """:func:`infer_shapes`, and per tensor the dims it counted as 1 (name, or ``?``)."""
    dims = dict(dims or {})
    light = skeleton(model)
    for vi in light.graph.input:
        if vi.name in (input_shapes or {}):
            _fix_dims(vi, list((input_shapes or {})[vi.name]))
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort on custom or broken graphs
        inferred = light
    shapes: dict[str, list[int]] = {}
    open_dims: dict[str, list[str]] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        shape = []
        for d in t.shape.dim:
            if d.HasField("dim_value") and d.dim_value >= 0:
                shape.append(d.dim_value)
            elif d.HasField("dim_param") and d.dim_param in dims:
                shape.append(int(dims[d.dim_param]))
            else:
                shape.append(1)
                open_dims.setdefault(vi.name, []).append(d.dim_param or "?")
        shapes[vi.name] = shape
    for init in g.initializer:
        shapes[init.name] = list(init.dims)
        open_dims.pop(init.name, None)
    return shapes, open_dims


def _fix_dims(vi: onnx.ValueInfoProto, sizes: list[int]) -> None:
    """Give a graph input's declared dims the sizes ``sizes`` (same rank, checked before)."""
    shape = vi.type.tensor_type.shape
    if len(shape.dim) != len(sizes):
        return
    for d, size in zip(shape.dim, sizes, strict=True):
        d.Clear()
        d.dim_value = int(size)


def node_macs(node: onnx.NodeProto, shapes: Mapping[str, Any]) -> int:
    """MACs of one Conv/ConvTranspose/Gemm/MatMul node from known shapes (0 otherwise)."""

    def shape(i: int, io: str = "in") -> list[int] | None:
        names = node.input if io == "in" else node.output
        found = shapes.get(names[i]) if i < len(names) and names[i] else None
        return list(found) if found is not None else None

    op = node.op_type
    if op == "Conv":
        w, y = shape(1), shape(0, "out")
        if w and y:
            return int(np.prod(y, dtype=np.int64) * np.prod(w[1:], dtype=np.int64))
    elif op == "ConvTranspose":
        w, x = shape(1), shape(0)
        if w and x:
            return int(np.prod(x, dtype=np.int64) * np.prod(w[1:], dtype=np.int64))
    elif op == "Gemm":
        a, b = shape(0), shape(1)
        if a and b and len(a) == 2 and len(b) == 2:
            m, k = (a[1], a[0]) if attr(node, "transA", 0) else (a[0], a[1])
            n = b[0] if attr(node, "transB", 0) else b[1]
            return m * k * n
    elif op == "MatMul":
        a, b = shape(0), shape(1)
        if a and b:
            a2, b2 = ([1] + a if len(a) == 1 else a), (b + [1] if len(b) == 1 else b)
            batch = np.broadcast_shapes(tuple(a2[:-2]), tuple(b2[:-2]))
            return int(np.prod(batch, dtype=np.int64) * a2[-2] * a2[-1] * b2[-1])
    return 0
