"""Per-op rules of the channel analysis: how each op moves, joins, cuts or pins channels.

Each handler takes the :class:`~onnxprune.groups.Analysis` and one node. It reads the labels
of the node's inputs and sets the labels of its outputs, registering members (constants to
slice), sinks (weighted consumers), rewrites (shape constants) and pins (with a reason).
Ops without a handler pin every channel they touch. ``HANDLERS`` maps op type to handler.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from onnxprune.groups import (
    CONST,
    VAR,
    ZERO,
    Analysis,
    Labels,
    Rewrite,
    Sink,
    _attr,
    _name,
)

# Unary ops applied per element: f(channel) depends on that channel only.
ZERO_PRESERVING = {
    "Relu", "LeakyRelu", "Tanh", "Gelu", "Elu", "Selu", "HardSwish", "Identity", "Cast",
    "Dropout", "Neg", "Abs", "Erf", "Sign", "Round", "Floor", "Ceil", "Softsign", "Mish",
    "ThresholdedRelu", "Sin", "Atan", "Asinh", "Sinh", "Tan", "Asin", "CastLike",
}
CONST_MAKING = {"Sigmoid", "HardSigmoid", "Exp", "Softplus", "Cos", "Cosh", "Acos", "Celu"}
SPATIAL_CARRIERS = {"MaxPool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu", "Sum", "Mean"}
REDUCE = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2",
          "ReduceProd", "ReduceLogSumExp", "ReduceSumSquare"}


def _carry(an: Analysis, node: onnx.NodeProto, state_fn: Any = None) -> None:
    """Output 0 gets input 0's labels; state mapped by ``state_fn`` (default: unchanged)."""
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    state = state_fn(lab.state) if state_fn else lab.state
    an.set_out(node.output[0], Labels(lab.axis, lab.ids, state))


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


def _scalar(arr: np.ndarray) -> float:
    """The one value of a scalar or one-element array (Clip bounds may be either)."""
    return float(np.asarray(arr).reshape(-1)[0])


def _spatial(an: Analysis, node: onnx.NodeProto) -> None:
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    if lab.axis != 1:
        an.pin_inputs(node, "pools over the channel axis")
        return
    _carry(an, node)


def _average_pool(an: Analysis, node: onnx.NodeProto) -> None:
    pads = _attr(node, "pads", []) or []
    padded = any(pads) or _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID")
    if padded and _attr(node, "count_include_pad", 0):
        lab = an.labels.get(node.input[0])
        if lab is not None and lab.axis == 1:
            an.set_out(node.output[0], Labels(1, lab.ids, np.where(lab.state == CONST, VAR, lab.state)))
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
    state = lab.state if node.op_type in ("ReduceMean", "ReduceMax", "ReduceMin") else np.where(
        lab.state == ZERO, ZERO, np.where(lab.state == CONST, CONST, VAR))
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


def _broadcast_axis(out_rank: int, in_rank: int, out_axis: int) -> int:
    """Axis of an input of rank ``in_rank`` that broadcasts onto ``out_axis``, or -1."""
    axis = out_axis - (out_rank - in_rank)
    return axis if axis >= 0 else -1


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
                an.pin(ids, f"{node.op_type} {_name(node)}: constant {t!r} does not match the channels")
        elif dim == size:
            an.pin(ids, f"{node.op_type} {_name(node)}: joins channels with an unanalysed tensor {t!r}")
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


