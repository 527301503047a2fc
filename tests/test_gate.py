"""Deployment gates on the command line: exit codes, the report written first, its stable schema."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import pytest
from conftest import invoke as cli
from onnx import numpy_helper

import onnxprune
from onnxprune import Pass, PassResult, register_pass
from onnxprune.passes import validate as validate_module
from onnxprune.validation import gates
from onnxprune.validation.latency import LatencyComparison, LatencyStats

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits"
MODEL = DIGITS / "torch_cnn.onnx"
DATA = DIGITS / "torch_cnn.test.npz"
FAST = "validate:runs=2,warmup=1"


def one_line_error(result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("Error: ") and "Traceback" not in err, err
    return err


def _set_zero(model: onnx.ModelProto, names, value: float = 0.0) -> None:
    for t in model.graph.initializer:
        if t.name in names:
            arr = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array(np.full_like(arr, value), t.name))


@dataclass
class ZeroLast(Pass):
    """Zero the weights and bias of the last Gemm/MatMul (a deliberately damaged model)."""

    name: ClassVar[str] = "test-zero-last"

    def run(self, model, ctx):
        last = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul")][-1]
        _set_zero(model, set(last.input[1:]))
        return PassResult(model, True, {})


@dataclass
class NanBias(Pass):
    """Set the last Gemm's bias to NaN."""

    name: ClassVar[str] = "test-nan-bias"

    def run(self, model, ctx):
        last = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
        _set_zero(model, {last.input[2]}, float("nan"))
        return PassResult(model, True, {})


@dataclass
class RenameInput(Pass):
    """Rename the first graph input (the pruned model can no longer take the data)."""

    name: ClassVar[str] = "test-rename-input"

    def run(self, model, ctx):
        old = model.graph.input[0].name
        model.graph.input[0].name = "renamed"
        for node in model.graph.node:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = "renamed"
        return PassResult(model, True, {})


