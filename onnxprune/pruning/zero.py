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
from onnxprune.graph import iter_graphs, mapped, tensor_array
from onnxprune.runtime import puts_apart
from onnxprune.scratch import Writer


def random_classes(an: Analysis, share: float, seed: int = 0) -> set[int]:
    """A random ``share`` of the unpinned classes of every group (never a whole tensor)."""
    rng = np.random.default_rng(seed)
    chosen = {r for r in unpinned_classes(an) if rng.random() < share}
    return keep_one_per_tensor(an, chosen)


def zero_classes(model: onnx.ModelProto, an: Analysis, classes: Iterable[int]) -> int:
    """Zero, in ``model`` (the one ``an`` analysed, or a copy of it), every producing slice of
    ``classes``, one tensor at a time.

    A tensor of the analysed model itself that stays in its file (:func:`onnxprune.graph.mapped`),
    in a model whose sessions take the weights from files (:func:`onnxprune.runtime.puts_apart`),
    gets its zeroed value written once into a scratch file (:mod:`onnxprune.scratch`) and is read
    from there mapped: no in-memory copy of the weights stays. Returns the number of
    initializer entries set to zero.
    """
    roots = an.roots()
    chosen = np.array(sorted(set(classes)), dtype=np.int64)
    quantized = {name: d.data for name, d in an.dequantized.items()}
    consumer = {(quantized.get(s.weight, s.weight), s.weight_axis) for s in an.sinks}

    def value(name: str) -> np.ndarray:
        return tensor_array(an.inits[name])

    cuts: dict[str, list[tuple[int, np.ndarray]]] = {}
    zeroed = 0
    for m in an.members:
        if (m.init, m.axis) in consumer or m.role == "quant":
            continue
        gone = chosen_positions(roots, m.ids, chosen)
        if not gone.any():
            continue
        cuts.setdefault(m.init, []).append((m.axis, np.flatnonzero(gone)))
        dims = [int(d) for d in an.inits[m.init].dims]
        zeroed += int(gone.sum() * int(np.prod(dims)) // max(1, dims[m.axis]))
    targets: dict[str, list[onnx.TensorProto]] = {}
    for g in iter_graphs(model.graph):  # an If branch's own weights too
        for t in g.initializer:
            if t.name in cuts:
                targets.setdefault(t.name, []).append(t)
    with Writer(puts_apart(model)) as scratch:
        for name, axes in cuts.items():
            if name not in targets:
                continue
            arr = np.array(tensor_array(an.inits[name]))  # this tensor only
            for axis, pos in axes:
                index: list[slice | np.ndarray] = [slice(None)] * arr.ndim
                index[axis] = pos
                d = an.quantized_data.get(name)
                arr[tuple(index)] = 0 if d is None else zero_code(d, value, axis, pos)
            for target in targets[name]:
                if scratch.active and mapped(target) and an.inits.get(name) is target:
                    scratch.put(target, arr)
                else:
                    target.CopyFrom(numpy_helper.from_array(arr, name))
            del arr
    return zeroed
