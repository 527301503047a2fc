"""The one onnxruntime runner: exposure, batching, the per-sample retry, outputs.

Every test runs real onnxruntime sessions on small onnx.helper models.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from conftest import build_model
from onnx import TensorProto, helper

from onnxprune import runtime
from onnxprune.analysis.probe import probe
from onnxprune.context import Context
from onnxprune.data import Dataset
from onnxprune.errors import DataError, PassFailedError, RunFailed
from onnxprune.runner import (
    DEFAULT_BATCH,
    batches,
    expose,
    exposed_session,
    exposing,
    outputs,
    plan,
    run_batches,
    run_model,
    runnable,
    stream,
)
from onnxprune.runtime import session
from onnxprune.synthesis import SYNTH_SAMPLES, load_data
from onnxprune.validation.latency import compare_latency

RNG = np.random.default_rng(0)


def _f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def dense(batch: int | str = "N") -> onnx.ModelProto:
    """x[N,5] -> Gemm(7) -> g -> Relu -> r."""
    return build_model(
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1),
            helper.make_node("Relu", ["g"], ["r"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 5])],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, [batch, 7])],
        {"w": _f32(7, 5), "b": _f32(7)},
    )


def baked(rows: int) -> onnx.ModelProto:
    """Declares x[N,4] but reshapes to [rows, 4]: runs only on batches of ``rows`` samples."""
    return build_model(
        [
            helper.make_node("Reshape", ["x", "shape"], ["x1"]),
            helper.make_node("MatMul", ["x1", "w"], ["m"]),
            helper.make_node("Relu", ["m"], ["r"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, [rows, 3])],
        {"shape": np.array([rows, 4], np.int64), "w": _f32(4, 3)},
    )


def embedding() -> onnx.ModelProto:
    """ids[N,L] int64 -> Gather(table[20,6]) -> e."""
    return build_model(
        [helper.make_node("Gather", ["table", "ids"], ["e"])],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "L"])],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", "L", 6])],
        {"table": _f32(20, 6)},
    )


def data(samples: int, features: int = 5, labels: bool = False) -> Dataset:
    y = np.arange(samples) % 3 if labels else None
    return Dataset({"x": _f32(samples, features)}, y, "test")


def sizes(feeds) -> list[int]:
    return [len(f["x"]) for f in feeds]


# ---------------------------------------------------------------------------------------------
# batching: one default, one ragged-tail rule


def test_default_batch_size_and_ragged_tail_kept_for_dynamic_batch() -> None:
    n = DEFAULT_BATCH * 2 + 5
    assert sizes(batches(dense(), data(n))) == [DEFAULT_BATCH, DEFAULT_BATCH, 5]
    assert plan(dense(), n) == plan(dense(), n, batch_size=DEFAULT_BATCH)
    assert sizes(batches(dense(), data(10), batch_size=4)) == [4, 4, 2]
    assert plan(dense(), 10, batch_size=4).samples == 10


def test_fixed_batch_wins_and_ragged_tail_dropped() -> None:
    model = dense(batch=4)
    assert sizes(batches(model, data(10), batch_size=64)) == [4, 4]
    p = plan(model, 10)
    assert (p.size, p.fixed, p.count, p.samples) == (4, True, 2, 8)
    with pytest.raises(DataError, match=r"3 sample\(s\) give no batch .*batch size 4, fixed"):
        next(batches(model, data(3)))


def test_limit_and_max_batches() -> None:
    assert sizes(batches(dense(), data(20), batch_size=8, limit=12)) == [8, 4]
    assert sizes(batches(dense(batch=4), data(20), limit=10)) == [4, 4]
    assert sizes(batches(dense(), data(50), batch_size=8, max_batches=2)) == [8, 8]
    assert plan(dense(), 50, batch_size=8, max_batches=2).samples == 16
    with pytest.raises(ValueError, match="batch size"):
        plan(dense(), 10, batch_size=-1)
    with pytest.raises(ValueError, match="limit"):
        plan(dense(), 10, limit=-1)


def test_feeds_hold_the_inputs_only_cast_to_declared_dtypes() -> None:
    ids = RNG.integers(0, 20, (6, 3)).astype(np.int32)
    (feed,) = batches(embedding(), Dataset({"ids": ids, "extra": ids}, None, "t"))
    assert list(feed) == ["ids"] and feed["ids"].dtype == np.int64
    with pytest.raises(DataError, match=r"no array for model input\(s\) \['ids'\]"):
        next(batches(embedding(), Dataset({"x": ids}, None, "t")))


# ---------------------------------------------------------------------------------------------
# running: the per-sample retry


def test_first_batch_failure_retries_one_sample_at_a_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model, d = baked(1), data(6, 4)
    with caplog.at_level(logging.WARNING, logger="onnxprune.runner"):
        got = list(stream(model, ["r", "x"], d, batch_size=3))
    assert "one sample at a time" in caplog.text
    assert len(got) == 6
    want = run_model(model, {"x": d.inputs["x"][:1]})["r"]
    np.testing.assert_array_equal(got[0]["r"], want)
    np.testing.assert_array_equal(got[5]["x"], d.inputs["x"][5:6])  # inputs from the feeds


def test_later_batch_failure_is_an_error_naming_the_session() -> None:
    model = baked(3)  # batches of 3 run, the ragged tail of 1 cannot
    sessions = [session(build_model_like(model)), session(model)]
    with pytest.raises(RunFailed) as caught:
        list(run_batches(sessions, model, data(7, 4), batch_size=3))
    assert caught.value.index == 1
    assert isinstance(caught.value, PassFailedError)
    assert "onnxruntime could not run the model" in str(caught.value)


def build_model_like(model: onnx.ModelProto) -> onnx.ModelProto:
    """A model with ``model``'s input that runs on any batch: x -> Relu -> r."""
    return build_model(
        [helper.make_node("Relu", ["x"], ["r"])],
        list(model.graph.input),
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", 4])],
        {},
    )


