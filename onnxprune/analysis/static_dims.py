"""Which tensor axes have a size the model fixes: the same for every input.

A Reshape target may read the model width at run time (``query.shape[2]`` in torch's
legacy export of attention). Where that size is fixed by the model, the entry can be replaced
by the constant the pruned model needs. An axis is fixed when, followed back through its
producers, it comes from a weight or a declared input size:

* initializers; graph inputs where the size is declared as a number;
* ops that keep the shape (activations, normalisations, Cast...): the same axis of input 0;
* broadcasting elementwise ops: a fixed size > 1 on that axis of any input;
* Transpose (through ``perm``), MatMul (rows of A, columns of B, broadcast batch axes), Gemm,
  Conv (output channels);
* Reshape: an entry of the target (:mod:`.shape_expr`) that is a positive constant or made
  of fixed sizes only, or a ``0`` copying a fixed axis.

Anything else is not known to be fixed.
"""

from __future__ import annotations

import weakref

import onnx

from onnxprune.analysis.shape_expr import value
from onnxprune.analysis.state import Analysis
from onnxprune.graph import attr

_KEEP_SHAPE = frozenset(
    {"Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Gelu", "Erf", "Sqrt", "Exp", "Log"}
    | {"Neg", "Abs", "Identity", "Cast", "Softmax", "LogSoftmax", "LayerNormalization"}
    | {"BatchNormalization", "InstanceNormalization", "GroupNormalization", "Dropout", "Clip"}
    | {"HardSigmoid", "HardSwish", "Mish", "Softplus", "Elu", "Selu", "Celu", "Reciprocal"}
    | {"Floor", "Ceil", "Round", "Sign", "QuantizeLinear", "DequantizeLinear", "Softsign"}
)
_BROADCAST = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mod", "Where", "Sum"})

_CACHES: weakref.WeakKeyDictionary[Analysis, _Fixed] = weakref.WeakKeyDictionary()


def fixed_axis(an: Analysis, tensor: str, axis: int) -> bool:
    """Whether axis ``axis`` of ``tensor`` has the same size for every input of the model."""
    cache = _CACHES.get(an)
    if cache is None:
        cache = _CACHES[an] = _Fixed(an)
    return cache.fixed(tensor, axis, 0)


class _Fixed:
    def __init__(self, an: Analysis) -> None:
        self._an = weakref.ref(an)  # the cache must not keep the analysis alive
        self.producer = {o: n for n in an.graph.node for o in n.output if o}
        self.inputs = {i.name: i for i in an.graph.input}
        self.cache: dict[tuple[str, int], bool] = {}

    @property
    def an(self) -> Analysis:
        """The analysis this cache belongs to."""
        an = self._an()
        assert an is not None
        return an

    def fixed(self, tensor: str, axis: int, depth: int) -> bool:
        shape = self.an.shape(tensor)
        if shape is None or not -len(shape) <= axis < len(shape):
            return False
        key = (tensor, axis % len(shape))
        if key not in self.cache:
            self.cache[key] = depth < 200 and self._fixed(tensor, key[1], len(shape), depth + 1)
        return self.cache[key]

    def _fixed(self, tensor: str, axis: int, rank: int, depth: int) -> bool:
        if tensor in self.an.inits:
            return True
        if tensor in self.inputs:
            dims = self.inputs[tensor].type.tensor_type.shape.dim
            return (
                axis < len(dims) and dims[axis].HasField("dim_value") and dims[axis].dim_value > 0
            )
        node = self.producer.get(tensor)
        if node is None:
            return False
        op, ins = node.op_type, list(node.input)
        if op in _KEEP_SHAPE:
            return self.fixed(ins[0], axis, depth)
        if op in _BROADCAST:
            return any(self._broadcast(t, axis, rank, depth) for t in ins if t)
        if op == "Transpose":
            perm = attr(node, "perm", None) or list(reversed(range(rank)))
            return self.fixed(ins[0], int(perm[axis]), depth)
        if op == "MatMul":
            return self._matmul(ins, axis, rank, depth)
        if op == "Gemm":
            if axis == 0:
                return self.fixed(ins[0], 1 if attr(node, "transA", 0) else 0, depth)
            return self.fixed(ins[1], 0 if attr(node, "transB", 0) else 1, depth)
        if op == "Conv":
            return axis == 1 and self.fixed(ins[1], 0, depth)
        if op == "Reshape":
            return self._reshape(node, axis, depth)
        return False

    def _broadcast(self, tensor: str, axis: int, rank: int, depth: int) -> bool:
        shape = self.an.shape(tensor)
        if shape is None:
            return False
        k = axis - (rank - len(shape))
        return k >= 0 and shape[k] > 1 and self.fixed(tensor, k, depth)

    def _matmul(self, ins: list[str], axis: int, rank: int, depth: int) -> bool:
        a, b = self.an.shape(ins[0]), self.an.shape(ins[1])
        if a is None or b is None or len(a) < 2 or len(b) < 2:
            return False
        if axis == rank - 1:
            return self.fixed(ins[1], len(b) - 1, depth)
        if axis == rank - 2:
            return self.fixed(ins[0], len(a) - 2, depth)
        return any(self._broadcast(t, axis, rank, depth) for t in ins[:2])  # batch axes

    def _reshape(self, node: onnx.NodeProto, axis: int, depth: int) -> bool:
        target = value(self.an, node.input[1])
        if target is None or axis >= len(target.terms):
            return False
        term = target.terms[axis]
        if term is None:
            return False
        if term.constant and term.coef == 0:
            return not attr(node, "allowzero", 0) and self.fixed(node.input[0], axis, depth)
        if term.constant:
            return term.coef > 0
        return all(self.fixed(d.tensor, d.axis, depth) for d in term.dims)