@pytest.fixture
def test_passes(isolated_registry):
    for cls in (ZeroLast, NanBias, RenameInput):
        register_pass(cls)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_model_against_itself_passes_every_gate(tmp_path):
    report = tmp_path / "r.json"
    result = cli(
        MODEL,
        "-p",
        "cleanup",
        "-p",
        FAST,
        "--data",
        DATA,
        "--max-accuracy-drop",
        0.01,
        "--min-cosine",
        0.99,
        "--max-latency-ratio",
        100,
        "-o",
        tmp_path / "o.onnx",
        "--report",
        report,
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.stderr
    assert "PASSED" in result.stdout and "validate: gates" in result.stdout
    assert "validate: classification of output against labels" in result.stdout
    section = json.loads(report.read_text())["passes"][-1]
    assert section["pass"] == "validate" and section["passed"]
    assert section["options"]["runs"] == 2  # the flags set limits on the given validate pass
    assert {g["name"] for g in section["gates"]} == {
        "finite",
        "min_cosine",
        "max_accuracy_drop",
        "max_latency_ratio",
    }
    assert _files(tmp_path) == ["o.onnx", "r.json"]


def test_damaged_model_fails_accuracy_gate_with_exit_1(tmp_path, test_passes):
    report, out = tmp_path / "r.json", tmp_path / "o.onnx"
    result = cli(
        MODEL,
        "-p",
        "test-zero-last",
        "-p",
        FAST,
        "--data",
        DATA,
        "--max-accuracy-drop",
        0.01,
        "-o",
        out,
        "--report",
        report,
    )
    err = one_line_error(result, 1)
    assert re.fullmatch(
        r"Error: validation failed: max_accuracy_drop 0\.\d+ > 0\.01 \(output 'output'\)", err
    ), err
    assert "PASSED" not in result.stdout
    assert _files(tmp_path) == ["o.onnx", "r.json"]  # written before failing
    onnxprune.load(out)
    gates = json.loads(report.read_text())["passes"][-1]["gates"]
    drop = next(g for g in gates if g["name"] == "max_accuracy_drop")
    assert drop["passed"] is False and drop["value"] > 0.5 and drop["limit"] == 0.01


def test_every_failed_gate_is_named(tmp_path, test_passes):
    result = cli(
        MODEL,
        "-p",
        "test-zero-last",
        "-p",
        FAST,
        "--data",
        DATA,
        "--min-cosine",
        0.99,
        "--max-latency-ratio",
        1e-9,
        "-o",
        tmp_path / "o.onnx",
    )
    err = one_line_error(result, 1)
    assert "min_cosine 0 < 0.99 (output 'output')" in err
    assert re.search(r"max_latency_ratio [\d.e+-]+ > 1e-09", err), err


def test_gates_from_a_recipe(tmp_path, test_passes):
    recipe = tmp_path / "deploy.toml"
    recipe.write_text(
        f'data = "{DATA}"\nreport = "r.json"\noutput = "o.onnx"\n\n[[pass]]\nname = "test-zero-last"\n\n'
        '[[pass]]\nname = "validate"\nmax_accuracy_drop = 0.01\nruns = 2\nwarmup = 0\n'
    )
    err = one_line_error(cli(MODEL, "--recipe", recipe), 1)
    assert "max_accuracy_drop" in err
    assert (tmp_path / "r.json").is_file() and (tmp_path / "o.onnx").is_file()
    # the command line overrides the recipe's limit: a 100% drop is allowed
    assert cli(MODEL, "--recipe", recipe, "--max-accuracy-drop", 1.0, "-q").exit_code == 0


def test_nan_appearing_fails_the_finite_gate(tmp_path, test_passes):
    err = one_line_error(
        cli(MODEL, "-p", "test-nan-bias", "-p", FAST, "--data", DATA, "-o", tmp_path / "o.onnx"), 1
    )
    # the default accuracy gate (the data has labels) fails too, and is named after it
    assert err.startswith(
        "Error: validation failed: finite: 3590 new NaN/Inf values (output 'output'); "
        "max_accuracy_drop "
    ), err


def test_an_input_the_pruned_model_cannot_take_is_an_error(tmp_path, test_passes):
    err = one_line_error(
        cli(
            MODEL, "-p", "test-rename-input", "-p", FAST, "--data", DATA, "-o", tmp_path / "o.onnx"
        ),
        1,
    )
    assert "the pruned model has no input 'input' (its inputs: renamed)" in err
    assert _files(tmp_path) == []


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--min-cosine", 2, "min_cosine must be between -1 and 1"),
        ("--max-accuracy-drop", 1.5, "max_accuracy_drop must be between 0 and 1"),
        ("--max-latency-ratio", 0, "max_latency_ratio must be > 0"),
    ],
)
def test_bad_gate_values_exit_2(flag, value, expected, tmp_path):
    err = one_line_error(cli(MODEL, "-p", "cleanup", flag, value, "-o", tmp_path / "o.onnx"), 2)
    assert expected in err
    assert _files(tmp_path) == []


def test_a_slower_model_is_flagged_loudly(tmp_path, monkeypatch, test_passes):
    def fake(run_a, run_b, runs, warmup, *, max_ratio=None, clock=None):
        run_a(), run_b()
        slow = LatencyStats(runs, 2.0, 2.01, 2.0, 2.0, 2.02)
        return LatencyComparison(LatencyStats(runs, 1.0, 1.01, 1.0, 1.0, 1.02), slow, max_ratio)

    monkeypatch.setattr(validate_module, "compare_latency", fake)
    result = cli(MODEL, "-p", FAST, "--data", DATA, "-o", tmp_path / "o.onnx", "--device", "cpu")
    assert result.exit_code == 0  # no latency gate set: a warning, not a failure
    text = " ".join(result.stdout.split())  # rich wraps long lines
    assert "WARNING: the pruned model is SLOWER than the original" in text
    assert "ratio 2.00" in text and result.stderr == ""


def test_python_api_reads_the_gates():
    model = onnxprune.load(MODEL)
    _, report = onnxprune.run(model, ["validate:runs=0,min_cosine=0.99"], data=DATA, device="cpu")
    gates = report["passes"][-1]["gates"]
    assert [(g["name"], g["passed"]) for g in gates] == [("finite", True), ("min_cosine", True)]


