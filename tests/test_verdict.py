"""The final line never claims a pass it did not check (issue 9): PASSED only when gates were
checked and held, FAILED naming every failed gate (exit 1), else DONE saying what was not
checked; validate has default gates a user can change or turn off."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from conftest import build_model
from conftest import invoke as cli
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune import Pass, PassResult, register_pass
from onnxprune.passes.validate import Validate, with_gates
from onnxprune.validation.gates import gate, verdict

DIGITS = Path(__file__).resolve().parents[1] / "models" / "digits"
MODEL = DIGITS / "torch_cnn.onnx"
DATA = DIGITS / "torch_cnn.test.npz"


def last_line(result) -> str:
    return result.stdout.strip().splitlines()[-1]


@dataclass
class Collapse(Pass):
    """Zero the last Gemm's weights and bias, or set its bias to NaN (``nan``)."""

    name: ClassVar[str] = "test-collapse"
    nan: bool = False

    def run(self, model, ctx):
        last = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
        for t in model.graph.initializer:
            if t.name in last.input[1:] and (not self.nan or t.name == last.input[2]):
                arr = numpy_helper.to_array(t)
                fill = np.nan if self.nan else 0.0
                t.CopyFrom(numpy_helper.from_array(np.full_like(arr, fill), t.name))
        return PassResult(model, True, {})


@pytest.fixture
def collapse(isolated_registry):
    register_pass(Collapse)


def test_vote_fold_validate_with_labels_fails_on_an_accuracy_collapse(tmp_path: Path) -> None:
    result = cli(
        MODEL, "-p", "vote", "-p", "fold", "-p", "validate:runs=0", "--data", DATA,
        "-o", tmp_path / "o.onnx",
    )  # fmt: skip
    assert result.exit_code == 1, result.stdout
    assert last_line(result).startswith("FAILED (max_accuracy_drop 0.")
    assert "PASSED" not in result.stdout
    assert result.stderr.startswith("Error: validation failed: max_accuracy_drop")
    assert (tmp_path / "o.onnx").is_file()  # written before failing, as always


def test_synthetic_data_collapse_fails_the_default_cosine_gate(tmp_path, collapse) -> None:
    result = cli(MODEL, "-p", "test-collapse", "-p", "validate:runs=0", "-o", tmp_path / "o")
    assert result.exit_code == 1
    assert last_line(result).startswith("FAILED (min_cosine 0 < 0.99 (output 'output')) | ")
    text = " ".join(result.stdout.split())
    assert "validate: gates (defaults;" in text


def test_an_unchanged_model_passes_the_default_gates(tmp_path: Path) -> None:
    result = cli(MODEL, "-p", "validate:runs=0", "-o", tmp_path / "o.onnx")
    assert result.exit_code == 0, result.stderr
    assert last_line(result).startswith("PASSED (2 gates held) | ")
    with_labels = cli(MODEL, "-p", "validate:runs=0", "--data", DATA, "-o", tmp_path / "o.onnx")
    assert last_line(with_labels).startswith("PASSED (2 gates held) | ")
    assert "max_accuracy_drop" in with_labels.stdout


def test_gates_off_checks_nothing_and_says_so(tmp_path, collapse) -> None:
    result = cli(
        MODEL, "-p", "test-collapse", "-p", "validate:runs=0,gates=off", "-o", tmp_path / "o"
    )
    assert result.exit_code == 0, result.stderr
    assert last_line(result).startswith("DONE (no gates checked: validate:gates=off) | ")
    nan = cli(
        MODEL, "-p", "test-collapse:nan=true", "-p", "validate:runs=0,gates=off",
        "-o", tmp_path / "o",
    )  # fmt: skip
    assert nan.exit_code == 0
    text = " ".join(nan.stdout.split())
    assert re.search(r"WARNING: output 'output' has \d+ new NaN/Inf values \(gates=off: not", text)


def test_gates_off_and_a_limit_contradict(tmp_path: Path) -> None:
    result = cli(MODEL, "-p", "validate:gates=off,min_cosine=0.9", "-o", tmp_path / "o.onnx")
    assert result.exit_code == 2
    assert "gates=off contradicts min_cosine" in result.stderr


def test_a_command_line_limit_turns_the_gates_back_on(tmp_path, collapse) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[[pass]]\nname = "test-collapse"\n\n[[pass]]\nname = "validate"\ngates = "off"\nruns = 0\n'
    )
    off = cli(MODEL, "--recipe", recipe, "--data", DATA, "-o", tmp_path / "o.onnx")
    assert off.exit_code == 0 and "DONE (no gates checked" in last_line(off)
    on = cli(MODEL, "--recipe", recipe, "--data", DATA, "--min-cosine", 0.5, "-o", tmp_path / "o")
    assert on.exit_code == 1 and last_line(on).startswith("FAILED (min_cosine")


