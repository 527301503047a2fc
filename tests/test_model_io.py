"""Model I/O: external data, overwrite protection, atomic writes, provenance, what cleanup keeps."""

from __future__ import annotations

import errno
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import uses_external_data

import onnxprune
from onnxprune.context import Context
from onnxprune.errors import DataError, ModelLoadError, ModelSaveError
from onnxprune.graph import graph_input_names
from onnxprune.model import provenance


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


# --- external data -----------------------------------------------------------------------------


def test_external_data_roundtrip(model_path, tmp_path, monkeypatch, run_ort, same_outputs):
    src = model_path("tf/mlp.onnx")  # 17k float parameters: tensors over the 1 KiB threshold
    model = onnxprune.load(src)
    before = model.SerializeToString()
    out = onnxprune.save(model, tmp_path / "m.onnx", external_data=True)
    assert model.SerializeToString() == before, "save must not change the caller's model"
    assert _names(tmp_path) == ["m.onnx", "m.onnx.data"]
    assert (tmp_path / "m.onnx").stat().st_size < 10_000 < (tmp_path / "m.onnx.data").stat().st_size
    assert any(
        uses_external_data(t)
        for t in onnx.load(str(out), load_external_data=False).graph.initializer
    )

    again = onnxprune.load(out)
    feeds = {
        n: np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
        for n in graph_input_names(model.graph)
    }
    same_outputs(run_ort(again, feeds), run_ort(model, feeds))

    # Loading from another working directory still finds the data beside the model.
    monkeypatch.chdir(tmp_path.parent)
    assert onnxprune.load(out).graph == again.graph


def test_external_data_with_only_small_tensors(tiny, tmp_path):
    onnxprune.save(tiny, tmp_path / "t.onnx", external_data=True)
    assert _names(tmp_path) == ["t.onnx"]  # nothing over 1 KiB: no data file, no error
    assert onnxprune.load(tmp_path / "t.onnx").graph == tiny.graph


def test_missing_external_data_is_a_load_error(model_path, tmp_path):
    out = onnxprune.save(
        onnxprune.load(model_path("tf/mlp.onnx")), tmp_path / "m.onnx", external_data=True
    )
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(ModelLoadError, match="m.onnx"):
        onnxprune.load(out)


# --- overwrite protection and atomic writes ----------------------------------------------------


def test_save_refuses_to_overwrite_the_input(tiny, tmp_path, monkeypatch):
    src = onnxprune.save(tiny, tmp_path / "in.onnx")
    original = src.read_bytes()
    monkeypatch.chdir(tmp_path)
    for spelling in (src, "in.onnx", "./in.onnx", tmp_path / ".." / tmp_path.name / "in.onnx"):
        with pytest.raises(ModelSaveError, match="refusing to overwrite the input"):
            onnxprune.save(tiny, spelling, protect=src)
    (tmp_path / "link.onnx").symlink_to(src)
    with pytest.raises(ModelSaveError, match="refusing to overwrite the input"):
        onnxprune.save(tiny, tmp_path / "link.onnx", protect=src)
    assert src.read_bytes() == original
    assert _names(tmp_path) == ["in.onnx", "link.onnx"]


def test_save_overwrites_an_existing_output(tiny, tmp_path):
    (tmp_path / "out.onnx").write_bytes(b"old")
    onnxprune.save(tiny, tmp_path / "out.onnx", protect=tmp_path / "in.onnx")
    assert onnxprune.load(tmp_path / "out.onnx").graph == tiny.graph
    assert _names(tmp_path) == ["out.onnx"]


def test_failed_saves_leave_no_temp_files(tiny, tmp_path):
    with pytest.raises(ModelSaveError, match="does not exist"):
        onnxprune.save(tiny, tmp_path / "missing" / "out.onnx")
    (tmp_path / "adir").mkdir()
    with pytest.raises(ModelSaveError, match="is a folder"):
        onnxprune.save(tiny, tmp_path / "adir")
    with pytest.raises(ModelSaveError, match="cannot write"):
        onnxprune.save(tiny, tmp_path / ("x" * 300 + ".onnx"))  # name too long for the file system
    assert _names(tmp_path) == ["adir"]
    assert _names(tmp_path / "adir") == []


