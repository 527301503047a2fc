"""Write zeros: prune channel classes by zeroing every slice that produces them.

This is the contract between passes: a pruning pass zeroes, :mod:`onnxprune.passes.fold`
removes. Consumer rows (the weights that read a channel) are left alone; every other member
slice of a zeroed class (weights, biases, BN scale and shift, per-channel constants) is set
to 0, so the channel is exactly zero wherever it is read. A quantized weight or bias (behind a
DequantizeLinear) gets its zero point, which dequantizes to exactly 0; the scales and zero
points themselves (role ``quant``) are left alone.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.analysis.dequant import zero_code
from onnxprune.analysis.groups import chosen_positions, keep_one_per_tensor, unpinned_classes
from onnxprune.analysis.state import Analysis
from onnxprune.graph import iter_graphs, tensor_array


def random_classes(an: Analysis, share: float, seed: int = 0) -> set[int]:
    """A random ``share`` of the unpinned classes of every group (never a whole tensor)."""
    rng = np.random.default_rng(seed)
    chosen = {r for r in unpinned_classes(an) if rng.random() < share}
    return keep_one_per_tensor(an, chosen)


def zero_classes(model: onnx.ModelProto, an: Analysis, classes: Iterable[int]) -> int:
    """Zero, in ``model`` (the one ``an`` analysed), every producing slice of ``classes``.

    Returns the number of initializer entries set to zero.
    """
    roots = an.roots()
    chosen = np.array(sorted(set(classes)), dtype=np.int64)
    quantized = {name: d.data for name, d in an.dequantized.items()}
    consumer = {(quantized.get(s.weight, s.weight), s.weight_axis) for s in an.sinks}
    arrays: dict[str, np.ndarray] = {}

    def value(name: str) -> np.ndarray:
        return arrays[name] if name in arrays else tensor_array(an.inits[name])

    zeroed = 0
    for m in an.members:
        if (m.init, m.axis) in consumer or m.role == "quant":
            continue
        gone = chosen_positions(roots, m.ids, chosen)
        if not gone.any():
            continue
        if m.init not in arrays:
            arrays[m.init] = np.array(tensor_array(an.inits[m.init]))
        index: list[slice | np.ndarray] = [slice(None)] * arrays[m.init].ndim
        pos = np.flatnonzero(gone)
        index[m.axis] = pos
        d = an.quantized_data.get(m.init)
        arrays[m.init][tuple(index)] = 0 if d is None else zero_code(d, value, m.axis, pos)
        zeroed += int(gone.sum() * arrays[m.init].size // max(1, arrays[m.init].shape[m.axis]))
    for g in iter_graphs(model.graph):  # an If branch's own weights too
        for i, t in enumerate(g.initializer):
            if t.name in arrays:
                g.initializer[i].CopyFrom(numpy_helper.from_array(arrays[t.name], t.name))
    return zeroed
