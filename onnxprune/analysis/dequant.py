"""Constants stored quantized: the output of a DequantizeLinear whose inputs are initializers.

A QDQ model keeps each weight as an int8/uint8 (a bias as int32) initializer ``q`` behind a
DequantizeLinear with a scale ``s`` and zero point ``zp``, per tensor (scalars) or per channel
(1-D along the node's ``axis``): the weight is ``s * (q - zp)``. The analysis reads it as that
float constant; slicing it along an axis slices ``q``, and ``s`` and ``zp`` too when they are
per channel along that axis (a per-tensor one, or one per channel of another axis, stays).
A position is exactly 0 where ``q == zp``: that is the code :func:`zero_code` writes.
Blocked quantization (``block_size``) is not read: those weights stay unanalysed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.analysis.labels import Member, Role

ArrayGetter = Callable[[str], np.ndarray]


@dataclass(frozen=True)
class Dequantized:
    """A DequantizeLinear of initializers: ``output = scale * (data - zero_point)``.

    Attributes:
        node_index: the DequantizeLinear's index in the main graph.
        output: the float tensor it makes (what the weighted layer reads).
        data, scale, zero_point: the initializers (``zero_point`` None: 0).
        axis: the axis of ``data`` that per-channel scale and zero point follow; None when
            they are per tensor.
    """

    node_index: int
    output: str
    data: str
    scale: str
    zero_point: str | None
    axis: int | None


def find_dequantized(
    graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto]
) -> dict[str, Dequantized]:
    """Output name -> :class:`Dequantized`, for every DequantizeLinear of the default domain
    whose inputs are all initializers (not blocked, scale a scalar or a 1-D vector)."""
    out: dict[str, Dequantized] = {}
    for i, node in enumerate(graph.node):
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        names = [n for n in node.input if n]
        if len(node.input) < 2 or any(n not in inits for n in names):
            continue
        if any(a.name == "block_size" and a.i for a in node.attribute):
            continue
        data, scale = inits[node.input[0]], inits[node.input[1]]
        scale_size = int(np.prod(scale.dims)) if scale.dims else 1
        axis: int | None = None
        if len(scale.dims) == 1 and scale_size > 1:
            rank = max(len(data.dims), 1)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % rank
        elif scale_size != 1:
            continue
        zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
        out[node.output[0]] = Dequantized(i, node.output[0], node.input[0], node.input[1], zp, axis)
    return out


def _along(arr: np.ndarray, axis: int | None, rank: int) -> np.ndarray:
    """A scale or zero point shaped to broadcast over data of ``rank``."""
    if axis is None:
        return np.asarray(arr).reshape(())
    shape = [1] * rank
    shape[axis] = -1
    return np.asarray(arr).reshape(shape)


def dequantize(d: Dequantized, get: ArrayGetter) -> np.ndarray:
    """The real value ``scale * (data - zero_point)`` (in the scale's float type): exactly 0
    where ``data == zero_point``."""
    q = np.asarray(get(d.data))
    scale = np.asarray(get(d.scale))
    zp = np.asarray(get(d.zero_point)) if d.zero_point else np.zeros((), np.int64)
    real = (q.astype(np.float64) - _along(zp, d.axis, q.ndim).astype(np.float64)) * _along(
        scale, d.axis, q.ndim
    ).astype(np.float64)
    return real.astype(scale.dtype)


def zero_points(d: Dequantized, get: ArrayGetter) -> np.ndarray:
    """The zero point of every element of ``d``'s data, broadcastable over it (0 without one):
    the code that dequantizes to exactly 0."""
    rank = len(np.shape(get(d.data)))
    if d.zero_point is None:
        return np.zeros((), np.asarray(get(d.data)).dtype)
    return _along(np.asarray(get(d.zero_point)), d.axis, rank)


def zero_code(d: Dequantized, get: ArrayGetter, axis: int, positions: np.ndarray) -> np.ndarray:
    """What to write into ``data`` at ``positions`` of ``axis`` so those slices dequantize to
    exactly 0: the zero point (0 without one), shaped to broadcast over the selected slices."""
    rank = len(np.shape(get(d.data)))
    if d.zero_point is None:
        return np.zeros((), np.int64)
    zp = np.asarray(get(d.zero_point))
    if d.axis is None:
        return zp.reshape(())
    if d.axis == axis:
        zp = zp.reshape(-1)[positions]
    return _along(zp, d.axis, rank)


def quantized_members(
    d: Dequantized, axis: int, ids: np.ndarray, role: Role
) -> list[tuple[Member, int]]:
    """The members that slice ``d``'s output along ``axis``: its data (with ``role``), and its
    scale and zero point (role ``quant``) when they are per channel along ``axis``; each with
    the DequantizeLinear input slot it is read at."""
    out = [(Member(d.data, axis, ids, role), 0)]
    if d.axis == axis:
        out.append((Member(d.scale, 0, ids, "quant"), 1))
        if d.zero_point:
            out.append((Member(d.zero_point, 0, ids, "quant"), 2))
    return out
