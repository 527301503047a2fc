"""Rules for ops that act per element or per channel: activations, arithmetic with constants,
normalisations, pooling, reductions, quantisation."""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.analysis.handlers.common import _broadcast_axis, _carry, _scalar, _zero_pads
from onnxprune.analysis.labels import CONST, VAR, ZERO, Labels
from onnxprune.analysis.state import Analysis
from onnxprune.graph import attr as _attr
from onnxprune.graph import node_name as _name

# Unary ops applied per element: f(channel) depends on that channel only.
ZERO_PRESERVING = {
    "Relu",
    "LeakyRelu",
    "Tanh",
    "Gelu",
    "Elu",
    "Selu",
    "HardSwish",
    "Identity",
    "Cast",
    "Dropout",
    "Neg",
    "Abs",
    "Erf",
    "Sign",
    "Round",
    "Floor",
    "Ceil",
    "Softsign",
    "Mish",
    "ThresholdedRelu",
    "Sin",
    "Atan",
    "Asinh",
    "Sinh",
    "Tan",
    "Asin",
    "CastLike",
}

CONST_MAKING = {"Sigmoid", "HardSigmoid", "Exp", "Softplus", "Cos", "Cosh", "Acos", "Celu"}

SPATIAL_CARRIERS = {"MaxPool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}

BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu", "Sum", "Mean"}

REDUCE = {
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceSum",
    "ReduceL1",
    "ReduceL2",
    "ReduceProd",
    "ReduceLogSumExp",
    "ReduceSumSquare",
}


def _zero_preserving(an: Analysis, node: onnx.NodeProto) -> None:
    _carry(an, node)


def _const_making(an: Analysis, node: onnx.NodeProto) -> None:
    _carry(an, node, lambda s: np.where(s == ZERO, CONST, s))


def _clip(an: Analysis, node: onnx.NodeProto) -> None:
    lo = an.array(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    hi = an.array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    lo_v = _scalar(lo) if lo is not None else float(_attr(node, "min", -np.inf))
    hi_v = _scalar(hi) if hi is not None else float(_attr(node, "max", np.inf))
    for i in (1, 2):
        if len(node.input) > i and node.input[i] and an.array(node.input[i]) is None:
            an.pin_inputs(node, "min/max are not constants")
            return
    if lo_v <= 0 <= hi_v:
        _carry(an, node)
    else:
        _const_making(an, node)


def _spatial(an: Analysis, node: onnx.NodeProto) -> None:
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    if lab.axis != 1:
        an.pin_inputs(node, "pools over the channel axis")
        return
    _carry(an, node)


def _average_pool(an: Analysis, node: onnx.NodeProto) -> None:
    padded = _zero_pads(node)
    if padded and _attr(node, "count_include_pad", 0):
        lab = an.labels.get(node.input[0])
        if lab is not None and lab.axis == 1:
            an.set_out(
                node.output[0], Labels(1, lab.ids, np.where(lab.state == CONST, VAR, lab.state))
            )
            return
    _spatial(an, node)


def _reduce(an: Analysis, node: onnx.NodeProto) -> None:
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    rank = len(an.shape(node.input[0]) or ())
    axes = _attr(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        arr = an.array(node.input[1])
        if arr is None:
            an.pin_inputs(node, "reduction axes are not constant")
            return
        axes = arr.tolist()
    if axes is None or len(axes) == 0:
        if _attr(node, "noop_with_empty_axes", 0):
            _carry(an, node)
        else:
            an.pin_inputs(node, "reduces over all axes, the channel axis included")
        return
    axes = sorted(a % rank for a in axes)
    if lab.axis in axes:
        an.pin_inputs(node, "reduces over the channel axis")
        return
    keep = _attr(node, "keepdims", 1)
    axis = lab.axis if keep else lab.axis - sum(a < lab.axis for a in axes)
    state = (
        lab.state
        if node.op_type in ("ReduceMean", "ReduceMax", "ReduceMin")
        else np.where(lab.state == ZERO, ZERO, np.where(lab.state == CONST, CONST, VAR))
    )
    an.set_out(node.output[0], Labels(axis, lab.ids, state))


def _softmax_like(an: Analysis, node: onnx.NodeProto) -> None:
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    rank = len(an.shape(node.input[0]) or ())
    axis = _attr(node, "axis", -1) % max(rank, 1)
    if axis == lab.axis:
        an.pin_inputs(node, "normalises over the channel axis")
    else:
        _const_making(an, node)


def _layer_norm(an: Analysis, node: onnx.NodeProto) -> None:
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    rank = len(an.shape(node.input[0]) or ())
    axis = _attr(node, "axis", -1) % max(rank, 1)
    if lab.axis >= axis:
        an.pin_inputs(node, "normalises over the channel axis (LayerNorm over the hidden size)")
    else:
        an.set_out(node.output[0], Labels(lab.axis, lab.ids, np.full(len(lab.ids), VAR)))


def _group_norm(an: Analysis, node: onnx.NodeProto) -> None:
    lab = an.labels.get(node.input[0])
    if lab is not None:
        an.pin_inputs(node, "GroupNormalization mixes channels of a group")


def _batch_norm(an: Analysis, node: onnx.NodeProto) -> None:
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    if lab.axis != 1:
        an.pin_inputs(node, "channel axis is not axis 1")
        return
    for i in range(1, 5 if node.op_type == "BatchNormalization" else 3):
        if not an.member(node, i, 0, lab.ids, "scale" if i == 1 else "param"):
            an.pin_inputs(node, "parameters are not constants")
            return
    an.set_out(node.output[0], Labels(1, lab.ids, np.where(lab.state == ZERO, CONST, lab.state)))


def _elementwise(an: Analysis, node: onnx.NodeProto) -> None:
    """Add/Sub/Mul/Div/Max/Min/Pow/PRelu/Sum/Mean with any mix of activations and constants."""
    ins = [t for t in node.input if t]
    labelled = [t for t in ins if t in an.labels]
    if not labelled:
        return
    out_shape = an.shape(node.output[0])
    if out_shape is None:
        an.pin_inputs(node, "output shape unknown")
        return
    rank = len(out_shape)
    first = an.labels[labelled[0]]
    out_axis = first.axis + rank - len(an.shape(labelled[0]) or ())
    ids = first.ids
    size = len(ids)
    states = []
    for k, t in enumerate(labelled):
        lab = an.labels[t]
        axis = lab.axis + rank - len(an.shape(t) or ())
        if axis != out_axis:
            an.pin_inputs(node, "inputs carry channels on different axes")
            return
        if k:
            an.union(ids, lab.ids, f"{node.op_type} {_name(node)}: joins channels with fixed ones")
        states.append(lab.state)
    if node.op_type in ("Div", "Pow") and node.input[1] in an.labels:
        an.pin_inputs(node, "divides by (or raises to) a channel that may be zero")
        return
    unlabelled_var = False
    for idx, t in enumerate(node.input):
        if not t or t in an.labels:
            continue
        shape = an.shape(t)
        axis = _broadcast_axis(rank, len(shape), out_axis) if shape is not None else -1
        dim = shape[axis] if shape is not None and axis >= 0 else 1
        if an.array(t) is not None:
            if dim == size:
                an.member(node, idx, axis, ids)
            elif dim != 1:
                an.pin(
                    ids, f"{node.op_type} {_name(node)}: constant {t!r} does not match the channels"
                )
        elif dim == size:
            an.pin(
                ids, f"{node.op_type} {_name(node)}: joins channels with an unanalysed tensor {t!r}"
            )
        else:
            unlabelled_var = True
    stacked = np.stack(states)
    any_var = (stacked == VAR).any(0) | unlabelled_var
    if node.op_type == "Mul":
        state = np.where((stacked == ZERO).any(0), ZERO, np.where(any_var, VAR, CONST))
    elif node.op_type == "PRelu":
        state = stacked[0]
    else:
        all_zero = (stacked == ZERO).all(0) & (len(labelled) == len(ins))
        state = np.where(any_var, VAR, np.where(all_zero, ZERO, CONST))
    an.set_out(node.output[0], Labels(out_axis, ids, state))


def _dequantize(an: Analysis, node: onnx.NodeProto) -> None:
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    rank = len(an.shape(node.input[0]) or ())
    axis = _attr(node, "axis", 1) % max(rank, 1)
    for i in (1, 2):
        if len(node.input) > i and node.input[i]:
            arr = an.array(node.input[i])
            if arr is None:
                an.pin_inputs(node, "scale or zero point not constant")
                return
            if arr.ndim == 1 and arr.size > 1:
                if axis != lab.axis:
                    an.pin_inputs(node, "per-axis quantization on another axis")
                    return
                an.member(node, i, 0, lab.ids)
    _const_making(an, node)
