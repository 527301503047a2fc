"""Channel-group analysis: which channels can shrink, and every tensor slice tied to each.

The analysis walks the main graph in topological order, as a forward dataflow:

* a *producer* (Conv, ConvTranspose, Gemm, MatMul with a constant weight) opens a *space*: its
  output channels get fresh global channel ids;
* every tensor that carries channels has *labels*: along one axis, the channel id at each
  position (``-1`` where a position is no channel). Carriers keep them, Transpose moves the axis,
  Flatten/Reshape spread each id over a block of features, Concat appends, Split/Slice cut;
* two activations meeting in an elementwise op are the same channels: their ids are united
  (union-find), so a residual stream becomes one group;
* each constant sliced along a labelled axis (weights, biases, BN parameters, per-channel
  constants) is a *member*; removing channel id ``c`` deletes the positions labelled ``c`` in
  every member, and rewrites the shape constants that count them;
* anything the analysis does not understand *pins* the channels it touches, with the reason:
  pinned channels are never removed. The analysis never guesses.

Alongside the labels it tracks, per position, whether the value is provably ZERO, a data-
independent CONST, or VAR(iable). :mod:`onnxprune.passes.fold` uses that to remove channels.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.model import iter_graphs

ZERO, CONST, VAR = 0, 1, 2

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


@dataclass
class Labels:
    """Channel ids along one axis of a tensor (``-1`` = not a channel) and their value state."""

    axis: int
    ids: np.ndarray
    state: np.ndarray

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=np.int64)
        self.state = np.asarray(self.state, dtype=np.uint8)


@dataclass
class Member:
    """An initializer sliced along ``axis`` by channel ids (one id per position)."""

    init: str
    axis: int
    ids: np.ndarray
    node: str


@dataclass
class Sink:
    """A weighted consumer where channels end: Conv input, Gemm/MatMul rows."""

    node: onnx.NodeProto
    tensor: str
    labels: Labels
    weight: str
    weight_axis: int
    padded: bool = False


@dataclass
class Rewrite:
    """A shape constant or attribute that counts channels, to recompute after removal."""

    kind: str  # reshape | split | slice | group
    node: onnx.NodeProto
    ids: list[np.ndarray]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Space:
    """Channels opened by one producer output."""

    start: int
    size: int
    node: str
    op: str
    tensor: str


@dataclass
class ChannelGroup:
    """Connected spaces: channels that must be removed together, as users see them."""

    index: int
    spaces: list[Space]
    channels: int
    pinned: int
    reasons: list[str]
    members: list[str]
    macs: int = 0

    @property
    def prunable(self) -> bool:
        """Whether any channel of the group may be removed."""
        return self.pinned < self.channels

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description."""
        return {
            "index": self.index,
            "channels": self.channels,
            "pinned": self.pinned,
            "prunable": self.prunable,
            "producers": [f"{s.op} {s.node} ({s.size})" for s in self.spaces],
            "members": self.members,
            "macs": self.macs,
            "reasons": self.reasons,
        }


