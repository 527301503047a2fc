"""``refit:rounds=N``: target propagation between refitted layers joined by an activation; a
step stays only when the second layer's held-out error falls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.pruning.propagate import ElementwisePaths, pinv_rows
from onnxprune.runner import run_model
from tests.gemm_mlp import gemm_mlp
from tests.test_reconstruct import planted_mlp

CHAIN = "vote:sparsity=0.5,compensate=on"


def _random_mlp(sizes: list[int], seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    layers = [
        (rng.standard_normal((a, b)) / np.sqrt(a), rng.standard_normal(b) * 0.1)
        for a, b in zip(sizes, sizes[1:], strict=False)
    ]
    return gemm_mlp(layers)


def _gelu_mlp() -> onnx.ModelProto:
    """x[N,8] -> MatMul+Add (32) -> Gelu written out -> MatMul+Add (32) -> Gelu -> MatMul (4)."""
    rng = np.random.default_rng(5)
    nodes, inits, x = [], [], "x"
    sizes = [8, 32, 32, 4]
    for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
        inits += [
            numpy_helper.from_array(
                (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), f"w{i}"
            ),
            numpy_helper.from_array((rng.standard_normal(b) * 0.1).astype(np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"mm{i}"),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"z{i}"], name=f"add{i}"),
        ]
        x = f"z{i}"
        if i < 2:  # x * 0.5 * (1 + erf(x / sqrt 2)), as torch exports Gelu
            nodes += [
                helper.make_node("Div", [x, "sqrt2"], [f"d{i}"]),
                helper.make_node("Erf", [f"d{i}"], [f"e{i}"]),
                helper.make_node("Add", [f"e{i}", "one"], [f"p{i}"]),
                helper.make_node("Mul", [x, f"p{i}"], [f"q{i}"]),
                helper.make_node("Mul", [f"q{i}", "half"], [f"g{i}"]),
            ]
            x = f"g{i}"
    for name, value in (("sqrt2", np.sqrt(2)), ("one", 1.0), ("half", 0.5)):
        inits.append(numpy_helper.from_array(np.array(value, np.float32), name))
    graph = helper.make_graph(
        nodes,
        "gelu_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _data(tmp_path: Path, rows: int, width: int, seed: int = 1) -> Path:
    path = tmp_path / f"calib{rows}.npz"
    np.savez(path, x=np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32))
    return path


def _cosine(a: onnx.ModelProto, b: onnx.ModelProto, x: np.ndarray) -> float:
    ya = next(iter(run_model(a, {"x": x}).values())).astype(np.float64)
    yb = next(iter(run_model(b, {"x": x}).values())).astype(np.float64)
    return float(
        ((ya * yb).sum(1) / np.linalg.norm(ya, axis=1) / np.linalg.norm(yb, axis=1)).mean()
    )


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_source_through_relu_and_written_out_gelu() -> None:
    model = gemm_mlp([(np.ones((4, 8)), np.zeros(8)), (np.ones((8, 2)), np.zeros(2))])
    paths = ElementwisePaths(model.graph)
    assert paths.source("a0", _node(model, "fc1")) == ("y0", "")
    gelu = _gelu_mlp()
    assert ElementwisePaths(gelu.graph).source("g0", _node(gelu, "mm1"), {"z0"}) == ("z0", "")


def test_source_refuses_a_second_reader_and_a_channel_constant() -> None:
    model = gemm_mlp([(np.ones((4, 8)), np.zeros(8)), (np.ones((8, 8)), np.zeros(8))])
    model.graph.node.append(helper.make_node("Add", ["y0", "y1"], ["res"]))  # a residual
    src, why = ElementwisePaths(model.graph).source("a0", _node(model, "fc1"))
    assert src is None and "y0 is read by another node" in why
    model = gemm_mlp([(np.ones((4, 8)), np.zeros(8)), (np.ones((8, 2)), np.zeros(2))])
    model.graph.initializer.append(numpy_helper.from_array(np.ones(8, np.float32), "scale"))
    model.graph.node.insert(2, helper.make_node("Mul", ["a0", "scale"], ["s0"]))
    _node(model, "fc1").input[0] = "s0"
    src, why = ElementwisePaths(model.graph).source("s0", _node(model, "fc1"))
    assert src is None and "scale" in why


@pytest.mark.parametrize("shape", [(12, 5), (5, 12)])
def test_pinv_rows_explains_the_miss(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape)
    miss = rng.standard_normal((50, shape[0])) @ w  # a miss that a change of inputs explains
    back = pinv_rows(w)
    assert back.shape == (shape[1], shape[0])
    rel = np.linalg.norm(miss @ back @ w - miss) / np.linalg.norm(miss)
    assert rel < 0.1, rel


def test_rounds_lower_the_held_out_error_and_keep_each_step_honest(tmp_path: Path) -> None:
    model = _random_mlp([32, 128, 128, 32])
    path = _data(tmp_path, 4096, 32)
    held = np.random.default_rng(9).standard_normal((512, 32)).astype(np.float32)
    plain, _ = onnxprune.run(model, [CHAIN, "refit", "fold"], data=path)
    moved, report = onnxprune.run(model, [CHAIN, "refit:rounds=2", "fold"], data=path)
    onnx.checker.check_model(moved, full_check=True)
    propagation = report["passes"][1]["propagation"]
    assert propagation["pairs"] == 1
    steps = [s for r in propagation["rounds"] for s in r["pairs"]]
    assert steps and steps[0]["layers"] == ["fc1", "fc2"]
    for step in steps:
        assert step["kept"] is False or step["held_after"] < step["held_before"]
    assert steps[0]["kept"] is True
    assert _cosine(model, moved, held) > _cosine(model, plain, held)


def test_a_step_that_does_not_help_is_undone(tmp_path: Path, monkeypatch) -> None:
    """A step far too long (the correction times 25) raises the second layer's held-out error:
    the first layer's weights are put back exactly and no round follows."""
    model = _random_mlp([32, 128, 128, 32])
    path = _data(tmp_path, 4096, 32)
    plain, _ = onnxprune.run(model, [CHAIN, "refit"], data=path)
    monkeypatch.setattr("onnxprune.passes.refit.STEP", 25.0)
    moved, report = onnxprune.run(model, [CHAIN, "refit:rounds=3"], data=path)
    rounds = report["passes"][1]["propagation"]["rounds"]
    assert len(rounds) == 1 and rounds[0]["pairs"][0]["kept"] is False
    step = rounds[0]["pairs"][0]
    assert step["held_after"] >= step["held_before"]
    a, b = _inits(plain), _inits(moved)
    for name, value in a.items():
        np.testing.assert_array_equal(value, b[name])


