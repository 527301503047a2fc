"""The sweep plot: accuracy (or cosine) and the latency and MACs ratios against the swept value.

matplotlib is optional (``onnxprune[plot]``): it is imported only here, when a plot is asked
for, and :func:`require_matplotlib` lets the CLI fail before any work when it is missing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from onnxprune.errors import MissingDependency, ModelSaveError
from onnxprune.validation.gates import validate_sections

PLOT_INSTALL = 'pip install "onnxprune[plot]"'


def require_matplotlib() -> None:
    """Import matplotlib now, or fail with the one-line install hint.

    Raises:
        MissingDependency: matplotlib is not installed.
    """
    try:
        import matplotlib  # noqa: F401, PLC0415 - optional dependency, imported lazily
    except ImportError:
        raise MissingDependency(f"--plot needs matplotlib: {PLOT_INSTALL}") from None


def plot_file(path: str | os.PathLike[str]) -> Path:
    """The file :func:`write_plot` writes for ``path`` (``.png`` added when it has no suffix).

    Raises:
        MissingDependency: matplotlib is not installed.
        ModelSaveError: matplotlib cannot write the format the suffix names.
    """
    require_matplotlib()
    from matplotlib.backend_bases import FigureCanvasBase  # noqa: PLC0415

    path = Path(path)
    if not path.suffix:
        return Path(f"{path}.png")
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise ModelSaveError(
            f"--plot {path}: matplotlib cannot write {path.suffix} files; use one of "
            f"{', '.join('.' + f for f in sorted(formats))}"
        )
    return path


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
