"""Sweep one option over values: run the chain at each, validate each result.

Every pass of the chain that has an option named ``key`` (``sparsity`` by default) gets the
value; a validate pass ends the chain (appended when missing). The result is a JSON-ready
report with one entry per point, each with its table row (:func:`point_row`); the table is
:func:`onnxprune.report.sweep_table`, the plot :func:`onnxprune.plot.write_plot`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from onnxprune.cost import summarize
from onnxprune.errors import PassOptionError
from onnxprune.model import model_data_files, write_model
from onnxprune.outputs import OutputPlan, Target
from onnxprune.passes.base import Pass, check_value, coerce, with_range
from onnxprune.passes.validate import with_gates
from onnxprune.pipeline import run
from onnxprune.provenance import run_record, written_digests
from onnxprune.runtime import Device
from onnxprune.validation.gates import checked_gates, failed_gates, validate_sections
from onnxprune.version import __version__

MAX_POINTS = 200


def parse_values(text: str) -> list[float]:
    """``START:STOP:STEP`` (stop included, within float tolerance) or ``V1,V2,...``.

    Raises:
        ValueError: malformed text, a value that is NaN or infinite, a step that is not
            positive, or too many points.
    """
    text = text.strip()
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise ValueError(f"{text!r}: expected START:STOP:STEP, e.g. 0.1:0.8:0.1")
        try:
            start, stop, step = (float(p) for p in parts)
        except ValueError:
            raise ValueError(f"{text!r}: START, STOP and STEP must be numbers") from None
        if not all(map(math.isfinite, (start, stop, step))):
            raise ValueError(f"{text!r}: START, STOP and STEP must be finite numbers")
        if not step > 0:
            raise ValueError(f"{text!r}: STEP must be > 0")
        if stop < start:
            raise ValueError(f"{text!r}: STOP is below START")
        count = math.floor((stop - start) / step + 1e-9) + 1
        if count > MAX_POINTS:
            raise ValueError(f"{text!r}: {count} points; at most {MAX_POINTS}")
        return [round(start + i * step, 12) for i in range(count)]
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(
            f"{text!r}: expected numbers separated by commas, or START:STOP:STEP"
        ) from None
    if not values:
        raise ValueError("no values")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{text!r}: {bad[0]:g} is not a finite number")
    if len(values) > MAX_POINTS:
        raise ValueError(f"{len(values)} points; at most {MAX_POINTS}")
    return values


def apply_value(chain: Sequence[Pass], key: str, value: float) -> list[Pass]:
    """Copies of ``chain``'s passes, with option ``key`` set to ``value`` wherever it exists.

    Raises:
        PassOptionError: no pass has the option, or the value does not fit it.
    """
    field = key.replace("-", "_")
    out, hits = [], 0
    for p in chain:
        names = {f.name for f in dataclasses.fields(p)}
        if field not in names:
            out.append(p)
            continue
        hits += 1
        spec = next(f for f in dataclasses.fields(p) if f.name == field)
        try:
            typed = coerce(value, typing.get_type_hints(type(p))[field])
            check_value(spec, typed)
            out.append(dataclasses.replace(p, **{field: typed}))
        except (TypeError, ValueError) as exc:
            raise PassOptionError(
                f"pass {p.name}: {field}={value:g}: {with_range(exc, spec)}"
            ) from exc
    if not hits:
        raise PassOptionError(
            f"--sweep-key {key}: no pass in the chain has an option {field!r} "
            f"(chain: {', '.join(p.name for p in chain) or 'empty'})"
        )
    return out


def point_file(
    folder: str | os.PathLike[str],
    model_path: str | os.PathLike[str] | None,
    key: str,
    value: float,
) -> Path:
    """Where a point's model goes: ``FOLDER/NAME.KEY-VALUE.onnx``."""
    stem = Path(model_path).name if model_path else "model"
    stem = stem[: -len(".onnx")] if stem.endswith(".onnx") else stem
    return Path(folder) / f"{stem}.{key}-{value:g}.onnx"


def add_points(
    plan: OutputPlan,
    option: str,
    folder: str | os.PathLike[str],
    model_path: str | os.PathLike[str] | None,
    key: str,
    values: Sequence[float],
    external_data: bool | None,
) -> list[Target]:
    """Add the sweep folder and every point's model (and its .data) to ``plan``."""
    plan.add_folder(option, folder)
    return [
        plan.add_model(option, point_file(folder, model_path, key, v), external_data)
        for v in values
    ]


