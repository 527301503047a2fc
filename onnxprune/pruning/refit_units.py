"""The linear layers ``refit`` solves, as matrices: a layer's rows (inputs and outputs, a
Conv's input as patches), its weight as [inputs, outputs], and writing a solution back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxprune.analysis.handlers.recurrent import RECURRENT
from onnxprune.analysis.labels import Labels, Sink, State
from onnxprune.graph import add_output_bias, attr, bias_add_after, get_init, set_init, uses
from onnxprune.pruning.reconstruct import Streams
from onnxprune.pruning.workspace import Workspace


@dataclass
class Unit:
    """One linear consumer to refit, with its streaming fit and held-out sums."""

    sink: Sink
    output: str  # the unit's output (after its bias), the same tensor in both models
    out_axis: int
    keep: np.ndarray  # positions of the input that stay (not zero/constant)
    w: np.ndarray  # current weight as [K, N]
    streams: Streams
    scale: float = 1.0  # Gemm's alpha: the unit computes x @ (scale * weight)
    conv: dict[str, Any] | None = None  # kernel, pads, strides of a Conv (inputs as patches)
    index: int = 0  # position in graph order (seeds its row split)

    def add(self, x: np.ndarray, target: np.ndarray, current: np.ndarray) -> None:
        """Accumulate rows: x [R, K] inputs, target/current [R, N] unit outputs; the fit is for
        the layer with the removed inputs' weight rows at zero (a constant input's part, which
        zero padding may vary by row, goes to the fit's target)."""
        now = target - current
        gone = np.setdiff1d(np.arange(len(self.w)), self.keep)
        xs = x[:, gone]
        d = now + xs @ self.w[gone] if xs.any() else now
        self.streams.add(x[:, self.keep], d, now)


def unit_name(u: Unit) -> str:
    """The layer's node name (its output's when unnamed)."""
    return u.sink.node.name or u.sink.node.output[0]


def write_solution(
    graph: onnx.GraphProto, u: Unit, dw: np.ndarray, db: np.ndarray, frozen: np.ndarray
) -> None:
    """Store ``u``'s weights plus ``dw`` (removed inputs' rows zero, frozen outputs as they were)
    and add ``db`` to its bias."""
    w_new = np.zeros_like(u.w)
    w_new[u.keep] = u.w[u.keep] + dw
    w_new[:, frozen] = u.w[:, frozen]
    bias_new = db.copy()  # the zeroed inputs' rows become zero: their constant part is in db
    bias_new[frozen] = 0.0
    weight = get_init(graph, u.sink.weight)
    if u.conv:
        stored = conv_weight(w_new, weight.shape).astype(weight.dtype)
    else:
        moved = np.moveaxis(weight, u.sink.weight_axis, 0)
        stored = np.moveaxis(
            (w_new / u.scale).reshape(moved.shape).astype(weight.dtype), 0, u.sink.weight_axis
        )
    set_init(graph, u.sink.weight, np.ascontiguousarray(stored))
    # Gemm adds alpha * delta to its output; the solve is in output units
    add_output_bias(graph, u.sink.node, (bias_new / u.scale).astype(weight.dtype))


def save_weights(graph: onnx.GraphProto, u: Unit) -> dict[str, np.ndarray]:
    """``u``'s weight and bias values, to put back; the bias is made first (zeros, exact) so that
    writing ``u`` later changes values only."""
    dtype = get_init(graph, u.sink.weight).dtype
    bias = add_output_bias(graph, u.sink.node, np.zeros(u.w.shape[1], dtype)).init
    return {name: np.array(get_init(graph, name)) for name in (u.sink.weight, bias)}


def row_split(seed: int, index: int) -> Streams:
    """Empty sums with layer ``index``'s row split: the same rows are held out on every pass
    over the same data, so fits that share an index are judged on rows none of them saw."""
    return Streams(np.random.default_rng([seed, index]))


def output_after_bias(graph: onnx.GraphProto, node: onnx.NodeProto) -> str:
    """A layer's output after its bias: a MatMul's bias Add (as exporters write a linear
    layer), else the node's own output."""
    follower = bias_add_after(graph, node) if node.op_type == "MatMul" else None
    return follower[0].output[0] if follower else node.output[0]


def weight_matrix(sink: Sink, weight: np.ndarray) -> tuple[np.ndarray, dict[str, Any] | None]:
    """The layer's weight as [inputs, outputs] (a Conv's as [C * taps, O], with its
    geometry; None for the others)."""
    if sink.node.op_type == "Conv":
        return conv_matrix(sink.node, weight)
    w = np.moveaxis(weight, sink.weight_axis, 0)
    return w.reshape(w.shape[0], -1), None


