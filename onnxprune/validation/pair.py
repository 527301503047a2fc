"""The original and the pruned model side by side: inputs checked, both run on the same data.

:func:`check_inputs` refuses a pruned model that cannot take the original's inputs before
anything runs; :func:`run_pair` runs both sessions batch by batch and joins their outputs;
:func:`latency_feed` is the one batch both are timed on, and :func:`cost_section` their cost at
the symbolic dimensions of that batch (:func:`symbolic_dims`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.cost import summarize
from onnxprune.data import Dataset, fixed_batch, input_specs
from onnxprune.errors import DataError, InputMismatch, OutputMismatch, RunFailed
from onnxprune.runner import plan, run_batches


def check_inputs(original: onnx.ModelProto, model: onnx.ModelProto) -> None:
    """Check that ``model`` declares every input of ``original`` with a compatible type and shape.

    Raises:
        InputMismatch: an input missing, added, of another dtype, rank or fixed size.
    """
    ref, new = input_specs(original), input_specs(model)
    for name, (dims, dtype) in ref.items():
        if name not in new:
            raise InputMismatch(
                f"validate: the pruned model has no input {name!r} "
                f"(its inputs: {', '.join(new) or 'none'})"
            )
        new_dims, new_dtype = new[name]
        if new_dtype != dtype:
            raise InputMismatch(
                f"validate: the pruned model cannot take input {name!r}: it "
                f"expects {new_dtype}, the original {dtype}"
            )
        fixed_differs = any(
            isinstance(a, int) and isinstance(b, int) and a > 0 and b > 0 and a != b
            for a, b in zip(dims, new_dims, strict=False)
        )
        if len(dims) != len(new_dims) or fixed_differs:
            raise InputMismatch(
                f"validate: the pruned model cannot take input {name!r}: it "
                f"declares {new_dims}, the original {dims}"
            )
    extra = [n for n in new if n not in ref]
    if extra:
        raise InputMismatch(
            f"validate: the pruned model needs input {extra[0]!r}, which the original does not have"
        )


def run_pair(
    ref_sess: ort.InferenceSession,
    new_sess: ort.InferenceSession,
    model: onnx.ModelProto,
    data: Dataset,
    limit: int | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """Run both sessions on ``data`` in batches; outputs of each (original's names) and the count.

    Raises:
        OutputMismatch: the pruned model lacks an output of the original.
        InputMismatch: onnxruntime refuses the data for the pruned model (not the original).
        DataError: the original refuses the data, or no complete batch fits the model.
    """
    names = [o.name for o in ref_sess.get_outputs()]
    have = [o.name for o in new_sess.get_outputs()]
    missing = [n for n in names if n not in have]
    if missing:
        raise OutputMismatch(
            f"validate: the pruned model has no output {missing[0]!r} "
            f"(its outputs: {', '.join(have)})"
        )
    if not plan(model, data, limit=limit).count:
        raise DataError(
            f"validate: {data.source} has no complete batch of "
            f"{fixed_batch(model, data)} samples for the model"
        )
    ref_parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    new_parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    count = 0
    try:
        for feed, (ref_out, new_out) in run_batches(
            [ref_sess, new_sess], model, data, fetch=names, limit=limit
        ):
            for n in names:
                ref_parts[n].append(np.asarray(ref_out[n]))
                new_parts[n].append(np.asarray(new_out[n]))
            count += data.feed_samples(feed) if feed else 1
    except RunFailed as exc:
        if exc.index == 0:
            raise DataError(
                f"validate: the original model cannot run on {data.source}: {exc.reason}"
            ) from exc
        raise InputMismatch(
            f"validate: the pruned model cannot take input(s) "
            f"{', '.join(map(repr, input_specs(model)))}: {exc.reason}"
        ) from exc
    return _join(ref_parts), _join(new_parts), count


def _join(parts: Mapping[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    out = {}
    for name, arrays in parts.items():
        shapes = {a.shape[1:] if a.ndim else None for a in arrays}
        if len(shapes) > 1:  # new model's per-sample shape varies with the batch: compare as is
            raise OutputMismatch(f"validate: output {name!r} has a different shape per batch")
        out[name] = np.concatenate(arrays) if arrays[0].ndim else np.stack(arrays)
    return out


def latency_feed(model: onnx.ModelProto, data: Dataset, batch: int) -> dict[str, np.ndarray]:
    """The first ``batch`` samples of ``data`` (the model's own batch size when it is fixed)."""
    return data.take(0, fixed_batch(model, data) or batch)


def symbolic_dims(
    models: Sequence[onnx.ModelProto], feed: Mapping[str, np.ndarray]
) -> dict[str, int]:
    """Value of each symbolic input dimension of ``models``, read from ``feed``'s shapes."""
    dims: dict[str, int] = {}
    for m in models:
        for name, (declared, _) in input_specs(m).items():
            if name in feed:
                value = feed[name]  # a sequence input: the shape of its tensors
                value = value[0] if isinstance(value, list) and value else value
                for d, size in zip(declared, np.shape(value), strict=False):
                    if isinstance(d, str):
                        dims[d] = int(size)
    return dims


def cost_section(
    original: onnx.ModelProto, model: onnx.ModelProto, dims: Mapping[str, int]
) -> dict[str, Any]:
    """Parameters, MACs (total and per op type), bytes of both models, and pruned/original."""
    a, b = summarize(original, dims), summarize(model, dims)

    def pick(s: Any) -> dict[str, Any]:
        return {
            "parameters": s.parameters,
            "macs": s.macs,
            "macs_by_op": s.macs_by_op,
            "bytes": s.bytes,
        }

    ratio = {
        k: (getattr(b, k) / getattr(a, k) if getattr(a, k) else None)
        for k in ("parameters", "macs", "bytes")
    }
    return {"dims": dict(dims), "original": pick(a), "pruned": pick(b), "ratio": ratio}
