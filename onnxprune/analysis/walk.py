"""The graph walk: run every node's rule in topological order, then pin what must stay whole.

A node's rule is ``HANDLERS[handler_key(node.op_type, node.domain)]``: the op type alone for
the default ONNX domain, ``"domain::OpType"`` for any other (see :func:`register_handler`).
A node with no rule pins every channel it reads. An If's branches are walked as graphs of their
own (:mod:`onnxprune.analysis.subgraphs`); a Loop, Scan or other node with a subgraph pins
every channel it reads and every outer tensor its subgraphs read.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import onnx

from onnxprune.analysis.handlers import HANDLERS, handler_key, is_default_domain
from onnxprune.analysis.handlers.targets import settle
from onnxprune.analysis.labels import Member
from onnxprune.analysis.state import Analysis
from onnxprune.analysis.subgraphs import leave_whole, settle_branches, subgraph_reason, walk_if
from onnxprune.graph import iter_graphs, node_name


def analyse(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> Analysis:
    """Run the channel analysis on ``model`` with known tensor ``shapes``.

    Afterwards the analysis's ``labels``, ``members``, ``sinks`` and ``pins`` are set.
    """
    an = Analysis(model, shapes)
    if any(n.op_type == "If" for g in iter_graphs(model.graph) for n in g.node):
        what_if = Analysis(model, shapes)  # the states if the producers' channels were zeroed
        what_if.assume_pruned = True
        _visit_all(what_if)
        an.pruned_states = {name: lab.state for name, lab in what_if.labels.items()}
        an.branch_shapes, an.shapes = what_if.branch_shapes, what_if.shapes
    _visit_all(an)
    for out in an.graph.output:
        if out.name in an.labels:
            an.pin(an.labels[out.name].ids, f"reaches graph output {out.name!r}")
    for name in sorted(an.unwalked_reads):
        if name in an.labels:
            an.pin(an.labels[name].ids, f"{name!r} is read inside a subgraph left whole")
    _pin_shared_members(an)
    settle(an)  # Reshape/Expand targets, once the pins are known
    settle_branches(an)
    return an


def _visit_all(an: Analysis) -> None:
    for i, node in enumerate(an.graph.node):
        an.current = i
        visit(an, node)


def visit(an: Analysis, node: onnx.NodeProto) -> None:
    """Run ``node``'s rule (``an.current`` is its index)."""
    if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute
    ):
        if node.op_type == "If" and is_default_domain(node.domain):
            walk_if(an, node, walk_nodes)
        else:
            leave_whole(an, node, subgraph_reason(node))
        return
    handler = HANDLERS.get(handler_key(node.op_type, node.domain))
    if handler is None:
        if is_default_domain(node.domain):
            an.pin_inputs(node, "op not understood by the channel analysis")
        else:
            an.pin_inputs(node, f"op of custom domain {node.domain!r}")
        return
    handler(an, node)


def walk_nodes(an: Analysis, nodes: Iterable[onnx.NodeProto]) -> None:
    """Visit the nodes of an If branch, in order, each with an index of its own."""
    for node in nodes:
        an.add_branch_node(node)
        visit(an, node)


def _pin_shared_members(an: Analysis) -> None:
    """A member initializer that is also read elsewhere (unsliced) cannot be cut."""
    member_inits = {m.init for m in an.members}
    graph_io = {i.name for i in an.graph.input} | {o.name for o in an.graph.output}
    for i, node in [*enumerate(an.graph.node), *an.branch_nodes]:
        for j, name in enumerate(node.input):
            if name in member_inits and (i, j) not in an.sliced_inputs:
                for m in an.members:
                    if m.init == name:
                        an.pin(m.ids, f"initializer {name!r} is also read by {node_name(node)}")
    for m in an.members:
        if m.init in an.unwalked_reads:
            an.pin(m.ids, f"initializer {m.init!r} is also read inside a subgraph left whole")
    by_key: dict[tuple[str, int], list[Member]] = defaultdict(list)
    for m in an.members:
        by_key[(m.init, m.axis)].append(m)
    for (name, _axis), ms in by_key.items():
        if name in graph_io:
            for m in ms:
                an.pin(m.ids, f"initializer {name!r} is a graph input or output")
        for m in ms[1:]:
            an.union(ms[0].ids, m.ids, f"initializer {name!r} shared inconsistently")
