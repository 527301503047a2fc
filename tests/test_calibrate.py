"""Calibration: per-channel activation statistics and activation rows, computed by onnxruntime.

Statistics are checked against numpy on exactly the activations onnxruntime produced (the same
exposed model, session settings and batches), for NCHW, NHWC, [N, F] and [N, L, D] tensors;
merging is checked to equal one pass (random splits) and to be associative.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import build_model as _model
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxprune.context import Context
from onnxprune.data import Dataset, load_npz
from onnxprune.errors import DataError
from onnxprune.pruning.calibrate import (
    SYNTHETIC_WARNING,
    ChannelStats,
    activation_stats,
    collect,
    collect_rows,
    fingerprint,
)
from onnxprune.runner import expose
from onnxprune.runtime import session
from onnxprune.synthesis import synthesize

ROOT = Path(__file__).resolve().parents[1]

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------------------------
# tiny models


def _f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def conv_model(batch: int | str = "N") -> onnx.ModelProto:
    """x[N,3,6,6] -> Conv(8, 3x3, pad 1) -> c -> Relu -> r; channel 5 is exactly zero."""
    w, b = _f32(8, 3, 3, 3), _f32(8)
    w[5], b[5] = 0, 0
    return _model(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 6, 6])],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, [batch, 8, 6, 6])],
        {"w": w, "b": b},
    )


def nhwc_model() -> onnx.ModelProto:
    """tf2onnx layout: x[N,6,6,3] -> Transpose -> Conv -> Relu -> Transpose -> y[N,6,6,8]."""
    return _model(
        [
            helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2]),
            helper.make_node("Conv", ["xt", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Transpose", ["r"], ["y"], perm=[0, 2, 3, 1]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 6, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 6, 8])],
        {"w": _f32(8, 3, 3, 3), "b": _f32(8)},
    )


def dense_model(batch: int | str = "N") -> onnx.ModelProto:
    """x[N,5] -> Gemm(7) -> g -> Relu -> r."""
    return _model(
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1),
            helper.make_node("Relu", ["g"], ["r"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 5])],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, [batch, 7])],
        {"w": _f32(7, 5), "b": _f32(7)},
    )


def seq_model() -> onnx.ModelProto:
    """x[N,L,6] -> MatMul(6x9) -> Add -> h -> Relu -> r."""
    return _model(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"]),
            helper.make_node("Add", ["m", "b"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "L", 6])],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", "L", 9])],
        {"w": _f32(6, 9), "b": _f32(9)},
    )


def embedding_model() -> onnx.ModelProto:
    """ids[N,L] int64 -> Gather(table[20,6]) -> e -> MatMul(6x4) -> Relu -> r."""
    return _model(
        [
            helper.make_node("Gather", ["table", "ids"], ["e"]),
            helper.make_node("MatMul", ["e", "w"], ["m"]),
            helper.make_node("Relu", ["m"], ["r"]),
        ],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "L"])],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", "L", 4])],
        {"table": _f32(20, 6), "w": _f32(6, 4)},
    )


def baked_batch_model() -> onnx.ModelProto:
    """Declares a dynamic batch but reshapes to [1, 4]: only runs one sample at a time."""
    return _model(
        [
            helper.make_node("Reshape", ["x", "shape"], ["x1"]),
            helper.make_node("MatMul", ["x1", "w"], ["m"]),
            helper.make_node("Relu", ["m"], ["r"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 3])],
        {"shape": np.array([1, 4], np.int64), "w": _f32(4, 3)},
    )


def dataset(**arrays: np.ndarray) -> Dataset:
    return Dataset(dict(arrays), None, "test")


def activations(
    model: onnx.ModelProto, names: list[str], data: Dataset, batch: int
) -> dict[str, np.ndarray]:
    """What collect's runs see: same exposed model, session settings and batches."""
    sess = session(expose(model, names))
    runs = [sess.run(names, feed) for feed in data.batches(batch)]
    return {n: np.concatenate([r[i] for r in runs]) for i, n in enumerate(names)}


def assert_close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    scale = float(np.max(np.abs(expected), initial=0.0)) + 1.0
    np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-12 * scale, err_msg=what)


