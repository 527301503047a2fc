"""Free channels: those exactly zero or constant wherever they are read, so removing them costs
nothing (``fold`` removes them anyway, moving a constant into the next bias).

Without data the channel analysis proves it from the weights (a neuron whose weights and bias
are zero, a constant ``act(bias)``: ``State.ZERO`` / ``State.CONST`` at every consumer input).
With data, a channel whose activation has one value on all of it (``min == max`` at every
consumer input) counts too. Pruning passes take free channels before any live one.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from onnxprune.analysis.labels import State
from onnxprune.analysis.state import Analysis
from onnxprune.pruning.calibrate import ChannelStats


def free_mask(
    an: Analysis, classes: np.ndarray, stats: Mapping[str, ChannelStats] | None = None
) -> np.ndarray:
    """For each of ``classes`` (sorted union-find roots): True when every consumer input
    position that reads it is zero or constant (by the analysis, or by ``stats``)."""
    classes = np.asarray(classes, np.int64)
    seen = np.zeros(len(classes), bool)
    live = np.zeros(len(classes), bool)
    if not len(classes):
        return seen
    roots = an.roots()
    for sink in an.sinks:
        ids = sink.labels.ids
        valid = ids >= 0
        if not valid.any():
            continue
        r = roots[ids[valid]]
        at = np.clip(np.searchsorted(classes, r), 0, len(classes) - 1)
        mine = classes[at] == r
        if not mine.any():
            continue
        fixed = np.asarray(sink.labels.state)[valid] != State.VAR
        st = (stats or {}).get(sink.tensor)
        if st is not None and st.count > 0 and st.channels == len(ids):
            fixed = fixed | (st.min == st.max)[valid]
        seen[at[mine]] = True
        live[at[mine & ~fixed]] = True
    return seen & ~live


def free_first(scores: np.ndarray, free: np.ndarray) -> np.ndarray:
    """``scores`` (higher = keep) with every free class below every other one, each group
    keeping its own order: a voter ranks free channels first."""
    if not free.any() or free.all():
        return scores
    span = float(scores.max() - scores.min()) + 1.0  # free: at most max - span = min - 1
    return np.where(free, scores - span, scores)
