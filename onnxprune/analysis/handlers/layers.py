"""Rules for weighted layers: Conv (grouped and depthwise too), ConvTranspose, Gemm, MatMul."""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.analysis.handlers.common import optional_input, zero_padded, zero_pads
from onnxprune.analysis.labels import GroupRewrite, Labels, Sink, State
from onnxprune.analysis.state import Analysis
from onnxprune.graph import attr, node_name


def conv(an: Analysis, node: onnx.NodeProto) -> None:
    """Conv with a constant weight (and bias).

    group 1: the input channels end here (a sink; the weight's input axis is a ``consumer``
    member) and a new space opens for the output channels (weight rows, bias). An output
    channel whose filter is all zero is its bias: ZERO or CONST, else VAR. Depthwise
    (group = channels, one filter each) carries the input's channels through, with the
    ``group`` attribute rewritten; grouped convolutions go to :func:`grouped_conv`.
    """
    w = an.array(node.input[1])
    lab = an.labels.get(node.input[0])
    if w is None:
        an.pin_inputs(node, "weight is not a constant (quantized or computed)")
        return
    group = attr(node, "group", 1)
    cout, cin = w.shape[0], w.shape[1] * group
    padded = zero_pads(node)
    has_bias = optional_input(node, 2) is not None
    bias = an.array(node.input[2]) if has_bias else None
    if has_bias and bias is None:
        an.pin_inputs(node, "bias is not a constant")
        return
    zero_rows = ~np.asarray(w.reshape(cout, -1).any(axis=1))
    bias_zero = np.ones(cout, bool) if bias is None else np.asarray(bias == 0)
    if group == 1:
        if lab is not None:
            if lab.axis != 1:
                an.pin_inputs(node, "channel axis of the input is not axis 1")
            else:
                an.member(node, 1, 1, lab.ids, "consumer")
                an.sinks.append(Sink(node, node.input[0], lab, node.input[1], 1, padded))
        ids = an.open_space(node, cout)
        an.member(node, 1, 0, ids, "weight")
        if has_bias:
            an.member(node, 2, 0, ids, "bias")
        state = np.where(zero_rows, State.of_constant(bias_zero), State.VAR)
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
        an.rewrites.append(GroupRewrite(node, lab.ids))
        # a channel's filter sees its input (varying at a zero-padded border), plus its bias
        through = zero_padded(lab.state) if padded else lab.state
        bias_state = State.of_constant(bias_zero)
        state = np.where(zero_rows, bias_state, State.join(through, bias_state))
        an.set_out(node.output[0], Labels(1, lab.ids, state))
        return
    grouped_conv(an, node, lab, group, zero_rows, bias_zero, has_bias)


