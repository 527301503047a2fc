"""Validation gates: how the validate pass records them, and how a run report is read back.

A gate is a dict ``{name, output, value, limit, passed}`` in a validate section's ``gates``.
Gates are recorded, never raised; whoever runs the chain (the CLI, a sweep) reads them back
here and decides. Validate sections are found by :data:`SECTION`, the ``pass`` key of each
section, so a reader of the report needs no pass module.

The verdict of a run (:func:`verdict`) claims a pass only when gates were checked and held:
``PASSED`` (gates checked, none failed), ``FAILED`` (naming every failed gate), else ``DONE``
with what was not checked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from onnxprune.validation.latency import CONFIDENCE

SECTION = "validate"


def gate(name: str, output: str | None, value: Any, limit: float, passed: bool) -> dict[str, Any]:
    """One gate as recorded in a validate section (``output`` None: not about one output)."""
    return {"name": name, "output": output, "value": value, "limit": limit, "passed": bool(passed)}


def validate_sections(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The validate sections of a run report, in chain order."""
    return [s for s in report.get("passes", []) if s.get("pass") == SECTION]


def checked_gates(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every gate of every validate section of ``report``."""
    return [g for s in validate_sections(report) for g in s.get("gates", [])]


def failed_gates(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every failed gate of every validate section of ``report``."""
    return [g for g in checked_gates(report) if not g["passed"]]


def verdict(report: Mapping[str, Any]) -> str:
    """The run's verdict in a few words, from its report (a sweep's too).

    ``PASSED (5 gates held)``; ``FAILED (min_cosine 0.41 < 0.99 (output 'y'))``, every failed
    gate named; ``DONE (no gates checked: ...)`` when no gate was checked; for a sweep, which
    explores and so never passes or fails, ``DONE (sweep: gates held at 3 of 8 points)``.
    """
    if "points" in report:
        points = report["points"]
        held = sum(1 for p in points if checked_gates(p) and not failed_gates(p))
        return f"DONE (sweep: gates held at {held} of {len(points)} points)"
    failed = failed_gates(report)
    if failed:
        return f"FAILED ({'; '.join(describe_gate(g) for g in failed)})"
    gates = checked_gates(report)
    if gates:
        return f"PASSED ({len(gates)} gate{'s' if len(gates) > 1 else ''} held)"
    if validate_sections(report):
        return "DONE (no gates checked: validate:gates=off)"
    return "DONE (no gates checked: add -p validate to compare with the original)"


def describe_gate(g: Mapping[str, Any]) -> str:
    """``max_accuracy_drop 0.8747 > 0.01 (output 'y')``: a gate's figures in a few words."""
    value, limit = g["value"], g["limit"]
    where = f" (output {g['output']!r})" if g["output"] else ""
    if g["name"] == "finite":
        return f"finite: {value} new NaN/Inf values{where}"
    shown = "n/a" if value is None else f"{value:.4g}"
    if g.get("interval"):
        lo, hi = g["interval"]
        ci = f" ({CONFIDENCE:.0%} interval {lo:.4g}-{hi:.4g})"
        if g["passed"] and value is not None and value > limit:
            return f"{g['name']} {shown}, not above {limit:g} beyond noise{ci}"
        where += ci
    sign = (
        ("<=" if g["passed"] else ">")
        if g["name"].startswith("max_")
        else (">=" if g["passed"] else "<")
    )
    return f"{g['name']} {shown} {sign} {limit:g}{where}"


def gate_message(failed: Sequence[Mapping[str, Any]]) -> str:
    """The one-line error for failed gates."""
    return "validation failed: " + "; ".join(describe_gate(g) for g in failed)
