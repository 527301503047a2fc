"""The fused graph: every member's branch reads the one input; a combination makes the output.

Rules:
    1. A branch is a member's graph, prefixed, reading the fused input through its adapter;
       only the combined output is kept (nodes and initializers that fed nothing else go).
    2. The fused model's input is the first model's; its output takes the first model's
       combined output's name.
    3. ``mean``/``weighted``: ``sum_i w_i softmax(z_i)`` (softmax only on members whose outputs
       are logits; ``mean`` with equal weights is the ONNX ``Mean``); ``vote``: each member's
       argmax as a one-hot row, ``sum_i w_i onehot_i``, so the output is each class's share of
       the (weighted) votes and its argmax the majority (the lowest class index on a tie);
       ``concat``: the members' raw outputs side by side along the last axis.
    4. ``label=true`` adds an int64 output ``NAME_label``: the argmax of the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.errors import UnsupportedModelError
from onnxprune.fusion.adapters import Adapter, show
from onnxprune.fusion.members import Member, input_dims, output_of, prefixed, rename_input
from onnxprune.graph import allow_unlisted_initializers, iter_graphs

FUSE = "fuse/"  # prefix of the combination's own nodes and tensors


@dataclass
class Branch:
    """One member inside the fused graph: a standalone model from the fused input to
    ``output``, and whether that output is logits."""

    member: Member
    adapter: Adapter
    model: onnx.ModelProto
    output: onnx.ValueInfoProto
    logits: bool = False


def branch(
    member: Member, adapter: Adapter, fused_input: onnx.ValueInfoProto, index: int, opset: int
) -> Branch:
    """Member ``member`` as a model reading ``fused_input`` with only output ``index`` (rule 1)."""
    out_vi = output_of(member, index)
    model = prefixed(member)
    g = model.graph
    own = member.prefix + next(i.name for i in member.model.graph.input if _is_input(member, i))
    if adapter.empty:
        rename_input(g, own, fused_input.name)
    else:
        nodes, inits = adapter.nodes(fused_input.name, own, member.prefix, opset)
        keep = list(g.node)
        del g.node[:]
        g.node.extend(nodes + keep)
        g.initializer.extend(inits)
    del g.input[:]
    g.input.append(fused_input)
    wanted = member.prefix + out_vi.name
    kept = [o for o in g.output if o.name == wanted]
    del g.output[:]
    g.output.extend(kept)
    _drop_dead(g)
    return Branch(member, adapter, model, kept[0])


def _is_input(member: Member, vi: onnx.ValueInfoProto) -> bool:
    return vi.name not in {t.name for t in member.model.graph.initializer}


def _drop_dead(g: onnx.GraphProto) -> None:
    """Remove nodes no output needs, and unread initializers (main graph; a graph with
    subgraphs keeps its nodes: they may read outer names)."""
    if len(list(iter_graphs(g))) > 1:
        return
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(g.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    del g.node[:]
    g.node.extend(reversed(keep))
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    infos = [v for v in g.value_info if v.name in needed]
    del g.value_info[:]
    g.value_info.extend(infos)


def classes(b: Branch) -> int | None:
    """The size of the branch output's last axis, when declared."""
    dims = input_dims(b.output)
    return dims[-1] if dims and isinstance(dims[-1], int) else None


def check_outputs(branches: list[Branch], mode: str) -> None:
    """The branches' outputs can be combined in ``mode``: one element type, and (but for
    ``concat``) one rank and one class count.

    Raises:
        UnsupportedModelError: naming the member and both shapes.
    """
    first = branches[0]
    dims0 = input_dims(first.output)
    for b in branches[1:]:
        dims = input_dims(b.output)
        same_type = b.output.type.tensor_type.elem_type == first.output.type.tensor_type.elem_type
        if not same_type:
            raise UnsupportedModelError(
                f"pass fuse: member {b.member.source}: output {b.output.name!r} has another "
                f"element type than {first.member.source}'s; combine=... needs one"
            )
        fits = len(dims) == len(dims0) and (mode == "concat" or classes(b) == classes(first))
        if not fits:
            raise UnsupportedModelError(
                f"pass fuse: member {b.member.source}: output {show(dims)} cannot be combined "
                f"({mode}) with {first.member.source}'s {show(dims0)}"
                + ("; the class counts differ" if len(dims) == len(dims0) else "")
            )
    if mode == "vote" and classes(first) is None:
        raise UnsupportedModelError(
            f"pass fuse: combine=vote needs a fixed class count on the last axis, but "
            f"{first.member.source}'s output is {show(dims0)}"
        )


