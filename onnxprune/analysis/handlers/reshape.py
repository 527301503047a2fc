"""The Reshape/Flatten rule: where the channel axis lands when a reshape merges, splits or
regroups it (attention heads, ``bsz * num_heads``), and which target entries count it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.analysis.handlers.shapes import selected_later
from onnxprune.analysis.handlers.targets import TargetCheck, check_target, target_terms
from onnxprune.analysis.labels import Labels, State
from onnxprune.analysis.state import Analysis
from onnxprune.graph import attr, node_name


@dataclass
class Landing:
    """Where a reshape puts the channels: output axis, its labels, and the label of each
    channel position on it (``rows``; the other positions repeat them over other sizes)."""

    axis: int
    ids: np.ndarray
    rows: np.ndarray


def reshape(an: Analysis, node: onnx.NodeProto) -> None:
    """Reshape/Flatten: the channel axis is followed by :func:`land`; every entry of a
    Reshape's target, constant or computed at run time, is checked and the ones counting the
    channels are rewritten (:mod:`~onnxprune.analysis.handlers.targets`)."""
    lab = an.labels.get(node.input[0])
    terms = target_terms(an, node) if node.op_type == "Reshape" else None
    if lab is None:
        if terms is not None:
            check_target(an, TargetCheck(node, terms))
        return
    src, dst = an.shape(node.input[0]), an.shape(node.output[0])
    landing = None
    if src is None or dst is None:
        an.pin_inputs(node, "shapes unknown")
    elif node.op_type == "Reshape" and terms is None:
        an.pin_inputs(node, "target shape is computed by ops the analysis does not follow")
    else:
        landing = land(an, node, tuple(src), tuple(dst), lab)
    if terms is None:
        return
    if landing is None:  # the channels are pinned; other channel counts read must be too
        check_target(an, TargetCheck(node, terms))
    else:
        check_target(an, TargetCheck(node, terms, landing.axis, landing.ids, landing.rows, lab.ids))


def prefix_products(shape: tuple[int, ...]) -> list[int]:
    """``[1, s0, s0*s1, ...]``: the number of elements before each axis, in row-major order."""
    out = [1]
    for d in shape:
        out.append(out[-1] * d)
    return out


def factor_blocks(
    src: tuple[int, ...], dst: tuple[int, ...], axis: int
) -> tuple[list[int], tuple[int, int], dict[int, tuple[int, int]]] | None:
    """The common refinement of ``src`` and ``dst`` around input ``axis``.

    The window is the narrowest range of elements bounded on both sides by an axis boundary
    of both shapes that holds ``axis``; inside it every boundary of either shape cuts it into
    factors (outer to inner), which must divide each other. An output axis that holds part of
    ``axis`` may hold other input axes too (``bsz * num_heads``), but only whole ones: a
    piece of another axis would make the landing depend on the sizes seen. Returns the
    factor sizes, the factor range of ``axis`` and that of each output axis of size > 1
    inside the window; None when there is no such refinement or ``axis`` has size 1.
    """
    if any(d < 1 for d in (*src, *dst)) or src[axis] == 1:
        return None
    psrc, pdst = prefix_products(src), prefix_products(dst)
    if psrc[-1] != pdst[-1]:
        return None
    common = set(psrc) & set(pdst)
    lo = max(c for c in common if c <= psrc[axis])
    hi = min(c for c in common if c >= psrc[axis + 1])
    bounds = sorted({b for b in psrc + pdst if lo <= b <= hi})
    if any(b % a for a, b in zip(bounds, bounds[1:], strict=False)):
        return None
    factors = [b // a for a, b in zip(bounds, bounds[1:], strict=False)]
    pos = {b: i for i, b in enumerate(bounds)}
    out_axes = {
        j: (pos[pdst[j]], pos[pdst[j + 1]])
        for j in range(len(dst))
        if dst[j] > 1 and lo <= pdst[j] and pdst[j + 1] <= hi
    }
    c0, c1 = pos[psrc[axis]], pos[psrc[axis + 1]]
    whole = {pos[b] for b in psrc if lo <= b <= hi}
    for a, b in out_axes.values():
        if max(a, c0) < min(b, c1) and ((a < c0 and a not in whole) or (b > c1 and b not in whole)):
            return None
    return factors, (c0, c1), out_axes


def land(
    an: Analysis, node: onnx.NodeProto, src: tuple[int, ...], dst: tuple[int, ...], lab: Labels
) -> Landing | None:
    """Label the output of a reshape of the channel axis; None (and a pin) when it cannot.

    The channel axis is cut into the parts that land on different output axes
    (:func:`factor_blocks`). One part: the channels merge with neighbours (Flatten), each id
    spread over its block. Several: if the ids depend on one part only (an unflatten), that
    axis carries them; else the part before the innermost carries them and every position
    sharing its coordinate becomes one channel class: a head, with its q, k and v parts, goes
    or stays as a whole (the innermost but one, when that axis is picked apart later: q, k, v
    packed as ``[3, D]``). An output axis may also hold other sizes (``bsz * num_heads``):
    its labels repeat the channel part's over them.
    """
    found = factor_blocks(src, dst, lab.axis)
    if found is None:
        return _size_one(an, node, src, dst, lab)
    factors, (c0, c1), out_axes = found
    parts = [
        (j, max(a, c0), min(b, c1))
        for j, (a, b) in sorted(out_axes.items())
        if max(a, c0) < min(b, c1)
    ]
    if len(parts) > 1 and node.op_type != "Reshape":
        an.pin_inputs(node, "reshapes the channel axis in a way the analysis cannot follow")
        return None
    block = [int(np.prod(factors[g0:g1])) for _, g0, g1 in parts]
    ids, state = lab.ids.reshape(block), lab.state.reshape(block)
    k = _carrier(an, node, ids, [j for j, _, _ in parts])
    moved = np.moveaxis(ids, k, 0).reshape(block[k], -1)
    if not (moved == moved[:, :1]).all():
        for row in moved:
            an.union(
                np.repeat(row[:1], len(row) - 1),
                row[1:],
                f"Reshape {node_name(node)}: splits channels into blocks with fixed ones",
            )
    row_state = State.join_along(np.moveaxis(state, k, 0).reshape(block[k], -1), axis=1)
    out_axis, g0, g1 = parts[k]
    a, b = out_axes[out_axis]
    coords = np.indices(factors[a:b]).reshape(b - a, -1)[g0 - a : g1 - a]
    rows = np.ravel_multi_index(tuple(coords), factors[g0:g1])
    out_ids, out_state = moved[rows, 0], row_state[rows]
    an.set_out(node.output[0], Labels(out_axis, out_ids, out_state))
    return Landing(out_axis, out_ids, moved[:, 0])


def _carrier(an: Analysis, node: onnx.NodeProto, ids: np.ndarray, axes: list[int]) -> int:
    """Which part carries the labels (see :func:`land`); a channel shuffle's inner part
    (:func:`shuffle_rows`)."""
    for k in range(ids.ndim):
        moved = np.moveaxis(ids, k, 0).reshape(ids.shape[k], -1)
        if (moved == moved[:, :1]).all():  # ids constant across the other parts
            return k
    if ids.ndim == 2 and is_shuffle(an, node, axes):
        shuffle_rows(an, node, ids)
        return 1
    k = ids.ndim - 2  # heads: the part before the innermost (d) ...
    if selected_later(an, node.output[0], axes[k]):
        k += 1  # ... unless it is picked apart later (q, k, v packed as [3, D]): then D
    return k


def is_shuffle(an: Analysis, node: onnx.NodeProto, axes: list[int]) -> bool:
    """Whether ``node`` splits the channels into ``[g, C/g]`` on adjacent axes that every
    reader swaps with a Transpose: a channel shuffle (ShuffleNet)."""
    readers = an.consumers(node.output[0])
    if len(axes) != 2 or axes[1] != axes[0] + 1 or not readers:
        return False
    rank = len(an.shape(node.output[0]) or ())
    swap = list(range(rank))
    swap[axes[0]], swap[axes[1]] = axes[1], axes[0]
    outputs = {o.name for o in an.graph.output}
    return node.output[0] not in outputs and all(
        r.op_type == "Transpose" and list(attr(r, "perm", None) or ()) == swap for r in readers
    )


def shuffle_rows(an: Analysis, node: onnx.NodeProto, ids: np.ndarray) -> None:
    """A channel shuffle ``[g, m] -> [m, g]`` is a permutation of the channels: its label is
    the inner position ``j`` and the ``g`` channels of each column go together, so every row
    keeps ``m'`` of them and the shuffle stays a shuffle. When the rows are already whole
    classes (the groups of a grouped Conv before it), the columns join them all: pinned, named."""
    roots = an.roots()
    if ids.shape[0] > 1 and all(len(np.unique(roots[row[row >= 0]])) == 1 for row in ids):
        an.pin(
            ids,
            f"Reshape {node_name(node)}: channel shuffle of whole groups (a grouped Conv "
            f"before it prunes whole groups, which the shuffle spreads over every group); "
            f"equal numbers per group are not supported",
        )


def merge_map(src: tuple[int, ...], dst: tuple[int, ...], axis: int) -> tuple[int, int, int] | None:
    """(out_axis, first, last): input axes first..last (containing ``axis``) become out_axis.

    Holds when the elements before the block and the block itself line up in row-major order:
    prod(src[:first]) == prod(dst[:out_axis]) and prod(src[first:last+1]) == dst[out_axis].
    Among several answers (size-1 axes make ties) the smallest block is taken.
    """
    best = None
    for j in range(len(dst)):
        before = int(np.prod(dst[:j], dtype=np.int64))
        for first in range(axis, -1, -1):
            if int(np.prod(src[:first], dtype=np.int64)) != before:
                continue
            for last in range(axis, len(src)):
                size = int(np.prod(src[first : last + 1], dtype=np.int64))
                if size == dst[j] and (best is None or last - first < best[2] - best[1]):
                    best = (j, first, last)
                if size > dst[j]:
                    break
    return best


def _size_one(
    an: Analysis, node: onnx.NodeProto, src: tuple[int, ...], dst: tuple[int, ...], lab: Labels
) -> Landing | None:
    """A channel axis of size 1 merges with neighbours as :func:`merge_map` finds; any other
    reshape without a refinement pins."""
    found = merge_map(src, dst, lab.axis) if src[lab.axis] == 1 else None
    if found is None:
        an.pin_inputs(node, "reshapes the channel axis in a way the analysis cannot follow")
        return None
    out_axis, first, last = found
    block = src[first : last + 1]
    coords = np.indices(block).reshape(len(block), -1)[lab.axis - first]
    ids, state = lab.ids[coords], lab.state[coords]
    an.set_out(node.output[0], Labels(out_axis, ids, state))
    return Landing(out_axis, ids, lab.ids)
