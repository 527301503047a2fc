"""One onnxruntime run with every intermediate tensor exposed: concrete shapes and values.

Channel analysis needs concrete shapes (to follow Reshape/Flatten) and fold needs the value of
each constant channel where it is used. Both come from one run on a small synthetic batch;
when onnxruntime cannot run the model, shapes fall back to onnx shape inference and no values
are known (fold then removes only channels it can prove exactly zero).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.cost import infer_shapes
from onnxprune.data import fixed_batch, synthesize
from onnxprune.errors import DataError, PassFailedError
from onnxprune.runtime import CPU, run_model, session


@dataclass
class Probe:
    """Shapes of every main-graph tensor, and values where a run succeeded."""

    shapes: dict[str, tuple[int, ...]]
    values: dict[str, np.ndarray] = field(default_factory=dict)
    error: str = ""
    inputs: dict[str, np.ndarray] = field(default_factory=dict)


def probe(model: onnx.ModelProto, seed: int = 0, providers: list[str] | None = None) -> Probe:
    """Run ``model`` on two synthetic samples (one when its batch is fixed) exposing every tensor."""
    shapes = {k: tuple(v) for k, v in infer_shapes(model).items()}
    graph_outputs = len(model.graph.output)
    known = {o.name for o in model.graph.output}
    # expose every tensor on the model itself for the time of one serialisation (no copy)
    for node in model.graph.node:
        for out in node.output:
            if out and out not in known:
                model.graph.output.append(onnx.ValueInfoProto(name=out))
                known.add(out)
    try:
        sess = session(model, providers or [CPU], optimize=False)
    except PassFailedError as exc:
        return Probe(shapes, {}, str(exc))
    finally:
        del model.graph.output[graph_outputs:]
    error = ""
    # two samples show a constant channel is constant across samples; some exports bake in
    # batch 1 even where the input says otherwise, so try 1 as well
    for samples in dict.fromkeys([fixed_batch(model) or 2, 1]):
        try:
            feeds = synthesize(model, samples, seed).inputs
        except DataError as exc:  # no synthetic input fits: shapes from inference only
            return Probe(shapes, {}, str(exc))
        try:
            values = run_model(sess, feeds)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises untyped errors
            error = f"onnxruntime could not run the model: {str(exc).strip().splitlines()[0]}"
            continue
        # sequences and absent optionals have no tensor shape
        shapes.update({k: v.shape for k, v in values.items() if isinstance(v, np.ndarray)})
        return Probe(shapes, values, inputs=feeds)
    return Probe(shapes, {}, error)


def shrink_shapes(
    shapes: dict[str, tuple[int, ...]], changes: dict[str, tuple[int, int]]
) -> dict[str, tuple[int, ...]]:
    """``shapes`` with ``changes[name] = (axis, new size)`` applied: shapes after a fold round."""
    out = dict(shapes)
    for name, (axis, size) in changes.items():
        if name in out and axis < len(out[name]):
            shape = list(out[name])
            shape[axis] = size
            out[name] = tuple(shape)
    return out
