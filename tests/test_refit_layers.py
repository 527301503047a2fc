"""``refit:layers=all``: every linear layer refitted in graph order on the pruned model's
inputs (sequential reconstruction), not only the layers that read pruned channels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.runner import run_model

VOTE = "vote:criteria=l1,sparsity=0.5,round_to=1,protect=w3"  # h1 pruned, h2 whole


def _mlp3() -> onnx.ModelProto:
    """x[N,8] -> fc1 (16) -> Relu -> fc2 (16) -> Relu -> fc3 (4) -> y."""
    r = np.random.default_rng(7)
    inits = {
        "w1": r.normal(size=(16, 8)),
        "b1": r.normal(size=16) * 0.5,
        "w2": r.normal(size=(16, 16)) / 4,
        "b2": r.normal(size=16) * 0.5,
        "w3": r.normal(size=(4, 16)),
        "b3": r.normal(size=4),
    }
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1", transB=1),
            helper.make_node("Relu", ["h1"], ["a1"], name="act1"),
            helper.make_node("Gemm", ["a1", "w2", "b2"], ["h2"], name="fc2", transB=1),
            helper.make_node("Relu", ["h2"], ["a2"], name="act2"),
            helper.make_node("Gemm", ["a2", "w3", "b3"], ["y"], name="fc3", transB=1),
        ],
        "mlp3",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _data(tmp_path: Path) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(4, 8))

    def draw(n: int) -> np.ndarray:
        x = rng.normal(size=(n, 4)) @ basis + 0.1 * rng.normal(size=(n, 8))
        return x.astype(np.float32)

    path = tmp_path / "d.npz"
    np.savez(path, x=draw(2048))
    return path, draw(512)


def _error(a: onnx.ModelProto, b: onnx.ModelProto, x: np.ndarray) -> float:
    d = run_model(a, {"x": x})["y"].astype(np.float64) - run_model(b, {"x": x})["y"]
    return float((d * d).sum(axis=1).mean())


def test_all_layers_refits_the_later_layer_too_and_only_helps(tmp_path: Path) -> None:
    """fc2 reads the pruned h1; fc3 reads the whole h2, which drifted: only layers=all
    refits it, its held-out error falls, no layer's rises, and the output is closer."""
    model = _mlp3()
    path, test = _data(tmp_path)
    default, rep_p = onnxprune.run(model, [VOTE, "refit"], data=path, device="cpu")
    every, rep_a = onnxprune.run(model, [VOTE, "refit:layers=all"], data=path, device="cpu")
    pruned_layers = {r["node"]: r for r in rep_p["passes"][1]["layers"]}
    all_layers = {r["node"]: r for r in rep_a["passes"][1]["layers"]}
    assert set(pruned_layers) == {"fc2"}
    assert set(all_layers) == {"fc2", "fc3"}  # fc1 reads the graph input: no channel group
    assert all_layers["fc3"]["kept"]
    assert all_layers["fc3"]["held_after"] < 0.9 * all_layers["fc3"]["held_before"]
    for r in all_layers.values():
        assert r["mse_after"] <= r["mse_before"] + 1e-12
        if r["kept"]:
            assert r["held_after"] < r["held_before"]
    assert _error(every, model, test) < _error(default, model, test)


def test_all_layers_on_an_unpruned_model_changes_nothing(tmp_path: Path) -> None:
    """Nothing pruned: every layer is exact already and stays as it was."""
    model = _mlp3()
    path, test = _data(tmp_path)
    out, rep = onnxprune.run(model, ["refit:layers=all"], data=path, device="cpu")
    section = rep["passes"][0]
    assert section["refitted"] == 0 and not section["modified"]
    assert _error(out, model, test) == 0.0
