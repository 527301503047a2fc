"""Shape expressions: what each element of a shape tensor computed at run time is made of.

Exports with dynamic axes build Reshape targets from the sizes of tensors at run time: torch's
legacy exporter writes ``Shape -> Gather -> Unsqueeze -> Concat`` with constants for the head
count and head size, the dynamo exporter ``Shape(start, end) -> Squeeze -> Reshape [-1] ->
Concat``; ``bsz * num_heads`` is a ``Mul`` of a size and a constant. :func:`value` evaluates a
small integer tensor, pulling back through its producers, to one :class:`Term` per element:
an integer coefficient times sizes read at run time (:class:`Dim`: axis ``a`` of tensor
``t``), with the constant elements multiplied into the coefficient kept as :class:`Leaf`
(where they come from), which fold rewrites when channels go.

Followed: initializers (integer, rank <= 1, at most :data:`MAX_ELEMENTS` elements), Shape,
Gather and Slice with constant indices and bounds, Concat, Unsqueeze, Squeeze, Reshape,
Identity, Cast to an integer type and Mul; Add, Sub, Div, Mod, Max, Min and Neg are computed
between constants and give an *opaque* term otherwise (its sizes are known, not its form).
Anything else is not followed (None).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from functools import reduce

import numpy as np
import onnx

from onnxprune.analysis.state import Analysis
from onnxprune.graph import attr, outer_names_read_by_subgraphs
from onnxprune.model import INT_TYPES

MAX_ELEMENTS = 64
"""Larger tensors are data, not shapes: they are not followed."""

Hop = tuple[int, int]
"""(index of a node in the main graph, input slot): the node reads the next tensor there."""

FOLLOWED = frozenset(
    {"Shape", "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Identity", "Cast"}
    | {"Mul", "Add", "Sub", "Div", "Mod", "Max", "Min", "Neg"}
)
"""The op types :func:`value` follows."""


@dataclass(frozen=True)
class Dim:
    """The size of axis ``axis`` of tensor ``tensor``, read at run time."""

    tensor: str
    axis: int


@dataclass(frozen=True)
class Leaf:
    """Element ``index`` (flat) of initializer ``init``, holding ``value``; ``hops`` lead from
    the tensor the term belongs to back to the node that reads ``init``."""

    hops: tuple[Hop, ...]
    init: str
    index: int
    value: int

    def key(self) -> tuple[tuple[Hop, ...], str, int]:
        """Identity of the occurrence: the same element reached the same way."""
        return self.hops, self.init, self.index


@dataclass(frozen=True)
class Term:
    """One element: ``coef`` times the product of ``dims``; ``leaves`` are the constants
    multiplied into ``coef``. An ``opaque`` term depends on ``dims`` in another way (a sum, a
    quotient): its value is not ``coef`` times them and it has no leaves to rewrite.

    ``origin``, when known, leads (hops) to the nearest one-element tensor that holds exactly
    this element, reached without a Cast: a constant of the same type can take its place.
    """

    coef: int
    dims: tuple[Dim, ...] = ()
    leaves: tuple[Leaf, ...] = ()
    opaque: bool = False
    origin: tuple[Hop, ...] | None = None

    @property
    def constant(self) -> bool:
        """Whether the element is the same number on every run."""
        return not self.dims and not self.opaque

    def times(self, other: Term) -> Term:
        """The product of two elements."""
        if self.opaque or other.opaque:
            return _opaque(self, other)
        dims = tuple(sorted(self.dims + other.dims, key=lambda d: (d.tensor, d.axis)))
        return Term(self.coef * other.coef, dims, self.leaves + other.leaves)

    def via(self, hop: Hop, cast: bool = False) -> Term:
        """The same element seen one node further on (``hop`` prepended to each leaf and to
        the origin; a Cast loses the origin)."""
        leaves = tuple(replace(f, hops=(hop, *f.hops)) for f in self.leaves)
        origin = None if cast or self.origin is None else (hop, *self.origin)
        return replace(self, leaves=leaves, origin=origin)


def _opaque(*terms: Term) -> Term:
    dims = tuple(sorted({d for t in terms for d in t.dims}, key=lambda d: (d.tensor, d.axis)))
    return Term(0, dims, (), True)


@dataclass
class Value:
    """A small integer tensor of rank 0 or 1: its shape and one term per element (None: an
    element that is not followed)."""

    shape: tuple[int, ...]
    terms: list[Term | None]

    def ints(self) -> list[int] | None:
        """The elements as numbers, when every one is a constant."""
        if any(t is None or not t.constant for t in self.terms):
            return None
        return [t.coef for t in self.terms if t is not None]


_EVALUATORS: weakref.WeakKeyDictionary[Analysis, Evaluator] = weakref.WeakKeyDictionary()


def evaluator(an: Analysis) -> Evaluator:
    """The evaluator of ``an``'s graph (one per analysis, kept while the analysis lives)."""
    ev = _EVALUATORS.get(an)
    if ev is None:
        ev = _EVALUATORS[an] = Evaluator(an)
    return ev