def _conv(an: Analysis, node: onnx.NodeProto) -> None:
    w = an.array(node.input[1])
    lab = an.labels.get(node.input[0])
    if w is None:
        an.pin_inputs(node, "weight is not a constant (quantized or computed)")
        return
    group = _attr(node, "group", 1)
    cout, cin = w.shape[0], w.shape[1] * group
    pads = _attr(node, "pads", []) or []
    padded = any(pads) or _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID")
    has_bias = len(node.input) > 2 and bool(node.input[2])
    bias = an.array(node.input[2]) if has_bias else None
    if has_bias and bias is None:
        an.pin_inputs(node, "bias is not a constant")
        return
    zero_rows = ~w.reshape(cout, -1).any(axis=1)
    bias_zero = np.ones(cout, bool) if bias is None else (bias == 0)
    if group == 1:
        if lab is not None:
            if lab.axis != 1:
                an.pin_inputs(node, "channel axis of the input is not axis 1")
            else:
                an.member(node, 1, 1, lab.ids, "consumer")
                an.sinks.append(Sink(node, node.input[0], lab, node.input[1], 1, padded))
        ids = an.open_space(node, node.output[0], cout)
        an.member(node, 1, 0, ids, "weight")
        if has_bias:
            an.member(node, 2, 0, ids, "bias")
        state = np.where(zero_rows, np.where(bias_zero, ZERO, CONST), VAR)
        an.set_out(node.output[0], Labels(1, ids, state))
        return
    if group == cin == cout and w.shape[1] == 1:
        if lab is None:
            return
        if lab.axis != 1:
            an.pin_inputs(node, "channel axis of the input is not axis 1")
            return
        an.member(node, 1, 0, lab.ids)
        if has_bias:
            an.member(node, 2, 0, lab.ids)
        an.rewrites.append(Rewrite("group", node, [lab.ids]))
        in_state = lab.state
        through = np.where(in_state == ZERO, ZERO, np.where((in_state == CONST) & (not padded), CONST, VAR))
        from_input = np.where(through == ZERO, np.where(bias_zero, ZERO, CONST), through)
        state = np.where(zero_rows, np.where(bias_zero, ZERO, CONST), from_input)
        an.set_out(node.output[0], Labels(1, lab.ids, state))
        return
    _grouped_conv(an, node, lab, group, zero_rows, bias_zero, has_bias)


def _grouped_conv(an: Analysis, node: onnx.NodeProto, lab: Labels | None, group: int,
                  zero_rows: np.ndarray, bias_zero: np.ndarray, has_bias: bool) -> None:
    """A grouped convolution prunes whole groups: group g's input block and output block are
    one channel class, and the ``group`` attribute counts the groups that remain."""
    if lab is None:
        return  # the input channels are fixed, so are the groups
    if lab.axis != 1:
        an.pin_inputs(node, "channel axis of the input is not axis 1")
        return
    cout = len(zero_rows)
    cin_g, cout_g = len(lab.ids) // group, cout // group
    ids = an.open_space(node, node.output[0], cout)
    why = f"Conv {_name(node)}: a group joins fixed channels"
    for g in range(group):
        block_in = lab.ids[g * cin_g : (g + 1) * cin_g]
        block_out = ids[g * cout_g : (g + 1) * cout_g]
        an.union(np.repeat(block_out[:1], cin_g), block_in, why)
        an.union(np.repeat(block_out[:1], cout_g - 1), block_out[1:], why)
    an.member(node, 1, 0, ids, "weight")
    if has_bias:
        an.member(node, 2, 0, ids, "bias")
    an.rewrites.append(Rewrite("group", node, [ids[::cout_g]]))
    in_zero = (lab.state.reshape(group, cin_g) == ZERO).all(axis=1).repeat(cout_g)
    quiet = zero_rows | in_zero  # the output is its bias
    state = np.where(quiet, np.where(bias_zero, ZERO, CONST), VAR)
    an.set_out(node.output[0], Labels(1, ids, state))


def _conv_transpose(an: Analysis, node: onnx.NodeProto) -> None:
    w = an.array(node.input[1])
    lab = an.labels.get(node.input[0])
    if w is None or _attr(node, "group", 1) != 1 or (len(node.input) > 2 and node.input[2]
                                                       and an.array(node.input[2]) is None):
        an.pin_inputs(node, "weight not constant, or grouped")
        return
    if lab is not None:
        if lab.axis != 1:
            an.pin_inputs(node, "channel axis of the input is not axis 1")
        else:
            an.member(node, 1, 0, lab.ids, "consumer")
            # every input channel spreads over a neighbourhood: treat as padded (exact only for 0)
            an.sinks.append(Sink(node, node.input[0], lab, node.input[1], 0, True))
    cout = w.shape[1]
    ids = an.open_space(node, node.output[0], cout)
    an.member(node, 1, 1, ids, "weight")
    has_bias = len(node.input) > 2 and bool(node.input[2])
    if has_bias:
        an.member(node, 2, 0, ids, "bias")
    zero = ~np.moveaxis(w, 1, 0).reshape(cout, -1).any(axis=1)
    bias = an.array(node.input[2]) if has_bias else np.zeros(cout)
    an.set_out(node.output[0], Labels(1, ids, np.where(zero, np.where(bias == 0, ZERO, CONST), VAR)))


