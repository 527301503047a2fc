"""The sweep plot: one panel per metric against the swept value, on a shared x axis.

The panels are the score (accuracy, or the lowest output cosine), the cost (MACs and
parameter ratios) and, when timed, the latency ratio with its bootstrap interval. Each panel
draws the gate that applies to its metric, marks (red x) the points where that gate failed,
and marks the sweep's ``recommended`` point (the smallest that passes every gate).
:func:`panels` builds the data, :func:`figure` draws it, :func:`write_plot` saves it.

matplotlib is optional (``onnxprune[plot]``): it is imported only here, when a plot is asked
for, and :func:`require_matplotlib` lets the CLI fail before any work when it is missing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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


SCORE_GATES = ("max_accuracy_drop", "min_cosine", "finite")  # gates on the output's quality
LATENCY_GATES = ("max_latency_ratio",)


@dataclass
class Series:
    """One line of a panel: a label, y per point (None: not measured), optional [low, high]."""

    label: str
    y: list[float | None]
    interval: list[tuple[float, float] | None] | None = None


@dataclass
class Panel:
    """One metric's panel: its lines, reference and gate levels, failed and recommended points.

    ``failed`` holds (x, y, gate names) for each point where a gate of this panel failed.
    """

    name: str
    ylabel: str
    series: list[Series]
    reference: float | None = None
    gate: float | None = None
    gate_label: str = ""
    failed: list[tuple[float, float, list[str]]] = field(default_factory=list)


def _gates(point: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The gates of a point's last validate section."""
    sections = validate_sections(point)
    return list(sections[-1].get("gates", [])) if sections else []


def _failed(
    points: Sequence[Mapping[str, Any]],
    x: list[float],
    ys: list[float | None],
    names: tuple[str, ...],
    fallback: float | None,
) -> list[tuple[float, float, list[str]]]:
    """(x, y, failed gate names) where a gate in ``names`` failed; y is the gate level when unmeasured."""
    out = []
    for xi, yi, point in zip(x, ys, points, strict=True):
        bad = [g["name"] for g in _gates(point) if g["name"] in names and not g["passed"]]
        if bad:
            out.append((xi, yi if yi is not None else (fallback or 0.0), sorted(set(bad))))
    return out


def _limit(points: Sequence[Mapping[str, Any]], name: str) -> float | None:
    """The limit of gate ``name`` (the first point that checked it), or None."""
    for point in points:
        for g in _gates(point):
            if g["name"] == name:
                return float(g["limit"])
    return None


def _score_panel(points: Sequence[Mapping[str, Any]], x: list[float]) -> Panel:
    rows = [p["row"] for p in points]
    metric = rows[0]["metric"] if rows else "accuracy"
    reference = rows[0]["reference"] if rows else None
    ys = [r["score"] for r in rows]
    panel = Panel(metric, metric, [Series(metric, ys)], reference=reference)
    if metric == "accuracy":
        drop = _limit(points, "max_accuracy_drop")
        if drop is not None and reference is not None:
            panel.gate, panel.gate_label = reference - drop, f"gate: drop <= {drop:g}"
    else:
        cosine = _limit(points, "min_cosine")
        if cosine is not None:
            panel.gate, panel.gate_label = cosine, f"gate: cosine >= {cosine:g}"
    panel.failed = _failed(points, x, ys, SCORE_GATES, panel.gate)
    return panel


def _cost_panel(points: Sequence[Mapping[str, Any]]) -> Panel:
    params = [
        (validate_sections(p)[-1]["cost"]["ratio"]["parameters"] if validate_sections(p) else None)
        for p in points
    ]
    macs = Series("MACs ratio", [p["row"]["macs_ratio"] for p in points])
    return Panel("cost", "pruned / original", [macs, Series("parameter ratio", params)], 1.0)


def _latency_panel(points: Sequence[Mapping[str, Any]], x: list[float]) -> Panel | None:
    latencies = [(validate_sections(p) or [{}])[-1].get("latency") for p in points]
    if not any(latencies):
        return None
    ys = [lat["ratio"] if lat else None for lat in latencies]
    bands = [tuple(lat["interval"]) if lat and lat.get("interval") else None for lat in latencies]
    series = Series("latency ratio", ys, bands)
    panel = Panel("latency", "latency ratio", [series], reference=1.0)
    limit = _limit(points, "max_latency_ratio")
    if limit is not None:
        panel.gate, panel.gate_label = limit, f"gate: ratio <= {limit:g}"
    panel.failed = _failed(points, x, ys, LATENCY_GATES, panel.gate)
    return panel


def panels(report: Mapping[str, Any]) -> list[Panel]:
    """The plot's panels, top to bottom: score, cost and (when timed) latency."""
    points = report["points"]
    x = [p["row"]["value"] for p in points]
    out = [_score_panel(points, x), _cost_panel(points)]
    latency = _latency_panel(points, x)
    return out + ([latency] if latency else [])


def title(report: Mapping[str, Any]) -> str:
    """``NAME: sweep of KEY; recommended KEY=V (point I)``, or that no point passes every gate."""
    name = Path(report["model"]).name if report.get("model") else "model"
    key = report["sweep"]["key"]
    rec = report.get("recommended")
    if rec is None:
        return f"{name}: sweep of {key}; no point passes every gate"
    return f"{name}: sweep of {key}; recommended {key}={rec['value']:g} (point {rec['index'] + 1})"


