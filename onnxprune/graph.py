"""GraphProto helpers shared by the analysis and the passes: walking graphs and subgraphs,
attributes, names, initializers, lifting constants, consumer biases. No file I/O here, except
that an initializer whose data stays in its file (:func:`tensor_array`) is read mapped."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

# whole-file read-only maps, by real path and (mtime, size): every view of one file shares them
_MAPS: dict[str, tuple[tuple[int, int], np.ndarray]] = {}


def unique_name(graph: onnx.GraphProto, base: str) -> str:
    """``base``, or ``base_N``: a name no initializer, input or node output uses yet."""
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    taken |= {i.name for i in graph.input}
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def mapped(t: onnx.TensorProto) -> bool:
    """Whether ``t``'s data stays in its file: an external location given as an absolute path
    (how :func:`onnxprune.model.load` leaves the large weights of a large model)."""
    return uses_external_data(t) and os.path.isabs(ExternalDataInfo(t).location)


def file_map(path: str) -> np.ndarray:
    """The whole file ``path`` mapped read-only as bytes (one map per file, shared)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    stamp = (st.st_mtime_ns, st.st_size)
    known = _MAPS.get(real)
    if known is None or known[0] != stamp:
        known = (
            stamp,
            np.memmap(real, dtype=np.uint8, mode="r") if st.st_size else np.zeros(0, np.uint8),
        )
        _MAPS[real] = known
    return known[1]


def forget_map(path: str) -> None:
    """Drop the shared map of ``path`` (a file about to be deleted); views of it stay valid."""
    _MAPS.pop(os.path.realpath(path), None)


def release_maps() -> None:
    """Let the kernel drop the pages of every file map from this process (they are read again
    on the next access): after onnxruntime has copied what it needs."""
    advice = getattr(mmap, "MADV_DONTNEED", None)  # not on every platform
    for _, arr in _MAPS.values():
        base = getattr(arr, "_mmap", None)
        if base is not None and advice is not None:
            base.madvise(advice)


def tensor_array(t: onnx.TensorProto) -> np.ndarray:
    """The value of ``t``; a :func:`mapped` one is a read-only view of its file (no copy)."""
    if not mapped(t):
        return numpy_helper.to_array(t)
    info = ExternalDataInfo(t)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    shape = tuple(int(d) for d in t.dims)
    count = int(np.prod(shape, dtype=np.int64))
    start = int(info.offset or 0)
    raw = file_map(info.location)[start : start + count * dtype.itemsize]
    if raw.size != count * dtype.itemsize:
        raise OSError(f"{info.location}: too short for tensor {t.name!r}")
    return raw.view(dtype).reshape(shape)


def get_init(graph: onnx.GraphProto, name: str) -> np.ndarray:
    """The value of initializer ``name`` (read-only when it stays in its file): of ``graph``,
    else of a subgraph holding it (an If branch's own weights, which the channel analysis gives
    unique names)."""
    found = next((t for t in graph.initializer if t.name == name), None)
    if found is None:
        found = next(t for t in iter_initializers(graph) if t.name == name)
    return tensor_array(found)


def set_init(graph: onnx.GraphProto, name: str, arr: np.ndarray) -> None:
    """Replace initializer ``name`` (in ``graph``, else in the subgraph holding it) with
    ``arr``, or add it to ``graph``."""
    for g in (graph, *list(iter_graphs(graph))[1:]):
        for i, t in enumerate(g.initializer):
            if t.name == name:
                g.initializer[i].CopyFrom(numpy_helper.from_array(arr, name))
                return
    graph.initializer.append(numpy_helper.from_array(arr, name))


def uses(graph: onnx.GraphProto, name: str) -> int:
    """How many node inputs of the main graph read ``name``."""
    return sum(name == i for n in graph.node for i in n.input)


def private_input(graph: onnx.GraphProto, node: onnx.NodeProto, index: int) -> str:
    """Input ``index`` of ``node`` as an initializer no other node reads (copied if shared)."""
    name = node.input[index]
    if uses(graph, name) == 1:
        return name
    new = unique_name(graph, f"{name}_own")
    graph.initializer.append(numpy_helper.from_array(get_init(graph, name), new))
    node.input[index] = new
    return new


def attr_float(node: onnx.NodeProto, name: str, default: float) -> float:
    """Float attribute ``name`` of ``node``, or ``default`` (:func:`attr`, typed)."""
    return float(attr(node, name, default))


def remove_attr(node: onnx.NodeProto, name: str) -> None:
    """Remove attribute ``name`` of ``node`` if present."""
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept)


def set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    """Set attribute ``name`` of ``node`` (replacing it if present)."""
    remove_attr(node, name)
    node.attribute.append(onnx.helper.make_attribute(name, value))


