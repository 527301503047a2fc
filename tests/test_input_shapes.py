"""--input-shape / input_shapes= fix dynamic dims for synthesis and costs; MACs from symbolic or
unknown dims are never negative and say which dims they counted as 1."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, numpy_helper

import onnxprune
from onnxprune.cli import main
from onnxprune.cost import SYMBOLIC_NOTE, summarize
from onnxprune.errors import ArgumentError, DataError, RecipeError
from onnxprune.input_shapes import check_input_shapes, parse_input_shape
from onnxprune.recipe import load_recipe
from onnxprune.synthesis import synthesize

h = onnx.helper
FEAT, MID, OUT = 8, 6, 3


def _dynamic(batch: object = "N", seq: object = "S") -> onnx.ModelProto:
    """x [batch, seq, FEAT] -> MatMul (MID, column 2 zero) -> Relu -> MatMul (OUT) -> y,
    with a Reshape [-1, OUT] at the end, as dynamic-axes exports write one."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(FEAT, MID)).astype(np.float32)
    w1[:, 2] = 0
    w2 = rng.normal(size=(MID, OUT)).astype(np.float32)
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(np.array([-1, OUT], np.int64), "flat"),
    ]
    nodes = [
        h.make_node("MatMul", ["x", "w1"], ["a"], name="fc1"),
        h.make_node("Relu", ["a"], ["r"], name="act"),
        h.make_node("MatMul", ["r", "w2"], ["b"], name="fc2"),
        h.make_node("Reshape", ["b", "flat"], ["y"], name="flatten"),
    ]
    graph = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", TensorProto.FLOAT, [batch, seq, FEAT])],
        [h.make_tensor_value_info("y", TensorProto.FLOAT, [None, OUT])],
        inits,
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


PER_POSITION = FEAT * MID + MID * OUT


def test_symbolic_dims_count_as_one_and_are_named() -> None:
    s = summarize(_dynamic())
    assert s.macs == PER_POSITION
    assert s.macs_note == f"{SYMBOLIC_NOTE}: N, S"


def test_negative_and_unnamed_dims_never_give_negative_macs() -> None:
    model = _dynamic(batch=None)
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.dim_value = -1  # as some exporters write a dynamic dim
    model.graph.value_info.append(h.make_tensor_value_info("a", TensorProto.FLOAT, [-1, 5, MID]))
    s = summarize(model)
    assert s.macs >= 0 and all(v >= 0 for v in s.macs_by_op.values())
    assert s.macs == FEAT * MID + 5 * MID * OUT  # fc1 sees S as 1, fc2 the declared 5
    assert s.macs_note.startswith(SYMBOLIC_NOTE) and "?" in s.macs_note


def test_input_shapes_fix_the_costs() -> None:
    s = summarize(_dynamic(), input_shapes={"x": [2, 5, FEAT]})
    assert s.macs == 2 * 5 * PER_POSITION and s.macs_note == ""
    partial = summarize(_dynamic(), dims={"N": 4})
    assert partial.macs == 4 * PER_POSITION and partial.macs_note == f"{SYMBOLIC_NOTE}: S"


def test_synthetic_inputs_take_the_given_sizes() -> None:
    data = synthesize(_dynamic(), 4, input_shapes={"x": [1, 7, FEAT]})
    assert data.inputs["x"].shape == (4, 7, FEAT)  # axis 0 stays the samples axis


def test_run_uses_them_for_synthesis_and_the_summaries() -> None:
    model = _dynamic()
    out, report = onnxprune.run(model, ["fold"], input_shapes=["x:1,7,8"])
    assert report["before"]["macs"] == 7 * PER_POSITION and "macs_note" not in report["before"]
    fold = report["passes"][0]
    assert fold["channels_removed"] == 1 and fold["verified"].startswith("outputs equal")
    assert report["after"]["macs"] == 7 * (FEAT * (MID - 1) + (MID - 1) * OUT)
    # the saved model keeps its dynamic dims
    dims = out.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims[:2]] == ["N", "S"]
    _, same = onnxprune.run(model, ["fold"], input_shapes={"x": [1, 7, FEAT]})
    assert same["before"]["macs"] == report["before"]["macs"]


