"""Rules for ops that act per element or per channel: activations, arithmetic with constants,
normalisations, pooling, reductions (quantization: :mod:`.quantized`)."""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.analysis.fixed_values import computed_constant, data_independent
from onnxprune.analysis.handlers.common import (
    broadcast_axis,
    carry,
    optional_input,
    scalar,
    zero_padded,
    zero_pads,
)
from onnxprune.analysis.handlers.written_out import written_out
from onnxprune.analysis.labels import Labels, State
from onnxprune.analysis.state import Analysis
from onnxprune.graph import attr, node_name

# Unary ops applied per element with f(0) = 0: f(channel) depends on that channel only.
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
    "IsNaN",  # false at 0, as IsInf: the mask of a softmax's NaN rows (SDPA exports)
    "IsInf",
}

# Unary ops applied per element whose f(0) is a constant other than 0.
CONST_MAKING = {"Sigmoid", "HardSigmoid", "Exp", "Softplus", "Cos", "Cosh", "Acos", "Celu"}

# Pools over the spatial axes (one value per channel and window).
SPATIAL_CARRIERS = {"MaxPool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}

# Elementwise ops of several inputs, with broadcasting (Where picks per element: the state
# of its output is the join of all three, which holds whichever is picked).
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu", "Sum", "Mean", "Where"}

# Ops of several inputs that are 0 where every input is 0.
_SUMS = {"Add", "Sub", "Sum", "Mean", "Max", "Min"}

# Reductions over axes other than the channel axis keep the channels.
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


def zero_preserving(an: Analysis, node: onnx.NodeProto) -> None:
    """Per-element op with f(0) = 0 (Relu, Tanh, Cast, ...): labels and states pass through."""
    carry(an, node)


def const_making(an: Analysis, node: onnx.NodeProto) -> None:
    """Per-element op whose f(0) is a constant (Sigmoid, Exp, ...): ZERO becomes CONST."""
    carry(an, node, lambda s: State.join(s, State.CONST))


def clip(an: Analysis, node: onnx.NodeProto) -> None:
    """Clip with constant bounds: zeros stay zero when min <= 0 <= max, else they become the
    clipped constant; bounds computed at run time pin the channels."""
    bounds = [optional_input(node, i) for i in (1, 2)]
    if any(b is not None and an.array(b) is None for b in bounds):
        an.pin_inputs(node, "min/max are not constants")
        return
    lo, hi = (an.array(b) if b is not None else None for b in bounds)
    lo_v = scalar(lo) if lo is not None else float(attr(node, "min", -np.inf))
    hi_v = scalar(hi) if hi is not None else float(attr(node, "max", np.inf))
    if lo_v <= 0 <= hi_v:
        zero_preserving(an, node)
    else:
        const_making(an, node)


def spatial(an: Analysis, node: onnx.NodeProto) -> None:
    """Pools over the spatial axes keep channels on axis 1 and their state (the pool of a
    constant is a constant); an LpPool that zero-pads makes a constant vary at the border.
    Channels on another axis are pooled together: pinned."""
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    if lab.axis != 1:
        an.pin_inputs(node, "pools over the channel axis")
        return
    if node.op_type == "LpPool" and zero_pads(node):
        carry(an, node, zero_padded)
    else:
        carry(an, node)


def average_pool(an: Analysis, node: onnx.NodeProto) -> None:
    """AveragePool is :func:`spatial`, except that padding counted in the average
    (``count_include_pad``) makes a constant vary at the border."""
    lab = an.labels.get(node.input[0])
    if lab is not None and lab.axis == 1 and zero_pads(node) and attr(node, "count_include_pad", 0):
        carry(an, node, zero_padded)
        return
    spatial(an, node)


def reduced_state(op_type: str, state: np.ndarray) -> np.ndarray:
    """State of each channel after a reduction over other axes (n values become one).

    Mean, Max, Min, Sum, L1, L2, SumSquare and Prod map 0 to 0 and a constant to a constant:
    the state is unchanged. LogSumExp maps 0 to log n: ZERO becomes CONST.
    """
    if op_type == "ReduceLogSumExp":
        return State.join(state, State.CONST)
    return state


def reduce(an: Analysis, node: onnx.NodeProto) -> None:
    """Reductions over other axes than the channels keep them (the axis moves when the
    reduced axes are dropped) with :func:`reduced_state`; over the channel axis they pin, and
    the reason names a written-out LayerNorm, RMSNorm or Softmax (:func:`written_out`)."""
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    rank = len(an.shape(node.input[0]) or ())
    axes = attr(node, "axes", None)
    axes_input = optional_input(node, 1)
    if axes is None and axes_input is not None:
        arr = an.array(axes_input)
        if arr is None:
            an.pin_inputs(node, "reduction axes are not constant")
            return
        axes = arr.tolist()
    if axes is None or len(axes) == 0:
        if attr(node, "noop_with_empty_axes", 0):
            carry(an, node)
        else:
            an.pin_inputs(node, "reduces over all axes, the channel axis included")
        return
    axes = sorted(a % rank for a in axes)
    if lab.axis in axes:
        an.pin_inputs(node, written_out(an, node) or "reduces over the channel axis")
        return
    keep = attr(node, "keepdims", 1)
    axis = lab.axis if keep else lab.axis - sum(a < lab.axis for a in axes)
    an.set_out(node.output[0], Labels(axis, lab.ids, reduced_state(node.op_type, lab.state)))


def softmax_like(an: Analysis, node: onnx.NodeProto) -> None:
    """Softmax/LogSoftmax/Hardmax along another axis work within each channel (the softmax of
    a constant is a constant: ZERO becomes CONST); along the channel axis they mix: pinned."""
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    rank = len(an.shape(node.input[0]) or ())
    axis = attr(node, "axis", -1) % max(rank, 1)
    if axis == lab.axis:
        an.pin_inputs(node, "normalises over the channel axis")
    else:
        const_making(an, node)


def layer_norm(an: Analysis, node: onnx.NodeProto) -> None:
    """LayerNormalization over axes ``axis..`` pins channels among them; channels before them
    are kept, every state VAR (statistics and the per-position scale mix values)."""
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    rank = len(an.shape(node.input[0]) or ())
    axis = attr(node, "axis", -1) % max(rank, 1)
    if lab.axis >= axis:
        an.pin_inputs(node, "normalises over the channel axis (LayerNorm over the hidden size)")
    else:
        an.set_out(node.output[0], Labels(lab.axis, lab.ids, np.full(len(lab.ids), State.VAR)))


def group_norm(an: Analysis, node: onnx.NodeProto) -> None:
    """GroupNormalization normalises channels of a group together: pinned."""
    if node.input[0] in an.labels:
        an.pin_inputs(node, "GroupNormalization mixes channels of a group")


def batch_norm(an: Analysis, node: onnx.NodeProto) -> None:
    """Batch/InstanceNormalization on axis 1: scale, shift (and BN's mean, var) are members;
    a zero or constant channel comes out as a constant (ZERO becomes CONST). Parameters that
    are not constants, or channels on another axis, pin."""
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
    an.set_out(node.output[0], Labels(1, lab.ids, State.join(lab.state, State.CONST)))


def elementwise(an: Analysis, node: onnx.NodeProto) -> None:
    """Add/Sub/Mul/Div/Max/Min/Pow/PRelu/Sum/Mean with any mix of activations and constants.

    Labelled inputs must carry channels on the same (broadcast) axis and are united: they are
    the same channels. A constant with one entry per channel is a member; one that broadcasts
    is fine; any other, or an unanalysed activation of channel size, pins. A tensor computed
    from constants and fixed sizes only (:func:`data_independent`: the legacy softmax scale
    ``Shape -> Slice -> Cast -> Sqrt -> Div``) counts as a constant that cannot be sliced.
    Dividing by (or raising to) a channel pins it. State: Mul is :meth:`State.product` (zero
    absorbs), PRelu keeps its input's, the others :meth:`State.join` of their inputs (an
    unlabelled input counts as at least CONST; for sums, a constant counts as ZERO where all
    its entries of a channel are 0, so a zeroed bias keeps a zeroed channel ZERO).
    """
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
            why = f"{node.op_type} {node_name(node)}: joins channels with fixed ones"
            an.union(ids, lab.ids, why)
        states.append(lab.state)
    if node.op_type in ("Div", "Pow") and node.input[1] in an.labels:
        an.pin_inputs(node, "divides by (or raises to) a channel that may be zero")
        return
    unlabelled_var = False
    constant_states: list[np.ndarray] = []  # of constants: ZERO where a channel's entries are 0
    for idx, t in enumerate(node.input):
        if not t or t in an.labels:
            continue
        shape = an.shape(t)
        axis = broadcast_axis(rank, len(shape), out_axis) if shape is not None else -1
        dim = shape[axis] if shape is not None and axis >= 0 else 1
        where = f"{node.op_type} {node_name(node)}"
        arr = an.array(t)
        if arr is not None:
            if dim == size:
                an.member(node, idx, axis, ids)
                value = np.asarray(arr)
                rows = np.moveaxis(value, axis, 0).reshape(size, -1) if value.ndim else value
                constant_states.append(State.of_constant(~rows.reshape(size, -1).any(axis=1)))
            elif dim != 1:
                an.pin(ids, f"{where}: constant {t!r} does not match the channels")
            else:
                constant_states.append(State.of_constant(not np.asarray(arr).any()))
        elif data_independent(an, t):  # computed from constants and fixed sizes: a constant
            if dim == size:
                an.pin(ids, f"{where}: {computed_constant(an, t)}: run -p cleanup first")
            elif dim != 1:
                an.pin(ids, f"{where}: constant {t!r} does not match the channels")
        elif dim == size:
            an.pin(ids, f"{where}: joins channels with an unanalysed tensor {t!r}")
        else:
            unlabelled_var = True
    others = [State.VAR] if unlabelled_var else []
    if node.op_type == "Mul":
        state = State.product(*states, *others)
    elif node.op_type == "PRelu":
        state = states[0]
    elif node.op_type in _SUMS and len(constant_states) == len(ins) - len(labelled):
        state = State.join(*states, *constant_states, *others)  # x + 0 is x: a zero bias
    else:
        if len(labelled) < len(ins):
            others.append(State.CONST)
        state = State.join(*states, *others)
    an.set_out(node.output[0], Labels(out_axis, ids, state))
