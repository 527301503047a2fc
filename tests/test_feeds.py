"""Feeds of any form: inputs fed whole (``const/NAME``), samples on another axis
(``axes/NAME``), and ``--eval-data`` for validate."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import build_model, invoke
from onnx import TensorProto, helper

import onnxprune
from onnxprune.data import Dataset, fixed_batch, load_npz
from onnxprune.errors import ArgumentError, DataError
from onnxprune.runner import batches, plan

F, K, H, OUT, T = 6, 8, 4, 3, 40


def _ffn(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Weights of a frame FFN whose hidden neurons 0-3 are dead (their weights are zero)."""
    w1 = rng.normal(size=(F, K)).astype(np.float32)
    w1[:, : K // 2] = 0.0
    return {
        "w1": w1,
        "w2": rng.normal(size=(K, OUT)).astype(np.float32),
        "wh": rng.normal(size=(H, OUT)).astype(np.float32),
    }


def _lstm_like(fixed_frames: int | None = None) -> onnx.ModelProto:
    """frames [T, F] -> FFN -> [T, OUT], plus the recurrent state h, c [1, 1, H] projected and
    added to every frame: the state has no samples axis of its own."""
    inits = {**_ffn(np.random.default_rng(0)), "flat": np.array([1, H], np.int64)}
    nodes = [
        helper.make_node("MatMul", ["frames", "w1"], ["z"], name="fc1"),
        helper.make_node("Relu", ["z"], ["a"], name="act"),
        helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2"),
        helper.make_node("Add", ["h", "c"], ["hc"], name="state"),
        helper.make_node("Reshape", ["hc", "flat"], ["s"], name="flatten"),
        helper.make_node("MatMul", ["s", "wh"], ["sp"], name="proj"),
        helper.make_node("Add", ["y", "sp"], ["out"], name="mix"),
    ]
    t = fixed_frames or "T"
    inputs = [
        helper.make_tensor_value_info("frames", TensorProto.FLOAT, [t, F]),
        helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 1, H]),
        helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 1, H]),
    ]
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [t, OUT])
    return build_model(nodes, inputs, [out], inits)


def _batch_on_axis_1() -> onnx.ModelProto:
    """x [B, F] -> FFN -> [B, OUT], plus a state [2, B, OUT] summed over its first axis and a
    scalar ``rate`` that scales it: the state batches along axis 1."""
    inits = {**_ffn(np.random.default_rng(1)), "axis0": np.array([0], np.int64)}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["z"], name="fc1"),
        helper.make_node("Relu", ["z"], ["a"], name="act"),
        helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2"),
        helper.make_node("ReduceSum", ["state", "axis0"], ["s"], keepdims=0, name="sum"),
        helper.make_node("Mul", ["s", "rate"], ["sr"], name="scale"),
        helper.make_node("Add", ["y", "sr"], ["out"], name="mix"),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", F]),
        helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "B", OUT]),
        helper.make_tensor_value_info("rate", TensorProto.FLOAT, []),
    ]
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", OUT])
    return build_model(nodes, inputs, [out], inits)


def _state(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(1, 1, H)).astype(np.float32)


def _frames(n: int, seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, F)).astype(np.float32)


def _lstm_data(path, n: int = T, seed: int = 2):
    np.savez(path, frames=_frames(n, seed), **{"const/h": _state(3), "const/c": _state(4)})
    return path


def _saved(tmp_path, model: onnx.ModelProto, name: str = "m.onnx"):
    path = tmp_path / name
    onnx.save(model, path)
    return path


def _section(report, name: str) -> dict:
    return next(s for s in json.loads(report.read_text())["passes"] if s["pass"] == name)


