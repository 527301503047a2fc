"""Run a chain of passes over a model: ``run(model, passes, **context) -> (model, report)``."""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from importlib.metadata import entry_points, packages_distributions
from pathlib import Path
from typing import Any

import onnx

from onnxprune import scratch
from onnxprune.context import Context
from onnxprune.cost import summarize
from onnxprune.distributed import Workers
from onnxprune.errors import (
    ArgumentError,
    DataError,
    InternalError,
    OnnxPruneError,
    PassContractError,
    PassFailedError,
    first_line,
)
from onnxprune.graph import release_maps
from onnxprune.input_shapes import as_input_shapes, check_input_shapes
from onnxprune.model import MODEL_ARGUMENT, add_provenance, load, wrong_type
from onnxprune.passes.base import Pass, PassResult
from onnxprune.passes.registry import ENTRY_POINT_GROUP, parse_pass_spec
from onnxprune.progress import step
from onnxprune.provenance import run_record
from onnxprune.runtime import Device, providers_for, temp_bytes
from onnxprune.version import __version__

PATH_TYPES = (str, os.PathLike)


def run(
    model: onnx.ModelProto | str | os.PathLike[str],
    passes: Sequence[Pass | str] | Pass | str,
    *,
    data: str | os.PathLike[str] | None = None,
    eval_data: str | os.PathLike[str] | None = None,
    device: Device = "auto",
    seed: int = 0,
    model_path: str | os.PathLike[str] | None = None,
    ctx: Context | None = None,
    inplace: bool = False,
    input_shapes: Mapping[str, Sequence[int]] | Sequence[str] | None = None,
    cache: dict[str, Any] | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Apply ``passes`` in order to a copy of ``model``.

    Args:
        model: the input model, or the path of one (loaded and checked; then ``model_path``
            defaults to it); a ModelProto is not modified unless ``inplace``.
        passes: Pass instances or ``"name:key=value,..."`` specs (or a single one).
        data: calibration / test data (.npz) for passes that run the model.
        eval_data: data (.npz) validate compares the models on instead of ``data``.
        device: ``auto`` (CUDA when usable, else CPU), ``cpu`` or ``cuda``.
        seed: seed for anything random.
        model_path: where the model came from (for messages and the report).
        ctx: a prepared context (overrides data, eval_data, device, seed, model_path,
            workers).
        inplace: let the first pass change ``model`` itself instead of a copy (saves one copy
            of the weights on large models; the CLI uses it). A copy is still kept as
            ``ctx.original`` when a pass in the chain declares ``needs_original``.
        input_shapes: fixed sizes for dynamic input dims, ``{"x": [1, 3, 224, 224]}`` or
            ``["x:1,3,224,224"]`` (``--input-shape``): synthetic inputs and the cost
            summaries use them; each must keep its input's rank and fixed dims.
        cache: results shared with other runs on the same model, data and seed (keyed by
            the model's content): a sweep hands every point one dict, so activation
            statistics are computed once for all points.
        workers: run calibration (activation statistics) and validate's evaluation as this
            many Ray tasks, one shard of the data each, merged (:mod:`onnxprune.distributed`;
            needs ``onnxprune[ray]``); None runs them in this process.
        ray_address: the Ray cluster to join (with ``workers``); None starts a local cluster
            of ``workers`` CPUs for this run and stops it at the end.

    Returns:
        The new model (with provenance in its metadata) and a JSON-ready report, whose
        ``status`` (passed, failed, no gates), ``gates``, ``versions`` and ``files`` (SHA-256
        of what was read) make it CI-grade (:mod:`onnxprune.provenance`).

    Raises:
        ArgumentError: an argument of the wrong type (or a negative seed); the message names it.
        DataError: an input shape that does not fit its input (naming it and its declared
            shape).
        MissingDependency: ``workers`` without Ray installed.
        OnnxPruneError: a bad pass spec or option, bad data, or a pass that failed (one from
            another distribution that crashes is a :class:`PassFailedError` naming it).
    """
    if not isinstance(model, onnx.ModelProto):
        if not isinstance(model, PATH_TYPES):
            raise wrong_type(model, "onnxprune.run: model", MODEL_ARGUMENT)
        model_path = model if model_path is None else model_path
        model, inplace = load(model), True  # nobody else holds the loaded model
    chain = _chain(passes)
    _check_arguments(data, seed, model_path, ctx, inplace, eval_data)
    for p in chain:  # every option error before any work
        p.check_options()
    if ray_address is not None and workers is None:
        raise ArgumentError("onnxprune.run: ray_address needs workers (--workers N)")
    pool = Workers(workers, ray_address) if workers is not None and ctx is None else None
    shapes = as_input_shapes(input_shapes) if ctx is None else ctx.input_shapes
    check_input_shapes(model, shapes)
    if ctx is None:
        for given in (data, eval_data):  # not only when a pass first reads it
            if given is not None and not Path(given).is_file():
                folder = Path(given).is_dir()
                what = "is a folder, not an .npz data file" if folder else "no such data file"
                raise DataError(f"{given}: {what}")
        keep = not inplace or any(p.needs_original for p in chain)
        ctx = Context(
            original=(copy.deepcopy(model) if inplace else model) if keep else None,
            data_path=Path(data) if data is not None else None,
            eval_data_path=Path(eval_data) if eval_data is not None else None,
            providers=providers_for(device),
            seed=seed,
            model_path=Path(model_path) if model_path is not None else None,
            input_shapes=shapes,
            cache=cache if cache is not None else {},
            workers=pool,
        )
    report: dict[str, Any] = {
        "onnxprune": __version__,
        "model": str(ctx.model_path) if ctx.model_path else None,
        "providers": ctx.providers,
        "before": summarize(model, input_shapes=shapes).to_dict(),
        "passes": [],
    }
    current = model
    temp_before = temp_bytes()
    scratch_before = len(scratch.files())
    try:
        for index, p in enumerate(chain):
            # later passes get the previous pass's private result: no copy needed
            work = current if index or inplace else copy.deepcopy(current)
            result, section = _apply(p, work, ctx, [q.name for q in chain[:index]])
            release_maps()  # pages of mapped weights the pass read: read again when needed
            report["passes"].append(section)
            current = result.model
            if p.new_reference and ctx.original is not None:  # later passes compare with it
                ctx.original = copy.deepcopy(current)
            scratch.collect([current, ctx.original], scratch_before)  # the files none reads
    finally:
        if pool is not None:
            pool.close()  # the local cluster stops; a joined one only loses this client
    out = current if chain else copy.deepcopy(model)
    add_provenance(
        out,
        {
            "version": __version__,
            "passes": [{"name": p.name, "options": p.options()} for p in chain],
        },
    )
    report["after"] = summarize(out, input_shapes=shapes).to_dict()
    written = temp_bytes() - temp_before  # temporary weight files the sessions needed
    if written:
        report["temp_bytes"] = written
    report.update(
        run_record(
            report, seed=ctx.seed, device=device, model_path=ctx.model_path, data_path=ctx.data_path
        )
    )
    return out, report


def _chain(passes: Any) -> list[Pass]:
    """The passes argument as a list of Pass instances (specs parsed).

    Raises:
        ArgumentError: it is not a Pass, a spec, or a sequence of those.
    """
    items = [passes] if isinstance(passes, (Pass, str)) else passes
    if not isinstance(items, Iterable):
        raise ArgumentError(
            "onnxprune.run: passes must be a list of Pass objects or 'name:key=value' specs, "
            f"got {type(passes).__name__}"
        )
    chain = []
    for index, p in enumerate(items):
        if isinstance(p, str):
            chain.append(parse_pass_spec(p))
        elif isinstance(p, Pass):
            chain.append(p)
        elif isinstance(p, type) and issubclass(p, Pass):
            raise ArgumentError(
                f"onnxprune.run: passes[{index}] is the class {p.__name__}; give an instance "
                f"({p.__name__}()) or its name {p.name!r}"
            )
        else:
            raise ArgumentError(
                f"onnxprune.run: passes[{index}] must be a Pass or a 'name:key=value' spec, "
                f"got {type(p).__name__} {p!r:.40}"
            )
    return chain


def _check_arguments(
    data: Any, seed: Any, model_path: Any, ctx: Any, inplace: Any, eval_data: Any = None
) -> None:
    """The keyword arguments of :func:`run` have their types (seed an integer >= 0).

    Raises:
        ArgumentError: naming the argument, what it must be, and what it got.
    """

    def require(ok: bool, name: str, value: Any, expected: str) -> None:
        if not ok:
            raise ArgumentError(f"onnxprune.run: {name} must be {expected}, got {value!r:.60}")

    path = "a path (str or os.PathLike) or None"
    require(data is None or isinstance(data, PATH_TYPES), "data", data, path)
    require(eval_data is None or isinstance(eval_data, PATH_TYPES), "eval_data", eval_data, path)
    require(
        model_path is None or isinstance(model_path, PATH_TYPES), "model_path", model_path, path
    )
    is_int = isinstance(seed, int) and not isinstance(seed, bool)
    require(is_int and seed >= 0, "seed", seed, "an integer >= 0")
    require(ctx is None or isinstance(ctx, Context), "ctx", ctx, "an onnxprune.Context or None")
    require(isinstance(inplace, bool), "inplace", inplace, "True or False")


def _distribution(p: Pass) -> str | None:
    """The installed distribution, other than onnxprune, that provides ``p``'s class (None
    for onnxprune's own passes and for classes outside any distribution: scripts, tests)."""
    top = type(p).__module__.split(".")[0]
    if top == "onnxprune":
        return None
    for ep in entry_points(group=ENTRY_POINT_GROUP, name=p.name):
        if ep.dist is not None and ep.module.split(".")[0] == top:
            return ep.dist.name
    names = sorted(set(packages_distributions().get(top, [])) - {"onnxprune"})
    return ", ".join(names) or None


def _apply(
    p: Pass, work: onnx.ModelProto, ctx: Context, before: Sequence[str]
) -> tuple[PassResult, dict[str, Any]]:
    """Call one pass (its contract checks included), time it, and build its report section.

    A failure names the pass and ``before``, the passes that ran before it. A pass that
    crashes (an exception that is not onnxprune's) is a bug in onnxprune
    (:class:`InternalError`) unless it comes from another installed distribution: then it is a
    :class:`PassFailedError` naming that distribution.
    """
    after = ", ".join(before) or "none"
    start = time.perf_counter()
    try:
        with step(p.name):
            result = p(work, ctx)
    except PassContractError as exc:
        exc.passes_before = after
        raise
    except (OnnxPruneError, InternalError):
        raise
    except Exception as exc:
        dist = _distribution(p)
        if dist is not None:  # a bug in that pass: exit 2, not onnxprune's exit 3
            raise PassFailedError(
                f"pass {p.name} (from dist {dist}) failed: {type(exc).__name__}: "
                f"{first_line(exc)} (after: {after}); report it to the authors of {dist}"
            ) from exc
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
