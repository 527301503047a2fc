"""The channel vocabulary: value states, labels, members, sinks, rewrites, spaces, groups.

A *space* is the channels one producer output opens; each channel has a global *channel id*.
Channel ids that must go together are united into a *channel class* (a union-find root, typed
:data:`ClassId`). A *group* is the spaces connected by classes, as users see them. A *member*
is an initializer sliced along one axis by channel ids; a *sink* is a weighted consumer where
channels end; a *rewrite* is a shape constant or attribute that counts channels; a *pin*
keeps a class whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar, Literal, NewType

import numpy as np
import onnx

ClassId = NewType("ClassId", int)
"""A channel class: the union-find root of channel ids that are removed together."""

Role = Literal["weight", "bias", "scale", "consumer", "param", "quant"]
"""What a member slice is to its channel (see :meth:`Analysis.member`)."""

RewriteKind = Literal["reshape", "split", "slice", "group", "shape"]


class State(IntEnum):
    """What the analysis knows of a channel's value at one position of a tensor.

    ``ZERO``: provably 0 for every input. ``CONST``: one value for every input and position,
    independent of the data (fold reads it from the probe run). ``VAR``: anything else.
    Label arrays hold these as ``uint8``; the numeric order is the order of knowledge, so a
    value that may be either of two states has their :meth:`join`, the larger.
    """

    ZERO = 0
    CONST = 1
    VAR = 2

    @staticmethod
    def join(*states: Any) -> np.ndarray:
        """Per position, the least upper bound: VAR if any is VAR, else CONST if any is
        CONST, else ZERO. Arguments broadcast (arrays, or a single ``State``)."""
        out = np.asarray(states[0], dtype=np.uint8)
        for s in states[1:]:
            out = np.maximum(out, np.asarray(s, dtype=np.uint8))
        return out

    @staticmethod
    def join_along(states: np.ndarray, axis: int) -> np.ndarray:
        """:meth:`join` of the states along ``axis`` (positions that become one)."""
        return np.asarray(states, dtype=np.uint8).max(axis=axis)

    @staticmethod
    def product(*states: Any) -> np.ndarray:
        """State of a product of factors: ZERO where any factor is ZERO (zero absorbs),
        else their :meth:`join`."""
        joined = State.join(*states)
        any_zero = np.zeros(joined.shape, bool)
        for s in states:
            any_zero |= np.asarray(s) == State.ZERO
        return np.where(any_zero, State.ZERO, joined).astype(np.uint8)

    @staticmethod
    def of_constant(zero: Any) -> np.ndarray:
        """State of a constant (a bias, a fill value): ZERO where ``zero`` holds, else CONST."""
        return np.where(zero, State.ZERO, State.CONST).astype(np.uint8)


@dataclass
class Labels:
    """Channel ids along one axis of a tensor (``-1`` = not a channel) and their :class:`State`."""

    axis: int
    ids: np.ndarray
    state: np.ndarray

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=np.int64)
        self.state = np.asarray(self.state, dtype=np.uint8)


@dataclass
class Member:
    """An initializer sliced along ``axis`` by channel ids (one id per position)."""

    init: str
    axis: int
    ids: np.ndarray
    role: Role = "param"


@dataclass
class Sink:
    """A weighted consumer where channels end: Conv input, Gemm/MatMul rows."""

    node: onnx.NodeProto
    tensor: str
    labels: Labels
    weight: str
    weight_axis: int
    padded: bool = False
    scope: str = ""  # the If branch it sits in ("If name then_branch"); "" in the main graph


@dataclass
class GroupRewrite:
    """The ``group`` attribute of a grouped Conv: it counts the kept ids of ``ids``."""

    kind: ClassVar[RewriteKind] = "group"
    node: onnx.NodeProto
    ids: np.ndarray


@dataclass
class ReshapeRewrite:
    """Entry ``axis`` of a Reshape/Expand shape constant (input 1): it counts ``ids``."""

    kind: ClassVar[RewriteKind] = "reshape"
    node: onnx.NodeProto
    ids: np.ndarray
    axis: int


@dataclass
class SplitRewrite:
    """The split sizes of a Split along the channel axis: output ``i`` counts ``parts[i]``."""

    kind: ClassVar[RewriteKind] = "split"
    node: onnx.NodeProto
    parts: list[np.ndarray]


@dataclass
class SliceRewrite:
    """Entry ``k`` of a Slice's starts/ends: positions ``start:stop`` of ``ids`` are kept."""

    kind: ClassVar[RewriteKind] = "slice"
    node: onnx.NodeProto
    ids: np.ndarray
    k: int
    start: int
    stop: int