def gemm_alpha(node: onnx.NodeProto) -> float:
    """The factor the layer applies to ``x @ weight``: a Gemm's alpha, else 1."""
    return float(attr(node, "alpha", 1.0)) if node.op_type == "Gemm" else 1.0


def as_rows(x: np.ndarray, axis: int) -> np.ndarray:
    """Activation ``x`` as rows [positions, channels] (channel axis last), float64."""
    return np.moveaxis(np.asarray(x, np.float64), axis, -1).reshape(-1, x.shape[axis])


def conv_matrix(node: onnx.NodeProto, weight: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """A Conv weight [O, C, k...] as a matrix [C * taps, O], and its geometry."""
    kernel = list(weight.shape[2:])
    nd = len(kernel)
    pads = list(attr(node, "pads", [0] * 2 * nd))
    strides = list(attr(node, "strides", [1] * nd))
    order = [1, *range(2, 2 + nd), 0]
    taps = int(np.prod(kernel, dtype=np.int64))
    matrix = weight.transpose(order).reshape(weight.shape[1] * taps, weight.shape[0])
    return matrix, {"kernel": kernel, "pads": pads, "strides": strides, "taps": taps}


def conv_weight(matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`conv_matrix`: [C * taps, O] back to [O, C, k...]."""
    nd = len(shape) - 2
    return matrix.reshape(shape[1], *shape[2:], shape[0]).transpose([nd + 1, 0, *range(1, nd + 1)])


def patches(x: np.ndarray, conv: dict[str, Any]) -> np.ndarray:
    """Conv input [N, C, spatial...] as rows [N * out positions, C * taps] (im2col)."""
    nd = len(conv["kernel"])
    pads = conv["pads"]
    width = [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)]
    xp = np.pad(np.asarray(x, np.float64), width)
    win = np.lib.stride_tricks.sliding_window_view(xp, conv["kernel"], axis=tuple(range(2, 2 + nd)))
    win = win[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in conv["strides"])]
    # [N, C, out..., k...] -> [N, out..., C, k...]
    order = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    win = win.transpose(order)
    return win.reshape(-1, x.shape[1] * int(np.prod(conv["kernel"], dtype=np.int64)))


def unsupported(ws: Workspace, sink: Sink) -> str:
    node = sink.node
    if sink.weight in ws.an.dequantized:
        return "quantized weight (QDQ): not refitted"
    if sink.scope:
        return f"inside {sink.scope}: not refitted"
    if node.op_type == "Gemm":
        return "Gemm with transA" if attr(node, "transA", 0) else ""
    if node.op_type == "MatMul":
        w = get_init(ws.model.graph, sink.weight)
        return "" if w.ndim == 2 else "batched MatMul weight"
    if node.op_type == "Conv":
        if attr(node, "group", 1) != 1 or any(d != 1 for d in attr(node, "dilations", [])):
            return "grouped or dilated convolutions are not refitted"
        if sink.labels.axis != 1:
            return "channel axis is not axis 1"
        auto = attr(node, "auto_pad", b"NOTSET")
        return "" if auto in (b"NOTSET", "NOTSET") else "auto_pad convolutions are not refitted"
    if node.op_type in RECURRENT:
        why = "its output is not linear in X (gates and a recurrent state)"
        return f"{node.op_type} is not refitted: {why}"
    return f"{node.op_type} is not refitted"


def linear_outputs(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """The Gemm and MatMul nodes of the main graph whose weight is an initializer, by their
    output after the bias (MatMul + Add, as exporters write a linear layer)."""
    inits = {t.name for t in graph.initializer}
    return {
        output_after_bias(graph, node): node
        for node in graph.node
        if node.op_type in ("Gemm", "MatMul") and node.input[1] in inits
    }


def producer_unit(
    ws: Workspace, node: onnx.NodeProto, output: str, index: int
) -> tuple[Unit | None, str]:
    """A Gemm/MatMul that reads no channel group as a unit (every input kept; ``output``: after
    its bias), or None and why it cannot be one."""
    graph = ws.model.graph
    name = node.name or node.output[0]
    if uses(graph, node.input[1]) != 1:
        return None, f"{name}: its weight {node.input[1]} is shared"
    weight = np.asarray(get_init(graph, node.input[1]), np.float64)
    axis = 1 if node.op_type == "Gemm" and attr(node, "transB", 0) else 0
    k = weight.shape[axis] if weight.ndim == 2 else 0
    labels = Labels(-1, np.full(k, -1), np.full(k, State.VAR))
    sink = Sink(node, node.input[0], labels, node.input[1], axis)
    why = unsupported(ws, sink)
    if why:
        return None, f"{name}: {why}"
    alpha = gemm_alpha(node)
    w, _ = weight_matrix(sink, weight)
    streams = row_split(ws.ctx.seed, index)
    return Unit(sink, output, -1, np.arange(k), alpha * w, streams, alpha, None, index), ""
