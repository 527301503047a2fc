"""The package's layout rules, checked on its source: module size, private names, sessions.

(The import layers and the absence of circles are import-linter contracts in pyproject.toml,
run by CI as ``lint-imports``.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "onnxprune"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_LINES = 450


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_is_short(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines (at most {MAX_LINES})"


def test_no_private_name_is_imported_across_modules() -> None:
    found = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("onnxprune"):
                found += [
                    f"{_module_name(path)}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and a.name != "__version__"
                ]
    assert not found, found


def test_sessions_are_made_in_one_place() -> None:
    makers = [
        _module_name(path)
        for path in MODULES
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "InferenceSession"
    ]
    assert makers == ["onnxprune.runtime"], makers


def test_every_package_folder_is_a_package() -> None:
    """A folder without __init__.py would be left out of a built wheel."""
    folders = {p.parent for p in MODULES}
    assert all((f / "__init__.py").exists() for f in folders), folders