def _gemm(an: Analysis, node: onnx.NodeProto) -> None:
    b = an.array(node.input[1])
    lab = an.labels.get(node.input[0])
    c_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if b is None or (c_name and an.array(c_name) is None) or node.input[1] in an.labels:
        an.pin_inputs(node, "weight or bias is not a constant")
        return
    trans_a, trans_b = _attr(node, "transA", 0), _attr(node, "transB", 0)
    k_axis_b, n_axis_b = (1, 0) if trans_b else (0, 1)
    if lab is not None:
        if lab.axis != (0 if trans_a else 1):
            an.pin_inputs(node, "channels are on the rows (M axis) of the input")
        else:
            an.member(node, 1, k_axis_b, lab.ids, "consumer")
            an.sinks.append(Sink(node, node.input[0], lab, node.input[1], k_axis_b))
    n = b.shape[n_axis_b]
    ids = an.open_space(node, node.output[0], n)
    an.member(node, 1, n_axis_b, ids, "weight")
    c_zero = np.ones(n, bool)
    if c_name:
        c = an.array(c_name)
        if c.ndim >= 1 and c.shape[-1] == n:
            an.member(node, 2, c.ndim - 1, ids, "bias")
            c_zero = ~np.broadcast_to(c, (max(1, c.shape[0] if c.ndim == 2 else 1), n)).any(0)
        else:
            c_zero = np.full(n, not np.any(c))
        if _attr(node, "beta", 1.0) == 0:
            c_zero = np.ones(n, bool)
    zero = ~np.moveaxis(b, n_axis_b, 0).reshape(n, -1).any(axis=1)
    an.set_out(node.output[0], Labels(1, ids, np.where(zero, np.where(c_zero, ZERO, CONST), VAR)))


def _matmul(an: Analysis, node: onnx.NodeProto) -> None:
    a_lab = an.labels.get(node.input[0])
    b = an.array(node.input[1])
    a_shape = an.shape(node.input[0])
    if b is None or a_shape is None or b.ndim < 2 or len(a_shape) < 2:
        _matmul_activations(an, node)
        return
    if a_lab is not None:
        if a_lab.axis != len(a_shape) - 1:
            an.pin_inputs(node, "channels are not on the last axis of the input")
        else:
            an.member(node, 1, b.ndim - 2, a_lab.ids, "consumer")
            an.sinks.append(Sink(node, node.input[0], a_lab, node.input[1], b.ndim - 2))
    out_rank = len(an.shape(node.output[0]) or (0, 0))
    n = b.shape[-1]
    ids = an.open_space(node, node.output[0], n)
    an.member(node, 1, b.ndim - 1, ids, "weight")
    zero = ~np.moveaxis(b, -1, 0).reshape(n, -1).any(axis=1)
    an.set_out(node.output[0], Labels(out_rank - 1, ids, np.where(zero, ZERO, VAR)))


def _matmul_axis(an: Analysis, tensor: str, axis: int, is_a: bool, out_rank: int) -> int | None:
    """Output axis of an operand's labelled ``axis`` in a MatMul, or None if it is contracted."""
    rank = len(an.shape(tensor) or ())
    if rank < 2:
        return None
    if axis < rank - 2:
        return axis + out_rank - rank  # a batch axis (attention heads)
    if is_a and axis == rank - 2:
        return out_rank - 2  # rows of A
    if not is_a and axis == rank - 1:
        return out_rank - 1  # columns of B
    return None