@dataclass
class BiasChange:
    """Where a consumer's output bias now lives, for passes that track per-channel slices.

    Attributes:
        init: the bias initializer (one entry per output channel along ``axis``, or fewer
            when it broadcasts and stayed that way).
        axis: the output-channel axis of ``init``.
        previous: the initializer it was copied or grown from, or None when it is new.
        per_channel: ``init`` has one entry per output channel.
    """

    init: str
    axis: int
    previous: str | None
    per_channel: bool


def add_output_bias(graph: onnx.GraphProto, node: onnx.NodeProto, delta: np.ndarray) -> BiasChange:
    """Add ``delta`` (one value per output channel) to what a Conv/Gemm/MatMul node outputs.

    Conv: its bias input (created if absent). Gemm: C, scaled by alpha/beta (created if absent
    or if beta is 0). MatMul: a new ``Add`` node after it. Shared bias initializers are copied
    first, so other nodes are not affected.
    """
    op = node.op_type
    if op == "MatMul":
        follower = bias_add_after(graph, node)
        if follower is not None:
            add, index = follower
            return _add_to_input(graph, add, index, delta.astype(np.float64))
        bias = unique_name(graph, f"{node.output[0]}_bias")
        mid = unique_name(graph, f"{node.output[0]}_pre_bias")
        out = node.output[0]
        node.output[0] = mid
        add = onnx.helper.make_node(
            "Add", [mid, bias], [out], name=unique_name(graph, f"{node.name or out}_bias_add")
        )
        graph.node.insert(list(graph.node).index(node) + 1, add)
        graph.initializer.append(numpy_helper.from_array(delta, bias))
        return BiasChange(bias, delta.ndim - 1, None, True)
    if op == "Gemm":
        alpha, beta = attr_float(node, "alpha", 1.0), attr_float(node, "beta", 1.0)
        if len(node.input) > 2 and node.input[2] and beta != 0.0:
            return _add_to_input(graph, node, 2, alpha * delta.astype(np.float64) / beta)
        set_attr(node, "beta", 1.0)
        return _new_input(graph, node, 2, (alpha * delta.astype(np.float64)).astype(delta.dtype))
    if op == "Conv":
        if len(node.input) > 2 and node.input[2]:
            return _add_to_input(graph, node, 2, delta.astype(np.float64))
        return _new_input(graph, node, 2, delta)
    raise ValueError(f"cannot add a bias to {op}")


def add_gate_bias(graph: onnx.GraphProto, node: onnx.NodeProto, delta: np.ndarray) -> None:
    """Add ``delta`` ([directions, gates * hidden], what X's removed features gave) to an
    LSTM/GRU/RNN's input bias: the first half of B (input 3, created as zeros if absent)."""
    rows = np.zeros((delta.shape[0], 2 * delta.shape[1]), np.float64)
    rows[:, : delta.shape[1]] = delta
    if len(node.input) > 3 and node.input[3]:
        _add_to_input(graph, node, 3, rows)
    else:
        _new_input(graph, node, 3, rows.astype(get_init(graph, node.input[1]).dtype))


def bias_add_after(
    graph: onnx.GraphProto, node: onnx.NodeProto
) -> tuple[onnx.NodeProto, int] | None:
    """The ``Add`` of a constant bias that alone reads ``node``'s output, and the bias's input
    index (MatMul + Add is how most exporters write a linear layer); None if there is none."""
    out = node.output[0]
    readers = [n for n in graph.node if out in n.input]
    if len(readers) != 1 or readers[0].op_type != "Add" or out in {o.name for o in graph.output}:
        return None
    add = readers[0]
    other = 1 if add.input[0] == out else 0
    inits = {t.name: t for t in graph.initializer}
    t = inits.get(add.input[other])
    if t is None or any(d != 1 for d in list(t.dims)[:-1]):
        return None  # a bias broadcast over the last axis only (scalar, [N], [1, N])
    return add, other


def _add_to_input(
    graph: onnx.GraphProto, node: onnx.NodeProto, index: int, delta: np.ndarray
) -> BiasChange:
    old = node.input[index]
    name = private_input(graph, node, index)
    current = get_init(graph, name)
    new = current.astype(np.float64) + delta
    set_init(graph, name, new.astype(current.dtype))
    per_channel = new.ndim >= 1 and new.shape[-1] == delta.shape[-1]
    return BiasChange(name, max(new.ndim - 1, 0), old, per_channel)