def assert_matches_numpy(stats: ChannelStats, x: np.ndarray, axis: int) -> None:
    """Every statistic equals numpy's on ``x`` (float64) along ``axis``."""
    x = np.asarray(x, np.float64)
    block = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
    assert stats.channels == block.shape[0]
    assert stats.count == block.shape[1]
    assert_close(stats.mean, block.mean(axis=1), "mean")
    assert_close(stats.var, block.var(axis=1), "var")
    assert_close(stats.std, block.std(axis=1), "std")
    assert_close(stats.l2, np.linalg.norm(block, axis=1), "l2")
    assert_close(stats.rms, np.sqrt(np.mean(block**2, axis=1)), "rms")
    np.testing.assert_array_equal(stats.apoz, np.mean(block == 0, axis=1))
    np.testing.assert_array_equal(stats.zeros, np.count_nonzero(block == 0, axis=1))
    np.testing.assert_array_equal(stats.min, block.min(axis=1))
    np.testing.assert_array_equal(stats.max, block.max(axis=1))


def assert_same_stats(a: ChannelStats, b: ChannelStats) -> None:
    assert a.count == b.count
    np.testing.assert_array_equal(a.zeros, b.zeros)
    np.testing.assert_array_equal(a.min, b.min)
    np.testing.assert_array_equal(a.max, b.max)
    for prop in ("sum", "sumsq", "mean", "var", "l2"):
        assert_close(getattr(a, prop), getattr(b, prop), prop)


# ---------------------------------------------------------------------------------------------
# collect against numpy, per layout


@pytest.mark.parametrize("batch", [7, 64])
def test_nchw_conv_stats_equal_numpy(batch: int) -> None:
    model = conv_model()
    data = dataset(x=_f32(50, 3, 6, 6))
    tensors = {"x": 1, "c": 1, "r": 1}
    stats = collect(model, tensors, data, batch_size=batch)
    ref = activations(model, ["c", "r"], data, batch) | {"x": data.inputs["x"]}
    for name, axis in tensors.items():
        assert_matches_numpy(stats[name], ref[name], axis)
    assert stats["c"].apoz[5] == 1.0 and stats["c"].l2[5] == 0.0  # the zeroed filter
    assert 0.2 < stats["r"].apoz.mean() < 0.8  # Relu zeros are counted


def test_nhwc_stats_equal_numpy() -> None:
    model = nhwc_model()
    data = dataset(x=_f32(30, 6, 6, 3))
    stats = collect(model, {"x": 3, "y": 3, "r": 1}, data, batch_size=8)
    ref = activations(model, ["y", "r"], data, 8)
    assert_matches_numpy(stats["x"], data.inputs["x"], 3)
    assert_matches_numpy(stats["y"], ref["y"], 3)
    assert_matches_numpy(stats["r"], ref["r"], 1)
    assert_same_stats(stats["y"], stats["r"])  # the same activations in two layouts


def test_dense_2d_stats_equal_numpy() -> None:
    model = dense_model()
    data = dataset(x=_f32(100, 5))
    stats = collect(model, {"g": 1, "r": -1}, data, batch_size=16)
    ref = activations(model, ["g", "r"], data, 16)
    assert_matches_numpy(stats["g"], ref["g"], 1)
    assert_matches_numpy(stats["r"], ref["r"], 1)
    assert stats["g"].count == 100


def test_sequence_3d_stats_equal_numpy() -> None:
    model = seq_model()
    data = dataset(x=_f32(40, 5, 6))
    stats = collect(model, {"h": 2, "r": 2}, data, batch_size=16)
    ref = activations(model, ["h", "r"], data, 16)
    assert_matches_numpy(stats["h"], ref["h"], 2)
    assert_matches_numpy(stats["r"], ref["r"], 2)
    assert stats["h"].count == 40 * 5


def test_integer_input_embedding() -> None:
    model = embedding_model()
    data = dataset(ids=RNG.integers(0, 20, (33, 7)).astype(np.int64))
    stats = collect(model, {"ids": 1, "e": 2, "r": 2}, data, batch_size=10)
    ref = activations(model, ["e", "r"], data, 10)
    assert_matches_numpy(stats["e"], ref["e"], 2)
    assert_matches_numpy(stats["r"], ref["r"], 2)
    assert_matches_numpy(stats["ids"], data.inputs["ids"], 1)  # an integer graph input


