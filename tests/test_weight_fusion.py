"""Weight-space fusion (onnxprune.fusion.weights.merge_weights): identical checkpoints give the
checkpoint back, a channel-permuted copy is aligned back exactly, other architectures are
refused naming the first difference, and a merge of trained seeds is a valid model that runs."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.data import Dataset
from onnxprune.errors import ArchitectureMismatch, ArgumentError
from onnxprune.fusion.assignment import best_assignment, hungarian
from onnxprune.fusion.repair import repair
from onnxprune.fusion.weights import merge_weights

DIGITS = Path(__file__).resolve().parents[1] / "models" / "digits"
SEEDS = [DIGITS / "torch_cnn.onnx"] + [DIGITS / f"torch_cnn_seed{s}.onnx" for s in (1, 2, 3)]


def _f32(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.normal(size=shape).astype(np.float32)


def _cnn(seed: int, residual: bool = False) -> onnx.ModelProto:
    """x[N,2,6,6] -> Conv(8)+BN+Relu -> [Conv(8)+Relu, + residual] -> Conv(6)+Relu -> GAP ->
    Flatten -> Gemm(4, transB): random weights from ``seed``."""
    rng = np.random.default_rng(seed)
    inits = {
        "w1": _f32(rng, 8, 2, 3, 3),
        "b1": _f32(rng, 8),
        "scale": rng.uniform(0.5, 1.5, 8).astype(np.float32),
        "shift": _f32(rng, 8),
        "mean": _f32(rng, 8),
        "var": rng.uniform(0.5, 1.5, 8).astype(np.float32),
        "w2": _f32(rng, 6, 8, 3, 3),
        "b2": _f32(rng, 6),
        "w3": _f32(rng, 4, 6),
        "b3": _f32(rng, 4),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "scale", "shift", "mean", "var"], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
    ]
    last = "r1"
    if residual:
        inits["wr"] = _f32(rng, 8, 8, 3, 3)
        inits["br"] = _f32(rng, 8)
        nodes += [
            helper.make_node("Conv", ["r1", "wr", "br"], ["cr"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["cr"], ["rr"]),
            helper.make_node("Add", ["r1", "rr"], ["sum"]),
        ]
        last = "sum"
    nodes += [
        helper.make_node("Conv", [last, "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _params(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _with(model: onnx.ModelProto, params: dict[str, np.ndarray]) -> onnx.ModelProto:
    out = copy.deepcopy(model)
    del out.graph.initializer[:]
    out.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in params.items())
    return out


def _permuted(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """``model`` with its 8 and 6 hidden channels shuffled, every tied tensor moved by hand."""
    rng = np.random.default_rng(seed)
    p1, p2 = rng.permutation(8), rng.permutation(6)
    p = _params(model)
    q = dict(p)
    for k in ("w1", "b1", "scale", "shift", "mean", "var"):
        q[k] = p[k][p1]
    if "wr" in p:
        q["wr"] = p["wr"][p1][:, p1]
        q["br"] = p["br"][p1]
    q["w2"] = p["w2"][p2][:, p1]
    q["b2"] = p["b2"][p2]
    q["w3"] = p["w3"][:, p2]
    return _with(model, q)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("align", [True, False])
def test_identical_checkpoints_give_the_checkpoint(align: bool) -> None:
    model = _cnn(0)
    merged, stats = merge_weights([model, copy.deepcopy(model), copy.deepcopy(model)], align)
    assert merged.SerializeToString() == model.SerializeToString()
    assert stats["align"] is align
    if align:
        assert stats["sets"] and all(s["correlation_before"] == [1.0, 1.0] for s in stats["sets"])


def test_identical_fixture_checkpoints_give_the_checkpoint() -> None:
    model = onnxprune.load(SEEDS[0])
    merged, _ = merge_weights([model, copy.deepcopy(model)])
    assert merged.SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize("residual", [False, True])
def test_permuted_copy_is_aligned_back_exactly(residual: bool) -> None:
    model = _cnn(1, residual)
    shuffled = _permuted(model, 7)
    x = np.random.default_rng(0).normal(size=(5, 2, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(shuffled, x), _run(model, x), rtol=1e-4, atol=1e-5)
    assert not np.array_equal(_params(shuffled)["w1"], _params(model)["w1"])
    merged, stats = merge_weights([model, shuffled])
    for name, value in _params(model).items():
        assert np.array_equal(_params(merged)[name], value), name
    assert stats["verified"] == [True]
    assert all(s["correlation_after"] == [1.0] for s in stats["sets"])
    assert any(s["correlation_before"][0] < 0.9 for s in stats["sets"])
    # without alignment the same pair averages mismatched channels: another model
    unaligned, _ = merge_weights([model, shuffled], align=False)
    assert not np.allclose(_run(unaligned, x), _run(model, x), atol=1e-3)


@pytest.mark.parametrize("residual", [False, True])
def test_activation_matching_aligns_a_permuted_copy_back_exactly(residual: bool) -> None:
    model = _cnn(4, residual)
    shuffled = _permuted(model, 9)
    x = np.random.default_rng(3).normal(size=(48, 2, 6, 6)).astype(np.float32)
    merged, stats = merge_weights(
        [model, shuffled], data=Dataset({"x": x}, None, "t"), match="activations"
    )
    assert stats["match"] == "activations" and stats["verified"] == [True]
    assert all(s["correlation_after"] == [1.0] for s in stats["sets"])
    np.testing.assert_allclose(_run(merged, x), _run(model, x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ArgumentError, match="match='activations' needs data"):
        merge_weights([model, shuffled], match="activations")


def test_permuted_fixture_is_aligned_back_exactly() -> None:
    """torch_cnn with its first conv's 16 channels shuffled (weight rows, BN vectors, the
    next conv's input columns): merging it with the original gives the original."""
    model = onnxprune.load(SEEDS[0])
    p = _params(model)
    first = model.graph.node[0]
    assert first.op_type == "Conv"
    perm = np.random.default_rng(3).permutation(16)
    q = dict(p)
    tied = [n for n, v in p.items() if v.ndim >= 1 and v.shape[0] == 16]
    consumer = [n for n, v in p.items() if v.ndim == 4 and v.shape[1] == 16]
    assert len(consumer) == 1 and first.input[1] in tied
    for n in tied:
        q[n] = p[n][perm]
    q[consumer[0]] = p[consumer[0]][:, perm]
    shuffled = _with(model, q)
    with np.load(DIGITS / "torch_cnn.test.npz") as npz:
        x = npz["input"][:32]
    np.testing.assert_allclose(_run(shuffled, x), _run(model, x), rtol=1e-4, atol=1e-4)
    merged, stats = merge_weights([model, shuffled])
    for name, value in p.items():
        assert np.array_equal(_params(merged)[name], value), name
    assert stats["verified"] == [True]


