"""The error module: every error class in one place, exit codes, and how a foreign error is quoted."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from onnxprune import errors
from onnxprune.errors import first_line

PACKAGE = Path(__file__).resolve().parents[1] / "onnxprune"


@pytest.mark.parametrize(
    ("cls", "code"),
    [(errors.OutputMismatch, 1), (errors.InputMismatch, 1), (errors.MissingDependency, 2)],
)
def test_moved_errors_keep_their_exit_codes(cls, code):
    assert issubclass(cls, errors.OnnxPruneError) and cls.exit_code == code


@pytest.mark.parametrize(
    ("exc", "line"),
    [
        (RuntimeError("\n  [ONNXRuntimeError] : 2 : BAD  \nstack"), "[ONNXRuntimeError] : 2 : BAD"),
        (ValueError("one line"), "one line"),
        (ValueError(""), "ValueError"),
        (OSError("  \n \n"), "OSError"),
    ],
)
def test_first_line_is_the_first_non_empty_line_stripped(exc, line):
    assert first_line(exc) == line


def test_every_error_class_lives_in_errors_py():
    ours = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, Exception)}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "errors.py":
            continue
        tree = ast.parse(path.read_text())
        bases = {
            node.name: [ast.unparse(b) for b in node.bases]
            for node in ast.walk(tree)
            if isinstance(node, ast.ClassDef)
        }
        raised = [n for n, b in bases.items() if any(x.split(".")[-1] in ours for x in b)]
        assert not raised, f"{path.relative_to(PACKAGE)}: error classes {raised}"


def test_validation_imports_no_pass_module():
    """validation/ sits below passes/: the passes import it, never the other way round."""
    for path in (PACKAGE / "validation").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = [
            node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
        ] + [a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names]
        assert not [n for n in names if n.startswith("onnxprune.passes")], path.name