def test_feeds_cast_to_declared_dtype() -> None:
    model = embedding_model()
    ids = RNG.integers(0, 20, (6, 3))
    as_int32 = collect(model, {"r": 2}, dataset(ids=ids.astype(np.int32)))
    as_int64 = collect(model, {"r": 2}, dataset(ids=ids.astype(np.int64)))
    assert_same_stats(as_int32["r"], as_int64["r"])


def test_fixed_batch_one_runs_per_sample() -> None:
    model = dense_model(batch=1)  # onnxruntime rejects any other batch size
    data = dataset(x=_f32(9, 5))
    stats = collect(model, {"r": 1}, data, batch_size=64)
    assert stats["r"].count == 9
    assert_matches_numpy(stats["r"], activations(model, ["r"], data, 1)["r"], 1)


def test_fixed_batch_drops_ragged_tail_and_needs_one_batch() -> None:
    model = dense_model(batch=4)
    assert collect(model, {"r": 1}, dataset(x=_f32(10, 5)))["r"].count == 8
    with pytest.raises(DataError, match="no batch"):
        collect(model, {"r": 1}, dataset(x=_f32(3, 5)))


def test_baked_batch_one_falls_back_to_per_sample(caplog: pytest.LogCaptureFixture) -> None:
    model = baked_batch_model()
    data = dataset(x=_f32(6, 4))
    with caplog.at_level(logging.WARNING, logger="onnxprune.pruning.calibrate"):
        stats = collect(model, {"r": 1}, data, batch_size=3)
    assert "one sample at a time" in caplog.text
    assert_matches_numpy(stats["r"], activations(model, ["r"], data, 1)["r"], 1)


def test_max_batches() -> None:
    stats = collect(
        conv_model(), {"c": 1}, dataset(x=_f32(50, 3, 6, 6)), batch_size=8, max_batches=2
    )
    assert stats["c"].count == 16 * 36


def test_bad_requests() -> None:
    model = conv_model()
    data = dataset(x=_f32(2, 3, 6, 6))
    with pytest.raises(ValueError, match="not an input or a tensor"):
        collect(model, {"nope": 1}, data)
    with pytest.raises(ValueError, match="initializer"):
        collect(model, {"w": 0}, data)
    with pytest.raises(ValueError, match="out of range"):
        collect(model, {"c": 4}, data)
    with pytest.raises(DataError, match="no array"):
        collect(model, {"c": 1}, dataset(y=_f32(2, 3, 6, 6)))


def test_model_not_mutated_and_progress_quiet_off_tty(capsys: pytest.CaptureFixture) -> None:
    model = conv_model()
    before = model.SerializeToString()
    collect(model, {"c": 1, "r": 1}, dataset(x=_f32(20, 3, 6, 6)), batch_size=4, progress=True)
    assert model.SerializeToString() == before
    assert capsys.readouterr().err == ""  # stderr is not a terminal here: no bar


# ---------------------------------------------------------------------------------------------
# fixtures with real data


def test_digits_cnn_real_data_channel_counts() -> None:
    path = ROOT / "models/digits/torch_cnn.onnx"
    model = onnx.load(path)
    data = load_npz(path.with_name("torch_cnn.calib.npz"), model)
    names = {n.op_type + str(i): n.output[0] for i, n in enumerate(model.graph.node)}
    tensors = {
        names["Conv0"]: 1,
        names["Relu3"]: 1,
        names["MaxPool4"]: 1,
        names["Flatten8"]: 1,
        names["Relu10"]: 1,
        "output": 1,
    }
    stats = collect(model, tensors, data)
    got = {name: (s.channels, s.count) for name, s in stats.items()}
    n = len(data)
    assert list(got.values()) == [
        (16, n * 64),
        (32, n * 64),
        (32, n * 16),
        (32, n),
        (64, n),
        (10, n),
    ]
    relu = stats[names["Relu3"]]
    assert relu.min.min() == 0 and 0 < relu.apoz.mean() < 1
    assert_matches_numpy(stats["output"], activations(model, ["output"], data, 64)["output"], 1)