def _matmul_activations(an: Analysis, node: onnx.NodeProto) -> None:
    """MatMul of two activations (attention scores, attention x values): channels on batch
    axes (heads) or on A's rows / B's columns pass through; contracted ones are pinned."""
    out_shape = an.shape(node.output[0])
    labelled = [(i, t) for i, t in enumerate(node.input[:2]) if t in an.labels]
    if not labelled:
        return
    if out_shape is None:
        an.pin_inputs(node, "output shape unknown")
        return
    out_rank = len(out_shape)
    axes = {i: _matmul_axis(an, t, an.labels[t].axis, i == 0, out_rank) for i, t in labelled}
    if any(a is None for a in axes.values()) or len(set(axes.values())) > 1:
        an.pin_inputs(node, "multiplies two activations over the channel axis")
        return
    (out_axis,) = set(axes.values())
    first = an.labels[labelled[0][1]]
    if len(labelled) == 2:
        an.union(first.ids, an.labels[labelled[1][1]].ids,
                 f"MatMul {_name(node)}: joins channels with fixed ones")
    else:  # the other operand must broadcast along that axis, or its positions are fixed
        other = node.input[1 - labelled[0][0]]
        shape = an.shape(other)
        rank = len(shape) if shape is not None else 0
        other_axis = out_axis - (out_rank - rank)
        if shape is None or (0 <= other_axis < rank - 2 and shape[other_axis] != 1):
            an.pin_inputs(node, f"multiplies channels with an unanalysed tensor {other!r}")
            return
    states = np.stack([an.labels[t].state for _, t in labelled])
    zero = (states == ZERO).any(0)
    var = (states == VAR).any(0) | (len(labelled) < 2)
    an.set_out(node.output[0], Labels(out_axis, first.ids,
                                      np.where(zero, ZERO, np.where(var, VAR, CONST))))


def _transpose(an: Analysis, node: onnx.NodeProto) -> None:
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    rank = len(an.shape(node.input[0]) or ())
    perm = _attr(node, "perm", None) or list(reversed(range(rank)))
    an.set_out(node.output[0], Labels(list(perm).index(lab.axis), lab.ids, lab.state))


def _squeeze_like(an: Analysis, node: onnx.NodeProto) -> None:
    """Squeeze/Unsqueeze: find where the channel axis lands from the shapes."""
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    out_axis = _axis_after_reshape(an.shape(node.input[0]), an.shape(node.output[0]), lab.axis)
    if out_axis is None:
        an.pin_inputs(node, "cannot follow the channel axis")
        return
    an.set_out(node.output[0], Labels(out_axis, lab.ids, lab.state))


def _axis_after_reshape(src: tuple[int, ...] | None, dst: tuple[int, ...] | None, axis: int) -> int | None:
    """Output axis holding input ``axis`` unchanged when only size-1 axes are added/removed."""
    if src is None or dst is None:
        return None
    before = int(np.prod(src[:axis], dtype=np.int64))
    acc = 1
    for j, d in enumerate(dst):
        if acc == before and d == src[axis]:
            return j
        acc *= d
    return None


def _merge_map(src: tuple[int, ...], dst: tuple[int, ...], axis: int) -> tuple[int, int, int] | None:
    """(out_axis, first, last): input axes first..last (containing ``axis``) become out_axis.

    Holds when the elements before the block and the block itself line up in row-major order:
    prod(src[:first]) == prod(dst[:out_axis]) and prod(src[first:last+1]) == dst[out_axis].
    Among several answers (size-1 axes make ties) the smallest block is taken; all are
    equivalent for the channel labels.
    """
    best = None
    for j in range(len(dst)):
        before = int(np.prod(dst[:j], dtype=np.int64))
        for first in range(axis, -1, -1):
            if int(np.prod(src[:first], dtype=np.int64)) != before:
                continue
            for last in range(axis, len(src)):
                size = int(np.prod(src[first : last + 1], dtype=np.int64))
                if size == dst[j] and (best is None or last - first < best[2] - best[1]):
                    best = (j, first, last)
                if size > dst[j]:
                    break
    return best


def _reshape(an: Analysis, node: onnx.NodeProto) -> None:
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    src, dst = an.shape(node.input[0]), an.shape(node.output[0])
    if src is None or dst is None:
        an.pin_inputs(node, "shapes unknown")
        return
    if node.op_type == "Reshape" and an.array(node.input[1]) is None:
        an.pin_inputs(node, "target shape is computed at run time")
        return
    found = _merge_map(tuple(src), tuple(dst), lab.axis)
    if found is None:
        _split_reshape(an, node, tuple(src), tuple(dst), lab)
        return
    out_axis, first, last = found
    block = src[first : last + 1]
    coords = np.indices(block).reshape(len(block), -1)[lab.axis - first]
    ids, state = lab.ids[coords], lab.state[coords]
    if node.op_type == "Reshape":
        an.rewrites.append(Rewrite("reshape", node, [ids], {"axis": out_axis}))
    an.set_out(node.output[0], Labels(out_axis, ids, state))


