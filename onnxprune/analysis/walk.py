"""The graph walk: run every node's rule in topological order, then pin what must stay whole.

A node's rule is ``HANDLERS[handler_key(node.op_type, node.domain)]``: the op type alone for
the default ONNX domain, ``"domain::OpType"`` for any other (see :func:`register_handler`).
A node with no rule, or with a subgraph, pins every channel it reads.
"""

from __future__ import annotations

from collections import defaultdict

import onnx

from onnxprune.analysis.handlers import HANDLERS, handler_key, is_default_domain
from onnxprune.analysis.handlers.targets import settle
from onnxprune.analysis.labels import Member
from onnxprune.analysis.state import Analysis
from onnxprune.graph import node_name, outer_names_read_by_subgraphs


def analyse(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> Analysis:
    """Run the channel analysis on ``model`` with known tensor ``shapes``.

    Afterwards the analysis's ``labels``, ``members``, ``sinks`` and ``pins`` are set.
    """
    an = Analysis(model, shapes)
    sub_reads = outer_names_read_by_subgraphs(an.graph)
    for i, node in enumerate(an.graph.node):
        an.current = i
        if any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        ):
            an.pin_inputs(node, "has a subgraph (If/Loop/Scan): left whole")
            continue
        handler = HANDLERS.get(handler_key(node.op_type, node.domain))
        if handler is None:
            if is_default_domain(node.domain):
                an.pin_inputs(node, "op not understood by the channel analysis")
            else:
                an.pin_inputs(node, f"op of custom domain {node.domain!r}")
            continue
        handler(an, node)
    for out in an.graph.output:
        if out.name in an.labels:
            an.pin(an.labels[out.name].ids, f"reaches graph output {out.name!r}")
    for name in sub_reads:
        if name in an.labels:
            an.pin(an.labels[name].ids, f"{name!r} is read inside a subgraph")
    _pin_shared_members(an)
    settle(an)  # Reshape/Expand targets, once the pins are known
    return an


def _pin_shared_members(an: Analysis) -> None:
    """A member initializer that is also read elsewhere (unsliced) cannot be cut."""
    member_inits = {m.init for m in an.members}
    graph_io = {i.name for i in an.graph.input} | {o.name for o in an.graph.output}
    for i, node in enumerate(an.graph.node):
        for j, name in enumerate(node.input):
            if name in member_inits and (i, j) not in an.sliced_inputs:
                for m in an.members:
                    if m.init == name:
                        an.pin(m.ids, f"initializer {name!r} is also read by {node_name(node)}")
    by_key: dict[tuple[str, int], list[Member]] = defaultdict(list)
    for m in an.members:
        by_key[(m.init, m.axis)].append(m)
    for (name, _axis), ms in by_key.items():
        if name in graph_io:
            for m in ms:
                an.pin(m.ids, f"initializer {name!r} is a graph input or output")
        for m in ms[1:]:
            an.union(ms[0].ids, m.ids, f"initializer {name!r} shared inconsistently")
