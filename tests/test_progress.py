"""The progress display: silent off a terminal and under -q, one named line on a terminal."""

from __future__ import annotations

import shutil
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from conftest import invoke
from rich.console import Console

from onnxprune import progress


@pytest.fixture
def model(model_path, tmp_path) -> Path:
    return Path(shutil.copy(model_path("tf/cnn.onnx"), tmp_path / "cnn.onnx"))


def _terminal() -> tuple[Console, StringIO]:
    text = StringIO()
    return Console(force_terminal=True, file=text, width=80), text


def test_api_is_a_no_op_without_a_display():
    assert not progress.active()
    with progress.step("vote"), progress.task(3, "candidates") as advance:
        advance()
        advance(2)
    assert not progress.active()


def test_no_display_off_a_terminal_or_under_quiet():
    off = Console(force_terminal=False, file=StringIO())
    with progress.display(console=off):
        assert not progress.active()
    on, text = _terminal()
    with progress.display(console=on, quiet=True):
        assert not progress.active()
    assert text.getvalue() == ""


def test_a_terminal_shows_the_pass_and_its_task_on_one_transient_line():
    console, text = _terminal()
    with progress.display(console=console):
        assert progress.active()
        with progress.step("vote"), progress.task(4, "selection candidates") as advance:
            advance()
    out = text.getvalue()
    assert "vote: selection candidates" in out
    assert "0/4" in out
    assert not progress.active()
    last = out.rsplit("\n", 1)[-1]
    assert "selection candidates" not in last  # transient: erased when the display closes


def test_the_cli_names_each_pass_on_a_terminal(model, tmp_path, monkeypatch):
    console, text = _terminal()
    monkeypatch.setattr(progress, "stderr_console", lambda: console)
    result = invoke(model, "-p", "cleanup", "-p", "stats:below=0.001", "-o", tmp_path / "out.onnx")
    assert result.exit_code == 0, result.stderr
    out = text.getvalue()
    assert "cleanup" in out and "stats" in out
    assert "stats: batches" in out
    assert "stats" not in result.stderr


def test_the_cli_under_quiet_prints_nothing(model, tmp_path, monkeypatch):
    console, text = _terminal()
    monkeypatch.setattr(progress, "stderr_console", lambda: console)
    result = invoke(
        model, "-q", "-p", "cleanup", "-p", "stats:below=0.001", "-o", tmp_path / "out.onnx"
    )
    assert result.exit_code == 0
    assert text.getvalue() == ""
    assert result.stdout == "" and result.stderr == ""


def test_no_progress_output_when_stderr_is_not_a_terminal(model, tmp_path):
    out = tmp_path / "out.onnx"
    args = [
        sys.executable,
        "-m",
        "onnxprune",
        str(model),
        "-p",
        "cleanup",
        "-p",
        "stats:below=0.001",
    ]
    result = subprocess.run([*args, "-o", str(out)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stderr and "batches" not in result.stderr
    assert "━" not in result.stderr
