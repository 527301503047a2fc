"""Large-model paths on a small model (issue 14): the limits are lowered so that they run here.

* A large external-data model is loaded mapped: its weights stay in their file, are read as
  read-only views of it, copied from there into the output, and onnxruntime reads them in
  place (no temporary copy).
* A model past protobuf's 2 GiB is never serialised with its weights: validate then makes its
  sessions from the files (``SERIALIZE_LIMIT`` lowered) and gets the in-memory result.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

import onnxprune
from onnxprune import graph as graph_module
from onnxprune import model as model_module
from onnxprune import runtime
from onnxprune.analysis.groups import chosen_positions
from onnxprune.passes.fold import Plan
from onnxprune.runner import run_model
from tests.residual_mlp import residual_mlp

WIDTH, HIDDEN, DEAD = 32, 128, 48


def _mlp(folder: Path) -> Path:
    """Two residual MLP blocks, first layers with DEAD zero neurons: tests/residual_mlp.py."""
    return residual_mlp(folder, WIDTH, HIDDEN, DEAD)


@pytest.fixture
def mapped_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Load every external tensor of 1 KiB or more mapped (as for a model past 64 MiB)."""
    monkeypatch.setattr(model_module, "MAP_BYTES", 0)
    monkeypatch.setattr(model_module, "MAP_TENSOR_BYTES", 1024)


@pytest.fixture
def temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where ``tempfile`` puts temporary files during the test (checked to stay empty)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _feeds(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / "data.npz") as npz:
        return {"x": npz["x"]}


def test_large_external_weights_stay_in_their_file(tmp_path: Path, mapped_limits: None) -> None:
    path = _mlp(tmp_path)
    model = onnxprune.load(path)
    weights = [t for t in model.graph.initializer if t.name.startswith("w")]
    assert weights and all(graph_module.mapped(t) for t in weights)
    assert all(not t.raw_data for t in weights), "no weight is read into memory by load"
    view = graph_module.tensor_array(weights[0])
    assert not view.flags.writeable
    assert np.shares_memory(view, graph_module.file_map(str(tmp_path / "mlp.onnx.data")))
    plain = onnx.load(str(path))
    np.testing.assert_array_equal(view, numpy_helper.to_array(plain.graph.initializer[0]))


def test_session_on_a_mapped_model_reads_the_file_in_place(
    tmp_path: Path, mapped_limits: None, temp_dir: Path
) -> None:
    path = _mlp(tmp_path)
    model = onnxprune.load(path)
    before = runtime.temp_bytes()
    for share in (True, False, None):
        got = run_model(runtime.session(model, share_weights=share), _feeds(tmp_path))
        want = run_model(onnx.load(str(path)), _feeds(tmp_path))
        np.testing.assert_array_equal(got["r_1"], want["r_1"])
    assert runtime.temp_bytes() == before
    assert not list(temp_dir.iterdir()), "no temporary copy of the weights"


