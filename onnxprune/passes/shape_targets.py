"""Fold's rewrite of Reshape/Expand targets computed at run time (:class:`ShapeRewrite`).

The tensor a rewrite replaces (a constant factor of the channel axis's entry, or the entry
itself) may be shared: by other targets (dynamo exports share ``[8]`` or a whole ``Concat``
between the q, k and v reshapes) or by entries that must keep their value. So the new value
goes into a fresh initializer and every node on the way from it to the Reshape/Expand is
copied (copy-on-write); originals nothing reads any more are then dropped.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.analysis.labels import ShapeRewrite
from onnxprune.errors import InternalError
from onnxprune.graph import get_init, outer_names_read_by_subgraphs, unique_name


def rewrite_shape_target(
    graph: onnx.GraphProto, rw: ShapeRewrite, kept: int
) -> list[onnx.NodeProto]:
    """Give ``rw``'s tensor its value when ``kept`` of its ids stay, copy-on-write.

    The constant and every node on ``rw.path`` get a copy (inserted after the original) that
    only ``rw.node`` reads, so other readers keep their values; returns the originals passed
    over, for :func:`remove_dead`.
    """
    if rw.init is None:  # the entry itself, a channel count: now the count kept
        if kept == len(rw.ids):
            return []
        arr = np.full(rw.shape, kept, np.int64)
        base = rw.path[-1][0].input[rw.path[-1][1]]
    else:  # a constant factor of the entry: scaled by the share kept
        arr = get_init(graph, rw.init).copy()
        old = int(arr.flat[rw.index])
        new, rest = divmod(old * kept, len(rw.ids))
        if rest:
            raise InternalError(f"shape constant {rw.init!r}[{rw.index}] does not scale exactly")
        if new == old:
            return []
        arr.flat[rw.index] = new
        base = rw.init
    current = unique_name(graph, f"{base}_folded")
    graph.initializer.append(numpy_helper.from_array(arr, current))
    passed = []
    for h in range(len(rw.path) - 1, 0, -1):
        node, slot = rw.path[h]
        reader, reader_slot = rw.path[h - 1]
        clone = onnx.NodeProto()
        clone.CopyFrom(node)
        clone.input[slot] = current
        for k, out in enumerate(node.output):
            clone.output[k] = unique_name(graph, f"{out}_folded")
        if node.name:
            taken = {n.name for n in graph.node}
            clone.name = next(
                name
                for k in range(len(taken) + 1)
                if (name := f"{node.name}_folded" + (f"_{k}" if k else "")) not in taken
            )
        graph.node.insert(list(graph.node).index(node) + 1, clone)
        current = clone.output[list(node.output).index(reader.input[reader_slot])]
        passed.append(node)
    reader, reader_slot = rw.path[0]
    reader.input[reader_slot] = current
    return passed


def remove_dead(graph: onnx.GraphProto, candidates: list[onnx.NodeProto]) -> None:
    """Drop those of ``candidates`` whose outputs nothing reads any more (nodes, graph
    outputs, subgraphs), repeating while that frees more."""
    candidates = list({id(n): n for n in candidates}.values())
    changed = True
    while changed and candidates:
        changed = False
        read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        read |= outer_names_read_by_subgraphs(graph)
        for node in list(candidates):
            if not any(o in read for o in node.output if o):
                graph.node.remove(node)
                candidates.remove(node)
                changed = True
