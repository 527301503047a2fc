"""Helpers shared by the per-op rules."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from onnxprune.analysis.labels import Labels, State
from onnxprune.analysis.state import Analysis
from onnxprune.graph import attr


def carry(
    an: Analysis, node: onnx.NodeProto, state_fn: Callable[[np.ndarray], np.ndarray] | None = None
) -> None:
    """Output 0 gets input 0's labels; state mapped by ``state_fn`` (default: unchanged)."""
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    state = state_fn(lab.state) if state_fn else lab.state
    an.set_out(node.output[0], Labels(lab.axis, lab.ids, state))


def zero_padded(state: np.ndarray) -> np.ndarray:
    """State after zero padding of other axes: the border is 0, so a constant that is not 0
    varies over positions (CONST becomes VAR); ZERO and VAR stay."""
    return np.where(state == State.CONST, State.VAR, state).astype(np.uint8)


def scalar(arr: np.ndarray) -> float:
    """The one value of a scalar or one-element array (Clip bounds may be either)."""
    return float(np.asarray(arr).reshape(-1)[0])


def broadcast_axis(out_rank: int, in_rank: int, out_axis: int) -> int:
    """Axis of an input of rank ``in_rank`` that broadcasts onto ``out_axis``, or -1."""
    axis = out_axis - (out_rank - in_rank)
    return axis if axis >= 0 else -1


def zero_pads(node: onnx.NodeProto) -> bool:
    """Whether a Conv/pool node pads its input (explicit pads, or SAME auto-padding)."""
    pads = attr(node, "pads", []) or []
    auto = attr(node, "auto_pad", b"NOTSET")
    return any(pads) or auto not in (b"NOTSET", b"VALID", "NOTSET", "VALID")


def optional_input(node: onnx.NodeProto, index: int) -> str | None:
    """Name of input ``index`` of ``node``, or None when it is absent or empty."""
    return node.input[index] if len(node.input) > index and node.input[index] else None
