"""What a run shows: every terminal table of a run, a sweep or ``--inspect``, and the JSON file.

The tables read the JSON-ready report (:func:`onnxprune.run`'s, a validate section, a sweep's),
never the passes, so what the terminal shows is what ``--report`` writes (safely, through
:mod:`onnxprune.outputs`). A pass that did less than asked says why in its section's
``shortfall`` rows (:func:`shortfall_table`) and ``warnings``; the run ends with one line,
:func:`final_line`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from onnxprune.outputs import is_stdout, write_file
from onnxprune.runtime import CPU
from onnxprune.validation.gates import checked_gates, validate_sections

if TYPE_CHECKING:
    from onnxprune.analysis.coverage import UncoveredLayer
    from onnxprune.analysis.labels import ChannelGroup

REPORT_SCHEMA_VERSION = 2  # docs/report-schema.md says what each version changed
LAYER_ROWS = 30  # rows of a layer-diff table on the terminal (the report has them all)
LAYER_AGREE = 0.9999  # a layer whose cosine is below this is where agreement drops
SHORTFALL_ROWS = 20  # rows of a shortfall table on the terminal (the report has them all)
SHORTFALL_TITLES = {"vote": "less than asked", "fold": "zero or constant channels kept"}
_ROWS = (
    ("nodes", "nodes"),
    ("parameters", "parameters"),
    ("macs", "MACs"),
    ("bytes", "size"),
    ("opset", "opset"),
    ("framework", "framework"),
)


def human(value: Any, key: str = "") -> str:
    """Readable figure: 1.2M, 34.5k, 1.3 MiB."""
    if not isinstance(value, int) or isinstance(value, bool):
        return str(value)
    if key == "bytes":
        for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if value >= size:
                return f"{value / size:.1f} {unit}"
        return f"{value} B"
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


def summary_table(
    before: dict[str, Any], after: dict[str, Any] | None = None, title: str = ""
) -> Table:
    """Before/after table of a model's size and cost (one column when ``after`` is None)."""
    table = Table(title=title or None)
    table.add_column("")
    table.add_column("before" if after else "model", justify="right")
    if after:
        table.add_column("after", justify="right")
        table.add_column("ratio", justify="right")
    for key, label in _ROWS:
        row = [label, human(before[key], key)]
        if after:
            row.append(human(after[key], key))
            b, a = before[key], after[key]
            numeric = isinstance(b, int) and not isinstance(b, bool) and key not in ("opset",)
            row.append(f"{a / b:.3f}" if numeric and b else "")
        table.add_row(*row)
    if before.get("macs_note"):  # symbolic dims no --input-shape fixed
        table.caption = before["macs_note"]
    return table


def passes_table(sections: Sequence[Mapping[str, Any]]) -> Table:
    """One row per pass: name, modified, seconds, and its scalar report fields."""
    table = Table(title="passes")
    for col in ("pass", "modified", "seconds", "details"):
        table.add_column(col)
    # a validate section's verdict is its gates table's and the final line's to tell
    skip = {"pass", "options", "modified", "seconds", "passed", "gate_defaults"}
    skip |= {"layers_skipped", "layers_samples"}  # the layers table's caption says them
    for s in sections:
        details = ", ".join(
            f"{k}={v}" for k, v in s.items() if k not in skip and not isinstance(v, (list, dict))
        )
        table.add_row(s["pass"], "yes" if s["modified"] else "no", f"{s['seconds']:.3f}", details)
    return table


def shortfall_table(section: Mapping[str, Any]) -> Table:
    """A pass's ``shortfall`` rows: per group what it was asked, what it did, and why not more.

    Columns are the rows' keys (vote: group, layers, asked, pruned, reason; fold: group, layers,
    kept, reason); a row without a group (a layer no group covers) shows ``-``.
    """
    rows = section["shortfall"]
    name = section["pass"]
    table = Table(title=f"{name}: {SHORTFALL_TITLES.get(name, 'less than asked')}")
    for col in rows[0]:
        table.add_column("why" if col == "reason" else col, overflow="fold")
    for row in rows[:SHORTFALL_ROWS]:
        table.add_row(*("-" if v is None else str(v) for v in row.values()))
    if len(rows) > SHORTFALL_ROWS:
        table.caption = f"and {len(rows) - SHORTFALL_ROWS} more rows in the --report file"
    return table