def test_failure_mid_write_keeps_old_output_and_cleans_up(model_path, tiny, tmp_path, monkeypatch):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(ModelSaveError, match="No space left"):
        onnxprune.save(tiny, target)
    with pytest.raises(ModelSaveError, match="No space left"):
        onnxprune.save(onnxprune.load(model_path("tf/mlp.onnx")), target, external_data=True)
    monkeypatch.undo()
    assert target.read_bytes() == b"previous"
    assert _names(tmp_path) == ["out.onnx"]


# --- provenance and preserved model fields -----------------------------------------------------


def test_provenance_records_passes_and_options(tiny, tmp_path):
    new, _ = onnxprune.run(tiny, ["cleanup:fold_limit_mb=8,keep-initializer-inputs=yes"])
    entry = {
        "version": onnxprune.__version__,
        "passes": [
            {
                "name": "cleanup",
                "options": {
                    "fold_constants": True,
                    "fold_limit_mb": 8.0,
                    "keep_initializer_inputs": True,
                },
            }
        ],
    }
    assert provenance(new) == [entry]
    assert provenance(tiny) == [], "run must not modify its input model"
    saved = onnxprune.load(onnxprune.save(new, tmp_path / "a.onnx"))
    assert provenance(saved) == [entry]
    twice, _ = onnxprune.run(saved, ["cleanup"])
    history = provenance(twice)
    assert len(history) == 2 and history[0] == entry
    assert history[1]["passes"][0]["options"]["fold_limit_mb"] == 64.0


def test_cleanup_preserves_opsets_ir_and_io(fixture_model, tmp_path):
    model = onnxprune.load(fixture_model.path)
    new, _ = onnxprune.run(model, ["cleanup"])
    again = onnxprune.load(onnxprune.save(new, tmp_path / "c.onnx"))

    def opsets(m):
        return {o.domain or "ai.onnx": o.version for o in m.opset_import}

    assert opsets(again) == opsets(model)
    assert again.ir_version == model.ir_version
    assert (again.producer_name, again.producer_version) == (
        model.producer_name,
        model.producer_version,
    )
    assert graph_input_names(again.graph) == graph_input_names(model.graph)
    assert [o.name for o in again.graph.output] == [o.name for o in model.graph.output]
    for a, b in zip(again.graph.output, model.graph.output, strict=True):
        assert a.type.tensor_type.elem_type == b.type.tensor_type.elem_type


# --- Constant-node weights, If subgraphs, initializers listed as inputs ------------------------


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name))


def _model(nodes, inputs, outputs, initializer=(), opset=17, ir=8) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializer))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    onnx.checker.check_model(model, full_check=True)
    return model


RNG = np.random.default_rng(0)
W = RNG.standard_normal((4, 3)).astype(np.float32)
B = RNG.standard_normal(3).astype(np.float32)
X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
FEEDS = {"x": RNG.standard_normal((2, 4)).astype(np.float32)}


def test_constant_node_weights_are_lifted(run_ort, same_outputs):
    model = _model(
        [
            _const("W", W),
            _const("B", B),
            helper.make_node("Constant", [], ["s"], value_float=2.0),
            helper.make_node("MatMul", ["x", "W"], ["t"]),
            helper.make_node("Add", ["t", "B"], ["u"]),
            helper.make_node("Mul", ["u", "s"], ["y"]),
        ],
        [X],
        [Y],
    )
    new, report = onnxprune.run(model, ["cleanup"])
    assert report["passes"][0]["constants_lifted"] == 3
    assert [n.op_type for n in new.graph.node] == ["MatMul", "Add", "Mul"]
    assert sorted(t.name for t in new.graph.initializer) == ["B", "W", "s"]
    np.testing.assert_array_equal(
        numpy_helper.to_array(next(t for t in new.graph.initializer if t.name == "W")), W
    )
    assert report["before"]["parameters"] == report["after"]["parameters"] == 4 * 3 + 3 + 1
    same_outputs(run_ort(new, FEEDS), run_ort(model, FEEDS))


