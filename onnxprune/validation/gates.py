"""Validation gates: how the validate pass records them, and how a run report is read back.

A gate is a dict ``{name, output, value, limit, passed}`` in a validate section's ``gates``.
Gates are recorded, never raised; whoever runs the chain (the CLI, a sweep) reads them back
here and decides. Validate sections are found by :data:`SECTION`, the ``pass`` key of each
section, so a reader of the report needs no pass module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

SECTION = "validate"


def gate(name: str, output: str | None, value: Any, limit: float, passed: bool) -> dict[str, Any]:
    """One gate as recorded in a validate section (``output`` None: not about one output)."""
    return {"name": name, "output": output, "value": value, "limit": limit, "passed": bool(passed)}


def validate_sections(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The validate sections of a run report, in chain order."""
    return [s for s in report.get("passes", []) if s.get("pass") == SECTION]


def failed_gates(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every failed gate of every validate section of ``report``."""
    return [g for s in validate_sections(report) for g in s.get("gates", []) if not g["passed"]]


def describe_gate(g: Mapping[str, Any]) -> str:
    """``max_accuracy_drop 0.8747 > 0.01 (output 'y')``: a gate's figures in a few words."""
    value, limit = g["value"], g["limit"]
    where = f" (output {g['output']!r})" if g["output"] else ""
    if g["name"] == "finite":
        return f"finite: {value} new NaN/Inf values{where}"
    shown = "n/a" if value is None else f"{value:.4g}"
    sign = (
        ("<=" if g["passed"] else ">")
        if g["name"].startswith("max_")
        else (">=" if g["passed"] else "<")
    )
    return f"{g['name']} {shown} {sign} {limit:g}{where}"


def gate_message(failed: Sequence[Mapping[str, Any]]) -> str:
    """The one-line error for failed gates."""
    return "validation failed: " + "; ".join(describe_gate(g) for g in failed)