def fused_model(
    branches: list[Branch],
    mode: str,
    weights: np.ndarray,
    out_name: str,
    *,
    label: bool,
    template: onnx.ModelProto,
    opset: int,
    ir_version: int,
    domains: dict[str, int],
) -> onnx.ModelProto:
    """The fused model (rules 2-4) from the branches kept and their weights."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    infos: list[onnx.ValueInfoProto] = []
    functions: list[onnx.FunctionProto] = []
    for b in branches:
        g = b.model.graph
        nodes += list(g.node)
        inits += list(g.initializer)
        infos += list(g.value_info) + [b.output]
        functions += list(b.model.functions)
    more, more_inits, out_dims = _combination(branches, mode, weights, out_name)
    nodes += more
    inits += more_inits
    elem = branches[0].output.type.tensor_type.elem_type
    outputs = [helper.make_tensor_value_info(out_name, elem, out_dims)]
    if label:
        nodes.append(argmax(out_name, f"{out_name}_label", f"{FUSE}label"))
        outputs.append(
            helper.make_tensor_value_info(
                f"{out_name}_label", onnx.TensorProto.INT64, out_dims[:-1]
            )
        )
    graph = helper.make_graph(
        nodes,
        template.graph.name or "fused",
        [branches[0].model.graph.input[0]],
        outputs,
        inits,
        value_info=infos,
    )
    opsets = [helper.make_opsetid("", opset)] + [
        helper.make_opsetid(d, v) for d, v in sorted(domains.items())
    ]
    model = helper.make_model(graph, opset_imports=opsets, functions=functions)
    model.ir_version = ir_version
    for key in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, key, getattr(template, key))
    model.metadata_props.extend(template.metadata_props)
    allow_unlisted_initializers(model)  # a member's initializers listed as inputs are no longer
    return model


def argmax(src: str, out: str, name: str) -> onnx.NodeProto:
    """``out = ArgMax(src)`` over the last (class) axis, without it: int64 labels."""
    return helper.make_node("ArgMax", [src], [out], name=name, axis=-1, keepdims=0)


def _combination(
    branches: list[Branch], mode: str, weights: np.ndarray, out_name: str
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], list]:
    """The combination's nodes, constants and output dims (rule 3)."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    dims: list = list(input_dims(branches[0].output))
    dims = [d if d is not None else "?" for d in dims]
    elem = branches[0].output.type.tensor_type.elem_type
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    if mode == "concat":
        total = [classes(b) for b in branches]
        dims[-1] = sum(t for t in total if t is not None) if None not in total else "classes"
        names = [b.output.name for b in branches]
        nodes.append(helper.make_node("Concat", names, [out_name], name=f"{FUSE}concat", axis=-1))
        return nodes, inits, dims
    w = np.asarray(weights, np.float64) / np.sum(weights)
    parts = []
    for b in branches:
        src, tag = b.output.name, b.member.name
        if mode == "vote":
            depth = f"{FUSE}{tag}/depth"
            values = f"{FUSE}{tag}/values"
            inits.append(numpy_helper.from_array(np.array(classes(b), np.int64), depth))
            inits.append(numpy_helper.from_array(np.array([0, 1], dtype), values))
            nodes.append(argmax(src, f"{FUSE}{tag}/argmax", f"{FUSE}{tag}/argmax"))
            src = f"{FUSE}{tag}/onehot"
            nodes.append(
                helper.make_node(
                    "OneHot",
                    [f"{FUSE}{tag}/argmax", depth, values],
                    [src],
                    name=f"{FUSE}{tag}/onehot",
                    axis=-1,
                )
            )
        elif b.logits:
            nodes.append(
                helper.make_node(
                    "Softmax",
                    [src],
                    [f"{FUSE}{tag}/softmax"],
                    name=f"{FUSE}{tag}/softmax",
                    axis=-1,
                )
            )
            src = f"{FUSE}{tag}/softmax"
        parts.append(src)
    if mode == "mean" and np.allclose(w, w[0]):
        nodes.append(helper.make_node("Mean", parts, [out_name], name=f"{FUSE}mean"))
        return nodes, inits, dims
    scaled = []
    for b, src, wi in zip(branches, parts, w, strict=True):
        const = f"{FUSE}{b.member.name}/weight"
        inits.append(numpy_helper.from_array(np.array(wi, dtype), const))
        scaled.append(f"{FUSE}{b.member.name}/weighted")
        nodes.append(helper.make_node("Mul", [src, const], [scaled[-1]], name=scaled[-1]))
    nodes.append(helper.make_node("Sum", scaled, [out_name], name=f"{FUSE}sum"))
    return nodes, inits, dims