def budget_tables(section: Mapping[str, Any]) -> list[Table]:
    """vote's ``sensitivity`` (each group pruned alone: lowest output cosine, accuracy change
    in points) with, in budget mode, each group's ratio and the measured change (caption)."""
    sens, budget = section.get("sensitivity"), section.get("budget")
    if not sens:
        return []
    table = Table(
        title=f"{section['pass']}: sensitivity on {sens['samples']} samples "
        f"({sens['data']}), each group pruned alone"
    )
    ratios = {r["group"]: f"{r['ratio']:g}" for r in (budget or {}).get("groups", [])}
    for col in ("group", "layers", "channels", *(f"{r:g}" for r in sens["ratios"])):
        table.add_column(col, overflow="fold")
    table.add_column("budget ratio") if budget else None
    for row in sens["groups"]:
        cells = [_sens_cell(p) for p in row["points"]] + [ratios.get(row["group"], "0")][
            : len(ratios)
        ]
        table.add_row(str(row["group"]), ", ".join(row["layers"]), str(row["channels"]), *cells)
    table.caption = "cell: lowest output cosine (accuracy change) @ the share pruned"
    if budget:  # the groups' ratios are in the last column
        m, ev, cal = budget["measured"], budget["evaluation"], budget["calibration"]
        drop = "" if m["accuracy_drop"] is None else f", accuracy drop {m['accuracy_drop']:.4f}"
        table.caption += (
            f"; budget: estimated MAC ratio {budget['mac_ratio']:.3f}, judged on {_rows(ev)}: "
            f"cosine {m['cosine']:.4f}{drop}; calibrated on {_rows(cal)}"
        )
    return [table]


def _sens_cell(p: Mapping[str, Any]) -> str:
    change = "" if p["accuracy_drop"] is None else f" ({-100 * p['accuracy_drop']:+.1f} pt)"
    return f"{p['cosine']:.4f}{change} @{p['ratio']:g}"


def _rows(d: Mapping[str, Any]) -> str:
    return d["source"] + (f" rows {d['rows'][0]}-{d['rows'][1] - 1}" if "rows" in d else "")


def _ratio(a: float | None, b: float | None) -> str:
    return f"{b / a:.3f}" if a and b is not None else ""


def _cell(value: float | None, spec: str = ".4g") -> str:
    return "n/a" if value is None else format(value, spec)


def validate_tables(section: Mapping[str, Any]) -> list[Table]:
    """Terminal tables of one validate section: outputs, classification, cost, gates."""
    outputs = Table(
        title=f"validate: outputs on {section['data']['samples']} samples "
        f"({section['data']['source']})"
    )
    outputs.add_column("")
    for o in section["outputs"]:
        outputs.add_column(o["name"], justify="right")
    rows = (
        ("shape", lambda o: "x".join(map(str, o["shape"]))),
        ("max abs error", lambda o: _cell(o["max_abs"])),
        ("mean abs error", lambda o: _cell(o["mean_abs"])),
        ("max rel error", lambda o: _cell(o["max_rel"])),
        ("mean rel error", lambda o: _cell(o["mean_rel"])),
        ("cosine (mean)", lambda o: _cell(o["cosine"], ".6f")),
        ("cosine (worst sample)", lambda o: _cell(o["cosine_min"], ".6f")),
        ("top-1 agreement", lambda o: _cell(o["top1"], ".2%")),
        ("new NaN/Inf", lambda o: str(o["nonfinite"])),
    )
    for label, cell in rows:
        outputs.add_row(label, *(cell(o) for o in section["outputs"]))
    tables = [outputs]
    cls = section["classification"]
    if cls:
        basis = "labels" if cls["labels"] else "original's predictions (no labels)"
        t = Table(title=f"validate: classification of {cls['output']} against {basis}")
        for col in ("", "original", "pruned", "difference"):
            t.add_column(col, justify="right")
        for k in ("accuracy", "precision", "recall", "f1"):
            label = k if k == "accuracy" else f"macro {k}"
            t.add_row(
                label,
                f"{cls['original'][k]:.4f}",
                f"{cls['pruned'][k]:.4f}",
                f"{cls['difference'][k]:+.4f}",
            )
        tables.append(t)
    cost, lat = section["cost"], section["latency"]
    dims = ", ".join(f"{k}={v}" for k, v in cost["dims"].items())
    t = Table(title="validate: cost" + (f" ({dims})" if dims else ""))
    for col in ("", "original", "pruned", "ratio"):
        t.add_column(col, justify="right")
    for k, label in (("parameters", "parameters"), ("macs", "MACs"), ("bytes", "size")):
        a, b = cost["original"][k], cost["pruned"][k]
        t.add_row(label, human(a, k), human(b, k), _ratio(a, b))
    if lat:
        for k, label in (("median_ms", "latency median ms"), ("p90_ms", "latency p90 ms")):
            a, b = lat["original"][k], lat["pruned"][k]
            t.add_row(label, f"{a:.4f}", f"{b:.4f}", _ratio(a, b))
        t.caption = (
            f"{lat['provider']}, threads {lat['threads'] or 'default'}, batch "
            f"{lat['batch']}, {lat['runs']} interleaved runs after {lat['warmup']} warm-up"
        )
        if lat.get("interval"):
            lo, hi = lat["interval"]
            t.caption += f"; ratio {lat['confidence']:.0%} interval {lo:.3f}-{hi:.3f}"
    tables.append(t)
    if section["gates"]:
        title = "validate: gates"
        if section.get("gate_defaults"):
            title += " (defaults; a limit or validate:gates=off changes them)"
        t = Table(title=title)
        for col in ("gate", "output", "value", "limit", "result"):
            t.add_column(col, justify="right")
        for g in section["gates"]:
            value = g["value"] if isinstance(g["value"], int) else _cell(g["value"])
            if g.get("interval"):
                value = f"{value} ({_cell(g['interval'][0])}-{_cell(g['interval'][1])})"
            t.add_row(
                g["name"],
                g["output"] or "",
                str(value),
                f"{g['limit']:g}",
                "pass" if g["passed"] else "[bold red]FAIL[/]",
            )
        tables.append(t)
    if section.get("layers") is not None:
        tables.append(layers_table(section))
    return tables