def _new_input(
    graph: onnx.GraphProto, node: onnx.NodeProto, index: int, delta: np.ndarray
) -> BiasChange:
    name = unique_name(graph, f"{node.output[0]}_bias")
    while len(node.input) <= index:
        node.input.append("")
    node.input[index] = name  # a bias Gemm ignored (beta = 0) is replaced, not carried over
    graph.initializer.append(numpy_helper.from_array(delta, name))
    return BiasChange(name, 0, None, True)


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """Value of attribute ``name`` of ``node``, or ``default`` when it is absent."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def node_name(node: onnx.NodeProto) -> str:
    """The node's name, or ``OpType(first output)`` for an unnamed node."""
    return node.name or f"{node.op_type}({node.output[0]})"


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """Yield ``graph`` and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(a.g)
            for g in a.graphs:
                yield from iter_graphs(g)


def clear_value_info(graph: onnx.GraphProto) -> None:
    """Drop the recorded shapes of intermediate tensors, in ``graph`` and every subgraph, and
    of the subgraphs' outputs (their channel counts may have changed; runtimes infer them)."""
    del graph.value_info[:]
    for g in list(iter_graphs(graph))[1:]:
        del g.value_info[:]
        for out in g.output:
            if out.type.HasField("tensor_type"):
                out.type.tensor_type.ClearField("shape")


def iter_initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Yield initializers of ``graph`` and of all its subgraphs."""
    for g in iter_graphs(graph):
        yield from g.initializer


def graph_input_names(graph: onnx.GraphProto) -> list[str]:
    """Names of the real inputs: graph inputs that are not also initializers."""
    inits = {t.name for t in graph.initializer}
    return [i.name for i in graph.input if i.name not in inits]


def unlist_initializer_inputs(graph: onnx.GraphProto) -> int:
    """Stop listing initializers as graph inputs (MXNet, IR < 4 habit); returns how many.

    Such an input is an overridable default, so pruning it would change the model's interface;
    unlisted, it is a plain constant. Passes that prune call this first.
    """
    inits = {t.name for t in graph.initializer}
    keep = [i for i in graph.input if i.name not in inits]
    removed = len(graph.input) - len(keep)
    if removed:
        del graph.input[:]
        graph.input.extend(keep)
    return removed


IR_UNLISTED_INITIALIZERS = 4


def allow_unlisted_initializers(model: onnx.ModelProto) -> bool:
    """Raise the IR version to 4 when some graph has an initializer it does not list as an input.

    IR < 4 requires every initializer to be a graph input as well; IR 4 drops that rule and
    changes nothing else (IR versions and opsets are independent), so the raised model is valid
    for any opset. Returns whether the version was raised.
    """
    if model.ir_version >= IR_UNLISTED_INITIALIZERS:
        return False
    for g in iter_graphs(model.graph):
        listed = {i.name for i in g.input}
        if any(t.name not in listed for t in g.initializer):
            model.ir_version = IR_UNLISTED_INITIALIZERS
            return True
    return False


def prepare_for_pruning(graph: onnx.GraphProto) -> int:
    """Make every weight of the main graph a plain constant that passes may slice: Constant
    nodes become initializers, and initializers stop being listed as graph inputs. Returns how
    many Constant nodes were lifted."""
    lifted = lift_constants(graph)
    unlist_initializer_inputs(graph)
    return lifted


def lift_constants(graph: onnx.GraphProto) -> int:
    """Turn ``Constant`` nodes holding a tensor into initializers, in this graph only.

    Returns how many were lifted. Constants inside subgraphs stay where they are (a subgraph's
    initializers are local to it; passes that look into subgraphs call this per graph).
    """
    lifted = 0
    keep = []
    taken = {t.name for t in graph.initializer}
    for node in graph.node:
        if (
            node.op_type == "Constant"
            and node.domain in ("", "ai.onnx")
            and node.output[0] not in taken
        ):
            try:
                value = onnx.numpy_helper.to_array(_constant_tensor(node))
            except ValueError:
                keep.append(node)
                continue
            graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
            lifted += 1
        else:
            keep.append(node)
    if lifted:
        del graph.node[:]
        graph.node.extend(keep)
    return lifted


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto:
    """The value of a Constant node as a TensorProto, whichever attribute holds it."""
    value = node.attribute[0] if len(node.attribute) == 1 else None
    if value is None:
        raise ValueError("Constant node without exactly one value attribute")
    name = value.name
    if name == "value":
        return value.t
    if name in ("value_float", "value_int"):
        v = value.f if name == "value_float" else value.i
        return numpy_helper.from_array(
            np.array(v, np.float32 if name == "value_float" else np.int64)
        )
    if name in ("value_floats", "value_ints"):
        v = list(value.floats) if name == "value_floats" else list(value.ints)
        return numpy_helper.from_array(
            np.array(v, np.float32 if name == "value_floats" else np.int64)
        )
    raise ValueError(f"Constant attribute {name} is not a dense tensor")


def outer_names_read_by_subgraphs(graph: onnx.GraphProto) -> set[str]:
    """Names that any subgraph of ``graph``, at any depth, reads."""
    names: set[str] = set()
    for node in graph.node:
        for a in node.attribute:
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for sub in subs:
                for g in iter_graphs(sub):
                    for n in g.node:
                        names.update(n.input)
    return names
