"""Reports: the summary table shown on the terminal, and the JSON file (written atomically)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from rich.table import Table

from onnxprune.errors import ModelSaveError

REPORT_SCHEMA_VERSION = 1
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
    return table


def write_json(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``report`` (with its schema version) atomically to ``path``."""
    path = Path(path)
    data = json.dumps({"schema": REPORT_SCHEMA_VERSION, **report}, indent=2, default=str) + "\n"
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
        with os.fdopen(fd, "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise ModelSaveError(f"{path}: cannot write the report: {exc.strerror or exc}") from exc
    return path