def layers_table(section: Mapping[str, Any]) -> Table:
    """``validate:layers=true``: per shared tensor, in graph order, cosine and max abs error.

    Past :data:`LAYER_ROWS` rows the table starts a few rows before the first tensor whose
    cosine is below :data:`LAYER_AGREE` (where agreement drops), so that row is always shown.
    """
    rows = section["layers"]
    first = next(
        (i for i, r in enumerate(rows) if r["cosine"] is not None and r["cosine"] < LAYER_AGREE),
        None,
    )
    start = 0
    if len(rows) > LAYER_ROWS and first is not None:
        start = max(0, min(first - 3, len(rows) - LAYER_ROWS))
    title = (
        f"validate: layers on {section['layers_samples']} samples (graph order; shape of a batch)"
    )
    t = Table(title=title)
    for col in ("#", "tensor", "op", "shape", "cosine", "max abs error"):
        t.add_column(
            col,
            justify="right" if col in ("#", "cosine", "max abs error") else "left",
            overflow="fold",
        )
    for i, r in enumerate(rows[start : start + LAYER_ROWS], start):
        cos = _cell(r["cosine"], ".6f")
        t.add_row(
            str(i),
            r["tensor"],
            r["op"],
            "x".join(map(str, r["shape"])),
            f"[bold red]{cos}[/]" if i == first else cos,
            _cell(r["max_abs"]),
        )
    notes = [f"{section['layers_skipped']} shared tensors skipped (shape changed by pruning)"]
    notes.append(
        "agreement drops first at #{} {}".format(first, rows[first]["tensor"])
        if first is not None
        else f"every tensor agrees (cosine >= {LAYER_AGREE})"
    )
    if len(rows) > LAYER_ROWS:
        notes.append(f"rows {start}-{start + LAYER_ROWS - 1} of {len(rows)}; all in the report")
    t.caption = "; ".join(notes)
    return t


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
    for point, r in zip(report["points"], rows, strict=True):
        verdict = "pass" if r["gates_passed"] else "[bold red]FAIL[/]"
        table.add_row(
            f"{r['value']:g}",
            f"{r['parameters']:,}",
            _cell(r["macs_ratio"], ".3f"),
            _cell(r["score"], ".4f"),
            _cell(r["latency_ratio"], ".3f"),
            verdict if checked_gates(point) else "not checked",
        )
    if "recommended" in report:
        rec = report["recommended"]
        table.caption = (
            f"recommended: {key}={rec['value']:g}, the smallest point that passes every gate"
            if rec
            else "recommended: none (no point passes every gate)"
        )
    return table


def groups_table(groups: Sequence[ChannelGroup], title: str) -> Table:
    """``--inspect``: one row per channel group: size, prunable share, MACs, producers, why not."""
    table = Table(title=title)
    for col in ("#", "channels", "prunable", "MACs", "producers", "why not (first reason)"):
        table.add_column(col, overflow="fold")  # full node names: wrapped, never cut
    for g in groups:
        free = g.channels - g.pinned
        table.add_row(
            str(g.index),
            str(g.channels),
            f"{free}/{g.channels}",
            human(g.macs),
            ", ".join(f"{s.op} {s.node}" for s in g.spaces),
            g.reasons[0] if g.reasons else "",
        )
    return table


