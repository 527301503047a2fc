"""Rules for sizes read at run time: the Shape op, and the entries of Reshape/Expand targets.

A target is evaluated entry by entry (:mod:`onnxprune.analysis.shape_expr`), whether it is an
initializer or computed at run time (``Shape -> Gather -> Unsqueeze -> Concat``). After
channels go, every entry but the channel axis's must keep its value, and the channel axis's
must count the positions kept. A size read at run time (a :class:`Dim`, or a ``0`` that
copies one when ``allowzero`` is off) *moves* when it is the size of a channel axis whose
channels are not all pinned; since pins are known only once the walk is over, the checks
wait for :func:`settle`:

* ``-1`` is worked out by the runtime, anywhere;
* an entry that is not the channel axis's must not read a moving size, or it pins;
* on the channel axis, an entry that is exactly a moving size is right when it counts the
  same channels (they are united); else a constant factor of it, or a constant times sizes
  that do not move (``bsz * num_heads``), is rewritten: a :class:`ReshapeRewrite` when the
  target is an initializer, else a :class:`ShapeRewrite` of one constant leaf (copied on write
  by fold); an entry whose sizes the model fixes (the model width read with ``Shape``,
  :mod:`~onnxprune.analysis.static_dims`) is replaced by a constant; anything else pins;
* an entry not followed cannot hold a channel count (:func:`shape_of` pins every channel
  count that flows where no rule checks it): it pins only on the channel axis.
"""

from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.analysis.labels import ReshapeRewrite, ShapeRewrite
from onnxprune.analysis.shape_expr import Dim, Leaf, Term, size_readers, value
from onnxprune.analysis.state import Analysis
from onnxprune.analysis.static_dims import fixed_axis
from onnxprune.graph import attr, node_name


@dataclass
class TargetCheck:
    """A target waiting for :func:`settle` (``axis`` -1: the data carries no channels)."""

    node: onnx.NodeProto
    terms: list[Term | None]
    axis: int = -1
    ids: np.ndarray | None = None
    rows: np.ndarray | None = None
    reading: np.ndarray | None = None


_PENDING: weakref.WeakKeyDictionary[Analysis, list[TargetCheck]] = weakref.WeakKeyDictionary()


def shape_of(an: Analysis, node: onnx.NodeProto) -> None:
    """Shape of a labelled tensor: the channel count is a value from here on. Where it only
    flows through the ops :mod:`~onnxprune.analysis.shape_expr` follows into Reshape/Expand
    targets, their rules check it; any other reader pins the channels."""
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    dim = Dim(node.input[0], lab.axis)
    out = value(an, node.output[0])
    if out is not None and not any(t is not None and dim in t.dims for t in out.terms):
        return  # start/end leave the channel axis out
    readers = size_readers(an, node.output[0], dim)
    if readers:
        an.pin_inputs(node, f"the channel count is read at run time by {readers[0]}")


def target_terms(an: Analysis, node: onnx.NodeProto) -> list[Term | None] | None:
    """The entries of input 1 of a Reshape or Expand, seen from ``node``; a Reshape's ``0``
    (``allowzero`` off) becomes the input size it copies. None when not followed."""
    val = value(an, node.input[1]) if len(node.input) > 1 else None
    if val is None or len(val.shape) != 1:
        return None
    hop = (_index(an, node), 1)
    terms = [t.via(hop) if t is not None else None for t in val.terms]
    if node.op_type == "Reshape" and not attr(node, "allowzero", 0):
        terms = [
            Term(1, (Dim(node.input[0], e),)) if t is not None and t.constant and t.coef == 0 else t
            for e, t in enumerate(terms)
        ]
    return terms


def check_target(an: Analysis, check: TargetCheck) -> None:
    """Queue a target for :func:`settle`.

    ``check.axis`` is the entry of the output's channel axis (out of range: none), ``ids``
    the labels along it, ``rows`` the label of each of its channel positions (the other
    positions repeat them; a constant rewritten must be a multiple of their number),
    ``reading`` the labels of the channels reaching the node, pinned on a failure.
    """
    _PENDING.setdefault(an, []).append(check)


def settle(an: Analysis) -> None:
    """Decide every queued target with the walk's pins (rules in the module docstring).

    A decision may pin or unite channels, which can make other sizes fixed: the checks are
    repeated until they add nothing, and the rewrites of the last round are kept.
    """
    checks = _PENDING.pop(an, [])
    while checks:
        before = (len(an.pins), an.roots().tolist())
        moving = _Moving(an)
        rewrites = [rw for c in checks for rw in _decide(an, c, moving)]
        if (len(an.pins), an.roots().tolist()) == before:
            an.rewrites.extend(rewrites)
            return


