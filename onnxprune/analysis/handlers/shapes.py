"""Rules for ops that move, split or cut the channel axis: Transpose, Squeeze, Concat, Split,
Slice, Gather, Pad, Resize, Expand, Tile (Reshape/Flatten: :mod:`.reshape`)."""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.analysis.handlers.common import carry, optional_input, scalar, zero_padded
from onnxprune.analysis.handlers.targets import TargetCheck, check_target, target_terms
from onnxprune.analysis.labels import Labels, SliceRewrite, SplitRewrite, State
from onnxprune.analysis.state import Analysis
from onnxprune.graph import attr, node_name


def transpose(an: Analysis, node: onnx.NodeProto) -> None:
    """Transpose moves the channel axis to where ``perm`` puts it; ids and states stay."""
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    rank = len(an.shape(node.input[0]) or ())
    perm = attr(node, "perm", None) or list(reversed(range(rank)))
    an.set_out(node.output[0], Labels(list(perm).index(lab.axis), lab.ids, lab.state))


def squeeze_like(an: Analysis, node: onnx.NodeProto) -> None:
    """Squeeze/Unsqueeze keep the channels; where the axis lands is read from the shapes
    (:func:`axis_after_reshape`), and pins when it cannot be."""
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    out_axis = axis_after_reshape(an.shape(node.input[0]), an.shape(node.output[0]), lab.axis)
    if out_axis is None:
        an.pin_inputs(node, "cannot follow the channel axis")
        return
    an.set_out(node.output[0], Labels(out_axis, lab.ids, lab.state))


