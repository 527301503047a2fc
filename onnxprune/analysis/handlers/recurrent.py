"""Rules for recurrent layers: LSTM, GRU, RNN.

The input features end here: X's channels (its last axis, in either ``layout``) are read by
the columns of W (``[directions, gates * hidden, input]``, axis 2), so X is a sink and W's
axis 2 a ``consumer`` member; the producer of X may lose output channels and W the matching
columns. The hidden size stays: it is the width of the recurrent state, which R, B, P,
``initial_h``/``initial_c`` and the outputs Y, Y_h, Y_c all share, so the outputs open one
space of ``hidden_size`` channels, pinned with :data:`HIDDEN_PINNED`.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.analysis.labels import Labels, Sink, State
from onnxprune.analysis.state import Analysis
from onnxprune.graph import attr, node_name

RECURRENT = ("LSTM", "GRU", "RNN")
"""The recurrent op types; their input bias is W's half of B (see ``graph.add_gate_bias``)."""

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
"""Gate blocks stacked on W's axis 1, per op type."""

HIDDEN_PINNED = "hidden size is part of the state interface (initial_h/initial_c, Y_h/Y_c)"

INPUT_AXIS = 2
"""X's feature axis (``[seq, batch, input]``, or ``[batch, seq, input]`` with ``layout=1``)."""

OUTPUT_AXES = (3, 2, 2)
"""The hidden axis of Y, Y_h and Y_c (the same in both layouts)."""


def recurrent(an: Analysis, node: onnx.NodeProto) -> None:
    """LSTM/GRU/RNN with a constant W: X's features end here (a sink on W's axis 2); the
    outputs' hidden channels are a new space, pinned (:data:`HIDDEN_PINNED`)."""
    w = an.array(node.input[1])
    lab = an.labels.get(node.input[0])
    state_inputs = [t for t in node.input[2:] if t in an.labels]
    if state_inputs:
        an.pin_inputs(node, HIDDEN_PINNED)  # labelled R, B, initial_h...: their sizes stay
    if lab is not None:
        if w is None or w.ndim != 3:
            an.pin(lab.ids, f"{node.op_type} {node_name(node)}: W is not a constant")
        elif lab.axis != INPUT_AXIS:
            an.pin(lab.ids, f"{node.op_type} {node_name(node)}: features are not on the last axis")
        else:
            an.member(node, 1, INPUT_AXIS, lab.ids, "consumer")
            an.sinks.append(Sink(node, node.input[0], lab, node.input[1], INPUT_AXIS))
    hidden = attr(node, "hidden_size", None)
    if hidden is None and w is not None and w.ndim == 3:
        hidden = w.shape[1] // GATES.get(node.op_type, 1)
    if not hidden:
        return
    ids = an.open_space(node, int(hidden))
    an.pin(ids, f"{node.op_type} {node_name(node)}: {node.op_type} {HIDDEN_PINNED}")
    state = np.full(len(ids), State.VAR)
    for out, axis in zip(node.output, OUTPUT_AXES, strict=False):
        shape = an.shape(out) if out else None
        if shape is not None and len(shape) > axis and shape[axis] == len(ids):
            an.set_out(out, Labels(axis, ids, state))
