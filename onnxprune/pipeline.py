"""Run a chain of passes over a model: ``run(model, passes, **context) -> (model, report)``."""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

from onnxprune.context import Context
from onnxprune.cost import summarize
from onnxprune.errors import DataError, InternalError, OnnxPruneError, PassContractError
from onnxprune.model import add_provenance
from onnxprune.passes.base import Pass, PassResult
from onnxprune.passes.registry import parse_pass_spec
from onnxprune.runtime import Device, providers_for
from onnxprune.version import __version__


def run(
    model: onnx.ModelProto,
    passes: Sequence[Pass | str],
    *,
    data: str | os.PathLike[str] | None = None,
    device: Device = "auto",
    seed: int = 0,
    model_path: str | os.PathLike[str] | None = None,
    ctx: Context | None = None,
    inplace: bool = False,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Apply ``passes`` in order to a copy of ``model``.

    Args:
        model: the input model; it is not modified unless ``inplace``.
        passes: Pass instances or ``"name:key=value,..."`` specs.
        data: calibration / test data (.npz) for passes that run the model.
        device: ``auto`` (CUDA when usable, else CPU), ``cpu`` or ``cuda``.
        seed: seed for anything random.
        model_path: where the model came from (for messages and the report).
        ctx: a prepared context (overrides data, device, seed, model_path).
        inplace: let the first pass change ``model`` itself instead of a copy (saves one copy
            of the weights on large models; the CLI uses it). A copy is still kept as
            ``ctx.original`` when a pass in the chain declares ``needs_original``.

    Returns:
        The new model (with provenance in its metadata) and a JSON-ready report.

    Raises:
        OnnxPruneError: a bad pass spec or option, bad data, or a pass that failed.
    """
    chain = [parse_pass_spec(p) if isinstance(p, str) else p for p in passes]
    if ctx is None:
        if data is not None and not Path(data).is_file():
            raise DataError(f"{data}: no such data file")  # not only when a pass first reads it
        keep = not inplace or any(p.needs_original for p in chain)
        ctx = Context(
            original=(copy.deepcopy(model) if inplace else model) if keep else None,
            data_path=Path(data) if data is not None else None,
            providers=providers_for(device),
            seed=seed,
            model_path=Path(model_path) if model_path is not None else None,
        )
    report: dict[str, Any] = {
        "onnxprune": __version__,
        "model": str(ctx.model_path) if ctx.model_path else None,
        "providers": ctx.providers,
        "before": summarize(model).to_dict(),
        "passes": [],
    }
    current = model
    for index, p in enumerate(chain):
        # later passes get the previous pass's private result: no copy needed
        work = current if index or inplace else copy.deepcopy(current)
        result, section = _apply(p, work, ctx, [q.name for q in chain[:index]])
        report["passes"].append(section)
        current = result.model
    out = current if chain else copy.deepcopy(model)
    add_provenance(
        out,
        {
            "version": __version__,
            "passes": [{"name": p.name, "options": p.options()} for p in chain],
        },
    )
    report["after"] = summarize(out).to_dict()
    return out, report


def _apply(
    p: Pass, work: onnx.ModelProto, ctx: Context, before: Sequence[str]
) -> tuple[PassResult, dict[str, Any]]:
    """Call one pass (its contract checks included), time it, and build its report section.

    A failure names the pass and ``before``, the passes that ran before it.
    """
    after = ", ".join(before) or "none"
    start = time.perf_counter()
    try:
        result = p(work, ctx)
    except PassContractError as exc:
        exc.passes_before = after
        raise
    except (OnnxPruneError, InternalError):
        raise
    except Exception as exc:
        raise InternalError(
            f"pass {p.name} (after: {after}) crashed: {type(exc).__name__}: {exc}"
        ) from exc
    section = {
        "pass": p.name,
        "options": p.options(),
        "modified": result.modified,
        "seconds": round(time.perf_counter() - start, 4),
        **result.report,
    }
    return result, section
