"""The ``cleanup`` pass: make weights visible and the graph tidy, without changing results."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import numpy_helper
from onnx_graphsurgeon.logger import G_LOGGER

from onnxprune.graph import (
    allow_unlisted_initializers,
    iter_graphs,
    lift_constants,
    unlist_initializer_inputs,
)
from onnxprune.model import check_model
from onnxprune.passes.base import Pass, PassResult, option
from onnxprune.passes.registry import register_pass

if TYPE_CHECKING:
    from onnxprune.context import Context

_MB = 1 << 20
_MAX_FOLD_ROUNDS = 8


@register_pass
@dataclass
class Cleanup(Pass):
    """Lift Constant-node weights, fold constant subgraphs, drop dead nodes and Identity, sort.

    Rules:
        1. Constant nodes holding tensors become initializers (in every graph, subgraphs too).
        2. Initializers also listed as graph inputs (MXNet, IR < 4 habits) stop being inputs, so
           they are constants that passes may prune (``keep_initializer_inputs`` turns this off).
        3. Constant subgraphs are evaluated with onnxruntime through onnx-graphsurgeon and
           replaced by their values, unless a result exceeds ``fold_limit_mb``; an If whose
           condition is constant is replaced by the branch it takes.
        4. An Identity whose output is not a graph output (and not read by a subgraph) is
           bypassed; nodes whose outputs nobody uses are removed; nodes are sorted.
        5. Opset imports, IR version, producer and metadata are kept as they were, except that
           an IR < 4 model gets IR version 4 once a graph has initializers it does not list as
           inputs (IR < 4 forbids that; IR 4 changes nothing else, for any opset). Graph inputs
           and outputs keep their declared types (sequences, optionals included).
        6. When onnx-graphsurgeon cannot handle the model (or returns one onnx.checker
           rejects), rules 3-4 are left out: the model comes back with rules 1, 2 and 5 applied
           and ``note`` says why.

    Report: ``constants_lifted``, ``initializer_inputs_removed``, ``identities_bypassed``,
    ``constant_ifs_inlined``, ``nodes_before``, ``nodes_after``, and ``note`` when rule 5
    raised the IR version or rule 6 applied.
    """

    name: ClassVar[str] = "cleanup"
    in_place: ClassVar[bool] = False  # onnx-graphsurgeon exports a new model
    fold_constants: bool = option(True, "evaluate constant subgraphs and store their values")
    fold_limit_mb: float = option(64.0, "do not fold into a tensor larger than this (MiB)", low=0)
    keep_initializer_inputs: bool = option(False, "keep initializers that are also graph inputs")

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        """Apply rules 1-6 to ``model``."""
        nodes_before = sum(len(g.node) for g in iter_graphs(model.graph))
        lifted = sum(lift_constants(g) for g in iter_graphs(model.graph))
        unlisted = 0 if self.keep_initializer_inputs else unlist_initializer_inputs(model.graph)
        notes = []
        try:
            out, bypassed, inlined = self._surgery(model)
            allow_unlisted_initializers(out)
            check_model(out, "its result")
        except Exception as exc:  # noqa: BLE001 - any failure of the library: rule 6
            out, bypassed, inlined = copy.deepcopy(model), 0, 0
            allow_unlisted_initializers(out)
            first = next((ln for ln in str(exc).splitlines() if ln.strip()), "")
            notes.append(
                "constant folding, Identity bypass and dead-node removal left out: the rewrite "
                f"through onnx-graphsurgeon failed on this model ({type(exc).__name__}: {first})"
            )
        if out.ir_version != model.ir_version:
            notes.append(
                f"IR version raised from {model.ir_version} to {out.ir_version} "
                "(IR < 4 lists every initializer as a graph input)"
            )
        nodes_after = sum(len(g.node) for g in iter_graphs(out.graph))
        report: dict[str, Any] = {
            "constants_lifted": lifted,
            "initializer_inputs_removed": unlisted,
            "identities_bypassed": bypassed,
            "constant_ifs_inlined": inlined,
            "nodes_before": nodes_before,
            "nodes_after": nodes_after,
        }
        if notes:
            report["note"] = "; ".join(notes)
        changed = lifted or unlisted or bypassed or inlined or nodes_after != nodes_before
        modified = bool(changed or out.ir_version != model.ir_version)
        return PassResult(out, modified, report)

    def _surgery(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, int, int]:
        """Rules 3 and 4 through onnx-graphsurgeon: (new model, Identities bypassed, Ifs inlined)."""
        declared = _declared_io(model)
        graph = gs.import_onnx(_for_graphsurgeon(model))
        inlined = 0
        if self.fold_constants:
            _quiet_graphsurgeon()
            for _ in range(_MAX_FOLD_ROUNDS):
                count = _count_nodes(graph)
                graph.fold_constants(
                    fold_shapes=True,
                    recurse_subgraphs=True,
                    error_ok=True,
                    # graphsurgeon's own If flattening can leave outer-scope reads unsorted
                    flatten_subgraphs=False,
                    size_threshold=int(self.fold_limit_mb * _MB),
                )
                graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True)
                if _count_nodes(graph) == count and not _has_constant_if(graph):
                    break
                # Folding can make more shapes static, and a condition constant: infer again
                # and fold what that exposes, so a second cleanup finds nothing left to do.
                folded = gs.export_onnx(graph, do_type_check=False)
                _restore_model_fields(folded, model)
                now = inline_constant_ifs(folded)
                if _count_nodes(graph) == count and not now:
                    break  # a constant condition inline_constant_ifs leaves alone
                inlined += now
                graph = gs.import_onnx(_for_graphsurgeon(folded))
        bypassed = _bypass_identities(graph)
        graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True).toposort()
        out = gs.export_onnx(graph, do_type_check=False)
        _restore_model_fields(out, model)
        _restore_declared_io(out, declared)
        if self.keep_initializer_inputs:
            _restore_initializer_inputs(out.graph, model.graph)
        return out, bypassed, inlined


def _for_graphsurgeon(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with inferred shapes (so Shape ops fold) and without the types graphsurgeon
    cannot export (optional, map, opaque): those values' types are left empty, and
    :func:`_restore_declared_io` puts the graph inputs' and outputs' back afterwards."""
    out = _with_inferred_shapes(model)
    if out is model:
        out = copy.deepcopy(model)
    for g in iter_graphs(out.graph):
        kept = [vi for vi in g.value_info if _graphsurgeon_type(vi.type)]
        if len(kept) != len(g.value_info):
            del g.value_info[:]
            g.value_info.extend(kept)
        for vi in list(g.input) + list(g.output):
            if not _graphsurgeon_type(vi.type):
                vi.ClearField("type")
    return out


