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
* anything the analysis does not understand (see :mod:`onnxprune.handlers`) *pins* the channels it touches, with the reason:
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
    role: str = "param"  # weight | bias | scale | consumer | param (see Analysis.member)


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
        self._readers: dict[str, list[onnx.NodeProto]] | None = None

    # -- small helpers -------------------------------------------------------------------------
    def array(self, name: str) -> np.ndarray | None:
        """Value of an initializer, or None when ``name`` is not a constant."""
        if name not in self.inits:
            return None
        if name not in self._arrays:
            self._arrays[name] = numpy_helper.to_array(self.inits[name])
        return self._arrays[name]

    def release_arrays(self) -> None:
        """Drop the cached initializer values (they are read again on demand)."""
        self._arrays.clear()

    def shape(self, name: str) -> tuple[int, ...] | None:
        if name in self.inits:
            return tuple(self.inits[name].dims)
        return self.shapes.get(name)

    def consumers(self, tensor: str) -> list[onnx.NodeProto]:
        """Nodes of the main graph that read ``tensor``."""
        if self._readers is None:
            self._readers = defaultdict(list)
            for node in self.graph.node:
                for name in set(node.input):
                    self._readers[name].append(node)
        return self._readers.get(tensor, [])

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

    def member(self, node: onnx.NodeProto, index: int, axis: int, ids: np.ndarray,
               role: str = "param") -> bool:
        """Register input ``index`` of ``node`` (an initializer) as sliced along ``axis``.

        ``role`` says what the slice is to a channel, for criteria: ``weight`` (a producer's
        filter or neuron), ``bias``, ``scale`` (BN gamma), ``consumer`` (the rows that read
        the channel) or ``param`` (any other per-channel constant).
        """
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
        self.members.append(Member(name, axis, ids, _name(node), role))
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
        from onnxprune.handlers import HANDLERS as handlers

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
            handler = handlers.get(node.op_type)
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

    from onnxprune.model import prepare_for_pruning
    from onnxprune.probe import probe
    from onnxprune.summary import node_macs

    work = copy.deepcopy(model)
    prepare_for_pruning(work.graph)
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
