"""Rules for quantization: QuantizeLinear / DequantizeLinear of activations, and the
QOperator layers (QLinearConv, ...), which are pinned.

``QuantizeLinear``: ``q = saturate(round(x / s) + zp)``; ``DequantizeLinear``:
``x = (q - zp) * s``. Both act per element (per channel when ``s`` and ``zp`` are 1-D along
the channel axis: those are ``quant`` members, sliced with the channels; along another axis
they pin). The state rule, per channel, for one op alone:

* ZERO stays ZERO where ``zp == 0`` (``quantize(0) = 0``, ``dequantize(0) = 0``); elsewhere it
  becomes CONST (the code ``zp``, or the value ``-zp * s``);
* CONST stays CONST (a constant maps to one constant; fold reads the value from the probe);
* VAR stays VAR.

A Q -> DQ pair with the same zero point is exact for 0 whatever ``zp`` is:
``quantize(0) = zp`` and ``dequantize(zp) = 0``. So the DequantizeLinear of a QuantizeLinear's
output gets the state of the QuantizeLinear's *input* where the two zero points agree: ZERO
stays ZERO, CONST stays CONST, VAR stays VAR.

Weights behind a DequantizeLinear are constants (:mod:`onnxprune.analysis.dequant`); those
nodes have no labelled input and need no rule here.
"""

from __future__ import annotations

import weakref

import numpy as np
import onnx

from onnxprune.analysis.handlers.common import optional_input
from onnxprune.analysis.labels import Labels, State
from onnxprune.analysis.state import Analysis
from onnxprune.graph import attr

QOPERATOR = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger")
"""Layers of the QOperator format: integer arithmetic on quantized tensors, not analysed."""

QOPERATOR_REASON = "QOperator layer: quantize in QDQ format to prune"

# per analysis: QuantizeLinear output -> (its input's state, its zero point per position)
_QUANTIZED: weakref.WeakKeyDictionary[Analysis, dict[str, tuple[np.ndarray, np.ndarray]]] = (
    weakref.WeakKeyDictionary()
)


def zero_points(an: Analysis, node: onnx.NodeProto, lab: Labels) -> np.ndarray | None:
    """The zero point at each channel position of a Q/DQ node, registering per-channel scale
    and zero point as ``quant`` members; None (channels pinned) when they cannot be followed."""
    rank = len(an.shape(node.input[0]) or ())
    axis = attr(node, "axis", 1) % max(rank, 1)
    if attr(node, "block_size", 0):
        an.pin_inputs(node, "blocked quantization (block_size)")
        return None
    zp: np.ndarray = np.zeros(len(lab.ids))
    for i in (1, 2):
        name = optional_input(node, i)
        if name is None:
            continue
        arr = an.array(name)
        if arr is None:
            an.pin_inputs(node, "scale or zero point not constant")
            return None
        if arr.size > 1:
            if arr.ndim != 1 or axis != lab.axis or arr.size != len(lab.ids):
                an.pin_inputs(node, "per-axis quantization on another axis")
                return None
            an.member(node, i, 0, lab.ids, "quant")
        if i == 2:
            zp = np.broadcast_to(arr.reshape(-1).astype(np.float64), (len(lab.ids),))
    return np.asarray(zp)


def _through(state: np.ndarray, zp: np.ndarray) -> np.ndarray:
    """One Q or DQ alone: ZERO stays ZERO where the zero point is 0, else becomes CONST."""
    return np.where((state == State.ZERO) & (zp != 0), State.CONST, state).astype(np.uint8)


def quantize(an: Analysis, node: onnx.NodeProto) -> None:
    """QuantizeLinear of channels (see the module docstring for the state rule)."""
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    zp = zero_points(an, node, lab)
    if zp is None:
        return
    _QUANTIZED.setdefault(an, {})[node.output[0]] = (lab.state, zp)
    an.set_out(node.output[0], Labels(lab.axis, lab.ids, _through(lab.state, zp)))


def dequantize(an: Analysis, node: onnx.NodeProto) -> None:
    """DequantizeLinear of channels: after a QuantizeLinear with the same zero point, the
    state of that QuantizeLinear's input; else the rule of one op alone."""
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    zp = zero_points(an, node, lab)
    if zp is None:
        return
    state = _through(lab.state, zp)
    pair = _QUANTIZED.get(an, {}).get(node.input[0])
    if pair is not None:
        before, q_zp = pair
        state = np.where(q_zp == zp, before, state).astype(np.uint8)
    an.set_out(node.output[0], Labels(lab.axis, lab.ids, state))


def qoperator(an: Analysis, node: onnx.NodeProto) -> None:
    """QLinearConv, QLinearMatMul, ConvInteger, MatMulInteger: the channels that reach them
    are pinned, and their own output channels open a group that is pinned too, with the
    reason naming the op (so ``--inspect`` shows the layer and why it stays whole)."""
    why = f"{QOPERATOR_REASON} ({node.op_type})"
    an.pin_inputs(node, why)
    weight = node.input[3 if node.op_type.startswith("QLinear") else 1]
    shape = an.shape(weight)
    if not shape or len(shape) < 2:
        return
    size = shape[0] if "Conv" in node.op_type else shape[-1]
    ids = an.open_space(node, size)
    an.pin(ids, f"{node.op_type} {node.name or node.output[0]}: {why}")
    rank = len(an.shape(node.output[0]) or ())
    axis = 1 if "Conv" in node.op_type else max(rank - 1, 0)
    an.set_out(node.output[0], Labels(axis, ids, np.full(size, State.VAR)))