def test_unaligned_merge_is_the_plain_mean() -> None:
    models = [_cnn(s) for s in (2, 3, 4)]
    merged, stats = merge_weights(models, align=False)
    onnx.checker.check_model(merged, full_check=True)
    assert stats["sets"] == []
    for name in _params(models[0]):
        want = np.mean([_params(m)[name].astype(np.float64) for m in models], axis=0)
        np.testing.assert_allclose(_params(merged)[name], want.astype(np.float32), rtol=1e-6)


def test_trained_seeds_merge_into_a_model_that_runs() -> None:
    models = [onnxprune.load(p) for p in SEEDS]
    merged, stats = onnxprune.merge_weights(models, names=[p.stem for p in SEEDS])
    onnx.checker.check_model(merged, full_check=True)
    assert stats["models"] == [p.stem for p in SEEDS]
    assert stats["verified"] == [True, True, True]
    assert stats["sets"], "the CNN's hidden channel groups are aligned"
    for s in stats["sets"]:
        assert len(s["correlation_after"]) == 3
        assert np.mean(s["correlation_after"]) >= np.mean(s["correlation_before"]) - 1e-9
    with np.load(DIGITS / "torch_cnn.test.npz") as npz:
        x = npz["input"]
    out = _run(merged, x)
    assert out.shape == (len(x), 10) and np.isfinite(out).all()
    # the merge is the mean of the aligned members: not any one of them
    for m in models:
        assert not np.allclose(out, _run(m, x), atol=1e-3)


def test_other_architectures_are_refused_naming_the_first_difference() -> None:
    model = _cnn(0)
    with pytest.raises(ArchitectureMismatch, match=r"model 2 .*node 0 .*is Relu, not Conv"):
        other = copy.deepcopy(model)
        other.graph.node[0].op_type = "Relu"
        merge_weights([model, other])
    wider = _params(model)
    wider["b3"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match=r"initializer 'b3' is float32\[5\], not float32\[4\]"):
        merge_weights([model, _with(model, wider)])
    with pytest.raises(
        ArchitectureMismatch, match="torch_cnn_seed1 is not the architecture of keras"
    ):
        merge_weights(
            [onnxprune.load(DIGITS / "keras_cnn.onnx"), onnxprune.load(SEEDS[1])],
            names=["keras", "torch_cnn_seed1"],
        )
    with pytest.raises(ArgumentError, match="at least two models"):
        merge_weights([model])