def point_row(value: float, passes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The table row of one point, from its last validate section."""
    v = validate_sections({"passes": passes})[-1]
    cls = v.get("classification")
    if cls and cls["labels"]:
        metric, score, reference = (
            "accuracy",
            cls["pruned"]["accuracy"],
            cls["original"]["accuracy"],
        )
    else:
        cosines = [o["cosine"] for o in v["outputs"] if o["cosine"] is not None]
        metric, score, reference = "cosine", (min(cosines) if cosines else None), 1.0
    latency = v.get("latency")
    return {
        "value": value,
        "parameters": v["cost"]["pruned"]["parameters"],
        "macs_ratio": v["cost"]["ratio"]["macs"],
        "metric": metric,
        "score": score,
        "reference": reference,
        "latency_ratio": latency["ratio"] if latency else None,
        "gates_passed": v["passed"],
    }


def recommend(points: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The smallest point that passes every gate: ``{value, index}``, or None when none does.

    A point counts when its gates were checked and none failed, and it made the model smaller
    (a point that removed nothing is no recommendation); the smallest has the lowest MACs
    ratio, then the fewest parameters, then the lowest index.
    """
    passing = [
        (_or_inf(p["row"]["macs_ratio"]), p["row"]["parameters"], i)
        for i, p in enumerate(points)
        if checked_gates(p) and not failed_gates(p) and _shrank(p)
    ]
    if not passing:
        return None
    index = min(passing)[2]
    return {"value": points[index]["value"], "index": index}


def _shrank(point: Mapping[str, Any]) -> bool:
    """Whether the point's model has fewer parameters or MACs than the original."""
    ratio = validate_sections(point)[-1]["cost"]["ratio"]
    return any(ratio.get(k) is not None and ratio[k] < 1 for k in ("parameters", "macs"))


def _or_inf(ratio: float | None) -> float:
    """A ratio for ordering: a missing one sorts last."""
    return math.inf if ratio is None else ratio


def run_sweep(
    model: onnx.ModelProto,
    chain: Sequence[Pass],
    values: Sequence[float],
    key: str = "sparsity",
    *,
    data: str | os.PathLike[str] | None = None,
    eval_data: str | os.PathLike[str] | None = None,
    device: Device = "auto",
    seed: int = 0,
    model_path: str | os.PathLike[str] | None = None,
    save_to: str | os.PathLike[str] | None = None,
    external_data: bool | None = None,
    on_point: Callable[[float, dict[str, Any]], None] | None = None,
    plan: OutputPlan | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Run ``chain`` (validate appended if missing) once per value of option ``key``.

    Args:
        model: the original model (not modified).
        chain: the passes; those with an option ``key`` get each value.
        values: the values, in order.
        key: the option to sweep.
        data, eval_data, device, seed, model_path, input_shapes, workers, ray_address: as for
            :func:`onnxprune.run`.
        save_to: a folder to save each point's model in (``NAME.KEY-VALUE.onnx``), or None;
            the models are staged and moved into place together at the end (none on failure).
        external_data: as for :func:`onnxprune.save`.
        on_point: called after each point with its value and entry (for progress).
        plan: an open plan that holds the points (:func:`add_points`) and that the caller
            commits; without one, the sweep makes and commits its own.

    Returns:
        The sweep report: ``before``, ``sweep`` (key, values, passes), ``points`` and
        ``recommended`` (:func:`recommend`).

    Raises:
        OnnxPruneError: as for :func:`onnxprune.run`, or a key no pass has.
        ModelSaveError: a point's model would overwrite an input, or cannot be written.
    """
    chain = with_gates(chain, always=True)
    chains = [apply_value(chain, key, v) for v in values]  # all option errors before any work
    report: dict[str, Any] = {
        "onnxprune": __version__,
        "model": str(model_path) if model_path else None,
        "providers": [],
        "before": summarize(model, input_shapes=input_shapes).to_dict(),
        "sweep": {"key": key, "values": list(values), "passes": [p.name for p in chain]},
        "points": [],
        "recommended": None,
        "plot": None,
        **run_record(
            {"points": []}, seed=seed, device=device, model_path=model_path, data_path=data
        ),
    }
    own = None
    if save_to is not None and plan is None:
        plan = own = OutputPlan()
        own.add_input("the input model", model_path)
        for f in model_data_files(model_path) if model_path else []:
            own.add_input("the input model's external data", f)
        add_points(own, "save_to", save_to, model_path, key, values, external_data)
    cache: dict[str, Any] = {}  # calibration statistics, computed once for every point
    with own if own is not None else contextlib.nullcontext():
        for value, passes in zip(values, chains, strict=True):
            new, rep = run(
                model,
                passes,
                data=data,
                eval_data=eval_data,
                device=device,
                seed=seed,
                model_path=model_path,
                input_shapes=input_shapes,
                cache=cache,
                workers=workers,
                ray_address=ray_address,
            )
            report["providers"] = rep["providers"]
            output = None
            if save_to is not None and plan is not None:
                output = point_file(save_to, model_path, key, value)
                plan.write(
                    plan.target(output),
                    functools.partial(_write_point, new, external_data, output, report),
                )
            entry = {
                "value": value,
                "output": str(output) if output else None,
                "after": rep["after"],
                "passes": rep["passes"],
                "row": point_row(value, rep["passes"]),
            }
            report["points"].append(entry)
            if on_point is not None:
                on_point(value, entry)
    report["recommended"] = recommend(report["points"])
    return report


def _write_point(
    model: onnx.ModelProto,
    external_data: bool | None,
    output: Path,
    report: dict[str, Any],
    file: Path,
) -> None:
    """Write a point's model to its staged ``file``; its SHA-256 joins ``files.output``."""
    write_model(model, file, external_data=external_data)
    report["files"]["output"] += written_digests(file, output)
