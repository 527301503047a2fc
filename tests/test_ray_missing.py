"""``--workers`` without Ray installed: one line naming what to install, exit 2, before any work.

"Not installed" is simulated with ``sys.modules["ray"] = None`` (``import ray`` then raises
ImportError), in a subprocess for the command line and in-process for the Python API.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import onnxprune
from onnxprune.errors import MissingDependency

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models/digits/torch_cnn.onnx"
CALIB = ROOT / "models/digits/torch_cnn.calib.npz"
WITHOUT_RAY = (
    "import sys; sys.modules['ray'] = None; from onnxprune.cli import main; "
    "main(sys.argv[1:], prog_name='onnxprune')"
)
INSTALL = "pip install 'onnxprune[ray]'"


def test_cli_workers_without_ray_says_what_to_install(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    args = [DIGITS, "-p", "vote", "--data", CALIB, "--workers", "2", "-o", out]
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_RAY, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --workers needs Ray"), done.stderr
    assert INSTALL in lines[0] and not out.exists()


def test_api_workers_without_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingDependency, match=r"pip install 'onnxprune\[ray\]'"):
        onnxprune.run(DIGITS, "vote", data=CALIB, workers=2)