def test_mapped_model_pruned_end_to_end_without_a_temp_copy(
    tmp_path: Path, mapped_limits: None, temp_dir: Path
) -> None:
    path = _mlp(tmp_path)
    model = onnxprune.load(path)
    before = model.SerializeToString()
    out, report = onnxprune.run(model, ["fold", "validate:runs=0"], device="cpu")
    assert model.SerializeToString() == before, "the caller's model is unchanged"
    assert report["passes"][0]["channels_removed"] == 2 * DEAD
    assert report["passes"][1]["passed"]
    assert "temp_bytes" not in report  # nothing written
    assert not list(temp_dir.iterdir())
    saved = onnxprune.save(out, tmp_path / "out.onnx", external_data=True)
    reloaded = onnx.load(str(saved))
    assert len(os.listdir(tmp_path / "tmp")) == 0
    want = run_model(onnx.load(str(path)), _feeds(tmp_path))["r_1"]
    got = run_model(reloaded, _feeds(tmp_path))["r_1"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    w2 = numpy_helper.to_array(next(t for t in reloaded.graph.initializer if t.name == "w2_1"))
    assert w2.shape == (HIDDEN - DEAD, WIDTH)
    # the uncut tensors were copied straight from the input file, page-aligned
    for t in reloaded.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            offset = int(next(e.value for e in t.external_data if e.key == "offset"))
            assert offset % model_module.ALIGN == 0


def test_mapped_model_saved_as_one_file_keeps_the_mapping(
    tmp_path: Path, mapped_limits: None
) -> None:
    model = onnxprune.load(_mlp(tmp_path))
    before = model.SerializeToString()
    onnxprune.save(model, tmp_path / "one.onnx", external_data=False)
    assert model.SerializeToString() == before
    assert sorted(p.name for p in tmp_path.glob("one.onnx*")) == ["one.onnx"]
    want = run_model(onnx.load(str(tmp_path / "mlp.onnx")), _feeds(tmp_path))["r_1"]
    got = run_model(onnx.load(str(tmp_path / "one.onnx")), _feeds(tmp_path))["r_1"]
    np.testing.assert_array_equal(got, want)


def test_vote_and_fold_on_a_mapped_model_equal_the_in_memory_run(
    tmp_path: Path, mapped_limits: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _mlp(tmp_path)
    passes = ["vote:sparsity=0.5,round_to=1,check=off", "fold"]
    data = tmp_path / "data.npz"
    mapped_out, mapped_report = onnxprune.run(onnxprune.load(path), passes, data=data)
    monkeypatch.setattr(model_module, "MAP_BYTES", 1 << 40)
    plain_out, plain_report = onnxprune.run(onnxprune.load(path), passes, data=data)
    assert not any(graph_module.mapped(t) for t in plain_out.graph.initializer)
    removed = mapped_report["passes"][1]["channels_removed"]
    assert removed > 0 and removed == plain_report["passes"][1]["channels_removed"]
    feeds = _feeds(tmp_path)
    np.testing.assert_array_equal(
        run_model(mapped_out, feeds)["r_1"], run_model(plain_out, feeds)["r_1"]
    )


def test_validate_past_the_serialize_limit_equals_the_in_memory_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _mlp(tmp_path)
    for runs in (0, 2):  # runs > 0: the sessions validate times (prepacked weights)
        chain = ["fold", f"validate:runs={runs},warmup=0"]
        _, plain = onnxprune.run(path, chain, data=tmp_path / "data.npz", device="cpu")
        assert "temp_bytes" not in plain
        with monkeypatch.context() as m:
            m.setattr(runtime, "SERIALIZE_LIMIT", 4096)  # "past 2 GiB"
            m.setattr(runtime, "_SHARE_MIN_ELEMENTS", 1)
            _, big = onnxprune.run(path, chain, data=tmp_path / "data.npz", device="cpu")
        # the weights went to onnxruntime through files, not inside a serialised model
        assert big["temp_bytes"] > 0
        want, got = plain["passes"][1], big["passes"][1]
        assert got["passed"] and want["passed"]
        assert got["outputs"] == want["outputs"]
        assert got["cost"] == want["cost"]


def test_plan_keep_and_slots_match_the_set_based_rule() -> None:
    rng = np.random.default_rng(1)
    roots = rng.integers(0, 50, 200)
    roots[np.unique(roots)] = np.unique(roots)  # a root is its own root
    removed = {int(r) for r in rng.choice(np.unique(roots), 10, replace=False)}
    plan = Plan(roots, removed=removed)
    for _ in range(5):
        ids = rng.integers(-1, 200, 64)
        np.testing.assert_array_equal(plan.keep(ids), ~chosen_positions(roots, ids, removed))


@pytest.mark.parametrize(
    "chain",
    [
        ["cleanup", "fold"],
        ["magnitude:sparsity=0.5", "fold"],
        ["stats:metric=l1,below=0.5", "refit", "fold", "validate:runs=0,layers=true"],
    ],
)
def test_every_pass_works_on_a_mapped_model(
    tmp_path: Path, mapped_limits: None, monkeypatch: pytest.MonkeyPatch, chain: list[str]
) -> None:
    path = _mlp(tmp_path)
    data = tmp_path / "data.npz"
    mapped_out, _ = onnxprune.run(onnxprune.load(path), chain, data=data, device="cpu")
    monkeypatch.setattr(model_module, "MAP_BYTES", 1 << 40)
    plain_out, _ = onnxprune.run(onnxprune.load(path), chain, data=data, device="cpu")
    feeds = _feeds(tmp_path)
    np.testing.assert_allclose(
        run_model(mapped_out, feeds)["r_1"], run_model(plain_out, feeds)["r_1"], rtol=1e-6
    )
    onnxprune.save(mapped_out, tmp_path / "out.onnx")
    reloaded = run_model(onnx.load(str(tmp_path / "out.onnx")), feeds)["r_1"]
    np.testing.assert_allclose(reloaded, run_model(plain_out, feeds)["r_1"], rtol=1e-6)
