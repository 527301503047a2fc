"""Sweep one option over values: run the chain at each, validate each result, tabulate, plot.

Every pass of the chain that has an option named ``key`` (``sparsity`` by default) gets the
value; a validate pass ends the chain (appended when missing). The result is a JSON-ready
report with one entry per point, a rich table, and optionally a PNG plot of accuracy (or
cosine) and latency ratio against the value, for picking a point by eye.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
from rich.table import Table

from onnxprune.cost import summarize
from onnxprune.errors import MissingDependency, ModelSaveError, PassOptionError
from onnxprune.model import save
from onnxprune.passes.base import Pass, coerce
from onnxprune.passes.validate import with_gates
from onnxprune.pipeline import run
from onnxprune.runtime import Device
from onnxprune.validation.gates import validate_sections
from onnxprune.version import __version__

MAX_POINTS = 200
PLOT_INSTALL = 'pip install "onnxprune[plot]"'


def parse_values(text: str) -> list[float]:
    """``START:STOP:STEP`` (stop included, within float tolerance) or ``V1,V2,...``.

    Raises:
        ValueError: malformed text, a step that is not positive, or too many points.
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
        try:
            typed = coerce(value, typing.get_type_hints(type(p))[field])
            out.append(dataclasses.replace(p, **{field: typed}))
        except (TypeError, ValueError) as exc:
            raise PassOptionError(f"pass {p.name}: {field}={value:g}: {exc}") from exc
    if not hits:
        raise PassOptionError(
            f"--sweep-key {key}: no pass in the chain has an option {field!r} "
            f"(chain: {', '.join(p.name for p in chain) or 'empty'})"
        )
    return out


def _point_file(folder: Path, model_path: Path | None, key: str, value: float) -> Path:
    stem = model_path.name if model_path else "model"
    stem = stem[: -len(".onnx")] if stem.endswith(".onnx") else stem
    return folder / f"{stem}.{key}-{value:g}.onnx"


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


