"""The ``stats`` pass: threshold a per-channel statistic, zero, compensate biases, then fold.

Bias compensation is checked where it must be exact: a channel that is constant over the
calibration data (provably, or only on the data) is pruned and its value moved into the next
layer's bias, so outputs after ``stats`` (and after ``stats`` + ``fold``) equal the original's.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import build_model as _model
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.errors import PassOptionError
from onnxprune.runner import run_model

MODELS = Path(__file__).resolve().parents[1] / "models"
DIGITS = MODELS / "digits"


def constant_channel_model(act: str, consumer: str, kind: str, seed: int = 0) -> onnx.ModelProto:
    """x[N,2,5,5] -> conv1 (4, 3x3, no padding) -> act -> consumer -> y.

    Channel 2 of conv1 is constant: ``kind="bias"``: its filter is zero and its bias 0.7 (any
    input); ``kind="data"``: it reads only input channel 1, which the data holds at 0.3.
    ``consumer``: a 1x1 Conv, or GlobalAveragePool -> Flatten -> Gemm / MatMul (no bias).
    """
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(4, 2, 3, 3)).astype(np.float32)
    b1 = rng.normal(size=4).astype(np.float32)
    if kind == "bias":
        w1[2], b1[2] = 0, 0.7
    else:
        w1[2, 0] = 0
        w1[2, 1] = np.abs(w1[2, 1])  # positive: the constant survives a Relu
        b1[2] = 0.25
    inits = {"w1": w1, "b1": b1}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv1"),
        helper.make_node(act, ["c"], ["r"], name="act"),
    ]
    if consumer == "conv":
        inits |= {"w2": rng.normal(size=(3, 4, 1, 1)), "b2": rng.normal(size=3)}
        nodes.append(helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="conv2"))
        y = ["N", 3, 3, 3]
    else:
        nodes += [
            helper.make_node("GlobalAveragePool", ["r"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
        ]
        if consumer == "gemm":
            inits |= {"w2": rng.normal(size=(3, 4)), "b2": rng.normal(size=3)}
            nodes.append(helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], name="fc", transB=1))
        else:
            inits |= {"w2": rng.normal(size=(4, 3))}
            nodes.append(helper.make_node("MatMul", ["f", "w2"], ["y"], name="mm"))
        y = ["N", 3]
    inits = {k: np.asarray(v, np.float32) for k, v in inits.items()}
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y)],
        inits,
    )


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> tuple[Path, np.ndarray]:
    x = np.random.default_rng(11).normal(size=(64, 2, 5, 5)).astype(np.float32)
    x[:, 1] = 0.3
    path = tmp_path_factory.mktemp("stats") / "calib.npz"
    np.savez(path, x=x)
    return path, x


def _w1(model: onnx.ModelProto) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w1"))


def _close(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# bias compensation


@pytest.mark.parametrize("consumer", ["conv", "gemm", "matmul"])
@pytest.mark.parametrize("kind", ["bias", "data"])
@pytest.mark.parametrize("act", ["Relu", "Sigmoid"])
def test_constant_channel_is_compensated_exactly(calib, act: str, consumer: str, kind: str) -> None:
    """Sigmoid: after zeroing, the channel is the constant 0.5 at the consumer; the bias gets
    (mean - 0.5) * W and fold moves the 0.5 * W, so the consumer still sees the mean once."""
    path, x = calib
    model = constant_channel_model(act, consumer, kind)
    pruned, report = onnxprune.run(model, ["stats:metric=act_std,below=1e-6"], data=path)
    section = report["passes"][0]
    assert section["channels_pruned"] == 1 and section["compensated"]
    assert section["compensated_consumers"] == 1
    zero = ~_w1(pruned).reshape(4, -1).any(axis=1)
    assert zero.tolist() == [False, False, True, False]
    folded, report = onnxprune.run(pruned, ["fold"])
    assert report["passes"][0]["channels_removed"] == 1
    assert _w1(folded).shape[0] == 3
    want = run_model(model, {"x": x})["y"]
    _close(run_model(pruned, {"x": x})["y"], want)
    _close(run_model(folded, {"x": x})["y"], want)
    # without compensation the channel's contribution is simply lost
    lost, _ = onnxprune.run(model, ["stats:metric=act_std,below=1e-6,compensate=off"], data=path)
    assert np.abs(run_model(lost, {"x": x})["y"] - want).max() > 1e-2


def test_compensation_auto_needs_data(calib) -> None:
    """Without --data nothing is measured on real inputs: no compensation by default."""
    model = constant_channel_model("Relu", "conv", "bias")
    _, report = onnxprune.run(model, ["stats:metric=std,below=1e-6"])
    section = report["passes"][0]
    assert section["channels_pruned"] == 1
    assert not section["compensated"] and section["compensated_consumers"] == 0


# ---------------------------------------------------------------------------------------------
# dead neurons on the digits models


def _accuracy(model: onnx.ModelProto, test: Path) -> tuple[float, np.ndarray]:
    with np.load(test) as npz:
        labels = npz["labels"]
        feeds = {k: npz[k] for k in npz.files if k != "labels"}
    out = next(iter(run_model(model, feeds).values()))
    return float((out.argmax(axis=1) == labels).mean()), out


@pytest.mark.parametrize("name", ["torch_cnn", "keras_cnn"])
def test_apoz_removes_dead_neurons_without_accuracy_change(name: str) -> None:
    model = onnxprune.load(DIGITS / f"{name}.onnx")
    new, report = onnxprune.run(
        model, ["stats:metric=apoz,above=0.999", "fold"], data=DIGITS / f"{name}.calib.npz"
    )
    stats, fold = report["passes"]
    assert stats["channels_pruned"] >= 10, "the digits models have dead neurons"
    assert stats["metric"] == "apoz"
    assert all(g["max"] <= 1.0 for g in stats["groups"])
    assert fold["channels_removed"] == stats["channels_pruned"]
    assert fold["parameters_after"] < fold["parameters_before"]
    test = DIGITS / f"{name}.test.npz"
    before, out_before = _accuracy(model, test)
    after, out_after = _accuracy(new, test)
    assert after == before
    assert (out_after.argmax(1) == out_before.argmax(1)).mean() >= 0.99


def test_apoz_threshold_on_a_flattened_channel(tmp_path: Path) -> None:
    """conv -> Relu -> Flatten (4 features per channel) -> Gemm: a channel whose activation is
    zero about half the time must not cross ``apoz > 0.9``."""
    rng = np.random.default_rng(2)
    inits = {
        "w1": rng.normal(size=(4, 2, 3, 3)).astype(np.float32),
        "b1": np.zeros(4, np.float32),
        "wg": rng.normal(size=(3, 16)).astype(np.float32),
    }
    model = _model(
        [
            helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv1"),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Flatten", ["r"], ["f"]),
            helper.make_node("Gemm", ["f", "wg"], ["y"], name="fc", transB=1),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    x = rng.normal(size=(64, 2, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    exposed = copy.deepcopy(model)
    exposed.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    r = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["r"], {"x": x}
    )[0]
    share = (r == 0).mean(axis=(0, 2, 3))
    assert share.max() < 0.9
    _, report = onnxprune.run(model, ["stats:metric=apoz,above=0.9"], data=tmp_path / "x.npz")
    section = report["passes"][0]
    assert section["channels_pruned"] == 0
    assert section["groups"][0]["max"] <= 1.0


# ---------------------------------------------------------------------------------------------
# options, limits, reports


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        ("stats", "give below=... or above=..."),
        ("stats:metric=act_std", "give below=... or above=..."),
        ("stats:metric=nope,below=1", "unknown criterion 'nope'"),
        ("stats:below=abc", "below='abc'"),
        ("stats:above=1,wrong=2", "unknown option 'wrong'"),
        ("stats:below=1,compensate=maybe", "compensate"),
    ],
)
def test_option_errors(spec: str, text: str) -> None:
    with pytest.raises(PassOptionError) as err:
        onnxprune.run(constant_channel_model("Relu", "conv", "bias"), [spec])
    msg = str(err.value)
    assert msg.startswith("pass stats: ") and text in msg and "\n" not in msg


def test_never_empties_a_group() -> None:
    """Every channel crosses the threshold: each group keeps one."""
    model = onnxprune.load(DIGITS / "torch_cnn.onnx")
    new, report = onnxprune.run(model, ["stats:metric=l1,above=-1", "fold"])
    stats, fold = report["passes"]
    free = [g for g in fold["groups"] if g["prunable"]]
    assert len(free) == 4
    assert all(g["channels_after"] == 1 for g in free)
    assert stats["channels_pruned"] == sum(g["channels"] - 1 for g in free)
    assert fold["channels_removed"] == stats["channels_pruned"]
    with np.load(DIGITS / "torch_cnn.test.npz") as npz:
        out = run_model(new, {"input": npz["input"][:8]})
    assert np.isfinite(next(iter(out.values()))).all()


def test_per_group_report_counts_what_was_zeroed() -> None:
    """The group sections add up to ``channels_pruned``, also when the last channel of a
    group was spared."""
    model = onnxprune.load(DIGITS / "torch_cnn.onnx")
    for spec in ["stats:metric=l1,above=-1", "stats:metric=l1,below=0.2"]:
        _, report = onnxprune.run(model, [spec])
        stats = report["passes"][0]
        assert all(g["pruned"] < g["channels"] for g in stats["groups"]), stats["groups"]
        assert sum(g["pruned"] for g in stats["groups"]) == stats["channels_pruned"]


def test_below_and_above_select_both_tails() -> None:
    model, inits = _two_layer_mlp()
    l1 = np.abs(inits["w1"].astype(np.float64)).mean(1)
    ranked = np.sort(l1)
    lo, hi = (ranked[1] + ranked[2]) / 2, (ranked[-3] + ranked[-2]) / 2  # 2 below, 2 above
    new, report = onnxprune.run(model, [f"stats:metric=l1,below={lo},above={hi}"])
    zero = set(np.flatnonzero(~_w1(new).any(axis=1)).tolist())
    assert zero == set(np.flatnonzero((l1 < lo) | (l1 > hi)).tolist())
    assert len(zero) == 4 and report["passes"][0]["channels_pruned"] == 4


def test_metric_that_abstains_prunes_nothing() -> None:
    model, _ = _two_layer_mlp()
    new, report = onnxprune.run(model, ["stats:metric=bn,below=10"])
    section = report["passes"][0]
    assert section["channels_pruned"] == 0 and not section["modified"]
    assert section["groups"] == []


def test_protect_keeps_the_group(calib) -> None:
    path, _ = calib
    model = constant_channel_model("Relu", "conv", "bias")
    _, report = onnxprune.run(model, ["stats:metric=act_std,below=1e-6,protect=conv1"], data=path)
    assert report["passes"][0]["channels_pruned"] == 0


def _two_layer_mlp() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(4)
    inits = {
        "w1": rng.normal(size=(10, 5)).astype(np.float32),
        "b1": rng.normal(size=10).astype(np.float32),
        "w2": rng.normal(size=(3, 10)).astype(np.float32),
    }
    model = _model(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
            helper.make_node("Relu", ["h"], ["a"]),
            helper.make_node("Gemm", ["a", "w2"], ["y"], name="fc2", transB=1),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    return model, inits