def _split_map(src: tuple[int, ...], dst: tuple[int, ...], axis: int) -> tuple[int, int] | None:
    """(first, last): output axes first..last (two or more) that input ``axis`` splits into."""
    before = int(np.prod(src[:axis], dtype=np.int64))
    for first in range(len(dst)):
        if int(np.prod(dst[:first], dtype=np.int64)) != before:
            continue
        size = 1
        for last in range(first, len(dst)):
            size *= dst[last]
            if size == src[axis] and last > first:
                return first, last
            if size > src[axis]:
                break
    return None


_PASS_THROUGH = ("Transpose", "Unsqueeze", "Squeeze", "Identity")


def _selected_later(an: Analysis, tensor: str, axis: int, depth: int = 6) -> bool:
    """Whether every path from ``tensor`` soon picks positions of ``axis`` apart (Gather,
    Split or Slice along it) after only Transpose/Unsqueeze/Squeeze/Identity."""
    readers = an.consumers(tensor)
    if not readers or depth == 0:
        return False
    for node in readers:
        if node.op_type in ("Gather", "Split", "Slice"):
            rank = len(an.shape(tensor) or ()) or 1
            if node.op_type == "Slice":
                axes = an.array(node.input[3]) if len(node.input) > 3 and node.input[3] else None
                along = [int(a) % rank for a in axes.tolist()] if axes is not None else [0]
            else:
                along = [int(_attr(node, "axis", 0)) % rank]
            if axis not in along:
                return False
        elif node.op_type in _PASS_THROUGH:
            if node.op_type == "Transpose":
                rank = len(an.shape(tensor) or ())
                perm = list(_attr(node, "perm", None) or reversed(range(rank)))
                moved = perm.index(axis)
            else:
                moved = _axis_after_reshape(an.shape(tensor), an.shape(node.output[0]), axis)
            if moved is None or not _selected_later(an, node.output[0], moved, depth - 1):
                return False
        else:
            return False
    return True


def _split_reshape(an: Analysis, node: onnx.NodeProto, src: tuple[int, ...],
                   dst: tuple[int, ...], lab: Labels) -> None:
    """A Reshape that splits the channel axis into several (attention heads: D -> (H, d)).

    If the ids depend on one output axis only (an unflatten), that axis carries them. Else the
    axis before the innermost carries them and every position sharing its coordinate becomes
    one channel class: a head, with its q, k and v parts, goes or stays as a whole.
    """
    found = _split_map(src, dst, lab.axis)
    if found is None or node.op_type != "Reshape":
        an.pin_inputs(node, "reshapes the channel axis in a way the analysis cannot follow")
        return
    first, last = found
    block = dst[first : last + 1]
    ids, state = lab.ids.reshape(block), lab.state.reshape(block)
    for k in range(len(block)):
        moved = np.moveaxis(ids, k, 0).reshape(block[k], -1)
        if (moved == moved[:, :1]).all():  # ids constant across the other axes
            st = np.moveaxis(state, k, 0).reshape(block[k], -1).max(axis=1)
            an.rewrites.append(Rewrite("reshape", node, [moved[:, 0]], {"axis": first + k}))
            an.set_out(node.output[0], Labels(first + k, moved[:, 0], st))
            return
    k = len(block) - 2  # heads: the axis before the innermost (d) ...
    if _selected_later(an, node.output[0], first + k):
        k += 1  # ... unless it is picked apart later (q, k, v packed as [3, D]): then D
    moved = np.moveaxis(ids, k, 0).reshape(block[k], -1)
    for row in moved:
        an.union(np.repeat(row[:1], len(row) - 1), row[1:],
                 f"Reshape {_name(node)}: splits channels into blocks with fixed ones")
    st = np.moveaxis(state, k, 0).reshape(block[k], -1)
    head_state = np.where((st == ZERO).all(1), ZERO, np.where((st == VAR).any(1), VAR, CONST))
    an.rewrites.append(Rewrite("reshape", node, [moved[:, 0]], {"axis": first + k}))
    an.set_out(node.output[0], Labels(first + k, moved[:, 0], head_state))