def run_sweep(
    model: onnx.ModelProto,
    chain: Sequence[Pass],
    values: Sequence[float],
    key: str = "sparsity",
    *,
    data: str | os.PathLike[str] | None = None,
    device: Device = "auto",
    seed: int = 0,
    model_path: str | os.PathLike[str] | None = None,
    save_to: str | os.PathLike[str] | None = None,
    external_data: bool | None = None,
    on_point: Callable[[float, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run ``chain`` (validate appended if missing) once per value of option ``key``.

    Args:
        model: the original model (not modified).
        chain: the passes; those with an option ``key`` get each value.
        values: the values, in order.
        key: the option to sweep.
        data, device, seed, model_path: as for :func:`onnxprune.run`.
        save_to: a folder to save each point's model in (``NAME.KEY-VALUE.onnx``), or None.
        external_data: as for :func:`onnxprune.save`.
        on_point: called after each point with its value and entry (for progress).

    Returns:
        The sweep report: ``before``, ``sweep`` (key, values, passes) and ``points``.

    Raises:
        OnnxPruneError: as for :func:`onnxprune.run`, or a key no pass has.
    """
    chain = with_gates(chain, always=True)
    chains = [apply_value(chain, key, v) for v in values]  # all option errors before any work
    report: dict[str, Any] = {
        "onnxprune": __version__,
        "model": str(model_path) if model_path else None,
        "providers": [],
        "before": summarize(model).to_dict(),
        "sweep": {"key": key, "values": list(values), "passes": [p.name for p in chain]},
        "points": [],
        "plot": None,
    }
    for value, passes in zip(values, chains, strict=True):
        new, rep = run(model, passes, data=data, device=device, seed=seed, model_path=model_path)
        report["providers"] = rep["providers"]
        output = None
        if save_to is not None:
            target = _point_file(
                Path(save_to), Path(model_path) if model_path else None, key, value
            )
            output = save(new, target, external_data=external_data, protect=model_path)
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
    return report


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def sweep_table(report: Mapping[str, Any]) -> Table:
    """One row per point: value, parameters, MACs ratio, accuracy or cosine, latency ratio, gates."""
    rows = [p["row"] for p in report["points"]]
    metric = rows[0]["metric"] if rows else "accuracy"
    key = report["sweep"]["key"]
    title = f"sweep of {key}"
    if rows and rows[0]["metric"] == "accuracy":
        title += f" (original accuracy {rows[0]['reference']:.4f})"
    table = Table(title=title)
    for col in (key, "parameters", "MACs ratio", metric, "latency ratio", "gates"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            f"{r['value']:g}",
            f"{r['parameters']:,}",
            _fmt(r["macs_ratio"], ".3f"),
            _fmt(r["score"], ".4f"),
            _fmt(r["latency_ratio"], ".3f"),
            "pass" if r["gates_passed"] else "[bold red]FAIL[/]",
        )
    return table


def require_matplotlib() -> None:
    """Import matplotlib now, or fail with the one-line install hint.

    Raises:
        MissingDependency: matplotlib is not installed.
    """
    try:
        import matplotlib  # noqa: F401, PLC0415 - optional dependency, imported lazily
    except ImportError:
        raise MissingDependency(f"--plot needs matplotlib: {PLOT_INSTALL}") from None


def _gate_lines(ax: Any, ratios: Any, report: Mapping[str, Any], metric: str) -> None:
    """Dashed lines at the gate limits of the first point's validate pass."""
    if not report["points"]:
        return
    options = validate_sections(report["points"][0])[-1]["options"]
    row = report["points"][0]["row"]
    if metric == "accuracy" and options.get("max_accuracy_drop") is not None:
        ax.axhline(
            row["reference"] - options["max_accuracy_drop"],
            color="tab:blue",
            ls="--",
            lw=1,
            label="accuracy gate",
        )
    if metric == "cosine" and options.get("min_cosine") is not None:
        ax.axhline(options["min_cosine"], color="tab:blue", ls="--", lw=1, label="cosine gate")
    if options.get("max_latency_ratio") is not None:
        ratios.axhline(
            options["max_latency_ratio"], color="tab:red", ls="-.", lw=1, label="latency gate"
        )


def write_plot(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Plot accuracy (or cosine) and latency and MACs ratios against the swept value; save PNG.

    Raises:
        MissingDependency: matplotlib is not installed.
        ModelSaveError: the file cannot be written.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    path = Path(path)
    rows = [p["row"] for p in report["points"]]
    x = [r["value"] for r in rows]
    metric = rows[0]["metric"] if rows else "accuracy"
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(x, [r["score"] for r in rows], "o-", color="tab:blue", label=metric)
    if rows and rows[0]["reference"] is not None:
        ax.axhline(rows[0]["reference"], color="tab:blue", ls=":", lw=1, label=f"original {metric}")
    ax.set_xlabel(report["sweep"]["key"])
    ax.set_ylabel(metric, color="tab:blue")
    ax.grid(alpha=0.3)
    ratios = ax.twinx()
    ratios.plot(
        x, [r["latency_ratio"] for r in rows], "s--", color="tab:red", label="latency ratio"
    )
    ratios.plot(x, [r["macs_ratio"] for r in rows], "^:", color="tab:green", label="MACs ratio")
    ratios.axhline(1.0, color="gray", lw=0.8)
    ratios.set_ylabel("pruned / original")
    _gate_lines(ax, ratios, report, metric)
    if metric == "accuracy":
        ax.set_ylim(0, 1.02)
    failed = [r for r in rows if not r["gates_passed"]]
    if failed:
        ax.plot(
            [r["value"] for r in failed],
            [r["score"] for r in failed],
            "x",
            color="black",
            ms=10,
            label="gate failed",
        )
    handles = ax.get_legend_handles_labels()
    extra = ratios.get_legend_handles_labels()
    ax.legend(handles[0] + extra[0], handles[1] + extra[1], loc="best", fontsize="small")
    name = Path(report["model"]).name if report.get("model") else "model"
    ax.set_title(f"{name}: {metric} and cost against {report['sweep']['key']}")
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise ModelSaveError(f"{path}: cannot write the plot: {exc.strerror or exc}") from exc
    return path
