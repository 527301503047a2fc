"""The ``refit`` pass: least-squares refit of the layers that read pruned channels.

Models are small MLPs / CNNs whose inputs lie near a 3-dimensional subspace, so the hidden
units are correlated and the remaining ones can stand in for the pruned ones. Errors are
measured by running the models: mean over samples of the squared L2 distance between the
pruned (or refitted) output and the original output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.runner import run_model

VOTE = "vote:criteria=l1,sparsity=0.5,round_to=1"


def _model(nodes, inputs, outputs, inits: dict[str, np.ndarray]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "refit",
        inputs,
        outputs,
        [numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def mlp(
    act: str = "Relu", consumer: str = "gemm", alpha: float = 1.0, beta: float = 1.0
) -> onnx.ModelProto:
    """x[N,8] -> fc1 (16) -> act -> fc2 (4) -> y; fc2 is a Gemm or MatMul + Add."""
    r = np.random.default_rng(1)
    w1, b1 = r.normal(size=(16, 8)), r.normal(size=16) * 0.5
    w2, b2 = r.normal(size=(4, 16)), r.normal(size=4)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node(act, ["h"], ["a"], name="act"),
    ]
    if consumer == "gemm":
        nodes.append(
            helper.make_node(
                "Gemm", ["a", "w2", "b2"], ["y"], name="fc2", transB=1, alpha=alpha, beta=beta
            )
        )
    else:
        w2 = w2.T.copy()
        nodes += [
            helper.make_node("MatMul", ["a", "w2"], ["m"], name="fc2"),
            helper.make_node("Add", ["m", "b2"], ["y"], name="fc2_bias"),
        ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        {"w1": w1, "b1": b1, "w2": w2, "b2": b2},
    )


def cnn(
    kernel: int = 1, pads: int = 0, stride: int = 1, dilation: int = 1, auto_pad: str = ""
) -> onnx.ModelProto:
    """x[N,3,6,6] -> conv1 (8, 3x3, pad 1) -> Relu -> conv2 (4, kernel, pads, stride) -> y."""
    span = dilation * (kernel - 1) + 1
    side = -(-6 // stride) if auto_pad else (6 + 2 * pads - span) // stride + 1
    r = np.random.default_rng(2)
    inits = {
        "w1": r.normal(size=(8, 3, 3, 3)),
        "b1": r.normal(size=8) * 0.3,
        "w2": r.normal(size=(4, 8, kernel, kernel)),
        "b2": r.normal(size=4),
    }
    attrs: dict = {"strides": [stride] * 2, "dilations": [dilation] * 2}
    attrs |= {"auto_pad": auto_pad} if auto_pad else {"pads": [pads] * 4}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv1", pads=[1] * 4),
        helper.make_node("Relu", ["c"], ["a"]),
        helper.make_node("Conv", ["a", "w2", "b2"], ["y"], name="conv2", **attrs),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, side, side])],
        inits,
    )


def _low_rank(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> np.ndarray:
    basis = np.random.default_rng(100).normal(size=(3, int(np.prod(shape))))
    x = rng.normal(size=(n, 3)) @ basis + 0.05 * rng.normal(size=(n, basis.shape[1]))
    return x.reshape((n, *shape)).astype(np.float32)


@pytest.fixture(scope="module")
def dense_data(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    calib, test = _low_rank(rng, 1024, (8,)), _low_rank(rng, 512, (8,))
    path = tmp_path_factory.mktemp("refit") / "dense.npz"
    np.savez(path, x=calib)
    return path, calib, test


@pytest.fixture(scope="module")
def image_data(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    calib, test = _low_rank(rng, 256, (3, 6, 6)), _low_rank(rng, 128, (3, 6, 6))
    path = tmp_path_factory.mktemp("refit") / "image.npz"
    np.savez(path, x=calib)
    return path, calib, test


def _error(a: onnx.ModelProto, b: onnx.ModelProto, x: np.ndarray) -> float:
    ya, yb = run_model(a, {"x": x})["y"], run_model(b, {"x": x})["y"]
    d = np.moveaxis(ya - yb, 1, -1).reshape(-1, ya.shape[1]).astype(np.float64)
    return float((d * d).sum(axis=1).mean())


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [{}, {"act": "Sigmoid"}, {"consumer": "matmul"}],
    ids=["relu-gemm", "sigmoid-gemm", "relu-matmul"],
)
def test_refit_reduces_the_error_on_held_out_data(dense_data, kw) -> None:
    path, _, test = dense_data
    model = mlp(**kw)
    pruned, _ = onnxprune.run(model, [VOTE], data=path)
    refitted, report = onnxprune.run(model, [VOTE, "refit"], data=path)
    section = report["passes"][1]
    assert section["refitted"] == 1 and section["modified"] and section["skipped"] == {}
    (layer,) = section["layers"]
    assert layer["node"] == "fc2" and layer["inputs"] == 16 and layer["inputs_kept"] == 8
    assert layer["mse_after"] < 0.8 * layer["mse_before"]
    before, after = _error(pruned, model, test), _error(refitted, model, test)
    assert after < 0.8 * before
    # pruned inputs get zero weights; the others changed
    w2 = _inits(refitted)["w2"]
    rows = w2.T if kw.get("consumer") != "matmul" else w2
    zero = ~_inits(refitted)["w1"].any(axis=1)
    assert zero.sum() == 8
    assert not rows[zero].any() and rows[~zero].all()


@pytest.mark.parametrize(
    "kw",
    [
        {"spec": VOTE},
        {"spec": VOTE + ",compensate=off"},
        {"spec": VOTE, "consumer": "matmul"},
        {"spec": VOTE + ",compensate=off", "consumer": "matmul"},
        {"spec": VOTE, "alpha": 0.5, "beta": 2.0},
    ],
    ids=["compensated", "uncompensated", "matmul", "matmul-uncompensated", "gemm-alpha"],
)
def test_reported_errors_are_the_real_ones(dense_data, kw) -> None:
    """mse_before / mse_after are what the pruned / refitted model really do on the
    calibration data (all of it is streamed: 16 batches of 64)."""
    path, calib, _ = dense_data
    kw = dict(kw)
    spec = kw.pop("spec")
    model = mlp(**kw)
    pruned, _ = onnxprune.run(model, [spec], data=path)
    refitted, report = onnxprune.run(model, [spec, "refit"], data=path)
    (layer,) = report["passes"][1]["layers"]
    before, after = _error(pruned, model, calib), _error(refitted, model, calib)
    assert layer["mse_before"] == pytest.approx(before, rel=1e-3)
    assert layer["mse_after"] == pytest.approx(after, rel=1e-3)
    assert after < before


@pytest.mark.parametrize(("kernel", "pads", "stride"), [(1, 0, 1), (1, 0, 2), (3, 1, 1), (3, 0, 1)])
def test_reported_errors_are_the_real_ones_for_conv(image_data, kernel, pads, stride) -> None:
    """Same for a conv consumer (vote compensates with the channel means over all positions,
    which a strided or k x k conv does not read evenly: an offset is left for refit)."""
    path, calib, _ = image_data
    model = cnn(kernel=kernel, pads=pads, stride=stride)
    pruned, _ = onnxprune.run(model, [VOTE], data=path)
    refitted, report = onnxprune.run(model, [VOTE, "refit"], data=path)
    (layer,) = report["passes"][1]["layers"]
    assert layer["mse_before"] == pytest.approx(_error(pruned, model, calib), rel=1e-3)
    assert layer["mse_after"] == pytest.approx(_error(refitted, model, calib), rel=1e-3)


@pytest.mark.parametrize(
    "kw",
    [
        {"spec": VOTE},
        {"spec": VOTE + ",compensate=off"},
        {"spec": VOTE, "alpha": 0.5, "beta": 2.0},
    ],
    ids=["compensated", "uncompensated", "gemm-alpha"],
)
def test_refit_leaves_no_mean_offset_on_the_calibration_data(dense_data, kw) -> None:
    """A least-squares fit with a free bias has residuals of mean zero on the data it was fitted
    on, whatever offset the pruned model had before."""
    path, calib, _ = dense_data
    kw = dict(kw)
    spec = kw.pop("spec")
    model = mlp(**kw)
    refitted, _ = onnxprune.run(model, [spec, "refit"], data=path)
    want = run_model(model, {"x": calib})["y"].astype(np.float64)
    offset = (run_model(refitted, {"x": calib})["y"] - want).mean(axis=0)
    assert np.abs(offset).max() < 1e-3 * np.abs(want).mean(), offset


def test_refit_of_an_unpruned_model_is_a_no_op(dense_data) -> None:
    path, _, _ = dense_data
    model = mlp()
    new, report = onnxprune.run(model, ["refit"], data=path)
    section = report["passes"][0]
    assert section["refitted"] == 0 and not section["modified"]
    assert "layers" not in section
    for name, w in _inits(model).items():
        np.testing.assert_array_equal(_inits(new)[name], w)
    assert len(new.graph.node) == len(model.graph.node)


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        (
            {"kernel": 3, "pads": 1, "dilation": 2},
            "grouped or dilated convolutions are not refitted",
        ),
        ({"kernel": 3, "auto_pad": "SAME_UPPER"}, "auto_pad convolutions are not refitted"),
    ],
    ids=["dilated", "auto_pad"],
)
def test_unsupported_conv_consumer_is_skipped_with_a_reason(image_data, kw, reason) -> None:
    path, _, _ = image_data
    model = cnn(**kw)
    pruned, _ = onnxprune.run(model, [VOTE], data=path)
    new, report = onnxprune.run(model, [VOTE, "refit"], data=path)
    section = report["passes"][1]
    assert section["refitted"] == 0 and not section["modified"]
    assert section["skipped"] == {"conv2": reason}
    for name, w in _inits(pruned).items():
        np.testing.assert_array_equal(_inits(new)[name], w)


@pytest.mark.parametrize(
    ("kernel", "pads", "stride"), [(1, 0, 1), (1, 0, 2), (3, 1, 1), (3, 0, 1), (3, 1, 2), (1, 1, 1)]
)
def test_conv_consumer_is_refitted(image_data, kernel: int, pads: int, stride: int) -> None:
    """Pointwise or k x k, padded or not, strided or not: the conv's input is taken as patches;
    fold afterwards is exact."""
    path, _, test = image_data
    model = cnn(kernel=kernel, pads=pads, stride=stride)
    pruned, _ = onnxprune.run(model, [VOTE], data=path)
    refitted, report = onnxprune.run(model, [VOTE, "refit"], data=path)
    assert report["passes"][1]["skipped"] == {}
    (layer,) = report["passes"][1]["layers"]
    assert layer["node"] == "conv2" and layer["inputs_kept"] == 4 and layer["inputs"] == 8
    assert layer["mse_after"] < layer["mse_before"]
    assert _error(refitted, model, test) < _error(pruned, model, test)
    folded, report = onnxprune.run(refitted, ["fold"])
    assert report["passes"][0]["channels_removed"] == 4
    np.testing.assert_allclose(
        run_model(folded, {"x": test})["y"],
        run_model(refitted, {"x": test})["y"],
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("case", ["relu-gemm", "sigmoid-gemm", "relu-matmul", "conv-stride2"])
def test_refit_then_fold_is_exact(dense_data, image_data, case: str) -> None:
    """Pruned channels (zero, or the constant 0.5 after a Sigmoid) get zero weights in the
    refitted layer: fold removes them and adds nothing to the bias."""
    if case == "conv-stride2":
        (path, _, test), model = image_data, cnn(kernel=1, stride=2)
    else:
        act, consumer = case.split("-")
        (path, _, test), model = (
            dense_data,
            mlp({"relu": "Relu", "sigmoid": "Sigmoid"}[act], consumer),
        )
    kept = 4 if case == "conv-stride2" else 8
    refitted, _ = onnxprune.run(model, [VOTE, "refit"], data=path)
    folded, report = onnxprune.run(refitted, ["fold"])
    assert report["passes"][0]["channels_removed"] == kept
    want, got = run_model(refitted, {"x": test})["y"], run_model(folded, {"x": test})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert _inits(folded)["w1"].shape[0] == kept
