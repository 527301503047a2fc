"""The channel vocabulary: labels and value states, members, sinks, rewrites, spaces, groups.

A *space* is the channels one producer output opens; each channel has a global *channel id*.
Channel ids that must go together are united into a *channel class* (a union-find root). A
*group* is the spaces connected by classes, as users see them. A *member* is an initializer
sliced along one axis by channel ids; a *sink* is a weighted consumer where channels end; a
*rewrite* is a shape constant or attribute that counts channels; a *pin* keeps a class whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

ZERO, CONST, VAR = 0, 1, 2


@dataclass
class Labels:
    """Channel ids along one axis of a tensor (``-1`` = not a channel) and their value state."""

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
    node: str
    role: str = "param"  # weight | bias | scale | consumer | param (see Analysis.member)


@dataclass
class Sink:
    """A weighted consumer where channels end: Conv input, Gemm/MatMul rows."""

    node: onnx.NodeProto
    tensor: str
    labels: Labels
    weight: str
    weight_axis: int
    padded: bool = False


@dataclass
class Rewrite:
    """A shape constant or attribute that counts channels, to recompute after removal."""

    kind: str  # reshape | split | slice | group
    node: onnx.NodeProto
    ids: list[np.ndarray]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Space:
    """Channels opened by one producer output."""

    start: int
    size: int
    node: str
    op: str
    tensor: str


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
    """Union-find over channel ids, grown as spaces open."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, n: int) -> int:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return start

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)