def test_fixed_batch_fixture_with_nhwc_input() -> None:
    path = ROOT / "models/tf/cnn.onnx"  # input [1, 32, 32, 3]
    model = onnx.load(path)
    conv = next(n.output[0] for n in model.graph.node if n.op_type == "Conv")
    data = synthesize(model, samples=3)
    stats = collect(model, {"input": 3, conv: 1}, data)
    assert (stats["input"].channels, stats["input"].count) == (3, 3 * 32 * 32)
    assert stats[conv].count % 3 == 0
    assert_matches_numpy(stats["input"], data.inputs["input"], 3)


# ---------------------------------------------------------------------------------------------
# ChannelStats algebra


arrays = st.integers(1, 40).flatmap(
    lambda n: st.tuples(
        st.just(n),
        st.integers(1, 5),
        st.lists(st.integers(0, n), max_size=6),
        st.floats(-1e3, 1e3),
        st.integers(0, 2**32 - 1),
    )
)


def _random_block(n: int, c: int, offset: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, c, 3)) + offset).astype(np.float32)
    x[rng.random(x.shape) < 0.2] = 0  # exact zeros
    return x


@settings(max_examples=60, deadline=None)
@given(arrays)
def test_streamed_updates_and_merges_equal_one_pass(case) -> None:
    n, c, cuts, offset, seed = case
    x = _random_block(n, c, offset, seed)
    pieces = np.split(x, sorted(cuts))
    whole = ChannelStats.of(x, 1)
    streamed = ChannelStats.empty(c)
    merged = ChannelStats.empty(c)
    for piece in pieces:
        streamed.update(piece, 1)
        merged = merged.merge(ChannelStats.of(piece, 1))
    assert_matches_numpy(whole, x, 1)
    assert_same_stats(streamed, whole)
    assert_same_stats(merged, whole)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=3, max_size=3), st.integers(0, 2**32 - 1))
def test_merge_is_associative_and_pure(sizes: list[int], seed: int) -> None:
    a, b, c = (
        ChannelStats.of(_random_block(k, 4, 2.0, seed + i), 1) if k else ChannelStats.empty(4)
        for i, k in enumerate(sizes)
    )
    snapshot = [s.copy() for s in (a, b, c)]
    assert_same_stats(a.merge(b).merge(c), a.merge(b.merge(c)))
    for s, before in zip((a, b, c), snapshot, strict=True):
        assert_same_stats(s, before)  # merge changed neither operand


def test_var_accurate_when_mean_dwarfs_spread() -> None:
    x = (1e4 + 1e-2 * RNG.standard_normal((200, 3))).astype(np.float64)
    stats = ChannelStats.empty(3)
    for piece in np.array_split(x, 13):
        stats.update(piece, 1)
    assert_close(stats.var, x.var(axis=0), "var")  # sumsq/n - mean**2 would be off by ~1e-4


def test_empty_and_mismatched_stats() -> None:
    empty = ChannelStats.empty(3)
    assert empty.count == 0 and np.isnan(empty.mean).all() and np.isnan(empty.apoz).all()
    assert (empty.l2 == 0).all() and (empty.min == np.inf).all()
    one = ChannelStats.of(np.arange(6.0).reshape(2, 3), 1)
    assert_same_stats(empty.merge(one), one)
    with pytest.raises(ValueError, match="channels"):
        one.update(np.zeros((2, 4)), 1)
    with pytest.raises(ValueError, match="merge"):
        one.merge(ChannelStats.empty(2))


# ---------------------------------------------------------------------------------------------
# collect_rows


@pytest.mark.parametrize(
    ("factory", "names", "shape"),
    [
        (conv_model, {"c": 1, "r": 1}, (12, 3, 6, 6)),
        (nhwc_model, {"y": 3}, (12, 6, 6, 3)),
        (seq_model, {"h": 2}, (12, 5, 6)),
        (dense_model, {"g": 1}, (12, 5)),
    ],
)
def test_rows_are_the_activation_vectors(factory, names: Mapping[str, int], shape) -> None:
    model = factory()
    data = dataset(x=_f32(*shape))
    full = activations(model, list(names), data, 5)
    rows = collect_rows(model, names, data, max_rows=10_000, batch_size=5)
    sub = collect_rows(model, names, data, max_rows=20, batch_size=5, seed=3)
    for name, axis in names.items():
        expected = np.moveaxis(full[name], axis, -1).reshape(-1, full[name].shape[axis])
        assert rows[name].dtype == np.float64
        np.testing.assert_array_equal(rows[name], expected)  # all rows, in stream order
        assert sub[name].shape == (min(20, len(expected)), expected.shape[1])
        known = {r.tobytes() for r in expected.astype(np.float64)}
        assert all(r.tobytes() in known for r in sub[name])