def test_fixed_batch_failure_is_not_retried() -> None:
    model = dense(batch=2)
    broken = Dataset({"x": _f32(4, 6)}, None, "t")  # wrong feature count: every batch fails
    with pytest.raises(RunFailed):
        list(stream(model, ["g"], broken))


def test_sessions_side_by_side_see_the_same_feeds() -> None:
    a, b = dense(), dense()
    d = data(10)
    pairs = list(run_batches([session(a), session(b)], a, d, batch_size=4, fetch=["r"]))
    assert [len(feed["x"]) for feed, _ in pairs] == [4, 4, 2]
    for feed, (ra, rb) in pairs:
        np.testing.assert_array_equal(ra["r"], run_model(a, feed)["r"])
        np.testing.assert_array_equal(rb["r"], run_model(b, feed)["r"])


def test_outputs_concatenate_batches() -> None:
    model, d = dense(), data(10)
    got = outputs(model, d, batch_size=3)
    np.testing.assert_allclose(got["r"], run_model(model, d.inputs)["r"], rtol=1e-6)
    assert outputs(model, d, limit=4)["r"].shape == (4, 7)


def test_runnable_runs_once_and_times_a_session() -> None:
    model, d = dense(), data(2)
    sess = session(model)
    np.testing.assert_array_equal(runnable(sess, d.inputs)()[0], run_model(sess, d.inputs)["r"])
    ticks = iter(range(1000))
    run = runnable(sess, d.inputs)
    cmp = compare_latency(run, run, runs=3, warmup=1, clock=lambda: next(ticks))
    assert cmp.original.runs == cmp.pruned.runs == 3 and cmp.ratio == 1.0


# ---------------------------------------------------------------------------------------------
# exposure, with and without a copy


def test_expose_copy_leaves_the_model_alone() -> None:
    model = dense()
    before = model.SerializeToString()
    exposed = expose(model, ["g", "x", "r", "g"])  # the input and the output are skipped
    assert exposed is not model and model.SerializeToString() == before
    assert [o.name for o in exposed.graph.output] == ["r", "g"]


def test_expose_without_copy_and_exposing_restores() -> None:
    model = dense()
    before = model.SerializeToString()
    same = expose(model, ["g"], copy=False)
    assert same is model and [o.name for o in model.graph.output] == ["r", "g"]
    del model.graph.output[1:]
    with exposing(model, ["g"]) as inside:
        assert inside is model and len(model.graph.output) == 2
    assert model.SerializeToString() == before


def test_expose_rejects_unknown_names_and_initializers() -> None:
    model = dense()
    before = model.SerializeToString()
    with pytest.raises(ValueError, match="not an input or a tensor"):
        exposed_session(model, ["nope"])
    with pytest.raises(ValueError, match="initializer"):
        expose(model, ["w"], copy=False)
    assert model.SerializeToString() == before


def test_exposed_session_leaves_the_model_as_it_was() -> None:
    model, d = dense(), data(3)
    before = model.SerializeToString()
    sess = exposed_session(model, ["g"])
    assert model.SerializeToString() == before
    got = run_model(sess, d.inputs)
    np.testing.assert_allclose(np.maximum(got["g"], 0), got["r"])


def test_exposed_session_on_shared_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large models: weights go to onnxruntime through a mapped file, exposure still in place."""
    model, d = dense(), data(3)
    want = run_model(expose(model, ["g"]), d.inputs)
    monkeypatch.setattr(runtime, "SHARE_WEIGHTS_BYTES", 0)
    monkeypatch.setattr(runtime, "_SHARE_MIN_ELEMENTS", 1)
    before = model.SerializeToString()
    got = run_model(exposed_session(model, ["g"]), d.inputs)
    assert model.SerializeToString() == before
    for name in ("g", "r"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# data: the one answer to "is this real data?"


def test_probe_on_real_data_or_synthetic() -> None:
    model, d = dense(), data(5)
    real = probe(model, data=d)
    np.testing.assert_array_equal(real.inputs["x"], d.inputs["x"][:2])
    assert real.shapes["g"] == (2, 7) and "g" in real.values
    synthetic = probe(model)
    assert synthetic.shapes["g"] == (2, 7) and not np.array_equal(
        synthetic.inputs["x"], d.inputs["x"][:2]
    )
    assert [o.name for o in model.graph.output] == ["r"]


def test_context_data_is_loaded_once_and_says_whether_real(tmp_path) -> None:
    model = dense()
    ctx = Context(original=model)
    d = ctx.data()
    assert d.synthetic and len(d) == SYNTH_SAMPLES and ctx.data(model) is d
    np.savez(tmp_path / "d.npz", x=_f32(4, 5))
    real = Context(original=model, data_path=tmp_path / "d.npz").data()
    assert not real.synthetic and real.source == str(tmp_path / "d.npz")
    assert not load_data(tmp_path / "d.npz", model).synthetic
    assert load_data(None, model, samples=3, seed=1).synthetic


def test_head_keeps_labels_and_source() -> None:
    d = data(10, labels=True).head(4)
    assert len(d) == 4 and list(d.labels) == [0, 1, 2, 0] and d.source == "test"
