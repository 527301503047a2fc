"""The ``magnitude`` pass: unstructured or N:M sparsity on Conv/Gemm/MatMul weights."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.analysis.dequant import Dequantized, dequantize, find_dequantized, zero_points
from onnxprune.graph import attr, tensor_array
from onnxprune.passes.base import Pass, PassResult, option
from onnxprune.passes.registry import register_pass
from onnxprune.pruning.calibrate import activation_stats

if TYPE_CHECKING:
    from onnxprune.context import Context

log = logging.getLogger(__name__)
NO_SPEEDUP = (
    "unstructured and N:M zeros keep every weight: onnxruntime's dense kernels run "
    "no faster and the file is no smaller; use vote + fold for speed"
)


@dataclass
class _Layer:
    """A weight to sparsify: [rows=outputs, cols=inputs] view and the input tensor it reads."""

    node: onnx.NodeProto
    init: str
    out_axis: int
    in_axis: int
    input: str
    input_axis: int
    quantized: Dequantized | None = None


@register_pass
@dataclass
class Magnitude(Pass):
    """Zero the smallest weights (unstructured or N:M), by |w| or, with data, by Wanda.

    Rules:
        1. Constant weights of Conv, Gemm and MatMul nodes (initializers or Constant nodes) are
           considered, and quantized ones (int8/uint8 data behind a DequantizeLinear of
           initializers: scored by their real value, a zeroed entry set to its zero point);
           ``skip`` (a regex of node or weight names) leaves some out.
        2. ``method=magnitude`` scores |w|; ``method=wanda`` scores |w| x ||x_j|| with the
           input channel norms from the calibration data, compared per output row.
        3. ``pattern=unstructured`` zeroes the lowest ``sparsity`` share per output row;
           ``pattern=N:M`` (e.g. 2:4) keeps the N largest of every M consecutive inputs;
           a weight whose input count is not a multiple of M is left dense (reported).
        4. Only values change: shapes, the stored size and sharing of initializers stay.
           onnxruntime's dense kernels get no speed from it, and the report says so.
    """

    name: ClassVar[str] = "magnitude"
    sparsity: float = option(0.5, "share of weights to zero (unstructured)", low=0, below=1)
    pattern: str = option("unstructured", "unstructured, or N:M such as 2:4")
    method: Literal["magnitude", "wanda"] = option("magnitude", "score by |w|, or |w| x ||x||")
    skip: str = option("", "regex of node or weight names to leave dense", regex=True)

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError("sparsity must be in [0, 1)")
        if self.pattern != "unstructured":
            m = re.fullmatch(r"(\d+):(\d+)", self.pattern)
            if not m or not 0 < int(m.group(1)) < int(m.group(2)):
                raise ValueError("pattern must be 'unstructured' or N:M with 0 < N < M, e.g. 2:4")

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        """Sparsify every eligible weight in place."""
        tensors = _weight_tensors(model.graph)
        layers = _layers(model, tensors, self.skip)
        norms: dict[str, np.ndarray] = {}
        if self.method == "wanda":
            stats = activation_stats(ctx, model, {ly.input: ly.input_axis for ly in layers})
            norms = {name: s.l2 for name, s in stats.items()}
        done: set[str] = set()
        zeros = total = 0
        per_layer: list[dict[str, Any]] = []
        skipped: dict[str, str] = {}
        m_size = 0 if self.pattern == "unstructured" else int(self.pattern.split(":")[1])
        for ly in layers:
            if ly.init in done:
                continue  # a shared weight is sparsified once, by its first reader
            done.add(ly.init)
            w = np.array(tensor_array(tensors[ly.init]))
            if m_size and w.shape[ly.in_axis] % m_size:
                skipped[ly.init] = f"{w.shape[ly.in_axis]} inputs are not a multiple of {m_size}"
                continue
            real = w
            zero = np.zeros((), w.dtype)
            if ly.quantized is not None:

                def get(name: str) -> np.ndarray:
                    return np.asarray(tensor_array(tensors[name]))

                real = dequantize(ly.quantized, get)
                zero = np.broadcast_to(zero_points(ly.quantized, get), w.shape)
            axes = (ly.out_axis, ly.in_axis)
            mat = np.moveaxis(real, axes, (0, 1))
            shape = mat.shape
            score = np.abs(mat.reshape(shape[0], shape[1], -1).astype(np.float64))  # [out, in, k]
            if ly.input in norms:
                score = score * norms[ly.input][None, :, None]
            mask = np.moveaxis(self._mask(score).reshape(shape), (0, 1), axes)
            w = np.where(mask, zero, w).astype(w.dtype)
            # in place, in the initializer or Constant node that holds it: no new tensors
            tensors[ly.init].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w), ly.init))
            z = int((w == zero).sum())
            zeros += z
            total += w.size
            per_layer.append({"weight": ly.init, "sparsity": round(z / w.size, 4)})
        log.warning(NO_SPEEDUP)
        report: dict[str, Any] = {
            "weights": len(per_layer),
            "skipped": skipped,
            "sparsity": round(zeros / total, 4) if total else 0.0,
            "layers": per_layer,
            "note": NO_SPEEDUP,
        }
        return PassResult(model, bool(per_layer), report)

    def _mask(self, score: np.ndarray) -> np.ndarray:
        """True where a weight is zeroed. ``score`` is [out, in, kernel]."""
        out, cin, kernel = score.shape
        if self.pattern == "unstructured":
            flat = score.reshape(out, -1)
            k = int(self.sparsity * flat.shape[1])
            mask = np.zeros_like(flat, bool)
            if k:
                idx = np.argsort(flat, axis=1, kind="stable")[:, :k]
                np.put_along_axis(mask, idx, True, axis=1)
            return mask.reshape(score.shape)
        n, m = (int(v) for v in self.pattern.split(":"))
        # groups of M consecutive inputs for each output and kernel position (cin % M == 0)
        blocks = np.moveaxis(score, 1, 2).reshape(out, kernel, cin // m, m)
        order = np.argsort(blocks, axis=-1, kind="stable")
        mask = np.zeros_like(blocks, bool)
        np.put_along_axis(mask, order[..., : m - n], True, axis=-1)
        return np.moveaxis(mask.reshape(out, kernel, cin), 2, 1)


def _weight_tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Constant tensors by name: initializers, and Constant nodes' ``value`` (edited in place)."""
    tensors = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensors.setdefault(node.output[0], node.attribute[0].t)
    return tensors