def axis_after_reshape(
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


_PASS_THROUGH = ("Transpose", "Unsqueeze", "Squeeze", "Identity")


def selected_later(an: Analysis, tensor: str, axis: int, depth: int = 6) -> bool:
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
                along = [int(attr(node, "axis", 0)) % rank]
            if axis not in along:
                return False
        elif node.op_type in _PASS_THROUGH:
            moved: int | None
            if node.op_type == "Transpose":
                rank = len(an.shape(tensor) or ())
                perm = list(attr(node, "perm", None) or reversed(range(rank)))
                moved = perm.index(axis)
            else:
                moved = axis_after_reshape(an.shape(tensor), an.shape(node.output[0]), axis)
            if moved is None or not selected_later(an, node.output[0], moved, depth - 1):
                return False
        else:
            return False
    return True


def concat(an: Analysis, node: onnx.NodeProto) -> None:
    """Concat along the channel axis appends ids (an unlabelled input adds ``-1`` positions,
    VAR). When every input carries channels on one other axis, they are united and the state
    is their :meth:`State.join`; any other mix pins."""
    labelled = [t for t in node.input if t in an.labels]
    if not labelled:
        return
    rank = len(an.shape(node.output[0]) or ())
    axis = attr(node, "axis", 0) % max(rank, 1)
    if any(an.labels[t].axis != axis for t in labelled):
        first = an.labels[labelled[0]]
        if all(an.labels[t].axis == first.axis for t in labelled) and len(labelled) == len(
            node.input
        ):
            for t in labelled[1:]:
                an.union(first.ids, an.labels[t].ids, f"Concat {node_name(node)}: joins channels")
            state = State.join(*(an.labels[t].state for t in labelled))
            an.set_out(node.output[0], Labels(first.axis, first.ids, state))
        else:
            an.pin_inputs(node, "concatenates along another axis than the channels")
        return
    ids: list[np.ndarray] = []
    states: list[np.ndarray] = []
    for t in node.input:
        if t in an.labels:
            ids.append(an.labels[t].ids)
            states.append(an.labels[t].state)
        else:
            shape = an.shape(t)
            if shape is None:
                an.pin_inputs(node, f"shape of {t!r} unknown")
                return
            ids.append(np.full(shape[axis], -1))
            states.append(np.full(shape[axis], State.VAR))
    an.set_out(node.output[0], Labels(axis, np.concatenate(ids), np.concatenate(states)))


def split(an: Analysis, node: onnx.NodeProto) -> None:
    """Split along another axis keeps the rank: every output has the input's labels. Along
    the channel axis each output gets its part of the ids, and the split sizes are rewritten."""
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    rank = len(an.shape(node.input[0]) or ())
    axis = attr(node, "axis", 0) % max(rank, 1)
    if axis != lab.axis:
        for out in node.output:
            an.set_out(out, Labels(lab.axis, lab.ids, lab.state))
        return
    sizes = []
    for out in node.output:
        shape = an.shape(out)
        if not shape:
            an.pin_inputs(node, "split sizes unknown")
            return
        sizes.append(shape[axis])
    if sum(sizes) != len(lab.ids):
        an.pin_inputs(node, "split sizes unknown")
        return
    offsets = np.cumsum([0, *sizes])
    parts = [lab.ids[offsets[i] : offsets[i + 1]] for i in range(len(sizes))]
    for i, out in enumerate(node.output):
        an.set_out(out, Labels(axis, parts[i], lab.state[offsets[i] : offsets[i + 1]]))
    an.rewrites.append(SplitRewrite(node, parts))


def slice_(an: Analysis, node: onnx.NodeProto) -> None:
    """Slice with constant bounds: along other axes it carries the channels; along the
    channel axis (step 1) the output keeps the sliced ids and the bounds are rewritten.
    Computed bounds, or a strided slice of the channels, pin."""
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    consts = [an.array(t) if t else None for t in node.input[1:]]
    given = [c for c, t in zip(consts, node.input[1:], strict=True) if t]
    starts_c, ends_c = (consts[0], consts[1]) if len(consts) >= 2 else (None, None)
    if starts_c is None or ends_c is None or any(c is None for c in given):
        an.pin_inputs(node, "slice bounds are not constants")
        return
    axes_c = consts[2] if len(consts) > 2 else None
    steps_c = consts[3] if len(consts) > 3 else None
    rank = len(an.shape(node.input[0]) or ())
    starts, ends = starts_c.tolist(), ends_c.tolist()
    axes = axes_c.tolist() if axes_c is not None else list(range(len(starts)))
    steps = steps_c.tolist() if steps_c is not None else [1] * len(starts)
    axes = [a % rank for a in axes]
    if lab.axis not in axes:
        carry(an, node)
        return
    k = axes.index(lab.axis)
    if steps[k] != 1:
        an.pin_inputs(node, "strided slice on the channel axis")
        return
    n = len(lab.ids)
    start, stop, _ = slice(starts[k], ends[k]).indices(n)
    an.set_out(node.output[0], Labels(lab.axis, lab.ids[start:stop], lab.state[start:stop]))
    an.rewrites.append(SliceRewrite(node, lab.ids, k, start, stop))


def gather(an: Analysis, node: onnx.NodeProto) -> None:
    """Gather along another axis carries the channels (the axis shifts by the indices' rank
    minus one when it comes after); along the channel axis, or with channels as indices, pins."""
    lab = an.labels.get(node.input[0])
    if node.input[1] in an.labels:
        an.pin_inputs(node, "channels used as indices")
        return
    if lab is None:
        return
    rank = len(an.shape(node.input[0]) or ())
    axis = attr(node, "axis", 0) % max(rank, 1)
    idx_shape = an.shape(node.input[1])
    if axis == lab.axis or idx_shape is None:
        an.pin_inputs(node, "gathers along the channel axis")
        return
    out_axis = lab.axis if lab.axis < axis else lab.axis + len(idx_shape) - 1
    an.set_out(node.output[0], Labels(out_axis, lab.ids, lab.state))


def pad(an: Analysis, node: onnx.NodeProto) -> None:
    """Pad of other axes carries the channels. Constant 0 padding makes a constant vary at
    the border (:func:`zero_padded`); a non-zero pad value makes every state VAR; edge and
    reflect padding keep them. Padding the channel axis, or computed pads, pin."""
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    pads_input = optional_input(node, 1)
    pads = an.array(pads_input) if pads_input is not None else attr(node, "pads")
    if pads is None or optional_input(node, 3) is not None:
        an.pin_inputs(node, "pads are not constant, or pad only some axes")
        return
    pads = np.asarray(pads).tolist()
    rank = len(pads) // 2
    if pads[lab.axis] or pads[lab.axis + rank]:
        an.pin_inputs(node, "pads the channel axis")
        return
    mode = attr(node, "mode", b"constant")
    value_input = optional_input(node, 2)
    value = an.array(value_input) if value_input is not None else None
    if mode in (b"constant", "constant") and (value is None or scalar(value) == 0.0):
        carry(an, node, zero_padded)
    elif mode in (b"constant", "constant"):
        carry(an, node, lambda s: np.full_like(s, State.VAR))
    else:
        carry(an, node)


def resize(an: Analysis, node: onnx.NodeProto) -> None:
    """Resize/Upsample of other axes carries the channels; resizing the channel axis, or
    output sizes given as an input, pin."""
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    src, dst = an.shape(node.input[0]), an.shape(node.output[0])
    sizes = optional_input(node, 3)
    if src is None or dst is None or src[lab.axis] != dst[lab.axis] or sizes:
        an.pin_inputs(node, "resizes the channel axis, or takes output sizes")
        return
    carry(an, node)


def expand(an: Analysis, node: onnx.NodeProto) -> None:
    """Expand broadcasts other axes; the target entry of the channel axis is 1, or counts
    the channels (rewritten); a target computed at run time is checked entry by entry
    (:func:`~onnxprune.analysis.handlers.targets.check_target`)."""
    lab = an.labels.get(node.input[0])
    terms = target_terms(an, node)
    src, dst = an.shape(node.input[0]), an.shape(node.output[0])
    check = TargetCheck(node, terms) if terms is not None else None  # channel counts read
    if lab is None:
        pass
    elif terms is None or src is None or dst is None:
        an.pin_inputs(node, "target shape is computed by ops the analysis does not follow")
    elif dst[out_axis := lab.axis + len(dst) - len(src)] != src[lab.axis]:
        an.pin_inputs(node, "expands the channel axis")
    else:
        index = out_axis - (len(dst) - len(terms))
        check = TargetCheck(node, terms, index, lab.ids, lab.ids, lab.ids)
        an.set_out(node.output[0], Labels(out_axis, lab.ids, lab.state))
    if check is not None:
        check_target(an, check)


def tile(an: Analysis, node: onnx.NodeProto) -> None:
    """Tile repeating other axes carries the channels; repeating the channel axis pins them."""
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    repeats = an.array(node.input[1])
    if repeats is None or int(repeats[lab.axis]) != 1:
        an.pin_inputs(node, "repeats the channel axis, or repeats computed at run time")
        return
    carry(an, node)
