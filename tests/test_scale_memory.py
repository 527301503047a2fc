"""Memory and disk on large models (issue 14), on a small MLP with the size limits lowered.

* vote writes its zeroed weights once into a scratch file that stays mapped (no in-memory copy),
  fold its cut ones; every session on those states reads the files in place, so a vote + fold
  run writes at most one copy of the weights (the report's ``temp_bytes``).
* validate after fold reads fold's file in place (no second copy), and the scratch files no
  model reads any more are deleted when the pass ends.
* Results are exactly those of the in-memory run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

import onnxprune
from onnxprune import graph as graph_module
from onnxprune import model as model_module
from onnxprune import runtime, scratch
from onnxprune.runner import run_model
from tests.residual_mlp import residual_mlp

WIDTH, HIDDEN, DEAD = 64, 512, 128


def _mlp(folder: Path) -> Path:
    """Two residual MLP blocks, first layers with DEAD zero neurons: tests/residual_mlp.py."""
    return residual_mlp(folder, WIDTH, HIDDEN, DEAD, "matmul")


@pytest.fixture
def large(monkeypatch: pytest.MonkeyPatch) -> None:
    """Treat the MLP as a large model: weights loaded mapped, sessions take them from files."""
    monkeypatch.setattr(model_module, "MAP_BYTES", 0)
    monkeypatch.setattr(model_module, "MAP_TENSOR_BYTES", 1024)
    monkeypatch.setattr(runtime, "SHARE_WEIGHTS_BYTES", 0)
    monkeypatch.setattr(runtime, "_SHARE_MIN_ELEMENTS", 1024)


def _feeds(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / "data.npz") as npz:
        return {"x": npz["x"]}


def _weights(path: Path) -> int:
    return os.path.getsize(str(path) + ".data")


def _in_memory(
    path: Path, passes: list[str], monkeypatch: pytest.MonkeyPatch, data: Path | None
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The same run with the weights in memory (sessions still take them apart, as above)."""
    with monkeypatch.context() as m:
        m.setattr(model_module, "MAP_BYTES", 1 << 40)
        return onnxprune.run(onnxprune.load(path), passes, data=data)


@pytest.mark.parametrize("data", [False, True])
def test_vote_and_fold_write_one_copy_and_equal_the_in_memory_run(
    tmp_path: Path, large: None, monkeypatch: pytest.MonkeyPatch, data: bool
) -> None:
    path = _mlp(tmp_path)
    # select=local: no whole-model trial copies (those stay in memory, as on a small model)
    passes = ["vote:sparsity=0.5,round_to=1,criteria=l1+l2,check=off,select=local", "fold"]
    calibration = tmp_path / "data.npz" if data else None
    first, written = len(scratch.files()), scratch.written()
    out, report = onnxprune.run(onnxprune.load(path), passes, data=calibration)
    removed = report["passes"][1]["channels_removed"]
    assert removed > 0
    # everything written went to the two scratch files: no session wrote its own copy
    assert report["temp_bytes"] == scratch.written() - written > 0
    made = scratch.files()[first:]
    assert len(made) == 2, "one scratch file for vote, one for fold"
    assert not os.path.exists(made[0]), "vote's file is deleted once fold no longer reads it"
    kept = os.path.getsize(made[1])  # fold's cut weights
    assert report["temp_bytes"] - kept <= _weights(path), "vote wrote at most one copy"
    assert kept <= sum(model_module.tensor_nbytes(t) + 4096 for t in out.graph.initializer)
    cut = [t for t in out.graph.initializer if t.name in ("w1_0", "w2_0", "w1_1", "w2_1")]
    assert all(graph_module.mapped(t) and not t.raw_data for t in cut)
    assert {onnx.external_data_helper.ExternalDataInfo(t).location for t in cut} == {made[1]}
    want, plain = _in_memory(path, passes, monkeypatch, calibration)
    # in memory, every session on the zeroed and the cut model writes its own copy
    assert plain["temp_bytes"] > report["temp_bytes"]
    feeds = _feeds(tmp_path)
    np.testing.assert_array_equal(run_model(out, feeds)["r_1"], run_model(want, feeds)["r_1"])
    saved = onnxprune.save(out, tmp_path / "out.onnx", external_data=True)
    reloaded = onnx.load(str(saved))
    assert all(
        not t.external_data or t.external_data[0].value == "out.onnx.data"
        for t in reloaded.graph.initializer
    )
    np.testing.assert_array_equal(
        run_model(reloaded, _feeds(tmp_path))["r_1"], run_model(out, _feeds(tmp_path))["r_1"]
    )


def test_vote_keeps_no_zeroed_weight_in_memory(tmp_path: Path, large: None) -> None:
    path = _mlp(tmp_path)
    before = onnxprune.load(path)
    out, report = onnxprune.run(onnxprune.load(path), ["vote:sparsity=0.5,round_to=1,check=off"])
    assert report["passes"][0]["channels_pruned"] > 0
    zeroed = [
        t
        for t in out.graph.initializer
        if not np.array_equal(
            graph_module.tensor_array(t),
            graph_module.tensor_array(
                next(u for u in before.graph.initializer if u.name == t.name)
            ),
        )
    ]
    assert zeroed, "vote zeroed some weights"
    for t in zeroed:
        assert graph_module.mapped(t) and not t.raw_data
        assert onnx.external_data_helper.ExternalDataInfo(t).location.startswith(scratch.folder())
    one_copy = sum(model_module.tensor_nbytes(t) + 4096 for t in zeroed)  # page padding
    assert report["temp_bytes"] <= one_copy, "each zeroed weight written once, no session copy"


