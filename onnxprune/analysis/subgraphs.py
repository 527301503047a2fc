"""If branches in the channel analysis: each branch is walked as a graph of its own.

A branch reads outer tensors by name, so the walk goes through its nodes with the outer labels
in view: a branch's Conv reading an outer channel tensor is that channel's sink, its own weights
(initializers of the branch, or outer ones) are members like any other. The If's output ``k``
is then-branch output ``k`` or else-branch output ``k``, whichever runs, so:

* when both carry channels on the same axis with the same count, position ``j`` of the two is
  one channel (united, as where two activations meet): removing it removes it in both branches;
  its state is ZERO only where both branches give ZERO (a constant may differ between branches,
  and which branch runs depends on the data), else VAR;
* when they differ (channels in one branch only, another axis or count) the channels of both
  are pinned, with a reason naming the If and what differs.
* a channel that, once zeroed where it is produced, would not be zero in both branches (Relu
  in one, Sigmoid in the other) is pinned too: fold could not remove it. That is read from a
  what-if walk in which every producer's output is ZERO (``Analysis.assume_pruned``).

A branch is not walked (the If is left whole, as Loop and Scan bodies are) when one of its
names is already used outside it (the analysis keys tensors by name), or when onnx shape
inference cannot give the shapes of its tensors. Shape constants inside a branch (Reshape,
Split, Slice targets) are not rewritten: the channels they count are pinned (:func:`settle_branches`).
Fold rewrites a branch's own initializers in place (``graph.set_init`` finds them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx

from onnxprune.analysis.labels import GroupRewrite, Labels, SplitRewrite, State
from onnxprune.analysis.state import Analysis
from onnxprune.graph import clear_value_info, iter_graphs, node_name

BRANCHES = ("then_branch", "else_branch")

Walk = Callable[[Analysis, Iterable[onnx.NodeProto]], None]
"""The walk over a list of nodes (:func:`onnxprune.analysis.walk.walk_nodes`)."""


def reads_of(node: onnx.NodeProto) -> set[str]:
    """Names the subgraphs of ``node`` read, at any depth (their own names included)."""
    names: set[str] = set()
    for a in node.attribute:
        for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
            for g in iter_graphs(sub):
                for n in g.node:
                    names.update(n.input)
                names.update(o.name for o in g.output)
    return names


def leave_whole(an: Analysis, node: onnx.NodeProto, reason: str) -> None:
    """Pin what ``node`` reads, and every outer tensor its subgraphs read (at any depth)."""
    an.pin_inputs(node, reason)
    reads = reads_of(node)
    for name in sorted(reads & set(an.labels)):  # read so far; later ones: ``unwalked_reads``
        an.pin(an.labels[name].ids, f"{node.op_type} {node_name(node)}: {reason}")
    an.unwalked_reads |= reads


def subgraph_reason(node: onnx.NodeProto) -> str:
    """Why a Loop/Scan (or other subgraph) node is left whole."""
    if node.op_type in ("Loop", "Scan"):
        return (
            "its body (a subgraph) carries state across iterations and is not analysed: left "
            "whole, with every outer tensor the body reads"
        )
    return "has a subgraph the channel analysis does not walk: left whole"


def walk_if(an: Analysis, node: onnx.NodeProto, walk: Walk) -> None:
    """Walk both branches of If ``node`` and give its outputs their labels (module docstring)."""
    branches = {a.name: a.g for a in node.attribute if a.name in BRANCHES}
    why = _cannot_walk(an, node, branches)
    if why:
        leave_whole(an, node, why)
        return
    if node.input and node.input[0] in an.labels:
        an.pin(an.labels[node.input[0]].ids, f"If {node_name(node)}: a channel is its condition")
    outs: dict[str, list[Labels | None]] = {}
    for name in BRANCHES:
        g = branches[name]
        for t in g.initializer:
            an.inits[t.name] = t
        first = len(an.sinks)
        an.branch_tensors.update(o for n in g.node for o in n.output if o)
        walk(an, g.node)
        for sink in an.sinks[first:]:
            sink.scope = sink.scope or f"If {node_name(node)} {name}"
        outs[name] = [an.labels.get(o.name) for o in g.output]
    names = [[o.name for o in branches[b].output] for b in BRANCHES]
    for k, out in enumerate(node.output):
        if out and k < len(outs[BRANCHES[0]]) and k < len(outs[BRANCHES[1]]):
            _join_output(an, node, out, outs[BRANCHES[0]][k], outs[BRANCHES[1]][k])
            _pin_unfoldable(an, node, out, names[0][k], names[1][k])


def _pin_unfoldable(an: Analysis, node: onnx.NodeProto, out: str, then: str, other: str) -> None:
    """Pin the channels of If output ``out`` that, once zeroed where they are produced, would
    not be zero in both branches (a constant may differ between them, and which branch runs
    depends on the data): fold could not remove them, so no pass should zero them."""
    lab, states = an.labels.get(out), an.pruned_states
    if lab is None or states is None:
        return
    zero = np.ones(len(lab.ids), bool)
    for name in (then, other):
        state = states.get(name)
        zero &= state is not None and len(state) == len(lab.ids) and state == State.ZERO
    an.pin(
        lab.ids[~zero],
        f"If {node_name(node)}: output {out!r}: a channel, once zeroed, is not zero in both "
        "branches",
    )


def _join_output(
    an: Analysis, node: onnx.NodeProto, out: str, then: Labels | None, other: Labels | None
) -> None:
    """Labels of If output ``out`` from its two branches' (pins where they disagree)."""
    if then is None and other is None:
        return
    where = f"If {node_name(node)}: output {out!r}"
    if then is None or other is None:
        has, lab = ("then_branch", then) if then is not None else ("else_branch", other)
        assert lab is not None
        an.pin(lab.ids, f"{where} carries channels in {has} only")
        return
    if then.axis != other.axis or len(then.ids) != len(other.ids):
        why = (
            f"{where} carries {len(then.ids)} channels on axis {then.axis} in then_branch, "
            f"{len(other.ids)} on axis {other.axis} in else_branch"
        )
        an.pin(then.ids, why)
        an.pin(other.ids, why)
        return
    an.union(then.ids, other.ids, f"{where}: a channel in one branch is none in the other")
    ids = np.where(then.ids >= 0, then.ids, other.ids)
    both_zero = (then.state == State.ZERO) & (other.state == State.ZERO)
    an.set_out(out, Labels(then.axis, ids, np.where(both_zero, State.ZERO, State.VAR)))


