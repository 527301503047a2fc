"""Providers: ``--device auto|cpu|cuda``. The CUDA tests skip cleanly without a usable GPU; the
choice logic is tested everywhere with ``cuda_works`` replaced. On a GPU host, run them all with
``scripts/gpu_check.sh``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import invoke as cli

import onnxprune
from onnxprune import runtime
from onnxprune.errors import DeviceError
from onnxprune.runtime import CPU, CUDA, cuda_works, providers_for

DIGITS = Path(__file__).resolve().parents[1] / "models" / "digits"
MODEL = DIGITS / "torch_cnn.onnx"
DATA = DIGITS / "torch_cnn.test.npz"

needs_cuda = pytest.mark.skipif(not cuda_works(), reason="no GPU that onnxruntime can use here")


# --- everywhere ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("works", "device", "expected"),
    [
        (True, "auto", [CUDA, CPU]),
        (False, "auto", [CPU]),
        (True, "cuda", [CUDA, CPU]),
        (True, "cpu", [CPU]),
    ],
)
def test_provider_choice(monkeypatch, works, device, expected):
    monkeypatch.setattr(runtime, "cuda_works", lambda: works)
    assert providers_for(device) == expected


def test_cuda_without_gpu_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setattr(runtime, "cuda_works", lambda: False)
    with pytest.raises(DeviceError, match="--device cuda: onnxruntime cannot use CUDA here"):
        providers_for("cuda")


def test_auto_says_which_provider(tmp_path):
    result = cli(MODEL, "-p", "validate:runs=1,warmup=0", "--data", DATA, "-o", tmp_path / "o.onnx")
    assert result.exit_code == 0, result.stderr
    expected = "(auto: a usable GPU)" if cuda_works() else "(auto: no usable GPU)"
    assert expected in " ".join(result.stdout.split())


# --- on a GPU host -----------------------------------------------------------------------------------


@needs_cuda
def test_validate_on_cuda_records_the_provider(tmp_path):
    report = tmp_path / "r.json"
    result = cli(
        MODEL,
        "-p",
        "validate:runs=20,warmup=5",
        "--data",
        DATA,
        "--device",
        "cuda",
        "--min-cosine",
        0.9999,
        "--max-accuracy-drop",
        0.0,
        "-o",
        tmp_path / "o.onnx",
        "--report",
        report,
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(report.read_text())
    section = data["passes"][-1]
    assert data["providers"][0] == CUDA
    assert section["providers"][0] == CUDA and section["latency"]["provider"] == CUDA
    assert section["classification"]["accuracy_drop"] == 0.0
    assert section["latency"]["original"]["median_ms"] > 0


@needs_cuda
def test_fold_then_validate_on_cuda():
    model = onnxprune.load(
        Path(__file__).resolve().parents[1] / "models/torch/cnn_masked_legacy.onnx"
    )
    _, report = onnxprune.run(
        model, ["cleanup", "fold", "validate:runs=10,min_cosine=0.9999"], device="cuda"
    )
    section = report["passes"][-1]
    assert section["latency"]["provider"] == CUDA
    assert section["passed"], section["gates"]
    assert section["cost"]["ratio"]["macs"] < 1.0