def _draw(ax: Any, panel: Panel, x: list[float], rec: Mapping[str, Any] | None) -> None:
    """One panel: its lines (with interval bars), reference, gate, failures and the pick."""
    styles = iter([("o-", "tab:blue"), ("^:", "tab:green"), ("s--", "tab:purple")])
    if panel.name == "latency":
        styles = iter([("s-", "tab:orange")])
    for s in panel.series:
        fmt, color = next(styles)
        pts = [(xi, yi) for xi, yi in zip(x, s.y, strict=True) if yi is not None]
        if not pts:
            continue
        ax.plot(*zip(*pts, strict=True), fmt, color=color, label=s.label)
        if s.interval:
            for xi, yi, band in zip(x, s.y, s.interval, strict=True):
                if band is not None and yi is not None:
                    ax.errorbar(
                        [xi],
                        [yi],
                        yerr=[[yi - band[0]], [band[1] - yi]],
                        color=color,
                        capsize=3,
                        lw=1,
                    )
    if panel.reference is not None:
        ax.axhline(
            panel.reference, color="gray", ls=":", lw=1, label=f"original ({panel.reference:.4g})"
        )
    if panel.gate is not None:
        ax.axhline(panel.gate, color="tab:red", ls="--", lw=1, label=panel.gate_label)
    if panel.failed:
        fx, fy = [f[0] for f in panel.failed], [f[1] for f in panel.failed]
        ax.plot(fx, fy, "x", color="red", ms=11, mew=2.5, label="gate failed", zorder=5)
    if rec is not None:
        ax.axvline(rec["value"], color="tab:green", lw=6, alpha=0.2, label="recommended")
        i = rec["index"]
        ys = [s.y[i] for s in panel.series if s.y[i] is not None]
        if ys:
            ax.plot([rec["value"]] * len(ys), ys, "*", color="gold", mec="black", ms=15, zorder=6)
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="x-small")


def figure(report: Mapping[str, Any]) -> Any:
    """The sweep's figure: one panel per metric (:func:`panels`), one shared x axis.

    Raises:
        MissingDependency: matplotlib is not installed.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    x = [p["row"]["value"] for p in report["points"]]
    built = panels(report)
    fig = Figure(figsize=(7.5, 2.6 * len(built) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(built), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, built, strict=True):
        _draw(ax, panel, x, report.get("recommended"))
    axes[-1].set_xlabel(report["sweep"]["key"])
    fig.suptitle(title(report))
    return fig


def sensitivity_section(report: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The first pass section of a run report with a ``sensitivity`` table (vote's), or None."""
    return next((s for s in report.get("passes", []) if s.get("sensitivity")), None)


def sensitivity_figure(report: Mapping[str, Any]) -> Any:
    """A run's sensitivity plot: one line per group, its lowest output cosine (and, with
    labels, its accuracy drop, a second panel) against the share of it pruned alone; in budget
    mode a star marks each group's ratio and a dashed line the budget.

    Raises:
        MissingDependency: matplotlib is not installed.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    section = sensitivity_section(report) or {}
    sens, budget = section["sensitivity"], section.get("budget") or {}
    metrics = ["cosine"] + (["accuracy_drop"] if sens["labels"] else [])
    fig = Figure(figsize=(7.5, 3.2 * len(metrics) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    chosen = {g["group"]: g["ratio"] for g in budget.get("groups", [])}
    limits = {"cosine": budget.get("min_cosine"), "accuracy_drop": budget.get("max_accuracy_drop")}
    for ax, metric in zip(axes, metrics, strict=True):
        for row in sens["groups"]:
            xs = [0.0] + [p["ratio"] for p in row["points"]]
            ys = [1.0 if metric == "cosine" else 0.0] + [p[metric] for p in row["points"]]
            (line,) = ax.plot(xs, ys, "o-", ms=3, label=f"group {row['group']} ({row['channels']})")
            if row["group"] in chosen:
                r = chosen[row["group"]]
                ax.plot(
                    [r], [np.interp(r, xs, ys)], "*", color=line.get_color(), mec="black", ms=12
                )
        if limits[metric] is not None:
            ax.axhline(limits[metric], color="tab:red", ls="--", lw=1, label="budget")
        ax.set_ylabel("lowest output cosine" if metric == "cosine" else "accuracy drop")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="x-small", ncol=2)
    axes[-1].set_xlabel("share of the group pruned (only that group)")
    name = Path(report["model"]).name if report.get("model") else "model"
    star = "; *: the budget's ratio per group" if chosen else ""
    fig.suptitle(f"{name}: sensitivity on {sens['samples']} samples{star}")
    return fig


def write_plot(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Draw the sweep's figure (:func:`figure`), or a run's sensitivity figure
    (:func:`sensitivity_figure`) for a report without ``sweep``, and save it to ``path``.

    Raises:
        MissingDependency: matplotlib is not installed.
        ModelSaveError: the file cannot be written.
    """
    path = Path(path)
    fig = figure(report) if "sweep" in report else sensitivity_figure(report)
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise ModelSaveError(f"{path}: cannot write the plot: {exc.strerror or exc}") from exc
    return path