def test_planted_zero_mlp_stays_exact_with_rounds(tmp_path: Path) -> None:
    model = planted_mlp()
    path = _data(tmp_path, 512, 16)
    held = np.random.default_rng(2).standard_normal((256, 16)).astype(np.float32)
    new, report = onnxprune.run(model, ["vote:sparsity=0.5", "refit:rounds=2", "fold"], data=path)
    ya = next(iter(run_model(model, {"x": held}).values()))
    yb = next(iter(run_model(new, {"x": held}).values()))
    assert np.abs(ya - yb).max() < 1e-5
    steps = [s for r in report["passes"][1]["propagation"]["rounds"] for s in r["pairs"]]
    assert all(not s["kept"] for s in steps)


def test_rounds_follow_a_written_out_gelu(tmp_path: Path) -> None:
    model = _gelu_mlp()
    path = _data(tmp_path, 2048, 8)
    new, report = onnxprune.run(model, [CHAIN, "refit:rounds=1", "fold"], data=path)
    onnx.checker.check_model(new, full_check=True)
    propagation = report["passes"][1]["propagation"]
    assert propagation["pairs"] == 1
    assert propagation["rounds"][0]["pairs"][0]["layers"] == ["mm1", "mm2"]
    run_model(new, {"x": np.zeros((3, 8), np.float32)})


def test_no_pair_is_said(tmp_path: Path) -> None:
    """A per-channel scale between the layers is no elementwise path with scalars: no pair, the
    layer says why, and the model is the one refit gives without rounds."""
    rng = np.random.default_rng(4)
    model = gemm_mlp(
        [(rng.standard_normal((16, 64)), np.zeros(64)), (rng.standard_normal((64, 8)), np.zeros(8))]
    )
    model.graph.initializer.append(
        numpy_helper.from_array(rng.uniform(0.5, 2, 64).astype(np.float32), "scale")
    )
    model.graph.node.insert(2, helper.make_node("Mul", ["a0", "scale"], ["s0"]))
    _node(model, "fc1").input[0] = "s0"
    path = _data(tmp_path, 1024, 16)
    plain, _ = onnxprune.run(model, [CHAIN, "refit"], data=path)
    new, report = onnxprune.run(model, [CHAIN, "refit:rounds=2"], data=path)
    propagation = report["passes"][1]["propagation"]
    assert propagation["pairs"] == 0 and "nothing to propagate" in propagation["note"]
    assert "scale" in propagation["unpaired"]["fc1"]
    a, b = _inits(plain), _inits(new)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_first_layer_that_reads_the_input_pairs_too(tmp_path: Path) -> None:
    """MLP 16-64-16: fc0 reads the graph input and no pruned channel; it is the first layer of
    the pair that fc1 closes."""
    model = _random_mlp([16, 64, 16])
    path = _data(tmp_path, 2048, 16)
    new, report = onnxprune.run(model, [CHAIN, "refit:rounds=1", "fold"], data=path)
    onnx.checker.check_model(new, full_check=True)
    step = report["passes"][1]["propagation"]["rounds"][0]["pairs"][0]
    assert step["layers"] == ["fc0", "fc1"]
    assert step["kept"] is False or step["held_after"] < step["held_before"]