_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
_CODES = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)


def _layers(model: onnx.ModelProto, inits: dict[str, onnx.TensorProto], skip: str) -> list[_Layer]:
    pattern = re.compile(skip) if skip else None
    plain = {t.name: t for t in model.graph.initializer}
    dequantized = find_dequantized(model.graph, plain)
    layers = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        w = inits.get(node.input[1])
        quantized = dequantized.get(node.input[1]) if w is None else None
        if quantized is not None:
            w = inits[quantized.data]
        if w is None or len(w.dims) < 2 or w.data_type not in (_CODES if quantized else _FLOATS):
            continue
        if pattern and (pattern.search(node.name) or pattern.search(w.name)):
            continue
        rank = len(w.dims)
        if node.op_type == "Conv":
            group = attr(node, "group", 1)
            if group != 1:
                continue  # depthwise/grouped filters: too few inputs per output to sparsify
            layers.append(_Layer(node, w.name, 0, 1, node.input[0], 1, quantized))
        elif node.op_type == "Gemm":
            attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
            if attrs.get("transA", 0):
                continue
            out_axis, in_axis = (0, 1) if attrs.get("transB", 0) else (1, 0)
            layers.append(_Layer(node, w.name, out_axis, in_axis, node.input[0], 1, quantized))
        else:
            layers.append(_Layer(node, w.name, rank - 1, rank - 2, node.input[0], -1, quantized))
    return layers