def grouped_conv(
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
    ids = an.open_space(node, cout)
    why = f"Conv {node_name(node)}: a group joins fixed channels"
    for g in range(group):
        block_in = lab.ids[g * cin_g : (g + 1) * cin_g]
        block_out = ids[g * cout_g : (g + 1) * cout_g]
        an.union(np.repeat(block_out[:1], cin_g), block_in, why)
        an.union(np.repeat(block_out[:1], cout_g - 1), block_out[1:], why)
    an.member(node, 1, 0, ids, "weight")
    if has_bias:
        an.member(node, 2, 0, ids, "bias")
    an.rewrites.append(GroupRewrite(node, ids[::cout_g]))
    in_zero = (lab.state.reshape(group, cin_g) == State.ZERO).all(axis=1).repeat(cout_g)
    quiet = zero_rows | in_zero  # the output is its bias
    state = np.where(quiet, State.of_constant(bias_zero), State.VAR)
    an.set_out(node.output[0], Labels(1, ids, state))


def conv_transpose(an: Analysis, node: onnx.NodeProto) -> None:
    """ConvTranspose (group 1, constant weight and bias): a sink for its input channels,
    treated as padded (each spreads over a neighbourhood), and a new space for its outputs
    (weight axis 1, bias), ZERO or CONST where a filter is all zero, else VAR."""
    w = an.array(node.input[1])
    lab = an.labels.get(node.input[0])
    bias_name = optional_input(node, 2)
    if (
        w is None
        or attr(node, "group", 1) != 1
        or (bias_name is not None and an.array(bias_name) is None)
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
    ids = an.open_space(node, cout)
    an.member(node, 1, 1, ids, "weight")
    if bias_name is not None:
        an.member(node, 2, 0, ids, "bias")
    zero = ~np.moveaxis(w, 1, 0).reshape(cout, -1).any(axis=1)
    bias = an.array(bias_name) if bias_name is not None else np.zeros(cout)
    an.set_out(
        node.output[0], Labels(1, ids, np.where(zero, State.of_constant(bias == 0), State.VAR))
    )


def gemm(an: Analysis, node: onnx.NodeProto) -> None:
    """Gemm with constant B (and C): input channels on A's K axis end here (a sink; B's K
    axis is a ``consumer`` member); a new space opens on B's N axis (and C's last axis).
    An output whose column of B is all zero is its bias: ZERO or CONST, else VAR."""
    b = an.array(node.input[1])
    lab = an.labels.get(node.input[0])
    c_name = optional_input(node, 2)
    c = an.array(c_name) if c_name is not None else None
    if b is None or (c_name is not None and c is None) or node.input[1] in an.labels:
        an.pin_inputs(node, "weight or bias is not a constant")
        return
    trans_a, trans_b = attr(node, "transA", 0), attr(node, "transB", 0)
    k_axis_b, n_axis_b = (1, 0) if trans_b else (0, 1)
    if lab is not None:
        if lab.axis != (0 if trans_a else 1):
            an.pin_inputs(node, "channels are on the rows (M axis) of the input")
        else:
            an.member(node, 1, k_axis_b, lab.ids, "consumer")
            an.sinks.append(Sink(node, node.input[0], lab, node.input[1], k_axis_b))
    n = b.shape[n_axis_b]
    ids = an.open_space(node, n)
    an.member(node, 1, n_axis_b, ids, "weight")
    c_zero: np.ndarray = np.ones(n, bool)
    if c is not None:
        if c.ndim >= 1 and c.shape[-1] == n:
            an.member(node, 2, c.ndim - 1, ids, "bias")
            rows = max(1, c.shape[0] if c.ndim == 2 else 1)
            c_zero = ~np.asarray(np.broadcast_to(c, (rows, n)).any(0))
        else:
            c_zero = np.full(n, not np.any(c))
        if attr(node, "beta", 1.0) == 0:
            c_zero = np.ones(n, bool)
    zero = ~np.moveaxis(b, n_axis_b, 0).reshape(n, -1).any(axis=1)
    an.set_out(node.output[0], Labels(1, ids, np.where(zero, State.of_constant(c_zero), State.VAR)))


def matmul(an: Analysis, node: onnx.NodeProto) -> None:
    """MatMul with a constant B of rank >= 2: channels on A's last axis end here (a sink; B's
    row axis is a ``consumer`` member); a new space opens on B's last axis, ZERO where a
    column is all zero, else VAR. Two activations go to :func:`matmul_activations`."""
    a_lab = an.labels.get(node.input[0])
    b = an.array(node.input[1])
    a_shape = an.shape(node.input[0])
    if b is None or a_shape is None or b.ndim < 2 or len(a_shape) < 2:
        matmul_activations(an, node)
        return
    if a_lab is not None:
        if a_lab.axis != len(a_shape) - 1:
            an.pin_inputs(node, "channels are not on the last axis of the input")
        else:
            an.member(node, 1, b.ndim - 2, a_lab.ids, "consumer")
            an.sinks.append(Sink(node, node.input[0], a_lab, node.input[1], b.ndim - 2))
    out_rank = len(an.shape(node.output[0]) or (0, 0))
    n = b.shape[-1]
    ids = an.open_space(node, n)
    an.member(node, 1, b.ndim - 1, ids, "weight")
    zero = ~np.moveaxis(b, -1, 0).reshape(n, -1).any(axis=1)
    an.set_out(node.output[0], Labels(out_rank - 1, ids, np.where(zero, State.ZERO, State.VAR)))


def matmul_axis(an: Analysis, tensor: str, axis: int, is_a: bool, out_rank: int) -> int | None:
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


def matmul_activations(an: Analysis, node: onnx.NodeProto) -> None:
    """MatMul of two activations (attention scores, attention x values): channels on batch
    axes (heads) or on A's rows / B's columns pass through; contracted ones are pinned.
    The state is a :meth:`State.product`, VAR where only one operand is labelled."""
    out_shape = an.shape(node.output[0])
    labelled = [(i, t) for i, t in enumerate(node.input[:2]) if t in an.labels]
    if not labelled:
        return
    if out_shape is None:
        an.pin_inputs(node, "output shape unknown")
        return
    out_rank = len(out_shape)
    axes = [matmul_axis(an, t, an.labels[t].axis, i == 0, out_rank) for i, t in labelled]
    known = [a for a in axes if a is not None]
    if len(known) < len(axes) or len(set(known)) > 1:
        an.pin_inputs(node, "multiplies two activations over the channel axis")
        return
    out_axis = known[0]
    first = an.labels[labelled[0][1]]
    if len(labelled) == 2:
        an.union(
            first.ids,
            an.labels[labelled[1][1]].ids,
            f"MatMul {node_name(node)}: joins channels with fixed ones",
        )
    else:  # the other operand must broadcast along that axis, or its positions are fixed
        other = node.input[1 - labelled[0][0]]
        shape = an.shape(other)
        rank = len(shape) if shape is not None else 0
        other_axis = out_axis - (out_rank - rank)
        if shape is None or (0 <= other_axis < rank - 2 and shape[other_axis] != 1):
            an.pin_inputs(node, f"multiplies channels with an unanalysed tensor {other!r}")
            return
    states = [an.labels[t].state for _, t in labelled]
    if len(labelled) < 2:
        states.append(np.full(len(first.ids), State.VAR))
    an.set_out(node.output[0], Labels(out_axis, first.ids, State.product(*states)))