def test_gates_module_finds_validate_sections_by_its_own_constant():
    assert gates.SECTION == validate_module.Validate.name == "validate"
    report = {"passes": [{"pass": "fold"}, {"pass": gates.SECTION, "gates": []}]}
    assert gates.validate_sections(report) == [report["passes"][1]]


def test_gates_read_back_the_failed_ones_in_a_few_words():
    failed = gates.gate("max_accuracy_drop", "y", 0.87474, 0.01, False)
    assert failed == {
        "name": "max_accuracy_drop",
        "output": "y",
        "value": 0.87474,
        "limit": 0.01,
        "passed": False,
    }
    ok = gates.gate("min_cosine", "y", 0.999, 0.99, np.True_)
    assert ok["passed"] is True  # a plain bool, JSON-ready
    nan = gates.gate("finite", "y", 3, 0, False)
    report = {"passes": [{"pass": gates.SECTION, "gates": [ok, failed]}, {"pass": "x"}]}
    assert gates.failed_gates(report) == [failed]
    assert gates.describe_gate(ok) == "min_cosine 0.999 >= 0.99 (output 'y')"
    assert gates.gate_message([failed, nan]) == (
        "validation failed: max_accuracy_drop 0.8747 > 0.01 (output 'y'); "
        "finite: 3 new NaN/Inf values (output 'y')"
    )


# --- the JSON report's schema is stable -------------------------------------------------------------

TOP = {"schema", "onnxprune", "model", "providers", "before", "passes", "after", "output"}
TOP |= {"status", "gates", "versions", "seed", "device", "argv", "files"}  # schema 2
VALIDATE = {
    "pass",
    "options",
    "modified",
    "seconds",
    "data",
    "providers",
    "outputs",
    "classification",
    "cost",
    "latency",
    "gates",
    "gate_defaults",
    "passed",
    "layers",  # schema 2
    "layers_skipped",
    "layers_samples",
    "warnings",
}
NESTED = {
    "data": {"source", "synthetic", "samples", "labels"},
    "outputs[]": {
        "name",
        "shape",
        "max_abs",
        "mean_abs",
        "max_rel",
        "mean_rel",
        "cosine",
        "cosine_min",
        "top1",
        "nonfinite",
        "atol",
        "rtol",
        "min_cosine",
        "close",
        "passed",
    },
    "classification": {"output", "labels", "original", "pruned", "difference", "accuracy_drop"},
    "classification.original": {"samples", "accuracy", "precision", "recall", "f1"},
    "cost": {"dims", "original", "pruned", "ratio"},
    "cost.original": {"parameters", "macs", "macs_by_op", "bytes"},
    "cost.ratio": {"parameters", "macs", "bytes"},
    "latency": {
        "provider",
        "threads",
        "cpu_count",
        "batch",
        "runs",
        "warmup",
        "original",
        "pruned",
        "ratio",
        "interval",
        "confidence",
        "slower",
        "causes",
    },
    "latency.original": {"runs", "median_ms", "p90_ms", "mean_ms", "min_ms", "max_ms"},
    "gates[]": {"name", "output", "value", "limit", "passed"},
}


def _at(section: dict, path: str):
    node = section
    for part in path.split("."):
        node = node[part[:-2]][0] if part.endswith("[]") else node[part]
    return node


def test_report_schema_is_pinned(tmp_path):
    report = tmp_path / "r.json"
    result = cli(
        MODEL,
        "-p",
        "validate:runs=2,warmup=0,max_accuracy_drop=0.5",
        "--data",
        DATA,
        "-o",
        tmp_path / "o.onnx",
        "--report",
        report,
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(report.read_text())
    assert set(data) == TOP and data["schema"] == 2
    section = data["passes"][-1]
    assert set(section) == VALIDATE
    for path, keys in NESTED.items():
        assert set(_at(section, path)) == keys, path
    assert set(section["cost"]["pruned"]) == NESTED["cost.original"]
    assert set(section["latency"]["pruned"]) == NESTED["latency.original"]


def test_schema_doc_names_every_key():
    doc = (ROOT / "docs" / "report-schema.md").read_text()
    assert "# Report schema (version 2)" in doc
    for keys in [TOP, VALIDATE, *NESTED.values()]:
        for key in keys:
            assert f"`{key}`" in doc, key