class UnionFind:
    """Union-find over channel ids, grown as spaces open."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, n: int) -> int:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return start

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _name(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}({node.output[0]})"


class Analysis:
    """Channel analysis of one model's main graph (see the module docstring).

    Args:
        model: the model; Constant nodes should already be lifted (``model.lift_constants``).
        shapes: concrete shape of every tensor (from a runtime run or shape inference).
    """

    def __init__(self, model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> None:
        self.model = model
        self.graph = model.graph
        self.shapes = shapes
        self.inits = {t.name: t for t in self.graph.initializer}
        self._arrays: dict[str, np.ndarray] = {}
        self.uf = UnionFind()
        self.labels: dict[str, Labels] = {}
        self.members: list[Member] = []
        self.sinks: list[Sink] = []
        self.rewrites: list[Rewrite] = []
        self.spaces: list[Space] = []
        self.pins: dict[int, str] = {}
        self._member_uses: set[tuple[int, int]] = set()
        self._current = -1

    # -- small helpers -------------------------------------------------------------------------
    def array(self, name: str) -> np.ndarray | None:
        """Value of an initializer, or None when ``name`` is not a constant."""
        if name not in self.inits:
            return None
        if name not in self._arrays:
            self._arrays[name] = numpy_helper.to_array(self.inits[name])
        return self._arrays[name]

    def shape(self, name: str) -> tuple[int, ...] | None:
        if name in self.inits:
            return tuple(self.inits[name].dims)
        return self.shapes.get(name)

    def pin(self, ids: np.ndarray, reason: str) -> None:
        """Mark channel ids as never removable."""
        for i in np.unique(ids[ids >= 0]):
            self.pins.setdefault(int(i), reason)

    def pin_inputs(self, node: onnx.NodeProto, reason: str) -> None:
        for t in node.input:
            if t in self.labels:
                self.pin(self.labels[t].ids, f"{node.op_type} {_name(node)}: {reason}")

    def open_space(self, node: onnx.NodeProto, tensor: str, size: int) -> np.ndarray:
        start = self.uf.add(size)
        self.spaces.append(Space(start, size, _name(node), node.op_type, tensor))
        return np.arange(start, start + size, dtype=np.int64)

    def member(self, node: onnx.NodeProto, index: int, axis: int, ids: np.ndarray) -> bool:
        """Register input ``index`` of ``node`` (an initializer) as sliced along ``axis``."""
        name = node.input[index]
        arr = self.array(name)
        if arr is None:
            return False
        if arr.ndim == 0:
            return True  # a scalar broadcasts over the channels: nothing to slice
        axis = axis % arr.ndim
        if arr.shape[axis] != len(ids):
            if arr.shape[axis] == 1:
                return True  # broadcast along the channel axis: nothing to slice
            self.pin(ids, f"{node.op_type} {_name(node)}: {name} has {arr.shape[axis]} "
                          f"entries on the channel axis, expected {len(ids)}")
            return True
        self.members.append(Member(name, axis, ids, _name(node)))
        self._member_uses.add((self._current, index))
        return True

    def union(self, a: np.ndarray, b: np.ndarray, why: str) -> None:
        """Positions ``a[j]`` and ``b[j]`` are the same channel; a ``-1`` pins the other side."""
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            if x >= 0 and y >= 0:
                self.uf.union(x, y)
            elif x >= 0 or y >= 0:
                self.pin(np.array([max(x, y)]), why)

    def set_out(self, tensor: str, labels: Labels | None) -> None:
        if labels is not None and len(labels.ids):
            self.labels[tensor] = labels

    # -- driver --------------------------------------------------------------------------------
    def run(self) -> Analysis:
        """Walk the graph once; afterwards ``labels``, ``members``, ``sinks``, ``pins`` are set."""
        sub_reads = _outer_names_read_by_subgraphs(self.graph)
        for i, node in enumerate(self.graph.node):
            self._current = i
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                   for a in node.attribute):
                self.pin_inputs(node, "has a subgraph (If/Loop/Scan): left whole")
                continue
            if node.domain not in ("", "ai.onnx"):
                self.pin_inputs(node, f"op of custom domain {node.domain!r}")
                continue
            handler = HANDLERS.get(node.op_type)
            if handler is None:
                self.pin_inputs(node, "op not understood by the channel analysis")
                continue
            handler(self, node)
        for out in self.graph.output:
            if out.name in self.labels:
                self.pin(self.labels[out.name].ids, f"reaches graph output {out.name!r}")
        for name in sub_reads:
            if name in self.labels:
                self.pin(self.labels[name].ids, f"{name!r} is read inside a subgraph")
        self._pin_shared_members()
        return self

    def _pin_shared_members(self) -> None:
        """A member initializer that is also read elsewhere (unsliced) cannot be cut."""
        member_inits = {m.init for m in self.members}
        graph_io = {i.name for i in self.graph.input} | {o.name for o in self.graph.output}
        for i, node in enumerate(self.graph.node):
            for j, name in enumerate(node.input):
                if name in member_inits and (i, j) not in self._member_uses:
                    for m in self.members:
                        if m.init == name:
                            self.pin(m.ids, f"initializer {name!r} is also read by {_name(node)}")
        by_key: dict[tuple[str, int], list[Member]] = defaultdict(list)
        for m in self.members:
            by_key[(m.init, m.axis)].append(m)
        for (name, _axis), ms in by_key.items():
            if name in graph_io:
                for m in ms:
                    self.pin(m.ids, f"initializer {name!r} is a graph input or output")
            for m in ms[1:]:
                self.union(ms[0].ids, m.ids, f"initializer {name!r} shared inconsistently")

    # -- results -------------------------------------------------------------------------------
    def roots(self) -> np.ndarray:
        """Root id of every channel id (the channel class it belongs to)."""
        return self.uf.roots()

    def pinned_roots(self) -> dict[int, str]:
        """Root -> reason for every pinned channel class."""
        roots = self.roots()
        out: dict[int, str] = {}
        for i, why in self.pins.items():
            out.setdefault(int(roots[i]), why)
        return out

    def groups(self) -> list[ChannelGroup]:
        """Spaces connected by unions, with their pin reasons and members."""
        roots = self.roots()
        pinned = self.pinned_roots()
        comp = UnionFind()
        comp.add(len(self.spaces))
        owner = {}
        for k, s in enumerate(self.spaces):
            for r in np.unique(roots[s.start : s.start + s.size]).tolist():
                if r in owner:
                    comp.union(owner[r], k)
                else:
                    owner[r] = k
        by_comp: dict[int, list[int]] = defaultdict(list)
        for k in range(len(self.spaces)):
            by_comp[comp.find(k)].append(k)
        groups = []
        for index, ks in enumerate(by_comp.values()):
            spaces = [self.spaces[k] for k in ks]
            classes = {int(r) for s in spaces for r in roots[s.start : s.start + s.size]}
            reasons = sorted({pinned[r] for r in classes if r in pinned})
            members = sorted({f"{m.init}[axis {m.axis}]" for m in self.members
                              if len(m.ids) and int(roots[m.ids[m.ids >= 0][0]]) in classes})
            groups.append(ChannelGroup(index, spaces, len(classes),
                                       sum(r in pinned for r in classes), reasons, members))
        return groups


def _outer_names_read_by_subgraphs(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for node in graph.node:
        for a in node.attribute:
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for sub in subs:
                for g in iter_graphs(sub):
                    for n in g.node:
                        names.update(n.input)
    return names


# -- op handlers ---------------------------------------------------------------------------------
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
        if not an.member(node, i, 0, lab.ids):
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
                an.member(node, 1, 1, lab.ids)
                an.sinks.append(Sink(node, node.input[0], lab, node.input[1], 1, padded))
        ids = an.open_space(node, node.output[0], cout)
        an.member(node, 1, 0, ids)
        if has_bias:
            an.member(node, 2, 0, ids)
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
    an.pin_inputs(node, f"grouped convolution (group={group}) keeps channels per group equal")
    ids = an.open_space(node, node.output[0], cout)
    an.pin(ids, f"Conv {_name(node)}: grouped convolution (group={group})")
    an.set_out(node.output[0], Labels(1, ids, np.full(cout, VAR)))


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
            an.member(node, 1, 0, lab.ids)
            # every input channel spreads over a neighbourhood: treat as padded (exact only for 0)
            an.sinks.append(Sink(node, node.input[0], lab, node.input[1], 0, True))
    cout = w.shape[1]
    ids = an.open_space(node, node.output[0], cout)
    an.member(node, 1, 1, ids)
    has_bias = len(node.input) > 2 and bool(node.input[2])
    if has_bias:
        an.member(node, 2, 0, ids)
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
            an.member(node, 1, k_axis_b, lab.ids)
            an.sinks.append(Sink(node, node.input[0], lab, node.input[1], k_axis_b))
    n = b.shape[n_axis_b]
    ids = an.open_space(node, node.output[0], n)
    an.member(node, 1, n_axis_b, ids)
    c_zero = np.ones(n, bool)
    if c_name:
        c = an.array(c_name)
        if c.ndim >= 1 and c.shape[-1] == n:
            an.member(node, 2, c.ndim - 1, ids)
            c_zero = ~np.broadcast_to(c, (max(1, c.shape[0] if c.ndim == 2 else 1), n)).any(0)
        else:
            c_zero = np.full(n, not np.any(c))
        if _attr(node, "beta", 1.0) == 0:
            c_zero = np.ones(n, bool)
    zero = ~np.moveaxis(b, n_axis_b, 0).reshape(n, -1).any(axis=1)
    an.set_out(node.output[0], Labels(1, ids, np.where(zero, np.where(c_zero, ZERO, CONST), VAR)))


def _matmul(an: Analysis, node: onnx.NodeProto) -> None:
    a_lab, b_lab = an.labels.get(node.input[0]), an.labels.get(node.input[1])
    b = an.array(node.input[1])
    a_shape = an.shape(node.input[0])
    if b is None or a_shape is None or b.ndim < 2 or len(a_shape) < 2:
        if b_lab is not None:
            an.pin_inputs(node, "multiplies two activations")
        elif a_lab is not None:
            a_rank = len(a_shape or ())
            if an.array(node.input[0]) is None and a_lab.axis < a_rank - 1 and b_lab is None:
                # channels on a row/batch axis of A pass through to the output unchanged
                out_rank = len(an.shape(node.output[0]) or ())
                axis = a_lab.axis + out_rank - a_rank
                an.set_out(node.output[0], Labels(axis, a_lab.ids, np.where(
                    a_lab.state == ZERO, ZERO, VAR)))
            else:
                an.pin_inputs(node, "multiplies two activations over the channel axis")
        return
    if a_lab is not None:
        if a_lab.axis != len(a_shape) - 1:
            an.pin_inputs(node, "channels are not on the last axis of the input")
        else:
            an.member(node, 1, b.ndim - 2, a_lab.ids)
            an.sinks.append(Sink(node, node.input[0], a_lab, node.input[1], b.ndim - 2))
    out_rank = len(an.shape(node.output[0]) or (0, 0))
    n = b.shape[-1]
    ids = an.open_space(node, node.output[0], n)
    an.member(node, 1, b.ndim - 1, ids)
    zero = ~np.moveaxis(b, -1, 0).reshape(n, -1).any(axis=1)
    an.set_out(node.output[0], Labels(out_rank - 1, ids, np.where(zero, ZERO, VAR)))


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
        an.pin_inputs(node, "splits the channel axis (or interleaves it with others)")
        return
    out_axis, first, last = found
    block = src[first : last + 1]
    coords = np.indices(block).reshape(len(block), -1)[lab.axis - first]
    ids, state = lab.ids[coords], lab.state[coords]
    if node.op_type == "Reshape":
        an.rewrites.append(Rewrite("reshape", node, [ids], {"axis": out_axis}))
    an.set_out(node.output[0], Labels(out_axis, ids, state))


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


def analyse(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> Analysis:
    """Run the channel analysis on ``model`` with known tensor ``shapes``."""
    return Analysis(model, shapes).run()


def channel_groups(model: onnx.ModelProto, seed: int = 0) -> list[ChannelGroup]:
    """The channel groups of ``model`` (not modified), with the MACs of the nodes they touch.

    Example::

        for g in onnxprune.channel_groups(onnxprune.load("model.onnx")):
            print(g.channels, g.prunable, g.reasons)
    """
    import copy

    from onnxprune.model import lift_constants, unlist_initializer_inputs
    from onnxprune.probe import probe
    from onnxprune.summary import node_macs

    work = copy.deepcopy(model)
    lift_constants(work.graph)
    unlist_initializer_inputs(work.graph)
    pr = probe(work, seed)
    an = analyse(work, pr.shapes)
    groups = an.groups()
    macs = {_name(n): node_macs(n, pr.shapes) for n in work.graph.node}
    sink_nodes: dict[int, set[str]] = defaultdict(set)
    roots = an.roots()
    for sink in an.sinks:
        for cid in np.unique(sink.labels.ids[sink.labels.ids >= 0]).tolist():
            sink_nodes[int(roots[cid])].add(_name(sink.node))
    for g in groups:
        nodes = {s.node for s in g.spaces}
        for s in g.spaces:
            for r in np.unique(roots[s.start : s.start + s.size]).tolist():
                nodes |= sink_nodes.get(int(r), set())
        g.macs = int(sum(macs.get(n, 0) for n in nodes))
    return groups