class _Moving:
    """Which run-time sizes move: channel axes with a channel not pinned (fixed per round)."""

    def __init__(self, an: Analysis) -> None:
        self.an = an
        self.roots = an.roots()
        self.pinned = set(an.pinned_roots())

    def ids(self, d: Dim) -> np.ndarray | None:
        """Labels of the channel axis ``d`` reads, when it moves."""
        lab = self.an.labels.get(d.tensor)
        if lab is None or lab.axis != d.axis:
            return None
        free = [i for i in lab.ids[lab.ids >= 0].tolist() if int(self.roots[i]) not in self.pinned]
        return lab.ids if free else None

    def fixed(self, d: Dim) -> bool:
        """Whether ``d`` never changes: not moving, and a size the model fixes (a channel axis
        of distinct channels, or :func:`~onnxprune.analysis.static_dims.fixed_axis`)."""
        if self.ids(d) is not None:
            return False
        lab = self.an.labels.get(d.tensor)
        distinct = lab is not None and lab.axis == d.axis and (lab.ids >= 0).all()
        if distinct and lab is not None and len(np.unique(lab.ids)) == len(lab.ids):
            return True
        return fixed_axis(self.an, d.tensor, d.axis)


def _decide(an: Analysis, c: TargetCheck, moving: _Moving) -> list[ShapeRewrite | ReshapeRewrite]:
    """Pins and unions for one target now; the rewrites it needs."""
    where = f"{c.node.op_type} {node_name(c.node)}"
    reading = c.reading if c.reading is not None else np.zeros(0, np.int64)
    out: list[ShapeRewrite | ReshapeRewrite] = []
    for e, term in enumerate(c.terms):
        if term is not None and term.constant and term.coef == -1:
            continue
        reads = [ids for d in (term.dims if term else ()) if (ids := moving.ids(d)) is not None]
        if e != c.axis:
            for ids in [reading, *reads] if reads else []:
                an.pin(ids, f"{where}: entry {e} of the target reads a channel count at run time")
            continue
        assert c.ids is not None
        if term is None:
            an.pin(reading, f"{where}: the target entry of the channel axis is not followed")
        elif reads:
            if not _count_of(an, c, term, reads, where):
                an.pin(reading, f"{where}: the target entry of the channel axis mixes counts")
        elif c.node.op_type == "Expand" and term.constant and term.coef == 1:
            continue  # broadcasts: the input's size is kept
        elif (rw := _rewrite(an, c, e, term, moving)) is not None:
            out.append(rw)
        else:
            an.pin(reading, f"{where}: no constant in the target counts the channels alone")
    return out


def _count_of(
    an: Analysis, c: TargetCheck, term: Term, reads: list[np.ndarray], where: str
) -> bool:
    """An entry that is one moving channel count times sizes that do not move: right when
    those channels go with the axis's (they are united); False when that cannot hold."""
    if term.opaque or len(reads) != 1:
        return False
    why = f"{where}: its target reads the count of other channels"
    assert c.ids is not None and c.rows is not None
    if len(reads[0]) == len(c.ids):
        an.union(reads[0], c.ids, why)
    elif len(reads[0]) == len(c.rows):
        an.union(reads[0], c.rows, why)
    else:
        return False
    return True


def _rewrite(
    an: Analysis, c: TargetCheck, e: int, term: Term, moving: _Moving
) -> ShapeRewrite | ReshapeRewrite | None:
    """The rewrite of the channel axis's entry ``e`` (None: there is none)."""
    assert c.ids is not None
    node = c.node
    if an.array(node.input[1]) is not None and term.constant and term.coef == len(c.ids):
        return ReshapeRewrite(node, c.ids, e)
    assert c.rows is not None
    leaf = None if term.opaque else _leaf(term, c.terms, len(c.rows))
    if leaf is not None:
        path = [(an.graph.node[i], slot) for i, slot in leaf.hops]
        return ShapeRewrite(node, path, c.ids, leaf.init, leaf.index)
    if term.origin is not None and all(moving.fixed(d) for d in term.dims):
        path = [(an.graph.node[i], slot) for i, slot in term.origin]
        shape = an.shape(path[-1][0].input[path[-1][1]])
        if shape is not None:
            return ShapeRewrite(node, path, c.ids, None, 0, tuple(shape))
    return None


def _leaf(term: Term, terms: list[Term | None], channels: int) -> Leaf | None:
    """A leaf of ``term`` used once in the whole target, a non-zero multiple of ``channels``."""
    uses = Counter(f.key() for t in terms if t is not None for f in t.leaves)
    for f in term.leaves:
        if uses[f.key()] == 1 and f.value != 0 and f.value % channels == 0:
            return f
    return None


def _index(an: Analysis, node: onnx.NodeProto) -> int:
    """Index of ``node`` in the main graph (the walk's current node, when it is that one)."""
    nodes = an.graph.node
    if 0 <= an.current < len(nodes) and nodes[an.current] is node:
        return an.current
    return next(i for i, n in enumerate(nodes) if n is node)
