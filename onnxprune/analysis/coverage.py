"""Layers with weights that no channel group covers, each with why: nothing of theirs can shrink.

A weighted layer (Conv, ConvTranspose, Gemm, a MatMul whose second input is a weight, LSTM,
GRU, RNN) is *covered* when it opens a space of a group or its weight is a member of one (a
depthwise Conv). Every other one is listed by :func:`layers_in_no_group`, with the first
reason that applies:

* inside a Loop/Scan body, or an If the analysis left whole: subgraphs are left whole (an If
  whose condition is a constant: run -p cleanup first, which inlines it); a layer of an If
  branch the analysis walked gets the reason it would get in the main graph;
* a recurrent layer: the analysis does not follow LSTM/GRU/RNN;
* the weight is a graph input, comes from DequantizeLinear (a QDQ model), is computed from
  constants (behind a Cast, a Transpose...: run -p cleanup first, which folds it), or is
  computed at run time from the inputs;
* the bias is not stored (computed: run -p cleanup first), or the layer is of a form the
  analysis leaves whole (a grouped ConvTranspose, a vector weight).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import onnx

from onnxprune.analysis.fixed_values import computed_by, data_independent
from onnxprune.analysis.labels import ChannelGroup
from onnxprune.analysis.state import Analysis
from onnxprune.graph import attr, iter_graphs, node_name

WEIGHTED = {"Conv": 0, "ConvTranspose": 1, "Gemm": None, "MatMul": None}
"""Weighted ops: input 1 is the weight; its axis of output channels (None: the last)."""

RECURRENT = frozenset({"LSTM", "GRU", "RNN"})
"""Recurrent layers: weighted, never analysed."""

CLEANUP = "run -p cleanup first"


@dataclass
class UncoveredLayer:
    """A weighted layer in no channel group: ``layer`` is ``'Conv conv1'``; ``channels`` its
    output channels when known."""

    layer: str
    weight: str
    channels: int | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description."""
        return asdict(self)


def layers_in_no_group(an: Analysis, groups: Sequence[ChannelGroup]) -> list[UncoveredLayer]:
    """Every weighted layer of ``an``'s model that none of ``groups`` covers, in graph order,
    subgraph layers after the node that holds them."""
    covered = {s.node for g in groups for s in g.spaces}
    members = {m.init for m in an.members}
    rows = []
    walked = {id(n) for _, n in an.branch_nodes}
    for node in [*an.graph.node, *(n for _, n in an.branch_nodes)]:
        mine = node_name(node) in covered or (len(node.input) > 1 and node.input[1] in members)
        if not mine and _weighted(an, node):
            rows.append(_row(an, node, _reason(an, node)))
        bodies = [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
        if not any(id(n) in walked for body in bodies for n in body.node):
            rows.extend(_inner_rows(an, node))  # a walked If's layers are in branch_nodes
    return rows


def _weighted(an: Analysis, node: onnx.NodeProto) -> bool:
    """A layer with a weight: a MatMul only where input 1 is no activation of the data."""
    if node.op_type in RECURRENT:
        return True
    if node.op_type not in WEIGHTED or len(node.input) < 2:
        return False
    if node.op_type != "MatMul":
        return True
    weight = node.input[1]
    src = computed_by(an, weight)
    return (
        weight in an.inits
        or src is None  # a graph input
        or src.op_type == "DequantizeLinear"
        or data_independent(an, weight)
    )


def _reason(an: Analysis, node: onnx.NodeProto) -> str:
    if node.op_type in RECURRENT:
        return (
            f"{node.op_type} is not followed by the channel analysis: its hidden size stays "
            "(and so do the channels it reads)"
        )
    weight = node.input[1]
    if weight not in an.inits:
        return _weight_reason(an, weight)
    bias = node.input[2] if len(node.input) > 2 and node.op_type != "MatMul" else ""
    if bias and bias not in an.inits:
        src = computed_by(an, bias)
        if src is not None and data_independent(an, bias):
            return (
                f"its bias {bias!r} is computed by {_by(src)}, not stored as an initializer: "
                f"{CLEANUP}, which folds it into one"
            )
        return f"its bias {bias!r} is not a constant"
    if node.op_type == "ConvTranspose" and attr(node, "group", 1) != 1:
        return "a grouped ConvTranspose is left whole by the channel analysis"
    if node.op_type == "MatMul" and len(an.inits[weight].dims) < 2:
        return f"its weight {weight!r} is a vector: no output channels to remove"
    return "the channel analysis opened no channel group for it"


def _weight_reason(an: Analysis, weight: str) -> str:
    src = computed_by(an, weight)
    if src is None:
        return (
            f"its weight {weight!r} is a graph input (fed at run time): onnxprune prunes "
            "weights stored in the model only"
        )
    if src.op_type == "DequantizeLinear":
        return (
            f"its weight {weight!r} comes from {_by(src)} (a QDQ model): onnxprune prunes "
            "float weights stored as initializers only"
        )
    if data_independent(an, weight):
        return (
            f"its weight {weight!r} is computed by {_by(src)}, not stored as an initializer: "
            f"{CLEANUP}, which folds it into one"
        )
    return f"its weight {weight!r} is computed at run time (by {_by(src)}) from the inputs"


def _by(node: onnx.NodeProto) -> str:
    return f"{node.op_type} {node.name}" if node.name else node.op_type


def _row(an: Analysis, node: onnx.NodeProto, reason: str) -> UncoveredLayer:
    weight = node.input[1] if len(node.input) > 1 else ""
    return UncoveredLayer(
        f"{node.op_type} {node_name(node)}", weight, out_channels(node, an.shape(weight)), reason
    )


def out_channels(node: onnx.NodeProto, shape: Sequence[Any] | None) -> int | None:
    """Output channels of a weighted layer from its weight's shape (None: not known)."""
    if not shape or not all(isinstance(d, int) for d in shape):
        return None
    if node.op_type in RECURRENT:
        return int(shape[1]) // {"LSTM": 4, "GRU": 3}.get(node.op_type, 1)
    axis = WEIGHTED[node.op_type]
    if node.op_type == "Gemm":
        axis = 0 if attr(node, "transB", 0) else 1
    return int(shape[-1 if axis is None else axis])


def _inner_rows(an: Analysis, holder: onnx.NodeProto) -> Iterator[UncoveredLayer]:
    """Weighted layers inside ``holder``'s subgraphs, at any depth."""
    bodies = [a.g for a in holder.attribute if a.type == onnx.AttributeProto.GRAPH]
    bodies += [g for a in holder.attribute for g in a.graphs]
    if not bodies:
        return
    where = f"inside the body of {holder.op_type} {node_name(holder)}: subgraphs are left whole"
    if holder.op_type == "If" and data_independent(an, holder.input[0]):
        where += f" ({CLEANUP}: its condition is a constant, so cleanup inlines the branch)"
    for body in bodies:
        for graph in iter_graphs(body):
            dims = {t.name: tuple(t.dims) for t in graph.initializer}
            dims |= {k: tuple(t.dims) for k, t in an.inits.items() if k not in dims}
            consts = set(dims) | {
                o for n in graph.node if n.op_type == "Constant" for o in n.output
            }
            for node in graph.node:
                if node.op_type in RECURRENT or (
                    node.op_type in WEIGHTED and len(node.input) > 1 and node.input[1] in consts
                ):
                    shape = dims.get(node.input[1])
                    name = f"{node.op_type} {node_name(node)}"
                    yield UncoveredLayer(name, node.input[1], out_channels(node, shape), where)