def test_validate_after_fold_reads_folds_file_in_place(tmp_path: Path, large: None) -> None:
    path = _mlp(tmp_path)
    chain = ["fold", "validate:runs=0"]
    out, report = onnxprune.run(onnxprune.load(path), chain, data=tmp_path / "data.npz")
    assert report["passes"][1]["passed"]
    cut = [t for t in out.graph.initializer if t.name.startswith(("w1", "w2", "b1"))]
    expected = sum(model_module.tensor_nbytes(t) + 4096 for t in cut)  # page padding
    assert all(graph_module.mapped(t) for t in cut)
    assert report["temp_bytes"] <= expected, "the cut weights are written once, not per session"


def test_session_reads_weights_from_two_folders_in_place(tmp_path: Path, large: None) -> None:
    path = _mlp(tmp_path)
    model = onnxprune.load(path)
    w = next(t for t in model.graph.initializer if t.name == "w2_0")
    with scratch.Writer() as out:
        out.put(w, graph_module.tensor_array(w) * 2)
    assert graph_module.mapped(w)
    assert os.path.dirname(onnx.external_data_helper.ExternalDataInfo(w).location) != str(tmp_path)
    plain = onnx.load(str(path))
    p = next(t for t in plain.graph.initializer if t.name == "w2_0")
    p.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(p) * 2, "w2_0"))
    want = run_model(plain, _feeds(tmp_path))["r_1"]
    before = runtime.temp_bytes()
    for share in (True, False):  # prepacked kernels or not: float rounding differs
        got = run_model(runtime.session(model, share_weights=share), _feeds(tmp_path))["r_1"]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))
    assert runtime.temp_bytes() == before, "nothing written for a session on mapped weights"


def test_last_write_makes_folds_scratch_file_the_output_data(tmp_path: Path, large: None) -> None:
    path = _mlp(tmp_path)
    out, _ = onnxprune.run(onnxprune.load(path), ["fold"])
    files = {
        onnx.external_data_helper.ExternalDataInfo(t).location
        for t in out.graph.initializer
        if graph_module.mapped(t)
    }
    cut = [f for f in files if f in scratch.files()]
    assert len(cut) == 1
    kept = os.path.getsize(cut[0])
    feeds = _feeds(tmp_path)
    want = run_model(out, feeds)["r_1"]
    written = scratch.written()
    model_module.write_model(out, tmp_path / "out.onnx", True, last_use=True)
    assert not os.path.exists(cut[0]), "the scratch file became the output's data file"
    data = tmp_path / "out.onnx.data"
    assert os.stat(data).st_nlink == 1 and os.path.getsize(data) >= kept
    assert scratch.written() == written
    reloaded = onnx.load(str(tmp_path / "out.onnx"))
    np.testing.assert_array_equal(run_model(reloaded, feeds)["r_1"], want)
    # a later write of the same model copies (the scratch file is gone)
    again = onnxprune.load(tmp_path / "out.onnx")
    model_module.write_model(again, tmp_path / "again.onnx", True, last_use=True)
    np.testing.assert_array_equal(
        run_model(onnx.load(str(tmp_path / "again.onnx")), feeds)["r_1"], want
    )


def test_one_file_write_of_a_mapped_model_streams_the_same_model(
    tmp_path: Path, large: None
) -> None:
    path = _mlp(tmp_path)
    model = onnxprune.load(path)
    with scratch.Writer() as out:  # weights in two files: the input's and a scratch file
        w = next(t for t in model.graph.initializer if t.name == "w1_1")
        out.put(w, -graph_module.tensor_array(w))
    before = model.SerializeToString()
    model_module.write_model(model, tmp_path / "one.onnx", False)
    assert model.SerializeToString() == before, "the caller's model is unchanged"
    one = onnx.load(str(tmp_path / "one.onnx"))
    onnx.checker.check_model(one)
    plain = onnx.load(str(path))
    assert [n.SerializeToString() for n in one.graph.node] == [
        n.SerializeToString() for n in plain.graph.node
    ]
    assert one.graph.input == plain.graph.input and one.graph.output == plain.graph.output
    assert one.opset_import == plain.opset_import and one.ir_version == plain.ir_version
    for t in one.graph.initializer:
        assert not graph_module.mapped(t) and t.data_location == TensorProto.DEFAULT
        want = numpy_helper.to_array(next(u for u in plain.graph.initializer if u.name == t.name))
        got = numpy_helper.to_array(t)
        np.testing.assert_array_equal(got, -want if t.name == "w1_1" else want)


def test_cli_scratch_folder_sits_next_to_the_output(
    tmp_path: Path, large: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI makes its scratch folder in the output's folder (not TMPDIR), so fold's file
    becomes the output's data by a link whatever file system TMPDIR is on."""
    from tests.conftest import invoke

    path = _mlp(tmp_path)
    elsewhere = tmp_path / "tmp"
    elsewhere.mkdir()
    monkeypatch.setenv("TMPDIR", str(elsewhere))
    monkeypatch.setattr(scratch.tempfile, "tempdir", None)  # re-read TMPDIR
    scratch.place(None)
    out = tmp_path / "out"
    out.mkdir()
    res = invoke(path, "-p", "vote", "-p", "fold", "-o", out / "small.onnx", "--external-data")
    assert res.exit_code == 0, res.stderr
    assert Path(scratch.files()[-1]).parent.parent == out  # fold's file, adopted
    assert not any(elsewhere.iterdir()), "nothing written under TMPDIR's scratch"
    assert os.stat(out / "small.onnx.data").st_nlink == 1
    assert sorted(p.name for p in out.iterdir()) == ["small.onnx", "small.onnx.data"]
