"""Rules for weighted layers: Conv (grouped and depthwise too), ConvTranspose, Gemm, MatMul."""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.analysis.handlers.common import _zero_pads
from onnxprune.analysis.labels import CONST, VAR, ZERO, Labels, Rewrite, Sink
from onnxprune.analysis.state import Analysis
from onnxprune.graph import attr as _attr
from onnxprune.graph import node_name as _name


def _conv(an: Analysis, node: onnx.NodeProto) -> None:
    w = an.array(node.input[1])
    lab = an.labels.get(node.input[0])
    if w is None:
        an.pin_inputs(node, "weight is not a constant (quantized or computed)")
        return
    group = _attr(node, "group", 1)
    cout, cin = w.shape[0], w.shape[1] * group
    padded = _zero_pads(node)
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
        through = np.where(
            in_state == ZERO, ZERO, np.where((in_state == CONST) & (not padded), CONST, VAR)
        )
        from_input = np.where(through == ZERO, np.where(bias_zero, ZERO, CONST), through)
        state = np.where(zero_rows, np.where(bias_zero, ZERO, CONST), from_input)
        an.set_out(node.output[0], Labels(1, lab.ids, state))
        return
    _grouped_conv(an, node, lab, group, zero_rows, bias_zero, has_bias)


def _grouped_conv(
    an: Analysis,
    node: onnx.NodeProto,
    lab: Labels | None,
    group: int,
    zero_rows: np.ndarray,
    bias_zero: np.ndarray,
    has_bias: bool,
) -> None:
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
    if (
        w is None
        or _attr(node, "group", 1) != 1
        or (len(node.input) > 2 and node.input[2] and an.array(node.input[2]) is None)
    ):
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
    an.set_out(
        node.output[0], Labels(1, ids, np.where(zero, np.where(bias == 0, ZERO, CONST), VAR))
    )


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
        an.union(
            first.ids,
            an.labels[labelled[1][1]].ids,
            f"MatMul {_name(node)}: joins channels with fixed ones",
        )
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
    an.set_out(
        node.output[0], Labels(out_axis, first.ids, np.where(zero, ZERO, np.where(var, VAR, CONST)))
    )