@pytest.mark.parametrize(
    ("shapes", "expected"),
    [
        ({"x": [1, 7]}, "--input-shape x:1,7 does not fit input 'x', declared [N, S, 8]"),
        ({"x": [1, 7, 9]}, "--input-shape x:1,7,9 does not fit input 'x', declared [N, S, 8]"),
        ({"z": [1]}, "--input-shape 'z': the model has no such input (inputs: 'x')"),
    ],
)
def test_a_shape_that_does_not_fit_names_the_input_and_its_declared_shape(
    shapes: dict[str, list[int]], expected: str
) -> None:
    with pytest.raises(DataError, match="^" + re.escape(expected)):
        check_input_shapes(_dynamic(), shapes)
    with pytest.raises(DataError):
        onnxprune.run(_dynamic(), ["fold"], input_shapes=shapes)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("x", "expected NAME:d0,d1"), ("x:1,a", "must be integers"), ("x:1,0", "must be >= 1")],
)
def test_malformed_specs(spec: str, expected: str) -> None:
    with pytest.raises(DataError, match=expected):
        parse_input_shape(spec)


def test_names_with_colons_split_at_the_last_one() -> None:
    assert parse_input_shape("serving:0:1,3") == ("serving:0", [1, 3])


def test_the_api_refuses_other_types() -> None:
    with pytest.raises(ArgumentError, match="input_shapes"):
        onnxprune.run(_dynamic(), ["fold"], input_shapes=5)  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match="list of integers"):
        onnxprune.run(_dynamic(), ["fold"], input_shapes={"x": "1,7,8"})  # type: ignore[dict-item]


def _cli(*args: object) -> object:
    try:
        runner = CliRunner(mix_stderr=False)  # type: ignore[call-arg]  # click < 8.2
    except TypeError:
        runner = CliRunner()
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_option_summary_and_error(tmp_path: Path) -> None:
    path = tmp_path / "dyn.onnx"
    onnx.save(_dynamic(), path)
    plain = _cli(path)
    assert plain.exit_code == 0 and f"{SYMBOLIC_NOTE}: N, S" in " ".join(plain.stdout.split())
    fixed = _cli(path, "--input-shape", "x:2,5,8")
    assert fixed.exit_code == 0 and SYMBOLIC_NOTE not in fixed.stdout
    assert "660" in fixed.stdout  # 2 * 5 * 66 MACs
    bad = _cli(path, "--input-shape", "x:2,5", "-p", "fold", "-o", tmp_path / "o.onnx")
    assert bad.exit_code == 2
    err = bad.stderr.strip()
    assert len(err.splitlines()) == 1 and "declared [N, S, 8]" in err
    assert not (tmp_path / "o.onnx").exists()
    report = tmp_path / "r.json"
    ok = _cli(
        path,
        "--input-shape",
        "x:1,4,8",
        "-p",
        "fold",
        "-o",
        tmp_path / "o.onnx",
        "--report",
        report,
    )
    assert ok.exit_code == 0, ok.stderr
    assert '"macs": 264' in report.read_text()  # 4 * 66 before


def test_recipes_take_a_list_or_a_table_and_the_command_line_wins(tmp_path: Path) -> None:
    listed = tmp_path / "a.toml"
    listed.write_text('input_shapes = ["x:1,4,8"]\n[[pass]]\nname = "fold"\n')
    assert load_recipe(listed).settings["input_shapes"] == {"x": [1, 4, 8]}
    table = tmp_path / "b.toml"
    table.write_text("[input_shapes]\nx = [1, 4, 8]\n")
    assert load_recipe(table).settings["input_shapes"] == {"x": [1, 4, 8]}
    wrong = tmp_path / "c.toml"
    wrong.write_text("input_shapes = 3\n")
    with pytest.raises(RecipeError, match="c.toml: input_shapes must be"):
        load_recipe(wrong)
    path = tmp_path / "dyn.onnx"
    onnx.save(_dynamic(), path)
    report = tmp_path / "r.json"
    cli = _cli(path, "--recipe", listed, "--input-shape", "x:1,2,8", "-o", tmp_path / "o.onnx")
    assert cli.exit_code == 0, cli.stderr
    ran = _cli(path, "--recipe", listed, "-o", tmp_path / "o.onnx", "--report", report)
    assert ran.exit_code == 0 and '"macs": 264' in report.read_text()