def test_lstm_like_state_fed_whole_through_vote_fold_validate(tmp_path) -> None:
    path = _saved(tmp_path, _lstm_like())
    data = _lstm_data(tmp_path / "d.npz")
    out, report = tmp_path / "small.onnx", tmp_path / "r.json"
    res = invoke(
        path,
        *("-p", "vote:sparsity=0.5,round_to=1", "-p", "fold", "-p", "validate:runs=2,warmup=0"),
        *("--data", data, "-o", out, "--report", report),
    )
    assert res.exit_code == 0, res.output + res.stderr
    fold = _section(report, "fold")
    assert fold["channels_removed"] == K // 2
    assert fold["verified"].startswith("outputs equal"), fold["verified"]
    validate = _section(report, "validate")
    assert validate["data"] == {
        "source": str(data),
        "synthetic": False,
        "samples": T,
        "labels": False,
    }
    assert validate["passed"] and validate["latency"]["batch"] == 1
    small = onnx.load(out)
    w1 = next(t for t in small.graph.initializer if t.name == "w1")
    assert list(w1.dims) == [F, K // 2]


def test_constants_are_fed_whole_to_every_batch(tmp_path) -> None:
    model = _lstm_like()
    data = load_npz(_lstm_data(tmp_path / "d.npz", n=21), model)
    assert len(data) == 21 and data.constants == {"h", "c"}
    feeds = list(batches(model, data, batch_size=8))
    assert [len(f["frames"]) for f in feeds] == [8, 8, 5]
    for f in feeds:
        assert f["h"].shape == (1, 1, H) and np.array_equal(f["h"], _state(3))
    assert [len(b["frames"]) for b in data.batches(10)] == [10, 10, 1]
    head = data.head(4)
    assert len(head) == 4 and head.inputs["c"].shape == (1, 1, H)


def test_a_fixed_frame_count_is_the_batch_and_constants_do_not_count(tmp_path) -> None:
    model = _lstm_like(fixed_frames=16)
    data = load_npz(_lstm_data(tmp_path / "d.npz", n=40), model)
    assert fixed_batch(model) is None  # 16 on frames, 1 on the states
    assert fixed_batch(model, data) == 16
    p = plan(model, data)
    assert (p.size, p.fixed, p.count, p.samples) == (16, True, 2, 32)
    _, report = onnxprune.run(model, ["validate:runs=0"], data=tmp_path / "d.npz")
    assert report["passes"][0]["data"]["samples"] == 32


def test_state_without_a_marker_is_refused_with_the_fix(tmp_path) -> None:
    np.savez(tmp_path / "d.npz", frames=_frames(T), h=_state(3), c=_state(4))
    with pytest.raises(DataError) as info:
        load_npz(tmp_path / "d.npz", _lstm_like())
    msg = str(info.value)
    assert "different sample counts" in msg and "'frames' has 40 (shape [40, 6], axis 0)" in msg
    assert "'h' has its declared shape [1, 1, 4]" in msg and "key it 'const/h'" in msg
    np.savez(tmp_path / "d.npz", frames=_frames(16), h=_state(3), **{"const/c": _state(4)})
    with pytest.raises(DataError) as info:  # frames [16, F] has its declared shape too
        load_npz(tmp_path / "d.npz", _lstm_like(fixed_frames=16))
    assert "key it 'const/h'" in str(info.value) and "const/frames" not in str(info.value)


@pytest.mark.parametrize(
    ("arrays", "expected"),
    [
        ({"const/h": np.zeros((2, 1, H), np.float32)}, ["const/h", "[2, 1, 4]", "[1, 1, 4]"]),
        ({"h": _state(3), "const/h": _state(3)}, ["both 'h' and 'const/h'"]),
        ({"axes/h": np.array(1)}, ["'axes/h' gives a sample axis to 'const/h'"]),
        ({"axes/frame": np.array(0)}, ["'axes/frame' names no input", "'frames'"]),
        ({"axes/frames": np.array(2)}, ["'axes/frames' = 2 is no axis of input 'frames'"]),
        ({"axes/frames": np.array(0.5)}, ["'axes/frames' must be one integer"]),
        ({"axes/frames": np.array([1])}, ["'axes/frames' must be one integer"]),
    ],
)
def test_bad_markers_name_the_input_and_the_shape(tmp_path, arrays, expected) -> None:
    base = {"frames": _frames(T), "const/h": _state(3), "const/c": _state(4)}
    if "h" in arrays:
        base.pop("const/h")
    np.savez(tmp_path / "d.npz", **{**base, **arrays})
    with pytest.raises(DataError) as info:
        load_npz(tmp_path / "d.npz", _lstm_like())
    for text in expected:
        assert text in str(info.value)


def _axis1_data(path, n: int, *, marker: bool = True):
    rng = np.random.default_rng(5)
    arrays = {
        "x": rng.normal(size=(n, F)).astype(np.float32),
        "state": rng.normal(size=(2, n, OUT)).astype(np.float32),
        "rate": np.float32(0.5),
    }
    if marker:
        arrays["axes/state"] = np.array(1)
    np.savez(path, **arrays)
    return path


def test_state_batched_on_axis_1(tmp_path) -> None:
    model = _batch_on_axis_1()
    data = load_npz(_axis1_data(tmp_path / "d.npz", 10), model)
    assert len(data) == 10 and data.axes == {"state": 1}
    feeds = list(batches(model, data, batch_size=4))
    assert [f["state"].shape for f in feeds] == [(2, 4, OUT), (2, 4, OUT), (2, 2, OUT)]
    assert all(f["rate"].shape == () for f in feeds)
    assert np.array_equal(feeds[1]["state"], data.inputs["state"][:, 4:8])
    assert data.feed_samples(feeds[2]) == 2
    path = _saved(tmp_path, model)
    report = tmp_path / "r.json"
    res = invoke(
        path,
        *("-p", "vote:sparsity=0.5,round_to=1", "-p", "fold", "-p", "validate:runs=2,warmup=0"),
        *("--data", tmp_path / "d.npz", "-o", tmp_path / "s.onnx", "--report", report),
    )
    assert res.exit_code == 0, res.output + res.stderr
    assert _section(report, "fold")["channels_removed"] == K // 2
    validate = _section(report, "validate")
    assert validate["data"]["samples"] == 10 and validate["passed"]
    assert validate["latency"]["batch"] == 1


def test_state_on_axis_1_without_the_marker_is_refused(tmp_path) -> None:
    with pytest.raises(DataError, match="different sample counts.*'state' has 2.*axes/NAME"):
        load_npz(_axis1_data(tmp_path / "d.npz", 10, marker=False), _batch_on_axis_1())


def test_a_negative_axis_counts_from_the_end(tmp_path) -> None:
    path = _axis1_data(tmp_path / "d.npz", 6)
    arrays = dict(np.load(path))
    arrays["axes/state"] = np.array(-2)
    np.savez(path, **arrays)
    assert load_npz(path, _batch_on_axis_1()).axes == {"state": 1}


def test_nan_in_a_state_names_the_sample_on_its_axis(tmp_path) -> None:
    path = _axis1_data(tmp_path / "d.npz", 6)
    arrays = dict(np.load(path))
    arrays["state"][1, 4, 0] = np.nan
    np.savez(path, **arrays)
    with pytest.raises(DataError, match="input 'state' has 1 NaN.*sample 4"):
        load_npz(path, _batch_on_axis_1())
    np.savez(tmp_path / "c.npz", frames=_frames(4), **{"const/h": np.full((1, 1, H), np.inf)})
    arrays = dict(np.load(tmp_path / "c.npz"))
    arrays["const/c"] = _state(4)
    np.savez(tmp_path / "c.npz", **arrays)
    with pytest.raises(DataError, match="const/h has 4 NaN or infinite value"):
        load_npz(tmp_path / "c.npz", _lstm_like())


def test_synthetic_and_plain_datasets_keep_axis_0() -> None:
    data = Dataset({"x": np.zeros((5, 2)), "r": np.float32(1)}, None, "mem")
    assert len(data) == 5 and data.sample_axis("x") == 0 and data.sample_axis("r") is None
    assert [f["x"].shape for f in data.batches(2)] == [(2, 2), (2, 2), (1, 2)]


def test_eval_data_is_what_validate_compares_on(tmp_path) -> None:
    path = _saved(tmp_path, _lstm_like())
    calib = _lstm_data(tmp_path / "calib.npz", n=T)
    held_out = _lstm_data(tmp_path / "eval.npz", n=12, seed=9)
    report = tmp_path / "r.json"
    res = invoke(
        path,
        *("-p", "vote:sparsity=0.5,round_to=1", "-p", "fold", "-p", "validate:runs=0"),
        *("--data", calib, "--eval-data", held_out, "-o", tmp_path / "s.onnx"),
        *("--report", report),
    )
    assert res.exit_code == 0, res.output + res.stderr
    data = _section(report, "validate")["data"]
    assert data["source"] == str(held_out)
    assert data["samples"] == 12
    assert _section(report, "fold")["channels_removed"] == K // 2  # calibration kept --data


def test_eval_data_from_the_recipe_and_the_python_api(tmp_path) -> None:
    model = _lstm_like()
    held_out = _lstm_data(tmp_path / "eval.npz", n=7, seed=9)
    _, report = onnxprune.run(model, ["validate:runs=0"], eval_data=held_out)
    assert report["passes"][0]["data"]["samples"] == 7
    assert report["passes"][0]["data"]["source"] == str(held_out)
    with pytest.raises(ArgumentError, match="eval_data must be a path"):
        onnxprune.run(model, ["validate:runs=0"], eval_data=3)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="no such data file"):
        onnxprune.run(model, ["validate:runs=0"], eval_data=tmp_path / "none.npz")
    path = _saved(tmp_path, model)
    recipe = tmp_path / "r.toml"
    recipe.write_text('eval_data = "eval.npz"\n[[pass]]\nname = "validate"\nruns = 0\n')
    report_path = tmp_path / "r.json"
    res = invoke(path, "--recipe", recipe, "-o", tmp_path / "s.onnx", "--report", report_path)
    assert res.exit_code == 0, res.output + res.stderr
    assert _section(report_path, "validate")["data"]["source"] == str(held_out)


def test_without_eval_data_validate_says_it_used_the_synthetic_inputs(tmp_path) -> None:
    model = _lstm_like()
    _, report = onnxprune.run(model, ["validate:runs=0"])
    assert report["passes"][0]["data"]["source"] == "synthetic"


def test_eval_data_that_aliases_an_output_is_refused(tmp_path) -> None:
    path = _saved(tmp_path, _lstm_like())
    held_out = _lstm_data(tmp_path / "eval.npz", n=4)
    before = held_out.read_bytes()
    for flag in ("-o", "--report"):
        res = invoke(path, "-p", "validate:runs=0", "--eval-data", held_out, flag, held_out)
        assert res.exit_code != 0
        assert "--eval-data file" in res.output + res.stderr
        assert held_out.read_bytes() == before
