"""Which tensors are data-independent: the same value for every input of the model.

A tensor is data-independent when it is

* an initializer;
* a small integer tensor (:mod:`.shape_expr`) whose every element is a constant or made of
  sizes the model fixes (:mod:`.static_dims`): the head size that torch's legacy export reads
  with ``Shape -> Slice`` to scale the attention scores;
* the ``Size`` of a tensor whose every axis is fixed;
* the output of a deterministic op (:data:`DETERMINISTIC`, no subgraph) whose inputs are all
  data-independent: the ``Cast -> Sqrt -> Div`` that turns that head size into the scale.

cleanup folds such tensors into initializers; until it runs, the channel analysis treats
them as constants it cannot slice (:func:`data_independent`), and names the op that computes
them (:func:`computed_by`).
"""

from __future__ import annotations

import weakref

import onnx

from onnxprune.analysis.shape_expr import value
from onnxprune.analysis.state import Analysis
from onnxprune.analysis.static_dims import fixed_axis
from onnxprune.graph import node_name

DETERMINISTIC = frozenset(
    {"Cast", "CastLike", "Identity", "Sqrt", "Reciprocal", "Neg", "Abs", "Exp", "Log", "Erf"}
    | {"Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Sum", "Mean", "Floor", "Ceil"}
    | {"Round", "Sign", "Clip", "Where", "Equal", "Less", "Greater", "LessOrEqual", "Not"}
    | {"GreaterOrEqual", "And", "Or", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Concat"}
    | {"Gather", "Slice", "Expand", "Tile", "Transpose", "ConstantOfShape", "Range"}
    | {"DequantizeLinear", "QuantizeLinear", "Sin", "Cos", "Tanh", "Sigmoid", "Relu"}
)
"""Ops whose output is a function of their inputs' values and shapes only."""

_MAX_DEPTH = 64
_CACHES: weakref.WeakKeyDictionary[Analysis, _Cache] = weakref.WeakKeyDictionary()


def data_independent(an: Analysis, tensor: str) -> bool:
    """Whether ``tensor`` holds the same value for every input (see the module docstring)."""
    cache = _CACHES.get(an)
    if cache is None:
        cache = _CACHES[an] = _Cache(an)
    return cache.known(tensor, 0)


def computed_by(an: Analysis, tensor: str) -> onnx.NodeProto | None:
    """The node of ``an``'s main graph that writes ``tensor`` (None: an input or initializer)."""
    cache = _CACHES.get(an)
    if cache is None:
        cache = _CACHES[an] = _Cache(an)
    return cache.producer.get(tensor)


def computed_constant(an: Analysis, tensor: str) -> str:
    """``per-channel constant 't' is computed by Cast c, not stored``: what cleanup folds."""
    node = computed_by(an, tensor)
    by = f" by {node.op_type} {node_name(node)}" if node is not None else ""
    return f"per-channel constant {tensor!r} is computed{by}, not stored"


class _Cache:
    def __init__(self, an: Analysis) -> None:
        self._an = weakref.ref(an)  # the cache must not keep the analysis alive
        self.producer = {o: n for n in an.graph.node for o in n.output if o}
        self.results: dict[str, bool] = {}

    @property
    def an(self) -> Analysis:
        """The analysis this cache belongs to."""
        an = self._an()
        assert an is not None
        return an

    def known(self, tensor: str, depth: int) -> bool:
        if tensor not in self.results:
            self.results[tensor] = False  # a cycle (never in a valid graph) is not known
            self.results[tensor] = depth < _MAX_DEPTH and self._known(tensor, depth + 1)
        return self.results[tensor]

    def _known(self, tensor: str, depth: int) -> bool:
        an = self.an
        if tensor in an.inits:
            return True
        node = self.producer.get(tensor)
        if node is None:
            return False  # a graph input
        if any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        ):
            return False
        if self._fixed_sizes(tensor):
            return True
        if node.op_type == "Size":
            shape = an.shape(node.input[0])
            return shape is not None and all(
                fixed_axis(an, node.input[0], a) for a in range(len(shape))
            )
        if node.op_type not in DETERMINISTIC or node.domain not in ("", "ai.onnx"):
            return False
        return all(self.known(t, depth) for t in node.input if t)

    def _fixed_sizes(self, tensor: str) -> bool:
        """A small integer tensor made of constants and fixed sizes only."""
        val = value(self.an, tensor)
        if val is None:
            return False
        for term in val.terms:
            if term is None:
                return False
            if not all(fixed_axis(self.an, d.tensor, d.axis) for d in term.dims):
                return False
        return True