def test_constant_weights_inside_if_branches(run_ort, same_outputs):
    def branch(name, weight):
        out = helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [2, 3])
        return helper.make_graph(
            [
                _const(f"{name}_W", weight),
                helper.make_node("MatMul", ["x", f"{name}_W"], [f"{name}_y"]),
            ],
            name,
            [],
            [out],
        )

    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    model = _model(
        [
            helper.make_node(
                "If",
                ["c"],
                ["y"],
                then_branch=branch("then", W),
                else_branch=branch("else", -2 * W),
            )
        ],
        [X, cond],
        [Y],
    )
    new, report = onnxprune.run(model, ["cleanup"])
    assert report["passes"][0]["constants_lifted"] == 2
    (if_node,) = new.graph.node
    for attr in if_node.attribute:
        assert [n.op_type for n in attr.g.node] == ["MatMul"]
        assert len(attr.g.initializer) == 1
    for c in (True, False):
        feeds = dict(FEEDS, c=np.array(c))
        same_outputs(run_ort(new, feeds), run_ort(model, feeds))


def _mxnet_style() -> onnx.ModelProto:
    inits = [numpy_helper.from_array(W, "fc0_weight"), numpy_helper.from_array(B, "fc0_bias")]
    listed = [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in inits]
    return _model(
        [
            helper.make_node("MatMul", ["x", "fc0_weight"], ["t"]),
            helper.make_node("Add", ["t", "fc0_bias"], ["y"]),
        ],
        [X, *listed],
        [Y],
        initializer=inits,
        opset=13,
        ir=6,
    )


def test_initializers_listed_as_inputs_become_constants(run_ort, same_outputs):
    model = _mxnet_style()
    assert onnxprune.summarize(model).framework == "MXNet (likely)"
    new, report = onnxprune.run(model, ["cleanup"])
    assert report["passes"][0]["initializer_inputs_removed"] == 2
    assert [i.name for i in new.graph.input] == ["x"]
    assert sorted(t.name for t in new.graph.initializer) == ["fc0_bias", "fc0_weight"]
    assert new.ir_version == 6
    same_outputs(run_ort(new, FEEDS), run_ort(model, FEEDS))


def test_keep_initializer_inputs(run_ort, same_outputs):
    model = _mxnet_style()
    new, report = onnxprune.run(model, ["cleanup:keep_initializer_inputs=true"])
    assert report["passes"][0]["initializer_inputs_removed"] == 0
    assert [i.name for i in new.graph.input] == ["x", "fc0_weight", "fc0_bias"]
    same_outputs(run_ort(new, FEEDS), run_ort(model, FEEDS))


def test_fixture_initializer_inputs_are_unlisted(all_fixtures, run_ort, same_outputs):
    checked = 0
    for fixture in all_fixtures:
        model = onnxprune.load(fixture.path)
        listed = len(model.graph.input) - len(graph_input_names(model.graph))
        if not listed:
            continue
        new, report = onnxprune.run(model, ["cleanup"])
        assert report["passes"][0]["initializer_inputs_removed"] == listed, fixture.id
        assert [i.name for i in new.graph.input] == graph_input_names(model.graph), fixture.id
        feeds = fixture.inputs()
        same_outputs(run_ort(new, feeds), run_ort(model, feeds), tol=1e-5)
        checked += 1
    if not checked:
        pytest.skip("no fixture lists initializers as graph inputs (MXNet exports do)")


# --- data files ---------------------------------------------------------------------------------


def test_calibration_data_loads_against_its_model(model_path):
    path = model_path("digits/torch_cnn.onnx")
    model = onnxprune.load(path)
    ctx = Context(original=model, data_path=path.with_name("torch_cnn.calib.npz"))
    data = ctx.data()
    assert not data.synthetic and len(data) > 0
    assert sorted(data.inputs) == graph_input_names(model.graph)
    assert data.labels is not None and len(data.labels) == len(data)


def test_bad_data_file_is_a_data_error(tiny, tmp_path):
    np.savez(tmp_path / "d.npz", wrong=np.zeros((2, 4), np.float32))
    with pytest.raises(DataError, match="no array for model input"):
        Context(original=tiny, data_path=tmp_path / "d.npz").data()
    with pytest.raises(DataError, match="no such data file"):
        onnxprune.run(tiny, ["cleanup"], data=tmp_path / "missing.npz")
