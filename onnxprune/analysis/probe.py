"""One onnxruntime run with every intermediate tensor exposed: concrete shapes and values.

Channel analysis needs concrete shapes (to follow Reshape/Flatten) and fold needs the value of
each constant channel where it is used. Both come from one run on a small batch (synthetic
unless real data is given); when onnxruntime cannot run the model, shapes fall back to onnx
shape inference and no values are known (fold then removes only channels it can prove exactly
zero). The tensors are exposed on the model itself, without a copy (:mod:`onnxprune.runner`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.context import Context
from onnxprune.cost import infer_shapes
from onnxprune.data import Dataset, fixed_batch
from onnxprune.errors import DataError, PassFailedError, first_line
from onnxprune.runner import batches, exposed_session, run_model
from onnxprune.runtime import CPU
from onnxprune.synthesis import synthesize


@dataclass
class Probe:
    """Shapes of every main-graph tensor, and values where a run succeeded."""

    shapes: dict[str, tuple[int, ...]]
    values: dict[str, np.ndarray] = field(default_factory=dict)
    error: str = ""
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = "a synthetic batch"  # where ``inputs`` came from, for reports


def probe(
    model: onnx.ModelProto,
    seed: int = 0,
    providers: list[str] | None = None,
    *,
    data: Dataset | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> Probe:
    """Run ``model`` on two samples (one when its batch is fixed) exposing every tensor.

    The samples are synthesised with ``seed`` (and ``input_shapes``, the shapes the user
    fixed), or the first ones of ``data`` when given.
    """
    shapes = {k: tuple(v) for k, v in infer_shapes(model, input_shapes=input_shapes).items()}
    tensors = [out for node in model.graph.node for out in node.output if out]
    try:
        sess = exposed_session(model, tensors, providers or [CPU], optimize=False)
    except PassFailedError as exc:
        return Probe(shapes, {}, str(exc))
    error = ""
    # two samples show a constant channel is constant across samples; some exports bake in
    # batch 1 even where the input says otherwise, so try 1 as well
    for samples in dict.fromkeys([fixed_batch(model, data) or 2, 1]):
        try:
            feeds = synthesize(model, samples, seed, input_shapes).inputs
        except DataError as exc:  # no synthetic input fits: shapes from inference only
            return Probe(shapes, {}, str(exc))
        try:
            feeds = _inputs(model, samples, seed, data, input_shapes)
            values = run_model(sess, feeds)
        except DataError as exc:
            error = str(exc)
            continue
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises untyped errors
            error = f"onnxruntime could not run the model: {first_line(exc)}"
            continue
        # sequences and absent optionals have no tensor shape
        shapes.update({k: v.shape for k, v in values.items() if isinstance(v, np.ndarray)})
        source = f"samples of {data.source}" if data is not None else Probe.source
        return Probe(shapes, values, inputs=feeds, source=source)
    return Probe(shapes, {}, error)


def probe_run(model: onnx.ModelProto, ctx: Context) -> Probe:
    """:func:`probe` on the run's own data when it has a data file (``--data``), else on inputs
    synthesised with the run's seed (a model no synthetic input fits is then probed for shapes
    only, with the reason): every onnxruntime run of a chain sees the user's data."""
    data = ctx.data(model) if ctx.data_path is not None else None
    return probe(model, ctx.seed, ctx.providers, data=data, input_shapes=ctx.input_shapes)


def _inputs(
    model: onnx.ModelProto,
    samples: int,
    seed: int,
    data: Dataset | None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, np.ndarray]:
    """``samples`` inputs for ``model``: synthesised, or the first ones of ``data``.

    Raises:
        DataError: ``data`` has fewer samples, or lacks an input.
    """
    if data is None:
        return synthesize(model, samples, seed, input_shapes).inputs
    if len(data) < samples:
        raise DataError(f"{data.source}: {len(data)} sample(s), the probe needs {samples}")
    return next(batches(model, data, batch_size=samples, limit=samples))


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