def test_builtin_assignment_is_optimal() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 5, 6):
        for trial in range(10):
            cost = rng.normal(size=(n, n))
            if trial % 2:
                cost = np.round(cost)  # ties
            best = min(
                sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n))
            )
            perm = hungarian(cost)
            assert sorted(perm.tolist()) == list(range(n))
            assert cost[np.arange(n), perm].sum() == pytest.approx(best, abs=1e-9)
            gain = best_assignment(-cost)
            assert cost[np.arange(n), gain].sum() == pytest.approx(best, abs=1e-9)
    big = rng.normal(size=(60, 60))
    assert np.array_equal(hungarian(big), best_assignment(-big)) or (
        big[np.arange(60), hungarian(big)].sum()
        == pytest.approx(big[np.arange(60), best_assignment(-big)].sum())
    )


def _moments(model: onnx.ModelProto, names: list[str], x: np.ndarray) -> list[np.ndarray]:
    """Per-channel mean and std of ``names`` on ``x``, by onnxruntime with the tensors as
    extra outputs."""
    probe_model = copy.deepcopy(model)
    probe_model.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    sess = ort.InferenceSession(probe_model.SerializeToString(), providers=["CPUExecutionProvider"])
    values = sess.run(names, {"x": x})
    return [np.stack([v.mean(axis=(0, 2, 3)), v.std(axis=(0, 2, 3))]) for v in values]


def test_repair_gives_hidden_channels_the_members_mean_statistics() -> None:
    """REPAIR: each hidden conv's output channels get the members' mean mean and std on the
    data; the last Gemm (a graph output) is left as it is."""
    x = np.random.default_rng(1).normal(size=(64, 2, 6, 6)).astype(np.float32)
    data = Dataset({"x": x}, None, "test")
    merged, members = _cnn(5), [_cnn(6), _cnn(7)]
    before = _params(merged)
    assert len(repair(merged, members, data)) == 2
    hidden = ["c1", "c2"]
    got = _moments(merged, hidden, x)
    targets = [_moments(m, hidden, x) for m in members]
    for k in range(len(hidden)):
        np.testing.assert_allclose(got[k][0], np.mean([t[k][0] for t in targets], 0), atol=1e-4)
        np.testing.assert_allclose(got[k][1], np.mean([t[k][1] for t in targets], 0), rtol=1e-3)
    assert np.array_equal(_params(merged)["w3"], before["w3"])
    assert not np.allclose(_params(merged)["w2"], before["w2"])


def test_merge_with_data_repairs_and_identical_checkpoints_stay_put() -> None:
    model = _cnn(0)
    x = np.random.default_rng(2).normal(size=(32, 2, 6, 6)).astype(np.float32)
    merged, stats = merge_weights([model, copy.deepcopy(model)], data=Dataset({"x": x}, None, "t"))
    assert len(stats["repaired"]) == 2
    np.testing.assert_allclose(_run(merged, x), _run(model, x), rtol=1e-4, atol=1e-4)


def _split_cnn(seed: int) -> onnx.ModelProto:
    """Conv(8) -> Split [4, 4] -> Relu | Sigmoid -> Concat -> Conv(6) -> GAP -> Gemm(4)."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(_f32(rng, 8, 2, 3, 3), "w1"),
        numpy_helper.from_array(_f32(rng, 8), "b1"),
        numpy_helper.from_array(np.array([4, 4], np.int64), "sizes"),
        numpy_helper.from_array(_f32(rng, 6, 8, 3, 3), "w2"),
        numpy_helper.from_array(_f32(rng, 6), "b2"),
        numpy_helper.from_array(_f32(rng, 4, 6), "w3"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Split", ["c1", "sizes"], ["a", "b"], axis=1),
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("Sigmoid", ["b"], ["sb"]),
        helper.make_node("Concat", ["ra", "sb"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "w3"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "split",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_channels_never_change_sides_of_a_split() -> None:
    """The two halves of a Split are read by different ops: each half is its own set, and a
    copy shuffled within each half is aligned back exactly."""
    model = _split_cnn(0)
    rng = np.random.default_rng(5)
    p1 = np.concatenate([rng.permutation(4), 4 + rng.permutation(4)])
    p = _params(model)
    shuffled = _with(model, {**p, "w1": p["w1"][p1], "b1": p["b1"][p1], "w2": p["w2"][:, p1]})
    x = np.random.default_rng(0).normal(size=(5, 2, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(shuffled, x), _run(model, x), rtol=1e-4, atol=1e-5)
    merged, stats = merge_weights([model, shuffled])
    split_sets = [s for s in stats["sets"] if "w1" in s["members"]]
    assert sorted(s["channels"] for s in split_sets) == [4, 4]
    for name, value in p.items():
        assert np.array_equal(_params(merged)[name], value), name
