"""Rules for ops that move, merge, split or cut the channel axis: Transpose, Squeeze,
Reshape/Flatten (heads too), Concat, Split, Slice, Gather, Pad, Resize, Expand, Tile."""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.analysis.handlers.common import _carry, _scalar
from onnxprune.analysis.labels import CONST, VAR, ZERO, Labels, Rewrite
from onnxprune.analysis.state import Analysis
from onnxprune.graph import attr as _attr
from onnxprune.graph import node_name as _name


def _transpose(an: Analysis, node: onnx.NodeProto) -> None:
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    rank = len(an.shape(node.input[0]) or ())
    perm = _attr(node, "perm", None) or list(reversed(range(rank)))
    an.set_out(node.output[0], Labels(list(perm).index(lab.axis), lab.ids, lab.state))


def _squeeze_like(an: Analysis, node: onnx.NodeProto) -> None:
    """Squeeze/Unsqueeze: find where the channel axis lands from the shapes."""
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    out_axis = _axis_after_reshape(an.shape(node.input[0]), an.shape(node.output[0]), lab.axis)
    if out_axis is None:
        an.pin_inputs(node, "cannot follow the channel axis")
        return
    an.set_out(node.output[0], Labels(out_axis, lab.ids, lab.state))


def _axis_after_reshape(
    src: tuple[int, ...] | None, dst: tuple[int, ...] | None, axis: int
) -> int | None:
    """Output axis holding input ``axis`` unchanged when only size-1 axes are added/removed."""
    if src is None or dst is None:
        return None
    before = int(np.prod(src[:axis], dtype=np.int64))
    acc = 1
    for j, d in enumerate(dst):
        if acc == before and d == src[axis]:
            return j
        acc *= d
    return None