def test_a_limit_replaces_the_defaults() -> None:
    model = onnxprune.load(MODEL)
    _, report = onnxprune.run(model, ["validate:runs=0,max_accuracy_drop=0.5"], data=DATA)
    section = report["passes"][0]
    assert [g["name"] for g in section["gates"]] == ["finite", "max_accuracy_drop"]
    assert section["gates"][1]["limit"] == 0.5 and not section["gate_defaults"]
    _, report = onnxprune.run(model, ["validate:runs=0"], data=DATA)
    section = report["passes"][0]
    assert [(g["name"], g["limit"]) for g in section["gates"]] == [
        ("finite", 0),
        ("max_accuracy_drop", 0.01),
    ]
    assert section["gate_defaults"]


def test_labels_without_a_classifier_default_to_the_cosine(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 2])
    model = build_model([helper.make_node("Relu", ["x"], ["y"])], [x], [y], {})
    data = tmp_path / "d.npz"
    np.savez(data, x=np.ones((3, 4, 2), np.float32), labels=np.array([0, 1, 0]))
    _, report = onnxprune.run(model, ["validate:runs=0"], data=data)
    section = report["passes"][0]
    assert [(g["name"], g["limit"]) for g in section["gates"]] == [
        ("finite", 0),
        ("min_cosine", 0.99),
    ]
    assert section["warnings"] == ["labels ignored: no classifier-like output ([N, C] scores)"]


def test_summary_only_and_a_chain_without_validate_claim_no_pass(tmp_path: Path) -> None:
    summary = cli(MODEL)
    assert summary.exit_code == 0
    assert last_line(summary).startswith("DONE (summary only, no gates checked) | ")
    fold = cli(MODEL, "-p", "fold", "-o", tmp_path / "o.onnx")
    assert last_line(fold).startswith("DONE (no gates checked: add -p validate")


def test_a_sweep_says_at_how_many_points_the_gates_held(tmp_path, collapse) -> None:
    result = cli(
        MODEL, "-p", "vote:round_to=1", "-p", "validate:runs=0", "--data", DATA,
        "--sweep", "0.05,0.9",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr  # a sweep explores: exit 0 whatever the gates
    assert last_line(result).startswith("DONE (sweep: gates held at ")
    assert last_line(result).split("|")[0].strip().endswith("of 2 points)")


def test_verdict_wording() -> None:
    ok = gate("min_cosine", "y", 0.999, 0.99, True)
    bad = gate("max_accuracy_drop", "y", 0.58, 0.01, False)
    nan = gate("finite", "y", 3, 0, False)

    def report(*gates, **section):
        return {"passes": [{"pass": "fold"}, {"pass": "validate", "gates": list(gates), **section}]}

    assert verdict(report(ok)) == "PASSED (1 gate held)"
    assert verdict(report(ok, ok)) == "PASSED (2 gates held)"
    assert verdict(report(ok, bad, nan)) == (
        "FAILED (max_accuracy_drop 0.58 > 0.01 (output 'y'); finite: 3 new NaN/Inf values "
        "(output 'y'))"
    )
    assert verdict(report()) == "DONE (no gates checked: validate:gates=off)"
    assert verdict({"passes": [{"pass": "fold"}]}).startswith("DONE (no gates checked: add")
    sweep = {"points": [report(ok), report(bad), report()]}
    assert verdict(sweep) == "DONE (sweep: gates held at 1 of 3 points)"


def test_with_gates_turns_a_recipes_gates_off_back_on() -> None:
    chain = with_gates([Validate(gates="off")], min_cosine=0.5)
    assert chain[0].gates == "auto" and chain[0].min_cosine == 0.5
    assert with_gates([Validate(gates="off")])[0].gates == "off"
    with pytest.raises(ValueError, match="contradicts"):
        Validate(gates="off", max_latency_ratio=2.0)


def test_a_sweep_without_gates_claims_no_pass_in_its_table() -> None:
    result = cli(
        MODEL, "-p", "vote:round_to=1", "-p", "validate:runs=0,gates=off", "--data", DATA,
        "--sweep", "0.1,0.2",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count("not checked") == 2 and " pass " not in result.stdout
    assert last_line(result).startswith("DONE (sweep: gates held at 0 of 2 points)")