def _graphsurgeon_type(tp: onnx.TypeProto) -> bool:
    """A tensor, or a sequence of tensors: the value types graphsurgeon exports."""
    kind = tp.WhichOneof("value")
    if kind == "sequence_type":
        return tp.sequence_type.elem_type.WhichOneof("value") == "tensor_type"
    return kind == "tensor_type"


def _declared_io(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Graph inputs and outputs (of every graph) that are not plain tensors: graphsurgeon loses
    their types (optional, map) or their element shapes (sequence)."""
    return {
        vi.name: copy.deepcopy(vi)
        for g in iter_graphs(model.graph)
        for vi in list(g.input) + list(g.output)
        if vi.type.WhichOneof("value") not in (None, "tensor_type")
    }


def _restore_declared_io(out: onnx.ModelProto, declared: dict[str, onnx.ValueInfoProto]) -> None:
    for g in iter_graphs(out.graph):
        for vi in list(g.input) + list(g.output):
            if vi.name in declared and vi.type.WhichOneof("value") != "tensor_type":
                vi.CopyFrom(declared[vi.name])


def _with_inferred_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Model with value_info from onnx shape inference, so Shape ops can fold (best effort)."""
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - custom ops or broken shapes: fold what can be folded
        return model


def _restore_initializer_inputs(out: onnx.GraphProto, original: onnx.GraphProto) -> None:
    """Put back the initializer inputs graphsurgeon drops on import, in their original order."""
    inits = {t.name for t in out.initializer}
    real = {i.name: i for i in out.input}
    kept = [
        real.pop(i.name) if i.name in real else i
        for i in original.input
        if i.name in real or i.name in inits
    ]
    del out.input[:]
    out.input.extend(kept + list(real.values()))


def _names_read_by_subgraphs(graph: gs.Graph) -> set[str]:
    names: set[str] = set()
    for node in graph.nodes:
        for sub in node.attrs.values():
            subs = sub if isinstance(sub, list) else [sub]
            for s in subs:
                if isinstance(s, gs.Graph):
                    for n in s.nodes:
                        names.update(t.name for t in n.inputs)
                    names |= _names_read_by_subgraphs(s)
    return names


def _bypass_identities(graph: gs.Graph) -> int:
    """Reconnect consumers of Identity outputs to the Identity's input; returns the count."""
    protected = {t.name for t in graph.outputs} | _names_read_by_subgraphs(graph)
    count = 0
    for node in list(graph.nodes):
        if node.op != "Identity" or node.domain not in ("", "ai.onnx", None):
            continue
        src, dst = node.inputs[0], node.outputs[0]
        if dst.name in protected:
            continue
        for consumer in list(dst.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is dst:
                    consumer.inputs[i] = src
        node.outputs.clear()
        node.inputs.clear()
        count += 1
    return count


def _restore_model_fields(out: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Keep what graphsurgeon's export does not carry over: IR, producer, metadata, opsets."""
    out.ir_version = original.ir_version
    out.producer_name = original.producer_name
    out.producer_version = original.producer_version
    out.domain = original.domain
    out.model_version = original.model_version
    out.doc_string = original.doc_string
    del out.metadata_props[:]
    out.metadata_props.extend(original.metadata_props)
    versions = {o.domain: o.version for o in out.opset_import}
    versions.update({o.domain: o.version for o in original.opset_import})
    del out.opset_import[:]
    out.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in sorted(versions.items()))
    if not out.functions and original.functions:
        out.functions.extend(original.functions)


def _count_nodes(graph: gs.Graph) -> int:
    """Nodes of ``graph`` and of its subgraphs."""
    total = 0
    for node in graph.nodes:
        total += 1
        for value in node.attrs.values():
            for sub in value if isinstance(value, list) else [value]:
                if isinstance(sub, gs.Graph):
                    total += _count_nodes(sub)
    return total


def _quiet_graphsurgeon() -> None:
    """graphsurgeon logs every fold at INFO; keep its warnings only. The onnxruntime sessions it
    folds with would print optimizer warnings and errors (of partitions it then leaves
    unfolded) on stderr, even with ``-q``: keep only fatal ones."""
    G_LOGGER.severity = G_LOGGER.ERROR
    ort.set_default_logger_severity(4)


def _has_constant_if(graph: gs.Graph) -> bool:
    """Whether an If node of ``graph`` or of its subgraphs has a constant condition."""
    for node in graph.nodes:
        if node.op == "If" and isinstance(node.inputs[0], gs.Constant):
            return True
        for value in node.attrs.values():
            for sub in value if isinstance(value, list) else [value]:
                if isinstance(sub, gs.Graph) and _has_constant_if(sub):
                    return True
    return False


def inline_constant_ifs(model: onnx.ModelProto) -> int:
    """Replace each If whose condition is an initializer of its graph by the branch it takes.

    The branch's nodes and initializers move into the If's graph at the If's place; names that
    would clash with a name used elsewhere in the model are renamed (in nested subgraphs too),
    and the branch's outputs become the If's outputs. Returns how many Ifs were inlined.
    """
    count = 0
    for g in list(iter_graphs(model.graph)):
        inits = {t.name: t for t in g.initializer}
        for node in list(g.node):
            cond = inits.get(node.input[0]) if node.op_type == "If" and node.input else None
            if cond is None or int(np.prod(cond.dims)) != 1 or cond.data_location:
                continue
            taken = bool(numpy_helper.to_array(cond).reshape(-1)[0])
            branch = next(
                a.g for a in node.attribute if a.name == ("then_branch" if taken else "else_branch")
            )
            if branch.sparse_initializer or len(branch.output) != len(node.output):
                continue
            _inline(model, g, node, branch)
            count += 1
    return count


def _inline(
    model: onnx.ModelProto, g: onnx.GraphProto, node: onnx.NodeProto, branch: onnx.GraphProto
) -> None:
    """Put ``branch``'s nodes and initializers in place of If ``node`` of graph ``g``."""
    inner = {
        id(h)
        for a in node.attribute
        if a.type == onnx.AttributeProto.GRAPH
        for h in iter_graphs(a.g)
    }
    used = {name for h in iter_graphs(model.graph) if id(h) not in inner for name in _names(h)}
    defined = [o for n in branch.node for o in n.output if o] + [t.name for t in branch.initializer]
    rename = {}
    for name in defined:
        new, k = name, 0
        while new in used:
            k += 1
            new = f"{name}_inlined_{k}"
        used.add(new)
        rename[name] = new
    producers = {o: n for n in branch.node for o in n.output if o}
    nodes = [copy.deepcopy(n) for n in branch.node]
    extra = []
    for src, dst in zip(branch.output, node.output, strict=True):
        producer = producers.get(src.name)
        if producer is not None and rename[src.name] not in node.output:
            rename[src.name] = dst  # the branch's producer writes the If's output directly
        else:
            extra.append(onnx.helper.make_node("Identity", [src.name], [dst]))
    for n in nodes + extra:
        _rename_node(n, rename)
    index = list(g.node).index(node)
    del g.node[index]
    for k, n in enumerate(nodes + extra):
        g.node.insert(index + k, n)
    for t in branch.initializer:
        moved = copy.deepcopy(t)
        moved.name = rename[t.name]
        g.initializer.append(moved)


def _rename_node(node: onnx.NodeProto, rename: dict[str, str]) -> None:
    """Rename ``node``'s inputs and outputs, and the outer-scope reads of its subgraphs."""
    node.input[:] = [rename.get(i, i) for i in node.input]
    node.output[:] = [rename.get(o, o) for o in node.output]
    for a in node.attribute:
        for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else []) + list(a.graphs):
            for h in iter_graphs(sub):
                for n in h.node:
                    n.input[:] = [rename.get(i, i) for i in n.input]


def _names(graph: onnx.GraphProto) -> set[str]:
    """Every value name ``graph`` defines or reads (its own level only)."""
    names = {i.name for i in graph.input} | {o.name for o in graph.output}
    names |= {t.name for t in graph.initializer}
    for n in graph.node:
        names.update(n.input)
        names.update(n.output)
    return names