def _concat(an: Analysis, node: onnx.NodeProto) -> None:
    labelled = [t for t in node.input if t in an.labels]
    if not labelled:
        return
    rank = len(an.shape(node.output[0]) or ())
    axis = _attr(node, "axis", 0) % max(rank, 1)
    if any(an.labels[t].axis != axis for t in labelled):
        first = an.labels[labelled[0]]
        if all(an.labels[t].axis == first.axis for t in labelled) and len(labelled) == len(node.input):
            for t in labelled[1:]:
                an.union(first.ids, an.labels[t].ids, f"Concat {_name(node)}: joins channels")
            an.set_out(node.output[0], Labels(first.axis, first.ids, np.maximum.reduce(
                [an.labels[t].state for t in labelled])))
        else:
            an.pin_inputs(node, "concatenates along another axis than the channels")
        return
    ids, state = [], []
    for t in node.input:
        if t in an.labels:
            ids.append(an.labels[t].ids)
            state.append(an.labels[t].state)
        else:
            shape = an.shape(t)
            if shape is None:
                an.pin_inputs(node, f"shape of {t!r} unknown")
                return
            ids.append(np.full(shape[axis], -1))
            state.append(np.full(shape[axis], VAR))
    an.set_out(node.output[0], Labels(axis, np.concatenate(ids), np.concatenate(state)))


def _split(an: Analysis, node: onnx.NodeProto) -> None:
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    rank = len(an.shape(node.input[0]) or ())
    axis = _attr(node, "axis", 0) % max(rank, 1)
    if axis != lab.axis:
        for out in node.output:
            an.set_out(out, Labels(_axis_after_reshape(an.shape(node.input[0]), an.shape(out), lab.axis)
                                   or lab.axis, lab.ids, lab.state))
        return
    sizes = [an.shape(o)[axis] if an.shape(o) else None for o in node.output]
    if None in sizes or sum(sizes) != len(lab.ids):
        an.pin_inputs(node, "split sizes unknown")
        return
    offsets = np.cumsum([0, *sizes])
    parts = [lab.ids[offsets[i] : offsets[i + 1]] for i in range(len(sizes))]
    for i, out in enumerate(node.output):
        an.set_out(out, Labels(axis, parts[i], lab.state[offsets[i] : offsets[i + 1]]))
    an.rewrites.append(Rewrite("split", node, parts, {"axis": axis}))


def _slice(an: Analysis, node: onnx.NodeProto) -> None:
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    consts = [an.array(t) if t else None for t in node.input[1:]]
    if len(node.input) < 3 or any(c is None for c, t in zip(consts, node.input[1:], strict=True) if t):
        an.pin_inputs(node, "slice bounds are not constants")
        return
    rank = len(an.shape(node.input[0]) or ())
    starts, ends = consts[0].tolist(), consts[1].tolist()
    axes = consts[2].tolist() if len(consts) > 2 and consts[2] is not None else list(range(len(starts)))
    steps = consts[3].tolist() if len(consts) > 3 and consts[3] is not None else [1] * len(starts)
    axes = [a % rank for a in axes]
    if lab.axis not in axes:
        _carry(an, node)
        return
    k = axes.index(lab.axis)
    if steps[k] != 1:
        an.pin_inputs(node, "strided slice on the channel axis")
        return
    n = len(lab.ids)
    start, stop, _ = slice(starts[k], ends[k]).indices(n)
    an.set_out(node.output[0], Labels(lab.axis, lab.ids[start:stop], lab.state[start:stop]))
    an.rewrites.append(Rewrite("slice", node, [lab.ids], {"k": k, "start": start, "stop": stop}))