def uncovered_table(layers: Sequence[UncoveredLayer], title: str = "layers in no group") -> Table:
    """``--inspect``: one row per weighted layer that no channel group covers, with why."""
    table = Table(title=title)
    for col in ("layer", "channels", "why not"):
        table.add_column(col)
    for layer in layers:
        table.add_row(
            layer.layer, "" if layer.channels is None else str(layer.channels), layer.reason
        )
    return table


def providers_line(providers: Sequence[str], device: str) -> str:
    """``providers: ...``, saying what ``--device auto`` picked."""
    line = f"providers: {', '.join(providers)}"
    if device == "auto":
        line += " (auto: a usable GPU)" if providers[0] != CPU else " (auto: no usable GPU)"
    return line


def warnings(sections: Sequence[Mapping[str, Any]], prefix: str = "") -> list[Text]:
    """Every section's warnings (a slower pruned model, a vote that pruned nothing...), loud.

    Built from plain text, so brackets in a warning are never read as markup.
    """
    out = []
    for s in sections:
        for w in s.get("warnings", []):
            line = Text("WARNING:", style="bold red")
            line.append(f" {prefix}{w}")
            out.append(line)
    return out


def run_view(report: Mapping[str, Any], title: str, device: str) -> list[RenderableType]:
    """What a run prints, in order: summary, passes, validate tables, providers, warnings."""
    view: list[RenderableType] = [
        summary_table(report["before"], report["after"], title=title),
        passes_table(report["passes"]),
    ]
    view += [shortfall_table(s) for s in report["passes"] if s.get("shortfall")]
    view += [t for s in report["passes"] for t in budget_tables(s)]
    for section in validate_sections(report):
        view += validate_tables(section)
    view.append(providers_line(report["providers"], device))
    return view + warnings(report["passes"])


def sweep_view(report: Mapping[str, Any], device: str) -> list[RenderableType]:
    """What a sweep prints: its table, providers, then each point's warnings."""
    view: list[RenderableType] = [sweep_table(report), providers_line(report["providers"], device)]
    key = report["sweep"]["key"]
    for point in report["points"]:
        view += warnings(point["passes"], f"{key}={point['value']:g}: ")
    return view


def final_line(verdict: str, seconds: float, argv: Sequence[str]) -> str:
    """The last line of a run: ``PASSED (5 gates held) | 1.23 s | onnxprune model.onnx ...``.

    ``verdict`` is :func:`onnxprune.validation.gates.verdict`'s: PASSED only when gates were
    checked and held, FAILED naming every failed gate, else DONE saying what was not checked.
    """
    return f"{verdict} | {seconds:.2f} s | onnxprune {' '.join(argv)}"


def report_json(report: Mapping[str, Any]) -> str:
    """The report as the JSON text ``--report`` writes: its schema version, then ``status``
    (when it has one) first, for whoever reads it by eye."""
    head: dict[str, Any] = {"schema": REPORT_SCHEMA_VERSION}
    if "status" in report:
        head["status"] = report["status"]
    return json.dumps({**head, **report}, indent=2, default=str) + "\n"


def inspect_report(groups: Sequence[ChannelGroup], record: Mapping[str, Any]) -> dict[str, Any]:
    """``--inspect --json``: the channel groups with full node names, after ``record`` (model,
    providers, versions, seed, device, argv, files, probe data: :mod:`onnxprune.provenance`)."""
    return {
        "onnxprune": record["versions"]["onnxprune"],
        **record,
        "groups": [
            {
                "index": g.index,
                "channels": g.channels,
                "pinned": g.pinned,
                "prunable": g.channels - g.pinned,
                "macs": g.macs,
                "producers": [{"op": s.op, "node": s.node, "channels": s.size} for s in g.spaces],
                "members": list(g.members),
                "reasons": list(g.reasons),
            }
            for g in groups
        ],
    }


def write_json(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``report`` as JSON to ``path`` safely; ``-`` (or stdout's own file) is stdout.

    Raises:
        ModelSaveError: the file cannot be written.
    """
    text = report_json(report)
    if is_stdout(path):
        sys.stdout.write(text)
        sys.stdout.flush()
        return Path(path)
    return write_file(path, "report", text.encode())
