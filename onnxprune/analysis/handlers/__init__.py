"""Per-op rules of the channel analysis: how each op moves, joins, cuts or pins channels.

A :data:`Handler` takes the :class:`~onnxprune.analysis.state.Analysis` and one node. It reads
the labels of the node's inputs and sets the labels of its outputs, registering members
(constants to slice), sinks (weighted consumers), rewrites (shape constants) and pins (with a
reason). Ops without a handler pin every channel they touch.

``HANDLERS`` maps a key to the handler: the op type for the default ONNX domain (``"Relu"``),
``"domain::OpType"`` for any other (``"com.example::FusedAct"``); :func:`handler_key` builds
it. A plugin teaches the analysis its own op with :func:`register_handler`, at import time::

    from onnxprune import register_handler
    from onnxprune.analysis.handlers.elementwise import zero_preserving

    register_handler("com.example::FusedRelu")(zero_preserving)  # f(0) = 0, per element

    @register_handler("com.example::Scale")
    def scale(an, node): ...
"""

from __future__ import annotations

from collections.abc import Callable

import onnx

from onnxprune.analysis.handlers import (
    elementwise,
    layers,
    quantized,
    recurrent,
    reshape,
    shapes,
    targets,
)
from onnxprune.analysis.state import Analysis
from onnxprune.errors import OnnxPruneError

Handler = Callable[[Analysis, onnx.NodeProto], None]
"""A per-op rule: reads ``node``'s input labels in the analysis and sets its outputs'."""

HANDLERS: dict[str, Handler] = {}

DEFAULT_DOMAINS = ("", "ai.onnx")


def is_default_domain(domain: str) -> bool:
    """Whether ``domain`` names the standard ONNX operator set."""
    return domain in DEFAULT_DOMAINS


def handler_key(op_type: str, domain: str = "") -> str:
    """The ``HANDLERS`` key of an op: ``op_type``, or ``"domain::op_type"`` outside ONNX."""
    return op_type if is_default_domain(domain) else f"{domain}::{op_type}"


def _normalised(key: str) -> str:
    domain, sep, op_type = key.rpartition("::")
    if not op_type or (sep and not domain):
        raise OnnxPruneError(f"handler key {key!r}: expected 'OpType' or 'domain::OpType'")
    return handler_key(op_type, domain)


def register_handler(*op_types: str) -> Callable[[Handler], Handler]:
    """Decorator: ``fn(an, node)`` becomes the rule for each of ``op_types``.

    Each is an op type of the default domain (``"Relu"``) or ``"domain::OpType"``.
    Registering the same function again is allowed.

    Raises:
        OnnxPruneError: no op type, a malformed one, or one that has another handler.
    """
    if not op_types:
        raise OnnxPruneError("register_handler needs at least one op type")
    keys = [_normalised(op) for op in op_types]

    def wrap(fn: Handler) -> Handler:
        for key in keys:
            existing = HANDLERS.get(key)
            if existing is not None and existing is not fn:
                raise OnnxPruneError(
                    f"op {key!r} has two channel-analysis handlers: {_origin(existing)} and "
                    f"{_origin(fn)}"
                )
        for key in keys:
            HANDLERS[key] = fn
        return fn

    return wrap


def _origin(fn: Handler) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


BUILTIN: dict[Handler, tuple[str, ...]] = {
    elementwise.zero_preserving: tuple(sorted(elementwise.ZERO_PRESERVING)),
    elementwise.const_making: tuple(sorted(elementwise.CONST_MAKING)),
    elementwise.spatial: tuple(sorted(elementwise.SPATIAL_CARRIERS)),
    elementwise.elementwise: tuple(sorted(elementwise.BINARY)),
    elementwise.reduce: tuple(sorted(elementwise.REDUCE)),
    elementwise.clip: ("Clip",),
    elementwise.average_pool: ("AveragePool",),
    elementwise.softmax_like: ("Softmax", "LogSoftmax", "Hardmax"),
    elementwise.layer_norm: ("LayerNormalization",),
    elementwise.group_norm: ("GroupNormalization",),
    elementwise.batch_norm: ("BatchNormalization", "InstanceNormalization"),
    quantized.quantize: ("QuantizeLinear",),
    quantized.dequantize: ("DequantizeLinear",),
    quantized.qoperator: quantized.QOPERATOR,
    layers.conv: ("Conv",),
    layers.conv_transpose: ("ConvTranspose",),
    layers.gemm: ("Gemm",),
    layers.matmul: ("MatMul",),
    recurrent.recurrent: recurrent.RECURRENT,
    shapes.transpose: ("Transpose",),
    shapes.squeeze_like: ("Squeeze", "Unsqueeze"),
    reshape.reshape: ("Reshape", "Flatten"),
    targets.shape_of: ("Shape",),
    shapes.expand: ("Expand",),
    shapes.tile: ("Tile",),
    shapes.concat: ("Concat",),
    shapes.split: ("Split",),
    shapes.slice_: ("Slice",),
    shapes.gather: ("Gather",),
    shapes.pad: ("Pad",),
    shapes.resize: ("Resize", "Upsample"),
}
"""The built-in rules and the op types each serves."""


def _register_builtins() -> None:
    for fn, op_types in BUILTIN.items():
        register_handler(*op_types)(fn)


_register_builtins()
