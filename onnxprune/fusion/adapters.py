"""Adapters: how a member reads the fused model's one input when its own input differs by layout.

Rules:
    1. A mapping is a Transpose of the fused input (axis 0, the samples axis, stays first)
       followed by removing and inserting size-1 axes (Squeeze, Unsqueeze): NCHW vs NHWC, and a
       squeezed channel axis (``[N, 8, 8]`` vs ``[N, 1, 8, 8]``) are such mappings.
    2. The candidates are the identity and, for rank 3 or more, the channels-last and
       channels-first transposes. A candidate fits when every axis but the samples axis
       matches: equal sizes, or the same dim name; a named dim against another name or a size
       is a *possible* match. Candidates that order the non-1 axes alike read the same data
       and count as one (the one with the fewest nodes stands for them).
    3. The candidate with the most sure matches wins, a sure identity before a transpose; two
       different candidates with as many sure matches are ambiguous, none fitting is
       impossible: both are one-line errors naming the member and both shapes, and the
       ``layout`` option (``MEMBER:nhwc``, ``nchw``, ``same`` or a perm ``0.2.3.1``) sets the
       mapping by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.errors import PassOptionError, UnsupportedModelError

Dims = list[int | str | None]
AXES_AS_INPUT = 13  # Squeeze/Unsqueeze take their axes as an input from opset 13
NAMED = {"same": "identity", "nchw": "channels_first", "channels_first": "channels_first"}
NAMED |= {"nhwc": "channels_last", "channels_last": "channels_last", "identity": "identity"}


@dataclass(frozen=True)
class Adapter:
    """Transpose ``perm`` (None: none), then squeeze the size-1 axes ``squeeze`` and insert
    size-1 axes at ``unsqueeze`` (positions in the member's shape)."""

    perm: tuple[int, ...] | None
    squeeze: tuple[int, ...]
    unsqueeze: tuple[int, ...]
    how: str
    assumed: bool = False  # some named dims were taken to match

    @property
    def empty(self) -> bool:
        """The member reads the fused input as it is."""
        return self.perm is None and not self.squeeze and not self.unsqueeze

    def nodes(
        self, src: str, dst: str, prefix: str, opset: int
    ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
        """The nodes (and their axes constants) that turn tensor ``src`` into ``dst``."""
        steps: list[tuple[str, tuple[int, ...]]] = []
        if self.perm is not None:
            steps.append(("Transpose", self.perm))
        if self.squeeze:
            steps.append(("Squeeze", self.squeeze))
        if self.unsqueeze:
            steps.append(("Unsqueeze", self.unsqueeze))
        nodes, inits = [], []
        current = src
        for k, (op, axes) in enumerate(steps):
            out = dst if k == len(steps) - 1 else f"{prefix}adapter_{k}"
            name = f"{prefix}adapter_{op.lower()}"
            if op == "Transpose":
                nodes.append(helper.make_node(op, [current], [out], name=name, perm=list(axes)))
            elif opset >= AXES_AS_INPUT:
                const = f"{prefix}adapter_{op.lower()}_axes"
                inits.append(numpy_helper.from_array(np.array(axes, np.int64), const))
                nodes.append(helper.make_node(op, [current, const], [out], name=name))
            else:
                nodes.append(helper.make_node(op, [current], [out], name=name, axes=list(axes)))
            current = out
        return nodes, inits


def show(dims: Dims) -> str:
    """A shape as ``[N, 1, 8, 8]`` (``?`` for an unknown dim)."""
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def layout_perms(rank: int) -> dict[str, tuple[int, ...]]:
    """The candidate transposes by name (rule 2): identity, channels-last, channels-first."""
    perms = {"identity": tuple(range(rank))}
    if rank >= 3:
        perms["channels_last"] = (0, *range(2, rank), 1)
        perms["channels_first"] = (0, rank - 1, *range(1, rank - 1))
    return perms


def _match(a: int | str | None, b: int | str | None) -> str:
    """``sure``, ``maybe`` or ``no``: whether dims ``a`` and ``b`` can be one axis."""
    if isinstance(a, int) and isinstance(b, int):
        return "sure" if a == b else "no"
    if isinstance(a, str) and a == b:
        return "sure"
    return "maybe"


def _fit(fused: Dims, member: Dims, perm: tuple[int, ...]) -> tuple[int, Adapter] | None:
    """The adapter that applies ``perm`` and then fixes size-1 axes, with its count of sure
    matches; None when the shapes cannot match that way."""
    moved = [fused[p] for p in perm]
    keep_src = [0] + [i for i in range(1, len(moved)) if moved[i] != 1]
    keep_dst = [0] + [i for i in range(1, len(member)) if member[i] != 1]
    if len(keep_src) != len(keep_dst):
        return None
    sure = 0
    maybe = False
    for i, j in zip(keep_src[1:], keep_dst[1:], strict=True):
        m = _match(moved[i], member[j])
        if m == "no":
            return None
        sure += m == "sure"
        maybe |= m == "maybe"
    if isinstance(moved[0], int) and isinstance(member[0], int) and moved[0] != member[0]:
        return None
    squeeze = tuple(i for i in range(1, len(moved)) if moved[i] == 1)
    unsqueeze = tuple(j for j in range(1, len(member)) if member[j] == 1)
    if squeeze and squeeze == unsqueeze and len(moved) == len(member):
        squeeze = unsqueeze = ()  # the size-1 axes are where the member wants them
    is_identity = perm == tuple(range(len(perm)))
    return sure, Adapter(None if is_identity else perm, squeeze, unsqueeze, "", maybe)


def _nodes(a: Adapter) -> int:
    return (a.perm is not None) + bool(a.squeeze) + bool(a.unsqueeze)


def _key(fused: Dims, perm: tuple[int, ...]) -> tuple[int, ...]:
    """What a candidate reads (rule 2): the order in which it takes the non-1 axes."""
    return tuple(p for p in perm if fused[p] != 1)


def _describe(name: str, adapter: Adapter) -> str:
    parts = []
    if adapter.perm is not None:
        label = name.replace("_", "-") + " " if name in ("channels_last", "channels_first") else ""
        parts.append(f"transpose {label}{'.'.join(map(str, adapter.perm))}")
    if adapter.squeeze:
        parts.append(f"squeeze axes {'.'.join(map(str, adapter.squeeze))}")
    if adapter.unsqueeze:
        parts.append(f"unsqueeze axes {'.'.join(map(str, adapter.unsqueeze))}")
    return ", ".join(parts) or "same"


def parse_mapping(text: str, rank: int, where: str) -> tuple[str, tuple[int, ...]]:
    """A hand-set mapping (``nhwc``, ``nchw``, ``same`` or a perm ``0.2.3.1``) as (name, perm).

    Raises:
        PassOptionError: neither a known name nor a permutation of the fused input's axes
            that keeps axis 0 first.
    """
    word = text.strip().lower()
    perms = layout_perms(rank)
    if word in NAMED and NAMED[word] in perms:
        return NAMED[word], perms[NAMED[word]]
    digits = [d for d in re.split(r"[.\-/ ]", word) if d] if not word.isdigit() else list(word)
    try:
        perm = tuple(int(d) for d in digits)
    except ValueError:
        perm = ()
    if sorted(perm) != list(range(rank)) or perm[0] != 0:
        raise PassOptionError(
            f"{where}: layout {text!r} is not nhwc, nchw, same or a permutation of the fused "
            f"input's {rank} axes that keeps axis 0 first (e.g. {'.'.join(map(str, perms.get('channels_last', range(rank))))})"
        )
    return "perm", perm


def plan_adapter(
    member: str, fused_name: str, fused: Dims, dims: Dims, manual: str | None = None
) -> Adapter:
    """The adapter member ``member`` (input shape ``dims``) needs to read the fused input
    ``fused_name`` (shape ``fused``), by the rules above; ``manual`` is the ``layout`` option's
    mapping for this member.

    Raises:
        UnsupportedModelError: no mapping fits, or two fit equally well (rule 3).
        PassOptionError: ``manual`` is not a mapping, or does not fit the shapes.
    """
    shapes = f"input {show(dims)}, fused input {fused_name!r} {show(fused)}"
    if manual is not None:
        name, perm = parse_mapping(manual, len(fused), f"pass fuse: member {member}")
        fit = _fit(fused, dims, perm)
        if fit is None:
            raise PassOptionError(
                f"pass fuse: member {member}: layout {manual!r} does not fit ({shapes})"
            )
        a = fit[1]
        return Adapter(a.perm, a.squeeze, a.unsqueeze, _describe(name, a) + " (set by hand)")
    candidates: dict[tuple[int, ...], tuple[int, bool, str, Adapter]] = {}
    for name, perm in layout_perms(len(fused)).items():
        fit = _fit(fused, dims, perm)
        if fit is None:
            continue
        key = _key(fused, perm)
        rank = (fit[0], name == "identity" and not fit[1].assumed)
        if key in candidates:  # the same data either way: the rank of the best, fewest nodes
            old = candidates[key]
            rank = max(rank, old[:2])
            if _nodes(old[3]) <= _nodes(fit[1]):
                candidates[key] = (*rank, old[2], old[3])
                continue
        candidates[key] = (*rank, name, fit[1])
    hint = f"set it by hand: layout={member}:nhwc, nchw, same or a perm like 0.2.3.1"
    if not candidates:
        raise UnsupportedModelError(
            f"pass fuse: member {member}: {shapes}: no layout change (transpose, squeezed "
            f"axis) maps one onto the other; {hint}"
        )
    ranked = sorted(candidates.values(), key=lambda c: c[:2], reverse=True)
    if len(ranked) > 1 and ranked[0][:2] == ranked[1][:2]:
        names = " or ".join(c[2].replace("_", "-") for c in ranked if c[:2] == ranked[0][:2])
        raise UnsupportedModelError(
            f"pass fuse: member {member}: {shapes}: ambiguous layout ({names} fit alike); {hint}"
        )
    _, _, name, a = ranked[0]
    how = _describe(name, a) + (" (named dims assumed equal)" if a.assumed else "")
    return Adapter(a.perm, a.squeeze, a.unsqueeze, how, a.assumed)