def _cannot_walk(an: Analysis, node: onnx.NodeProto, branches: dict[str, onnx.GraphProto]) -> str:
    """Why the branches of ``node`` cannot be walked, or ``""``."""
    if sorted(branches) != sorted(BRANCHES):
        return "an If without both branches: left whole"
    taken = set(an.labels) | set(an.inits)
    taken |= {o for n in an.graph.node for o in n.output} | {i.name for i in an.graph.input}
    taken |= {o for _, n in an.branch_nodes for o in n.output}
    seen: set[str] = set()
    for name in BRANCHES:
        for g in iter_graphs(branches[name]):
            own = [t.name for t in g.initializer] + [i.name for i in g.input]
            own += [o for n in g.node for o in n.output if o]
            for t in own:
                if t in taken or t in seen:
                    return f"{name} defines {t!r}, a name used outside it: left whole"
                seen.add(t)
    shapes = _branch_shapes(an)
    for name in BRANCHES:
        g = branches[name]
        for t in [o for n in g.node for o in n.output if o]:
            if t not in shapes:
                return f"the shape of {t!r} in {name} is not known: left whole"
    return ""


def _branch_shapes(an: Analysis) -> dict[str, tuple[int, ...]]:
    """Static shapes of the tensors inside every If branch (onnx shape inference, with the
    main graph's inputs at their probed shapes), merged into ``an.shapes``; cached."""
    if an.branch_shapes is not None:
        return an.branch_shapes
    model = onnx.ModelProto()
    model.CopyFrom(an.model)
    clear_value_info(model.graph)  # recorded shapes may hold symbolic dims: inferred afresh
    for vi in model.graph.input:
        shape = an.shapes.get(vi.name)
        if shape is None or not vi.type.HasField("tensor_type"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != len(shape):
            continue
        for d, v in zip(dims, shape, strict=True):
            d.Clear()
            d.dim_value = int(v)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is best effort on custom or broken graphs
        inferred = model
    found: dict[str, tuple[int, ...]] = {}
    for g in list(iter_graphs(inferred.graph))[1:]:
        for vi in list(g.value_info) + list(g.output):
            t = vi.type.tensor_type
            if not t.HasField("shape") or not all(d.HasField("dim_value") for d in t.shape.dim):
                continue
            found.setdefault(vi.name, tuple(int(d.dim_value) for d in t.shape.dim))
    an.shapes = {**found, **an.shapes}
    an.branch_shapes = found
    return found


def settle_branches(an: Analysis) -> None:
    """Pin the channels that shape constants inside walked branches count, and drop those
    rewrites (fold rewrites the main graph's shape constants only); a grouped Conv's
    ``group`` attribute is rewritten wherever the Conv is."""
    inside = {id(n) for _, n in an.branch_nodes}
    keep = []
    for rw in an.rewrites:
        if id(rw.node) not in inside or isinstance(rw, GroupRewrite):
            keep.append(rw)
            continue
        ids = np.concatenate(rw.parts) if isinstance(rw, SplitRewrite) else rw.ids
        an.pin(
            ids,
            f"{rw.node.op_type} {node_name(rw.node)}: a shape constant inside an If branch "
            "counts these channels",
        )
    an.rewrites[:] = keep
