"""The ``cleanup`` pass: make weights visible and the graph tidy, without changing results."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx_graphsurgeon.logger import G_LOGGER

from onnxprune.graph import iter_graphs, lift_constants, unlist_initializer_inputs
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
           replaced by their values, unless a result exceeds ``fold_limit_mb``.
        4. An Identity whose output is not a graph output (and not read by a subgraph) is
           bypassed; nodes whose outputs nobody uses are removed; nodes are sorted.
        5. Opset imports, IR version, producer and metadata are kept as they were.
    """

    name: ClassVar[str] = "cleanup"
    in_place: ClassVar[bool] = False  # onnx-graphsurgeon exports a new model
    fold_constants: bool = option(True, "evaluate constant subgraphs and store their values")
    fold_limit_mb: float = option(64.0, "do not fold into a tensor larger than this (MiB)", low=0)
    keep_initializer_inputs: bool = option(False, "keep initializers that are also graph inputs")

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        """Apply rules 1-5 to ``model``."""
        nodes_before = sum(len(g.node) for g in iter_graphs(model.graph))
        lifted = sum(lift_constants(g) for g in iter_graphs(model.graph))
        unlisted = 0 if self.keep_initializer_inputs else unlist_initializer_inputs(model.graph)

        graph = gs.import_onnx(_with_inferred_shapes(model))
        if self.fold_constants:
            _quiet_graphsurgeon()
            for _ in range(_MAX_FOLD_ROUNDS):
                count = _count_nodes(graph)
                graph.fold_constants(
                    fold_shapes=True,
                    recurse_subgraphs=True,
                    error_ok=True,
                    size_threshold=int(self.fold_limit_mb * _MB),
                )
                graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True)
                if _count_nodes(graph) == count:
                    break
                # Folding can make more shapes static: infer again and fold what that exposes,
                # so a second cleanup finds nothing left to do.
                folded = gs.export_onnx(graph, do_type_check=False)
                _restore_model_fields(folded, model)
                graph = gs.import_onnx(_with_inferred_shapes(folded))
        bypassed = _bypass_identities(graph)
        graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True).toposort()
        out = gs.export_onnx(graph, do_type_check=False)
        _restore_model_fields(out, model)
        if self.keep_initializer_inputs:
            _restore_initializer_inputs(out.graph, model.graph)

        nodes_after = sum(len(g.node) for g in iter_graphs(out.graph))
        report = {
            "constants_lifted": lifted,
            "initializer_inputs_removed": unlisted,
            "identities_bypassed": bypassed,
            "nodes_before": nodes_before,
            "nodes_after": nodes_after,
        }
        modified = bool(lifted or unlisted or bypassed or nodes_after != nodes_before)
        return PassResult(out, modified, report)


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
    folds with would print optimizer warnings on stderr (even with ``-q``); keep errors only."""
    G_LOGGER.severity = G_LOGGER.WARNING
    ort.set_default_logger_severity(3)