def _gather(an: Analysis, node: onnx.NodeProto) -> None:
    lab = an.labels.get(node.input[0])
    if node.input[1] in an.labels:
        an.pin_inputs(node, "channels used as indices")
        return
    if lab is None:
        return
    rank = len(an.shape(node.input[0]) or ())
    axis = _attr(node, "axis", 0) % max(rank, 1)
    idx_shape = an.shape(node.input[1])
    if axis == lab.axis or idx_shape is None:
        an.pin_inputs(node, "gathers along the channel axis")
        return
    out_axis = lab.axis if lab.axis < axis else lab.axis + len(idx_shape) - 1
    an.set_out(node.output[0], Labels(out_axis, lab.ids, lab.state))


def _pad(an: Analysis, node: onnx.NodeProto) -> None:
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    pads = an.array(node.input[1]) if len(node.input) > 1 and node.input[1] else _attr(node, "pads")
    if pads is None or (len(node.input) > 3 and node.input[3]):
        an.pin_inputs(node, "pads are not constant, or pad only some axes")
        return
    pads = np.asarray(pads).tolist()
    rank = len(pads) // 2
    if pads[lab.axis] or pads[lab.axis + rank]:
        an.pin_inputs(node, "pads the channel axis")
        return
    mode = _attr(node, "mode", b"constant")
    value = an.array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if mode in (b"constant", "constant") and (value is None or _scalar(value) == 0.0):
        _carry(an, node, lambda s: np.where(s == CONST, VAR, s))
    elif mode in (b"constant", "constant"):
        _carry(an, node, lambda s: np.where(s == ZERO, VAR, np.where(s == CONST, VAR, s)))
    else:
        _carry(an, node)


def _resize(an: Analysis, node: onnx.NodeProto) -> None:
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    src, dst = an.shape(node.input[0]), an.shape(node.output[0])
    sizes = node.input[3] if len(node.input) > 3 and node.input[3] else None
    if src is None or dst is None or src[lab.axis] != dst[lab.axis] or sizes:
        an.pin_inputs(node, "resizes the channel axis, or takes output sizes")
        return
    _carry(an, node)


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


def _expand(an: Analysis, node: onnx.NodeProto) -> None:
    """Expand broadcasts other axes; a shape entry that counts the channels is rewritten."""
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    target = an.array(node.input[1])
    src, dst = an.shape(node.input[0]), an.shape(node.output[0])
    if target is None or src is None or dst is None:
        an.pin_inputs(node, "target shape is computed at run time")
        return
    out_axis = lab.axis + len(dst) - len(src)
    index = out_axis - (len(dst) - len(target))
    if dst[out_axis] != src[lab.axis]:
        an.pin_inputs(node, "expands the channel axis")
        return
    if index >= 0:
        an.rewrites.append(Rewrite("reshape", node, [lab.ids], {"axis": index}))
    an.set_out(node.output[0], Labels(out_axis, lab.ids, lab.state))


def _tile(an: Analysis, node: onnx.NodeProto) -> None:
    """Tile repeating other axes carries the channels; repeating the channel axis pins them."""
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    repeats = an.array(node.input[1])
    if repeats is None or int(repeats[lab.axis]) != 1:
        an.pin_inputs(node, "repeats the channel axis, or repeats computed at run time")
        return
    _carry(an, node)


def _flatten(an: Analysis, node: onnx.NodeProto) -> None:
    _reshape(an, node)


HANDLERS: dict[str, Any] = {
    **{op: _zero_preserving for op in ZERO_PRESERVING},
    **{op: _const_making for op in CONST_MAKING},
    **{op: _spatial for op in SPATIAL_CARRIERS},
    **{op: _elementwise for op in BINARY},
    **{op: _reduce for op in REDUCE},
    "Clip": _clip,
    "AveragePool": _average_pool,
    "Softmax": _softmax_like, "LogSoftmax": _softmax_like, "Hardmax": _softmax_like,
    "LayerNormalization": _layer_norm,
    "GroupNormalization": _group_norm,
    "BatchNormalization": _batch_norm,
    "InstanceNormalization": _batch_norm,
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Transpose": _transpose,
    "Squeeze": _squeeze_like,
    "Unsqueeze": _squeeze_like,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Expand": _expand,
    "Tile": _tile,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "Pad": _pad,
    "Resize": _resize,
    "Upsample": _resize,
    "QuantizeLinear": _dequantize,
    "DequantizeLinear": _dequantize,
}