@dataclass
class ShapeRewrite:
    """A part of a Reshape/Expand target computed at run time (``Shape -> Gather -> Concat``)
    that counts ``ids``: the entry of the axis that holds them, or a constant factor of it.

    ``path`` is the (node, input slot) chain from the Reshape/Expand (slot 1) to the tensor
    replaced. With ``init``, that tensor is an initializer whose element ``index`` (the head
    count, or ``H * d``) scales with the share of ``ids`` kept; without, it is a tensor of
    ``shape`` holding the entry itself (a channel count read with Shape), replaced by the
    count kept. Fold gives the chain its own copy (copy-on-write): other readers of the
    constant, or of any node on the way, keep their values.
    """

    kind: ClassVar[RewriteKind] = "shape"
    node: onnx.NodeProto
    path: list[tuple[onnx.NodeProto, int]]
    ids: np.ndarray
    init: str | None
    index: int = 0
    shape: tuple[int, ...] = ()


Rewrite = GroupRewrite | ReshapeRewrite | SplitRewrite | SliceRewrite | ShapeRewrite
"""A shape constant or attribute that counts channels, to recompute after removal."""


@dataclass
class Space:
    """Channels ``start .. start + size - 1`` opened by one producer output."""

    start: int
    size: int
    node: str
    op: str


@dataclass
class ChannelGroup:
    """Connected spaces: channels that must be removed together, as users see them."""

    index: int
    spaces: list[Space]
    channels: int
    pinned: int
    reasons: list[str]
    members: list[str]
    macs: int = 0

    @property
    def prunable(self) -> bool:
        """Whether any channel of the group may be removed."""
        return self.pinned < self.channels

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description."""
        return {
            "index": self.index,
            "channels": self.channels,
            "pinned": self.pinned,
            "prunable": self.prunable,
            "producers": [f"{s.op} {s.node} ({s.size})" for s in self.spaces],
            "members": self.members,
            "macs": self.macs,
            "reasons": self.reasons,
        }


class UnionFind:
    """Union-find over channel ids, grown as spaces open; a root is its class's smallest id."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self._roots: np.ndarray | None = None  # roots() until the next add or union

    def add(self, n: int) -> int:
        """Add ``n`` ids, each its own class; returns the first."""
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self._roots = None
        return start

    def find(self, x: int) -> int:
        """The root of ``x``; every id on the way is re-pointed at it (path compression)."""
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while x != root:
            up = self.parent[x]
            self.parent[x] = root
            x = up
        return root

    def union(self, a: int, b: int) -> None:
        """Put ``a`` and ``b`` in one class (the smaller root stays root)."""
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)
            self._roots = None

    def roots(self) -> np.ndarray:
        """The root of every id, as an array indexed by id (computed once per state of the
        classes, by pointer jumping: a parent is never a larger id; read-only)."""
        if self._roots is None or len(self._roots) != len(self.parent):
            up = np.array(self.parent, dtype=np.int64)
            while True:
                nxt = up[up]
                if np.array_equal(nxt, up):
                    break
                up = nxt
            up.flags.writeable = False
            self._roots = up
        return self._roots