def value(an: Analysis, tensor: str) -> Value | None:
    """The terms of ``tensor``, or None when it is not a small integer tensor followed here."""
    return evaluator(an).value(tensor)


class Evaluator:
    """Evaluates tensors of one analysis's graph, with a cache (the graph does not change)."""

    def __init__(self, an: Analysis) -> None:
        self._an = weakref.ref(an)  # the cache must not keep the analysis alive
        self.producer: dict[str, int] = {
            out: i for i, node in enumerate(an.graph.node) for out in node.output if out
        }
        self.cache: dict[str, Value | None] = {}
        self._inner: set[str] | None = None

    @property
    def an(self) -> Analysis:
        """The analysis this cache belongs to."""
        an = self._an()
        assert an is not None
        return an

    def read_by_subgraphs(self) -> set[str]:
        """Names that any subgraph of the main graph reads (computed once)."""
        if self._inner is None:
            self._inner = outer_names_read_by_subgraphs(self.an.graph)
        return self._inner

    def value(self, tensor: str, depth: int = 0) -> Value | None:
        """See :func:`value`; ``depth`` bounds the recursion."""
        if tensor in self.cache:
            return self.cache[tensor]
        result = None
        if depth < 48:
            result = self._evaluate(tensor, depth)
        if result is not None and len(result.terms) > MAX_ELEMENTS:
            result = None
        if result is not None and len(result.terms) == 1 and result.terms[0] is not None:
            result.terms[0] = replace(result.terms[0], origin=())
        self.cache[tensor] = result
        return result

    def _evaluate(self, tensor: str, depth: int) -> Value | None:
        arr = self.an.array(tensor)
        if arr is not None:
            if arr.ndim > 1 or arr.size > MAX_ELEMENTS or not np.issubdtype(arr.dtype, np.integer):
                return None
            flat = arr.reshape(-1).tolist()
            leaves = [Term(int(v), (), (Leaf((), tensor, k, int(v)),)) for k, v in enumerate(flat)]
            return Value(tuple(arr.shape), list(leaves))
        index = self.producer.get(tensor)
        if index is None:
            return None
        node = self.an.graph.node[index]
        if node.op_type not in FOLLOWED or len(node.output) != 1:
            return None
        if node.op_type == "Shape":
            return self._shape(node)
        inputs = [self.value(t, depth + 1) if t else None for t in node.input]
        return _RULES[node.op_type](self, index, node, inputs)

    def _shape(self, node: onnx.NodeProto) -> Value | None:
        shape = self.an.shape(node.input[0])
        if shape is None:
            return None
        rank = len(shape)
        start, end, _ = slice(attr(node, "start", 0), attr(node, "end", rank)).indices(rank)
        axes = range(start, max(start, end))
        return Value((len(axes),), [Term(1, (Dim(node.input[0], a),)) for a in axes])

    def out_shape(self, node: onnx.NodeProto, size: int) -> tuple[int, ...] | None:
        """Shape of ``node``'s output when it has ``size`` elements and rank <= 1."""
        shape = self.an.shape(node.output[0])
        if shape is None or len(shape) > 1 or int(np.prod(shape, dtype=np.int64)) != size:
            return None
        return tuple(shape)


def _same(ev: Evaluator, index: int, node: onnx.NodeProto, ins: list[Value | None]) -> Value | None:
    """Identity, Unsqueeze, Squeeze, Reshape (of a shape tensor), Cast to an integer type."""
    if node.op_type == "Cast" and attr(node, "to", 0) not in INT_TYPES:
        return None
    data = ins[0]
    if data is None:
        return None
    shape = ev.out_shape(node, len(data.terms))
    if shape is None:
        return None
    cast = node.op_type == "Cast"
    return Value(shape, [t.via((index, 0), cast) if t is not None else None for t in data.terms])


def _gather(
    ev: Evaluator, index: int, node: onnx.NodeProto, ins: list[Value | None]
) -> Value | None:
    data, idx = ins[0], ins[1] if len(ins) > 1 else None
    if (
        data is None
        or idx is None
        or len(data.shape) != 1
        or int(attr(node, "axis", 0)) not in (0, -1)
    ):
        return None
    picks = idx.ints()
    n = len(data.terms)
    if picks is None or any(not -n <= p < n for p in picks):
        return None
    terms = [data.terms[p % n] for p in picks]
    return Value(idx.shape, [t.via((index, 0)) if t is not None else None for t in terms])


