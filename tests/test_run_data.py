"""The run's --data reaches every onnxruntime run of the chain, fold's probe included."""

from __future__ import annotations

import json

import numpy as np
import onnx
from conftest import build_model, invoke
from onnx import TensorProto, helper

from onnxprune import Context, get_pass
from onnxprune.analysis.probe import probe_run

D, H, ROWS, OFFSET = 8, 16, 2, 3


def _token_type_ffn() -> onnx.ModelProto:
    """An embedding of ids (stored with an offset: the valid ids are -3 and -2) from a 2-row
    table into an FFN whose hidden neurons 0-7 are zero. No synthesis can guess such ids: any
    other value makes onnxruntime fail, so only the user's data runs the model."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(D, H)).astype(np.float32)
    w1[:, : H // 2] = 0.0
    inits = {
        "table": rng.normal(size=(ROWS, D)).astype(np.float32),
        "offset": np.array(OFFSET, np.int64),
        "w1": w1,
        "w2": rng.normal(size=(H, D)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Add", ["ids", "offset"], ["rows"], name="shift"),
        helper.make_node("Gather", ["table", "rows"], ["emb"], name="embed"),
        helper.make_node("MatMul", ["emb", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["a"], name="act"),
        helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2"),
    ]
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, D])
    return build_model(nodes, [ids], [y], inits)


def _ids(n: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, ROWS, size=(n, 4)).astype(np.int64) - OFFSET


def test_the_probe_runs_on_the_runs_data(tmp_path) -> None:
    model = _token_type_ffn()
    np.savez(tmp_path / "d.npz", ids=_ids(6))
    pr = probe_run(model, Context(original=model, data_path=tmp_path / "d.npz"))
    assert not pr.error
    table = onnx.numpy_helper.to_array(model.graph.initializer[0])  # "table"
    emb = pr.values["emb"]
    assert np.array_equal(emb, table[_ids(6)[: len(emb)] + OFFSET])


def test_fold_removes_zeroed_neurons_with_the_runs_data(tmp_path) -> None:
    model = _token_type_ffn()
    np.savez(tmp_path / "d.npz", ids=_ids(6))
    ctx = Context(original=model, data_path=tmp_path / "d.npz")
    work = onnx.ModelProto()
    work.CopyFrom(model)
    result = get_pass("fold")()(work, ctx)
    assert result.report["channels_removed"] == H // 2
    assert result.report["verified"].startswith("outputs equal"), result.report["verified"]
    w1 = next(t for t in result.model.graph.initializer if t.name == "w1")
    assert list(w1.dims) == [D, H // 2]


def test_cli_chain_folds_what_vote_zeroed_on_id_inputs(tmp_path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_token_type_ffn(), path)
    np.savez(tmp_path / "d.npz", ids=_ids(32))
    out, report = tmp_path / "small.onnx", tmp_path / "r.json"
    args = [path, "-p", "vote:sparsity=0.5,round_to=1", "-p", "fold", "--data", tmp_path / "d.npz"]
    res = invoke(*args, "-o", out, "--report", report)
    assert res.exit_code == 0, res.output + res.stderr
    fold = next(s for s in json.loads(report.read_text())["passes"] if s["pass"] == "fold")
    assert fold["channels_removed"] >= H // 2
    assert fold["verified"].startswith("outputs equal on samples of"), fold["verified"]
