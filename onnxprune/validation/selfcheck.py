"""Fold's self-check (its postcondition): the folded model computes what the input model did.

The reference is a plain onnxruntime run of the input model (no intermediate tensors exposed,
optimisations on: what a user's session computes), made before the pass changes it; the check
runs the result the same way on the same inputs. Floating-point outputs may differ within a
tolerance that follows their dtype; everything else (shapes, dtypes, integers, strings,
non-finite values, sequence lengths, whether an optional is present) must be equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxprune.analysis.probe import Probe
from onnxprune.errors import InternalError
from onnxprune.runner import run_model


@dataclass
class Reference:
    """The input model's outputs on the probe's inputs, from a plain onnxruntime run (no
    intermediate tensors exposed, optimisations on: what a user's session computes)."""

    inputs: dict[str, Any]
    outputs: dict[str, Any]
    providers: list[str]
    error: str = ""
    source: str = "a synthetic batch"  # where the inputs came from, for the report


def plain_reference(model: onnx.ModelProto, pr: Probe, providers: list[str]) -> Reference:
    """The outputs of ``model`` on the probe's inputs from a plain session (see Reference)."""
    if not pr.values:
        why = "the probe could not run it" + (" (probe_error says why)" if pr.error else "")
        return Reference({}, {}, providers, f"onnxruntime cannot run the input model: {why}")
    try:
        outputs = run_model(model, pr.inputs, providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises untyped errors
        return Reference({}, {}, providers, f"onnxruntime cannot run the input model: {exc}")
    return Reference(pr.inputs, outputs, providers, source=pr.source)


def output_tolerance(dtype: np.dtype) -> float:
    """Relative tolerance for a folded output of ``dtype``: 1e-4, or 16 units in the last place
    of a coarser type (float16: 0.016). Removing channels reorders sums, and a constant moved
    into a bias is rounded to the bias's dtype."""
    try:
        eps = float(np.finfo(dtype).eps)
    except (TypeError, ValueError):  # bfloat16 and other ml_dtypes types
        eps = 2.0**-7
    return max(1e-4, 16 * eps)


def verify_same(before: Reference, after: onnx.ModelProto) -> str:
    """Run the folded model on the reference's inputs; raise InternalError if outputs differ.

    ``before`` holds the input model's outputs on those inputs, from a plain run made before
    the first cut, so no copy of the input model is kept. Returns a one-line description.
    """
    if before.error:
        return f"not checked: {before.error}"
    try:
        got = run_model(after, before.inputs, before.providers)
    except Exception as exc:  # noqa: BLE001 - any failure here is a bug in fold
        raise InternalError(f"fold produced a model onnxruntime cannot run: {exc}") from exc
    worst = 0.0
    for o in after.graph.output:
        worst = max(worst, _differs(o.name, before.outputs[o.name], got[o.name]))
    return f"outputs equal on {before.source} (max relative error {worst:.2g})"


def _differs(name: str, r: Any, g: Any) -> float:
    """Relative error of output ``name`` (``g`` against ``r``); raise InternalError beyond the
    dtype's tolerance, or on any change of shape, type, non-finite or non-float value."""
    if isinstance(r, list) or isinstance(g, list):  # a sequence: element by element
        if not (isinstance(r, list) and isinstance(g, list)) or len(r) != len(g):
            raise InternalError(f"fold changed the length of sequence output {name!r}")
        return max(
            (_differs(f"{name}[{k}]", a, b) for k, (a, b) in enumerate(zip(r, g, strict=True))),
            default=0.0,
        )
    if r is None or g is None:  # an optional output
        if (r is None) != (g is None):
            raise InternalError(f"fold changed whether optional output {name!r} is present")
        return 0.0
    r, g = np.asarray(r), np.asarray(g)
    if r.shape != g.shape or r.dtype != g.dtype:
        raise InternalError(
            f"fold changed output {name!r}: {r.dtype}{list(r.shape)} -> {g.dtype}{list(g.shape)}"
        )
    if not np.issubdtype(r.dtype, np.floating):
        if not np.array_equal(r, g):
            raise InternalError(f"fold changed output {name!r}")
        return 0.0
    r64, g64 = r.astype(np.float64), g.astype(np.float64)
    finite = np.isfinite(r64)
    if (
        not np.array_equal(r64[~finite], g64[~finite], equal_nan=True)
        or not np.isfinite(g64[finite]).all()
    ):
        raise InternalError(f"fold changed the non-finite values of output {name!r}")
    if not finite.any():
        return 0.0
    scale = float(np.abs(r64[finite]).max())
    err = float(np.abs(r64[finite] - g64[finite]).max())
    tolerance = output_tolerance(r.dtype)
    if err > tolerance * (1.0 + scale):
        raise InternalError(
            f"fold changed output {name!r} by {err:.3g} (scale {scale:.3g}, {r.dtype} "
            f"tolerance {tolerance:.2g} x (1 + scale))"
        )
    return err / (1.0 + scale)
