"""What a graph says about its inputs beyond their declared types: sizes of symbolic dims, ranges.

Synthetic inputs must fit the model. A declared shape ``[B, D]`` says nothing about ``D``, but the
graph often does: ``MatMul(x, W)`` with ``W`` of shape ``[8, 5]`` needs ``D = 8``. The rules read
each input's consumers (through shape-keeping ops such as Relu or Cast):

1. MatMul, Gemm: the contracted axis has the weight's size.
2. Conv (input channels = weight channels x group), ConvTranspose, BatchNormalization,
   InstanceNormalization: axis 1 has the weight's (or scale's) size.
3. LayerNormalization and elementwise ops with a constant operand: the axes the constant does
   not broadcast over (right-aligned) have its sizes.
4. Gather of a constant table: integer indices stay below the table's size on that axis.
5. LabelEncoder, CategoryMapper: strings come from their vocabulary.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import onnx

from onnxprune.graph import attr

_SHAPE_KEEPING = frozenset(
    (
        "Abs", "Cast", "Ceil", "Clip", "Dropout", "Elu", "Erf", "Exp", "Floor", "Gelu",
        "HardSigmoid", "HardSwish", "Identity", "LeakyRelu", "Log", "Mish", "Neg", "Not",
        "Reciprocal", "Relu", "Round", "Selu", "Sigmoid", "Sign", "Sin", "Cos", "Softplus",
        "Softsign", "Sqrt", "Tanh", "ThresholdedRelu",
    )
)  # fmt: skip
_ELEMENTWISE = frozenset(("Add", "Sub", "Mul", "Div", "Pow", "PRelu", "Max", "Min", "Where"))
_MAX_DEPTH = 8


@dataclass
class InputHints:
    """Sizes for some axes of each input (``dims[input][axis]``), integer bounds, vocabularies."""

    dims: dict[str, dict[int, int]] = field(default_factory=lambda: defaultdict(dict))
    int_high: dict[str, int] = field(default_factory=dict)
    strings: dict[str, list[str]] = field(default_factory=dict)


def input_hints(model: onnx.ModelProto, ranks: dict[str, int]) -> InputHints:
    """Apply rules 1-5 to each input named in ``ranks`` (input name -> declared rank)."""
    graph = model.graph
    consts = {t.name: list(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = list(node.attribute[0].t.dims)
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in dict.fromkeys(node.input):
            readers[name].append(node)
    hints = InputHints()
    for name, rank in ranks.items():
        _follow(name, name, rank, readers, consts, hints, 0)
    return hints


def _follow(
    source: str,
    tensor: str,
    rank: int,
    readers: dict[str, list[onnx.NodeProto]],
    consts: dict[str, list[int]],
    hints: InputHints,
    depth: int,
) -> None:
    """Record what the readers of ``tensor`` (``source`` itself, or a same-shape copy) need."""
    if depth > _MAX_DEPTH:
        return
    dims = hints.dims[source]

    def need(axis: int, size: int) -> None:
        if 0 <= axis < rank and size > 0:
            dims.setdefault(axis, size)

    for node in readers.get(tensor, []):
        op, ins = node.op_type, list(node.input)
        other = [consts.get(i) for i in ins]
        if op in _SHAPE_KEEPING and ins[0] == tensor:
            _follow(source, node.output[0], rank, readers, consts, hints, depth + 1)
        elif op in _ELEMENTWISE and len(ins) >= 2:
            shapes = [s for i, s in zip(ins, other, strict=True) if i != tensor and s is not None]
            if len(shapes) == len(ins) - 1 and all(len(s) <= rank for s in shapes):
                for s in shapes:
                    for k, size in enumerate(s):
                        if size > 1:
                            need(rank - len(s) + k, size)
                _follow(source, node.output[0], rank, readers, consts, hints, depth + 1)
        elif op == "MatMul" and len(ins) == 2:
            if ins[0] == tensor and other[1] is not None and other[1]:
                need(rank - 1, other[1][-2] if len(other[1]) >= 2 else other[1][0])
            elif ins[1] == tensor and other[0] is not None and len(other[0]) >= 2 and rank >= 2:
                need(rank - 2, other[0][-1])
        elif op == "Gemm" and ins[0] == tensor and len(ins) > 1 and other[1] is not None:
            w = other[1]
            if len(w) == 2:
                need(0 if attr(node, "transA", 0) else 1, w[1] if attr(node, "transB", 0) else w[0])
        elif op in ("Conv", "ConvTranspose") and ins[0] == tensor and other[1] is not None:
            w = other[1]
            if len(w) >= 2:
                need(1, w[1] * attr(node, "group", 1) if op == "Conv" else w[0])
        elif op in ("BatchNormalization", "InstanceNormalization") and ins[0] == tensor:
            if other[1] is not None and len(other[1]) == 1:
                need(1, other[1][0])
        elif op == "LayerNormalization" and ins[0] == tensor and other[1] is not None:
            s = other[1]
            for k, size in enumerate(s):
                if size > 1 and len(s) <= rank:
                    need(rank - len(s) + k, size)
        elif op == "Gather" and len(ins) == 2 and ins[1] == tensor and other[0] is not None:
            table = other[0]
            axis = attr(node, "axis", 0)
            if table and -len(table) <= axis < len(table) and table[axis] > 0:
                bound = table[axis]
                hints.int_high[source] = min(hints.int_high.get(source, bound), bound)
        elif op == "LabelEncoder" and ins[0] == tensor:
            words = [s.decode() for s in attr(node, "keys_strings", []) or []]
            if words:
                hints.strings.setdefault(source, words)
        elif op == "CategoryMapper" and ins[0] == tensor:
            words = [s.decode() for s in attr(node, "cats_strings", []) or []]
            if words:
                hints.strings.setdefault(source, words)