def _merge_map(
    src: tuple[int, ...], dst: tuple[int, ...], axis: int
) -> tuple[int, int, int] | None:
    """(out_axis, first, last): input axes first..last (containing ``axis``) become out_axis.

    Holds when the elements before the block and the block itself line up in row-major order:
    prod(src[:first]) == prod(dst[:out_axis]) and prod(src[first:last+1]) == dst[out_axis].
    Among several answers (size-1 axes make ties) the smallest block is taken; all are
    equivalent for the channel labels.
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


def _reshape(an: Analysis, node: onnx.NodeProto) -> None:
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    src, dst = an.shape(node.input[0]), an.shape(node.output[0])
    if src is None or dst is None:
        an.pin_inputs(node, "shapes unknown")
        return
    if node.op_type == "Reshape" and an.array(node.input[1]) is None:
        an.pin_inputs(node, "target shape is computed at run time")
        return
    found = _merge_map(tuple(src), tuple(dst), lab.axis)
    if found is None:
        _split_reshape(an, node, tuple(src), tuple(dst), lab)
        return
    out_axis, first, last = found
    block = src[first : last + 1]
    coords = np.indices(block).reshape(len(block), -1)[lab.axis - first]
    ids, state = lab.ids[coords], lab.state[coords]
    if node.op_type == "Reshape":
        an.rewrites.append(Rewrite("reshape", node, [ids], {"axis": out_axis}))
    an.set_out(node.output[0], Labels(out_axis, ids, state))


def _split_map(src: tuple[int, ...], dst: tuple[int, ...], axis: int) -> tuple[int, int] | None:
    """(first, last): output axes first..last (two or more) that input ``axis`` splits into."""
    before = int(np.prod(src[:axis], dtype=np.int64))
    for first in range(len(dst)):
        if int(np.prod(dst[:first], dtype=np.int64)) != before:
            continue
        size = 1
        for last in range(first, len(dst)):
            size *= dst[last]
            if size == src[axis] and last > first:
                return first, last
            if size > src[axis]:
                break
    return None


_PASS_THROUGH = ("Transpose", "Unsqueeze", "Squeeze", "Identity")


def _selected_later(an: Analysis, tensor: str, axis: int, depth: int = 6) -> bool:
    """Whether every path from ``tensor`` soon picks positions of ``axis`` apart (Gather,
    Split or Slice along it) after only Transpose/Unsqueeze/Squeeze/Identity."""
    readers = an.consumers(tensor)
    if not readers or depth == 0:
        return False
    for node in readers:
        if node.op_type in ("Gather", "Split", "Slice"):
            rank = len(an.shape(tensor) or ()) or 1
            if node.op_type == "Slice":
                axes = an.array(node.input[3]) if len(node.input) > 3 and node.input[3] else None
                along = [int(a) % rank for a in axes.tolist()] if axes is not None else [0]
            else:
                along = [int(_attr(node, "axis", 0)) % rank]
            if axis not in along:
                return False
        elif node.op_type in _PASS_THROUGH:
            if node.op_type == "Transpose":
                rank = len(an.shape(tensor) or ())
                perm = list(_attr(node, "perm", None) or reversed(range(rank)))
                moved = perm.index(axis)
            else:
                moved = _axis_after_reshape(an.shape(tensor), an.shape(node.output[0]), axis)
            if moved is None or not _selected_later(an, node.output[0], moved, depth - 1):
                return False
        else:
            return False
    return True


def _split_reshape(
    an: Analysis, node: onnx.NodeProto, src: tuple[int, ...], dst: tuple[int, ...], lab: Labels
) -> None:
    """A Reshape that splits the channel axis into several (attention heads: D -> (H, d)).

    If the ids depend on one output axis only (an unflatten), that axis carries them. Else the
    axis before the innermost carries them and every position sharing its coordinate becomes
    one channel class: a head, with its q, k and v parts, goes or stays as a whole.
    """
    found = _split_map(src, dst, lab.axis)
    if found is None or node.op_type != "Reshape":
        an.pin_inputs(node, "reshapes the channel axis in a way the analysis cannot follow")
        return
    first, last = found
    block = dst[first : last + 1]
    ids, state = lab.ids.reshape(block), lab.state.reshape(block)
    for k in range(len(block)):
        moved = np.moveaxis(ids, k, 0).reshape(block[k], -1)
        if (moved == moved[:, :1]).all():  # ids constant across the other axes
            st = np.moveaxis(state, k, 0).reshape(block[k], -1).max(axis=1)
            an.rewrites.append(Rewrite("reshape", node, [moved[:, 0]], {"axis": first + k}))
            an.set_out(node.output[0], Labels(first + k, moved[:, 0], st))
            return
    k = len(block) - 2  # heads: the axis before the innermost (d) ...
    if _selected_later(an, node.output[0], first + k):
        k += 1  # ... unless it is picked apart later (q, k, v packed as [3, D]): then D
    moved = np.moveaxis(ids, k, 0).reshape(block[k], -1)
    for row in moved:
        an.union(
            np.repeat(row[:1], len(row) - 1),
            row[1:],
            f"Reshape {_name(node)}: splits channels into blocks with fixed ones",
        )
    st = np.moveaxis(state, k, 0).reshape(block[k], -1)
    head_state = np.where((st == ZERO).all(1), ZERO, np.where((st == VAR).any(1), VAR, CONST))
    an.rewrites.append(Rewrite("reshape", node, [moved[:, 0]], {"axis": first + k}))
    an.set_out(node.output[0], Labels(first + k, moved[:, 0], head_state))


def _concat(an: Analysis, node: onnx.NodeProto) -> None:
    labelled = [t for t in node.input if t in an.labels]
    if not labelled:
        return
    rank = len(an.shape(node.output[0]) or ())
    axis = _attr(node, "axis", 0) % max(rank, 1)
    if any(an.labels[t].axis != axis for t in labelled):
        first = an.labels[labelled[0]]
        if all(an.labels[t].axis == first.axis for t in labelled) and len(labelled) == len(
            node.input
        ):
            for t in labelled[1:]:
                an.union(first.ids, an.labels[t].ids, f"Concat {_name(node)}: joins channels")
            an.set_out(
                node.output[0],
                Labels(
                    first.axis, first.ids, np.maximum.reduce([an.labels[t].state for t in labelled])
                ),
            )
        else:
            an.pin_inputs(node, "concatenates along another axis than the channels")
        return
    ids, state = [], []
    for t in node.input:
        if t in an.labels:
            ids.append(an.labels[t].ids)
            state.append(an.labels[t].state)
        else:
            shape = an.shape(t)
            if shape is None:
                an.pin_inputs(node, f"shape of {t!r} unknown")
                return
            ids.append(np.full(shape[axis], -1))
            state.append(np.full(shape[axis], VAR))
    an.set_out(node.output[0], Labels(axis, np.concatenate(ids), np.concatenate(state)))


def _split(an: Analysis, node: onnx.NodeProto) -> None:
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    rank = len(an.shape(node.input[0]) or ())
    axis = _attr(node, "axis", 0) % max(rank, 1)
    if axis != lab.axis:
        for out in node.output:
            an.set_out(
                out,
                Labels(
                    _axis_after_reshape(an.shape(node.input[0]), an.shape(out), lab.axis)
                    or lab.axis,
                    lab.ids,
                    lab.state,
                ),
            )
        return
    sizes = [an.shape(o)[axis] if an.shape(o) else None for o in node.output]
    if None in sizes or sum(sizes) != len(lab.ids):
        an.pin_inputs(node, "split sizes unknown")
        return
    offsets = np.cumsum([0, *sizes])
    parts = [lab.ids[offsets[i] : offsets[i + 1]] for i in range(len(sizes))]
    for i, out in enumerate(node.output):
        an.set_out(out, Labels(axis, parts[i], lab.state[offsets[i] : offsets[i + 1]]))
    an.rewrites.append(Rewrite("split", node, parts, {"axis": axis}))


def _slice(an: Analysis, node: onnx.NodeProto) -> None:
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    consts = [an.array(t) if t else None for t in node.input[1:]]
    if len(node.input) < 3 or any(
        c is None for c, t in zip(consts, node.input[1:], strict=True) if t
    ):
        an.pin_inputs(node, "slice bounds are not constants")
        return
    rank = len(an.shape(node.input[0]) or ())
    starts, ends = consts[0].tolist(), consts[1].tolist()
    axes = (
        consts[2].tolist()
        if len(consts) > 2 and consts[2] is not None
        else list(range(len(starts)))
    )
    steps = consts[3].tolist() if len(consts) > 3 and consts[3] is not None else [1] * len(starts)
    axes = [a % rank for a in axes]
    if lab.axis not in axes:
        _carry(an, node)
        return
    k = axes.index(lab.axis)
    if steps[k] != 1:
        an.pin_inputs(node, "strided slice on the channel axis")
        return
    n = len(lab.ids)
    start, stop, _ = slice(starts[k], ends[k]).indices(n)
    an.set_out(node.output[0], Labels(lab.axis, lab.ids[start:stop], lab.state[start:stop]))
    an.rewrites.append(Rewrite("slice", node, [lab.ids], {"k": k, "start": start, "stop": stop}))


def _gather(an: Analysis, node: onnx.NodeProto) -> None:
    lab = an.labels.get(node.input[0])
    if node.input[1] in an.labels:
        an.pin_inputs(node, "channels used as indices")
        return
    if lab is None:
        return
    rank = len(an.shape(node.input[0]) or ())
    axis = _attr(node, "axis", 0) % max(rank, 1)
    idx_shape = an.shape(node.input[1])
    if axis == lab.axis or idx_shape is None:
        an.pin_inputs(node, "gathers along the channel axis")
        return
    out_axis = lab.axis if lab.axis < axis else lab.axis + len(idx_shape) - 1
    an.set_out(node.output[0], Labels(out_axis, lab.ids, lab.state))


def _pad(an: Analysis, node: onnx.NodeProto) -> None:
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    pads = an.array(node.input[1]) if len(node.input) > 1 and node.input[1] else _attr(node, "pads")
    if pads is None or (len(node.input) > 3 and node.input[3]):
        an.pin_inputs(node, "pads are not constant, or pad only some axes")
        return
    pads = np.asarray(pads).tolist()
    rank = len(pads) // 2
    if pads[lab.axis] or pads[lab.axis + rank]:
        an.pin_inputs(node, "pads the channel axis")
        return
    mode = _attr(node, "mode", b"constant")
    value = an.array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if mode in (b"constant", "constant") and (value is None or _scalar(value) == 0.0):
        _carry(an, node, lambda s: np.where(s == CONST, VAR, s))
    elif mode in (b"constant", "constant"):
        _carry(an, node, lambda s: np.where(s == ZERO, VAR, np.where(s == CONST, VAR, s)))
    else:
        _carry(an, node)


def _resize(an: Analysis, node: onnx.NodeProto) -> None:
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    src, dst = an.shape(node.input[0]), an.shape(node.output[0])
    sizes = node.input[3] if len(node.input) > 3 and node.input[3] else None
    if src is None or dst is None or src[lab.axis] != dst[lab.axis] or sizes:
        an.pin_inputs(node, "resizes the channel axis, or takes output sizes")
        return
    _carry(an, node)


def _expand(an: Analysis, node: onnx.NodeProto) -> None:
    """Expand broadcasts other axes; a shape entry that counts the channels is rewritten."""
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    target = an.array(node.input[1])
    src, dst = an.shape(node.input[0]), an.shape(node.output[0])
    if target is None or src is None or dst is None:
        an.pin_inputs(node, "target shape is computed at run time")
        return
    out_axis = lab.axis + len(dst) - len(src)
    index = out_axis - (len(dst) - len(target))
    if dst[out_axis] != src[lab.axis]:
        an.pin_inputs(node, "expands the channel axis")
        return
    if index >= 0:
        an.rewrites.append(Rewrite("reshape", node, [lab.ids], {"axis": index}))
    an.set_out(node.output[0], Labels(out_axis, lab.ids, lab.state))


def _tile(an: Analysis, node: onnx.NodeProto) -> None:
    """Tile repeating other axes carries the channels; repeating the channel axis pins them."""
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    repeats = an.array(node.input[1])
    if repeats is None or int(repeats[lab.axis]) != 1:
        an.pin_inputs(node, "repeats the channel axis, or repeats computed at run time")
        return
    _carry(an, node)


def _flatten(an: Analysis, node: onnx.NodeProto) -> None:
    _reshape(an, node)
