"""Why a pruning pass removes fewer channels than it was asked to: one reason per group, in words.

A pass that prunes less than ``sparsity`` asks must say why, group by group, in its report and
so on the terminal (:func:`onnxprune.report.shortfall_table`). The reasons, in the order they
bind: the group is protected or pinned (all or some channels), rounding the kept count to
``round_to`` leaves fewer to prune, no criterion could score it, too few channels reached the
quorum, or the last channel of a tensor is kept. Layers with weights that are in no group at all
(the weight is computed, not stored) get a row too (:func:`uncovered_layers`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import onnx

from onnxprune.analysis.labels import ChannelGroup
from onnxprune.analysis.state import Analysis
from onnxprune.graph import node_name
from onnxprune.pruning.workspace import round_count

LAST_CHANNEL = "the last channel of a tensor is kept"
# weighted ops: input 1 is the weight; output channels from its shape (axis, or None: last)
WEIGHTED = {"Conv": 0, "ConvTranspose": 1, "Gemm": None, "MatMul": None}


def asked_count(total: int, sparsity: float) -> int:
    """Channels ``sparsity`` asks of a group of ``total``: as many as leave ``ceil(total * (1 -
    sparsity))`` kept, never all (round_count without rounding or pins)."""
    return round_count(total, total, sparsity, 1)


def hold_reason(group: ChannelGroup, free: int, protect: str = "") -> str | None:
    """Why some or all of ``group``'s channels are not free to prune (None: all are free)."""
    if protect and free == 0 and group.pinned < group.channels:
        return f"protected: protect={protect!r} matches a node or weight of the group"
    held = group.channels - free
    if not held:
        return None
    why = group.reasons[0] if group.reasons else "pinned by the channel analysis"
    if len(group.reasons) > 1:
        why += f" (and {len(group.reasons) - 1} more reasons)"
    if free == 0:
        return f"pinned: {why}"
    return f"{held} of {group.channels} channels pinned: {why}"


def rounding_reason(total: int, k: int, round_to: int, per: int, width: int) -> str:
    """``rounding to a multiple of 16 leaves 0 of 16 channels to prune (lower round_to)``;
    for classes ``width`` channels wide (heads), counted in classes."""
    if width == 1:
        return (
            f"rounding to a multiple of {round_to} leaves {k} of {total} channels to prune "
            "(lower round_to)"
        )
    return (
        f"rounding to a multiple of {round_to} channels leaves {k} of {total} to prune: each "
        f"spans {width} channels (a head, a convolution group), so they go {per} at a time "
        "(lower round_to)"
    )


def join_reasons(reasons: Iterable[str | None]) -> str:
    """The reasons that apply, in order, as one line."""
    return "; ".join(r for r in reasons if r)


def shortfall_rows(sections: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per group section that pruned less than it asked: group, layers, asked,
    pruned, reason."""
    return [
        {
            "group": s["group"],
            "layers": ", ".join(s["producers"]),
            "asked": s["asked"],
            "pruned": s["pruned"],
            "reason": s.get("reason") or "not known",
        }
        for s in sections
        if s["pruned"] < s["asked"]
    ]


def _constant_tensors(graph: onnx.GraphProto) -> set[str]:
    """Tensors computed from initializers only (nodes in graph order, subgraph ops excluded)."""
    const = {t.name for t in graph.initializer}
    for node in graph.node:
        has_subgraph = any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        )
        if not has_subgraph and all(i in const for i in node.input if i):
            const.update(o for o in node.output if o)
    return const


def _out_channels(op: str, node: onnx.NodeProto, shape: Sequence[Any] | None) -> int | None:
    if not shape or not all(isinstance(d, int) for d in shape):
        return None
    axis = WEIGHTED[op]
    if op == "Gemm":
        trans = next((a.i for a in node.attribute if a.name == "transB"), 0)
        axis = 0 if trans else 1
    return int(shape[-1 if axis is None else axis])


def uncovered_layers(
    model: onnx.ModelProto, an: Analysis, groups: Sequence[ChannelGroup], sparsity: float
) -> list[dict[str, Any]]:
    """Rows for the layers whose weight is computed from initializers (a DequantizeLinear, a
    Cast): no channel group covers them, so nothing of theirs is pruned."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    covered = {s.node for g in groups for s in g.spaces}
    producer = {o: n for n in graph.node for o in n.output}
    const = _constant_tensors(graph)
    rows = []
    for node in graph.node:
        if node.op_type not in WEIGHTED or len(node.input) < 2:
            continue
        weight = node.input[1]
        if weight in inits or weight not in const or node_name(node) in covered:
            continue
        src = producer[weight]
        by = f"{src.op_type} {src.name}" if src.name else src.op_type
        if src.op_type == "DequantizeLinear":
            reason = (
                f"its weight {weight!r} comes from {by} (a QDQ model): onnxprune prunes "
                "weights stored as initializers, or dequantized from initializers only"
            )
        else:
            reason = (
                f"its weight {weight!r} is computed by {by}, not stored as an initializer: "
                "run -p cleanup first, which folds it into one"
            )
        channels = _out_channels(node.op_type, node, an.shape(weight))
        rows.append(
            {
                "group": None,
                "layers": f"{node.op_type} {node_name(node)}",
                "asked": asked_count(channels, sparsity) if channels else None,
                "pruned": 0,
                "reason": reason,
            }
        )
    return rows
