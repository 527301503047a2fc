"""The state of the channel analysis: which channels can shrink, and every tensor slice tied to each.

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
* anything the analysis does not understand (see :mod:`onnxprune.analysis.handlers`) *pins* the channels it touches, with the reason:
  pinned channels are never removed. The analysis never guesses.

Alongside the labels it tracks, per position, whether the value is provably ZERO, a data-
independent CONST, or VAR(iable) (:class:`~onnxprune.analysis.labels.State`).
:mod:`onnxprune.passes.fold` uses that to remove channels.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx

from onnxprune.analysis.dequant import Dequantized, dequantize, find_dequantized, quantized_members
from onnxprune.analysis.groups import classes_of
from onnxprune.analysis.labels import (
    ChannelGroup,
    ClassId,
    Labels,
    Member,
    Rewrite,
    Role,
    Sink,
    Space,
    UnionFind,
)
from onnxprune.graph import node_name, tensor_array

NOTHING_TO_PRUNE = (
    "nothing to prune: no channel groups (no Conv, ConvTranspose, Gemm or MatMul with a "
    "constant weight)"
)


class Analysis:
    """Channel analysis of one model's main graph (see the module docstring).

    Args:
        model: the model; Constant nodes should already be lifted (``graph.prepare_for_pruning``).
        shapes: concrete shape of every tensor (from a runtime run or shape inference).

    Attributes:
        labels: tensor name -> its channel labels.
        members, sinks, rewrites, spaces: what the handlers registered (see ``labels``).
        pins: channel id -> why it is pinned (the first reason given).
        current: index of the node the walk is at; ``member`` records it. Nodes of walked If
            branches get indices after the main graph's (``branch_nodes``).
        branch_nodes: (index, node) of every node of an If branch the walk went through.
        unwalked_reads: outer names read by subgraphs the walk left whole (Loop, Scan...).
        branch_tensors: tensors made inside walked If branches (no run can expose them).
        assume_pruned: a what-if walk: every producer's output is ZERO (all channels zeroed).
        pruned_states: tensor -> its state in that what-if walk (set when the model has an If).
        sliced_inputs: (node index, input index) of every input registered as a member.
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
        self.pins: dict[int, str] = {}  # channel id -> reason
        self.sliced_inputs: set[tuple[int, int]] = set()
        self.current = -1
        self.branch_nodes: list[tuple[int, onnx.NodeProto]] = []
        self.unwalked_reads: set[str] = set()
        self.branch_shapes: dict[str, tuple[int, ...]] | None = None
        self.branch_tensors: set[str] = set()  # made inside walked If branches: not probed
        self.assume_pruned = False
        self.fresh = -1  # first id of the space just opened, until its tensor is labelled
        self.pruned_states: dict[str, np.ndarray] | None = None
        self._readers: dict[str, list[onnx.NodeProto]] | None = None
        self.dequantized: dict[str, Dequantized] = find_dequantized(self.graph, self.inits)
        self.quantized_data = {d.data: d for d in self.dequantized.values()}

    # -- small helpers -------------------------------------------------------------------------
    def array(self, name: str) -> np.ndarray | None:
        """Value of an initializer, or None when ``name`` is not a constant. A DequantizeLinear
        of initializers is a constant too: its real value (:mod:`onnxprune.analysis.dequant`)."""
        if name not in self.inits and name not in self.dequantized:
            return None
        if name not in self._arrays:
            d = self.dequantized.get(name)
            if d is not None:
                self._arrays[name] = dequantize(d, lambda n: tensor_array(self.inits[n]))
            else:
                self._arrays[name] = tensor_array(self.inits[name])
        return self._arrays[name]

    def release_arrays(self) -> None:
        """Drop the cached initializer values (they are read again on demand)."""
        self._arrays.clear()

    def shape(self, name: str) -> tuple[int, ...] | None:
        """Shape of an initializer or of a tensor the probe saw, or None when unknown."""
        if name in self.inits:
            return tuple(self.inits[name].dims)
        if name in self.dequantized:
            return tuple(self.inits[self.dequantized[name].data].dims)
        return self.shapes.get(name)

    def consumers(self, tensor: str) -> list[onnx.NodeProto]:
        """Nodes of the main graph, and of the If branches walked so far, that read ``tensor``."""
        if self._readers is None:
            self._readers = defaultdict(list)
            for node in [*self.graph.node, *(n for _, n in self.branch_nodes)]:
                for name in set(node.input):
                    self._readers[name].append(node)
        return self._readers.get(tensor, [])

    def add_branch_node(self, node: onnx.NodeProto) -> None:
        """Make ``node`` (of an If branch) the current node, with an index of its own."""
        self.current = len(self.graph.node) + len(self.branch_nodes)
        self.branch_nodes.append((self.current, node))
        self._readers = None

    def pin(self, ids: np.ndarray, reason: str) -> None:
        """Mark channel ids as never removable."""
        for i in np.unique(ids[ids >= 0]):
            self.pins.setdefault(int(i), reason)

    def pin_inputs(self, node: onnx.NodeProto, reason: str) -> None:
        """Pin every channel that reaches ``node`` through its inputs, naming the node."""
        for t in node.input:
            if t in self.labels:
                self.pin(self.labels[t].ids, f"{node.op_type} {node_name(node)}: {reason}")

    def open_space(self, node: onnx.NodeProto, size: int) -> np.ndarray:
        """Fresh channel ids for ``size`` channels that ``node`` produces (a new space)."""
        start = self.fresh = self.uf.add(size)
        self.spaces.append(Space(start, size, node_name(node), node.op_type))
        return np.arange(start, start + size, dtype=np.int64)

    def member(
        self, node: onnx.NodeProto, index: int, axis: int, ids: np.ndarray, role: Role = "param"
    ) -> bool:
        """Register input ``index`` of ``node`` (an initializer) as sliced along ``axis``.

        ``role`` says what the slice is to a channel, for criteria: ``weight`` (a producer's
        filter or neuron), ``bias``, ``scale`` (BN gamma), ``consumer`` (the rows that read
        the channel), ``param`` (any other per-channel constant) or ``quant`` (a per-channel
        scale or zero point of quantization: sliced, never zeroed nor scored). An input made by
        a DequantizeLinear of initializers slices its quantized data (and per-channel scale
        and zero point along ``axis``); a second reader of it pins the channels.
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
            self.pin(
                ids,
                f"{node.op_type} {node_name(node)}: {name} has {arr.shape[axis]} "
                f"entries on the channel axis, expected {len(ids)}",
            )
            return True
        d = self.dequantized.get(name)
        if d is None:
            self.members.append(Member(name, axis, ids, role))
            self.sliced_inputs.add((self.current, index))
            return True
        for m, slot in quantized_members(d, axis, ids, role):
            self.members.append(m)
            self.sliced_inputs.add((d.node_index, slot))
        if len(self.consumers(name)) > 1:
            self.pin(ids, f"dequantized weight {name!r} is read by several nodes")
        return True

    def union(self, a: np.ndarray, b: np.ndarray, why: str) -> None:
        """Positions ``a[j]`` and ``b[j]`` are the same channel; a ``-1`` pins the other side."""
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            if x >= 0 and y >= 0:
                self.uf.union(x, y)
            elif x >= 0 or y >= 0:
                self.pin(np.array([max(x, y)]), why)

    def set_out(self, tensor: str, labels: Labels | None) -> None:
        """Give ``tensor`` its labels (none, or no positions, leaves it unlabelled)."""
        if labels is not None and len(labels.ids):
            if self.assume_pruned and labels.ids[0] == self.fresh:  # a producer's output
                labels = Labels(labels.axis, labels.ids, np.zeros(len(labels.ids), np.uint8))
            self.fresh = -1
            self.labels[tensor] = labels

    # -- results -------------------------------------------------------------------------------
    def roots(self) -> np.ndarray:
        """Root id of every channel id (the channel class it belongs to)."""
        return self.uf.roots()

    def pinned_roots(self) -> dict[ClassId, str]:
        """Class -> reason for every pinned channel class."""
        roots = self.roots()
        out: dict[ClassId, str] = {}
        for i, why in self.pins.items():
            out.setdefault(ClassId(int(roots[i])), why)
        return out

    def groups(self) -> list[ChannelGroup]:
        """Spaces connected by unions, with their pin reasons and members."""
        roots = self.roots()
        pinned = self.pinned_roots()
        comp = UnionFind()
        comp.add(len(self.spaces))
        owner: dict[ClassId, int] = {}
        for k, s in enumerate(self.spaces):
            for r in classes_of(roots, [s]):
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
            classes = classes_of(roots, spaces)
            reasons = sorted({pinned[r] for r in classes if r in pinned})
            members = sorted(
                {
                    f"{m.init}[axis {m.axis}]"
                    for m in self.members
                    if len(m.ids) and int(roots[m.ids[m.ids >= 0][0]]) in classes
                }
            )
            groups.append(
                ChannelGroup(
                    index, spaces, len(classes), sum(r in pinned for r in classes), reasons, members
                )
            )
        return groups