def test_row_subsample_is_uniform_and_seeded() -> None:
    """Rows carry their own stream index: the kept ones spread over the whole stream."""
    model = _model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 2])],
        {},
    )
    x = np.zeros((500, 8, 2), np.float32)
    x[..., 0] = np.arange(4000).reshape(500, 8)
    data = dataset(x=x)
    rows = collect_rows(model, {"y": 2}, data, max_rows=400, batch_size=64, seed=1)["y"]
    index = rows[:, 0].astype(int)
    assert len(index) == len(set(index)) == 400
    assert (np.diff(index) > 0).all()
    counts = np.histogram(index, bins=10, range=(0, 4000))[0]
    assert counts.min() > 20 and counts.max() < 60  # ~40 per tenth of the stream
    again = collect_rows(model, {"y": 2}, data, max_rows=400, batch_size=64, seed=1)["y"]
    other = collect_rows(model, {"y": 2}, data, max_rows=400, batch_size=64, seed=2)["y"]
    np.testing.assert_array_equal(rows, again)
    assert not np.array_equal(rows, other)


# ---------------------------------------------------------------------------------------------
# memory: streaming, not accumulating


MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    from onnxprune.pruning.calibrate import collect
    from onnxprune.data import Dataset

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype("f4"), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"])], "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", 16, 16, 16])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = rng.standard_normal((2000, 3, 16, 16)).astype("f4")
    data = Dataset({"x": x}, None, "memory")

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    collect(model, {"c": 1, "r": 1}, data, batch_size=64, max_batches=2)
    small = peak()
    stats = collect(model, {"c": 1, "r": 1}, data, batch_size=64)
    print(json.dumps({"growth": peak() - small, "count": stats["c"].count}))
""")


def test_collect_memory_does_not_grow_with_samples() -> None:
    """2,000 samples of two [16, 16, 16] activations: 2 MB of outputs per batch of 64, 64 MB
    for all samples (128 MB as float64). A fresh process's peak RSS after two batches and after
    all 32 must stay nearly flat. (tracemalloc would not see kept outputs: onnxruntime returns
    zero-copy views of its own buffers.)"""
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["count"] == 2000 * 256
    assert result["growth"] < 16 * 2**20, result


# ---------------------------------------------------------------------------------------------
# activation_stats: cached per model and tensor set


def test_activation_stats_cached_per_model_and_tensors(tmp_path) -> None:
    model = conv_model()
    np.savez(tmp_path / "calib.npz", x=_f32(16, 3, 6, 6))
    ctx = Context(original=model, data_path=tmp_path / "calib.npz")
    first = activation_stats(ctx, model, {"c": 1, "r": 1})
    assert activation_stats(ctx, model, {"r": 1, "c": 1}) is first  # same set, any order
    assert activation_stats(ctx, model, {"c": 1}) is not first
    assert len(ctx.cache) == 2

    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(model)
    w = numpy_helper.to_array(zeroed.graph.initializer[0]).copy()
    w[0] = 0
    zeroed.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
    assert fingerprint(zeroed) != fingerprint(model)
    changed = activation_stats(ctx, zeroed, {"c": 1, "r": 1})
    assert changed is not first
    assert changed["c"].l2[0] < first["c"].l2[0]  # weights are part of the key


def test_activation_stats_warns_on_synthetic_data(caplog: pytest.LogCaptureFixture) -> None:
    model = conv_model()
    ctx = Context(original=model, seed=3)
    with caplog.at_level(logging.WARNING, logger="onnxprune.pruning.calibrate"):
        stats = activation_stats(ctx, model, {"c": 1})
    assert SYNTHETIC_WARNING in caplog.text
    assert stats["c"].count == 32 * 36  # Context synthesises 32 samples
