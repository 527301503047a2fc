"""Per-op rules of the channel analysis: how each op moves, joins, cuts or pins channels.

Each handler takes the :class:`~onnxprune.analysis.state.Analysis` and one node. It reads the labels
of the node's inputs and sets the labels of its outputs, registering members (constants to
slice), sinks (weighted consumers), rewrites (shape constants) and pins (with a reason).
Ops without a handler pin every channel they touch. ``HANDLERS`` maps op type to handler.
"""

from __future__ import annotations

from typing import Any

from onnxprune.analysis.handlers.elementwise import (
    BINARY,
    CONST_MAKING,
    REDUCE,
    SPATIAL_CARRIERS,
    ZERO_PRESERVING,
    _average_pool,
    _batch_norm,
    _clip,
    _const_making,
    _dequantize,
    _elementwise,
    _group_norm,
    _layer_norm,
    _reduce,
    _softmax_like,
    _spatial,
    _zero_preserving,
)
from onnxprune.analysis.handlers.layers import _conv, _conv_transpose, _gemm, _matmul
from onnxprune.analysis.handlers.shapes import (
    _concat,
    _expand,
    _flatten,
    _gather,
    _pad,
    _reshape,
    _resize,
    _slice,
    _split,
    _squeeze_like,
    _tile,
    _transpose,
)

HANDLERS: dict[str, Any] = {
    **{op: _zero_preserving for op in ZERO_PRESERVING},
    **{op: _const_making for op in CONST_MAKING},
    **{op: _spatial for op in SPATIAL_CARRIERS},
    **{op: _elementwise for op in BINARY},
    **{op: _reduce for op in REDUCE},
    "Clip": _clip,
    "AveragePool": _average_pool,
    "Softmax": _softmax_like,
    "LogSoftmax": _softmax_like,
    "Hardmax": _softmax_like,
    "LayerNormalization": _layer_norm,
    "GroupNormalization": _group_norm,
    "BatchNormalization": _batch_norm,
    "InstanceNormalization": _batch_norm,
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Transpose": _transpose,
    "Squeeze": _squeeze_like,
    "Unsqueeze": _squeeze_like,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Expand": _expand,
    "Tile": _tile,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "Pad": _pad,
    "Resize": _resize,
    "Upsample": _resize,
    "QuantizeLinear": _dequantize,
    "DequantizeLinear": _dequantize,
}
