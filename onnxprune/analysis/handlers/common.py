"""Helpers shared by the per-op rules."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from onnxprune.analysis.labels import Labels
from onnxprune.analysis.state import Analysis
from onnxprune.graph import attr as _attr


def _carry(an: Analysis, node: onnx.NodeProto, state_fn: Any = None) -> None:
    """Output 0 gets input 0's labels; state mapped by ``state_fn`` (default: unchanged)."""
    lab = an.labels.get(node.input[0])
    if lab is None:
        return
    state = state_fn(lab.state) if state_fn else lab.state
    an.set_out(node.output[0], Labels(lab.axis, lab.ids, state))


def _scalar(arr: np.ndarray) -> float:
    """The one value of a scalar or one-element array (Clip bounds may be either)."""
    return float(np.asarray(arr).reshape(-1)[0])


def _broadcast_axis(out_rank: int, in_rank: int, out_axis: int) -> int:
    """Axis of an input of rank ``in_rank`` that broadcasts onto ``out_axis``, or -1."""
    axis = out_axis - (out_rank - in_rank)
    return axis if axis >= 0 else -1


def _zero_pads(node: onnx.NodeProto) -> bool:
    """Whether a Conv/pool node pads its input (explicit pads, or SAME auto-padding)."""
    pads = _attr(node, "pads", []) or []
    auto = _attr(node, "auto_pad", b"NOTSET")
    return any(pads) or auto not in (b"NOTSET", b"VALID", "NOTSET", "VALID")