def _slice(
    ev: Evaluator, index: int, node: onnx.NodeProto, ins: list[Value | None]
) -> Value | None:
    data = ins[0]
    if data is None or len(data.shape) != 1 or len(node.input) < 3:
        return None
    bounds = [v.ints() if v is not None else None for v in ins[1:]]
    if any(b is None or len(b) != 1 for b in bounds[:2]):
        return None
    axes = bounds[2] if len(bounds) > 2 and node.input[3] else [0]
    steps = bounds[3] if len(bounds) > 3 and node.input[4] else [1]
    if axes not in ([0], [-1]) or steps is None or steps == [0]:
        return None
    n = len(data.terms)
    start, stop = bounds[0][0], bounds[1][0]  # type: ignore[index]
    picked = data.terms[slice(*slice(start, stop, steps[0]).indices(n))]
    return Value((len(picked),), [t.via((index, 0)) if t is not None else None for t in picked])


def _concat(
    ev: Evaluator, index: int, node: onnx.NodeProto, ins: list[Value | None]
) -> Value | None:
    if any(v is None or len(v.shape) != 1 for v in ins):
        return None
    terms: list[Term | None] = []
    for slot, v in enumerate(ins):
        assert v is not None
        terms.extend(t.via((index, slot)) if t is not None else None for t in v.terms)
    return Value((len(terms),), terms)


def _arith(
    ev: Evaluator, index: int, node: onnx.NodeProto, ins: list[Value | None]
) -> Value | None:
    """Mul keeps the product form; the other ops compute constants, else give opaque terms."""
    if any(v is None or len(v.shape) > 1 for v in ins) or not ins:
        return None
    values = [v for v in ins if v is not None]
    sizes = {len(v.terms) for v in values if v.shape}
    if len(sizes) > 1:
        return None
    n = sizes.pop() if sizes else 1
    shape = (n,) if sizes or any(v.shape for v in values) else ()
    out: list[Term | None] = []
    for k in range(n):
        terms = [v.terms[k] if v.shape else v.terms[0] for v in values]
        if any(t is None for t in terms):
            out.append(None)
            continue
        seen = [t.via((index, slot)) for slot, t in enumerate(terms) if t is not None]
        out.append(_combine(node, seen))
    return Value(shape, out)


def _combine(node: onnx.NodeProto, terms: list[Term]) -> Term | None:
    op = node.op_type
    if op == "Mul":
        return reduce(Term.times, terms)
    if not all(t.constant for t in terms):
        return _opaque(*terms)
    nums = [t.coef for t in terms]
    if op == "Neg":
        return Term(-nums[0])
    if op in ("Max", "Min"):
        return Term(max(nums) if op == "Max" else min(nums))
    a, b = nums[0], nums[1]
    if op == "Add":
        return Term(a + b)
    if op == "Sub":
        return Term(a - b)
    if b == 0:
        return None
    if op == "Div":  # integer division truncates toward zero
        q = abs(a) // abs(b)
        return Term(q if (a >= 0) == (b >= 0) else -q)
    if op == "Mod":
        return Term(int(np.fmod(a, b)) if attr(node, "fmod", 0) else a % b)
    return None


_RULES = {
    "Identity": _same,
    "Unsqueeze": _same,
    "Squeeze": _same,
    "Reshape": _same,
    "Cast": _same,
    "Gather": _gather,
    "Slice": _slice,
    "Concat": _concat,
    **{op: _arith for op in ("Mul", "Add", "Sub", "Div", "Mod", "Max", "Min", "Neg")},
}


def size_readers(an: Analysis, tensor: str, dim: Dim) -> list[str]:
    """Where the run-time size ``dim`` (first held by ``tensor``, a Shape output) goes in a way
    the analysis does not check: every node that reads it other than through the ops followed
    here or as the target (input 1) of a Reshape or Expand, a graph output, a subgraph.

    Reshape and Expand targets are checked by their own rules, entry by entry.
    """
    outputs = {o.name for o in an.graph.output}
    inner = evaluator(an).read_by_subgraphs()
    bad: list[str] = []
    todo, seen = [tensor], {tensor}
    while todo:
        t = todo.pop()
        if t in outputs or t in inner:
            bad.append(f"{t!r} leaves the graph or enters a subgraph")
        for node in an.consumers(t):
            slots = [i for i, name in enumerate(node.input) if name == t]
            if node.op_type in ("Reshape", "Expand") and slots == [1]:
                continue
            out = value(an, node.output[0]) if node.op_type in FOLLOWED and node.output else None
            if out is None or any(term is None for term in out.terms):
                bad.append(f"{node.op_type} {node.name or node.output[0]}")
                continue
            tainted = any(term is not None and dim in term.dims for term in out.terms)
            if tainted and node.output[0] not in seen:
                seen.add(node.output[0])
                todo.append(node.output[0])
    return bad
