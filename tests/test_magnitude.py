"""The ``magnitude`` pass: unstructured and N:M sparsity by |w| or Wanda, values only.

Every weight is viewed as [outputs, inputs, kernel positions] by hand for its op (Conv:
[O, I, kh, kw]; Gemm transB=1: [N, K]; Gemm transB=0 and MatMul: [K, N]) and the zeros are
counted per output row, or per block of 4 consecutive inputs for 2:4.
"""

from __future__ import annotations

import copy
import glob
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import build_model as _model
from known_gaps import params
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.errors import PassOptionError
from onnxprune.runner import run_model

MODELS = Path(__file__).resolve().parents[1] / "models"


def _rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    # distinct magnitudes, no exact zeros: the expected choice is unique
    w = rng.uniform(0.1, 1.0, size=shape) * rng.choice([-1.0, 1.0], size=shape)
    return w.astype(np.float32)


def dense_model() -> onnx.ModelProto:
    """x[N,8] -> gA (transB=1, 12x8) -> Relu -> gB (transB=0, 12x8) -> Relu -> mC (8x4) -> y."""
    rng = np.random.default_rng(0)
    inits = {"wA": _rand(rng, 12, 8), "wB": _rand(rng, 12, 8), "wC": _rand(rng, 8, 4)}
    nodes = [
        helper.make_node("Gemm", ["x", "wA"], ["a"], name="gA", transB=1),
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("Gemm", ["ra", "wB"], ["b"], name="gB"),
        helper.make_node("Relu", ["b"], ["rb"]),
        helper.make_node("MatMul", ["rb", "wC"], ["y"], name="mC"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        inits,
    )


def conv_model() -> onnx.ModelProto:
    """x[N,8,5,5] -> cD (6x8x3x3) -> Relu -> cE (4x6x1x1: 6 inputs) -> y."""
    rng = np.random.default_rng(1)
    inits = {"wD": _rand(rng, 6, 8, 3, 3), "bD": _rand(rng, 6), "wE": _rand(rng, 4, 6, 1, 1)}
    nodes = [
        helper.make_node("Conv", ["x", "wD", "bD"], ["d"], name="cD"),
        helper.make_node("Relu", ["d"], ["rd"]),
        helper.make_node("Conv", ["rd", "wE"], ["y"], name="cE"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 3, 3])],
        inits,
    )


# weight -> (output axis, input axis), decided by hand from each node above
LAYOUT = {"wA": (0, 1), "wB": (1, 0), "wC": (1, 0), "wD": (0, 1), "wE": (0, 1)}


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _view(w: np.ndarray, name: str) -> np.ndarray:
    out_axis, in_axis = LAYOUT[name]
    v = np.moveaxis(w, (out_axis, in_axis), (0, 1))
    return v.reshape(v.shape[0], v.shape[1], -1)  # [out, in, kernel]


def magnitude(model: onnx.ModelProto, spec: str, **kw):
    new, report = onnxprune.run(model, [spec], **kw)
    return new, report["passes"][0]


# ---------------------------------------------------------------------------------------------
# unstructured


@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.75])
def test_unstructured_sparsity_per_output_row(sparsity: float) -> None:
    for model, names in ((dense_model(), ["wA", "wB", "wC"]), (conv_model(), ["wD", "wE"])):
        before = _inits(model)
        new, section = magnitude(model, f"magnitude:sparsity={sparsity}")
        after = _inits(new)
        assert section["weights"] == len(names) and section["skipped"] == {}
        for name in names:
            b, a = _view(before[name], name), _view(after[name], name)
            rows_b, rows_a = b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1)
            k = int(sparsity * rows_b.shape[1])
            assert ((rows_a == 0).sum(axis=1) == k).all(), name
            for rb, ra in zip(rows_b, rows_a, strict=True):
                gone = ra == 0
                np.testing.assert_array_equal(ra[~gone], rb[~gone])  # the rest is untouched
                assert np.abs(rb[gone]).max() < np.abs(rb[~gone]).min(), name
        assert before["bD" if "wD" in names else "wA"].all()


def test_sparsity_zero_changes_nothing() -> None:
    model = dense_model()
    new, section = magnitude(model, "magnitude:sparsity=0")
    for name, w in _inits(model).items():
        np.testing.assert_array_equal(_inits(new)[name], w)
    assert section["sparsity"] == 0.0


# ---------------------------------------------------------------------------------------------
# N:M


@pytest.mark.parametrize(("pattern", "n", "m"), [("2:4", 2, 4), ("1:4", 1, 4), ("3:4", 3, 4)])
def test_n_m_pattern_along_the_input_axis(pattern: str, n: int, m: int) -> None:
    for model, names in ((dense_model(), ["wA", "wB", "wC"]), (conv_model(), ["wD"])):
        before = _inits(model)
        new, section = magnitude(model, f"magnitude:pattern={pattern}")
        after = _inits(new)
        for name in names:
            b, a = _view(before[name], name), _view(after[name], name)
            out, cin, kernel = b.shape
            assert cin % m == 0
            blocks_b = np.moveaxis(b, 1, 2).reshape(out, kernel, cin // m, m)
            blocks_a = np.moveaxis(a, 1, 2).reshape(out, kernel, cin // m, m)
            assert ((blocks_a == 0).sum(axis=-1) == m - n).all(), name
            gone = blocks_a == 0
            kept_min = np.where(gone, np.inf, np.abs(blocks_b)).min(axis=-1)
            gone_max = np.where(gone, np.abs(blocks_b), -np.inf).max(axis=-1)
            assert (gone_max < kept_min).all(), f"{name}: the smallest of each block go"
        if "wD" in names:
            assert set(section["skipped"]) == {"wE"}
            assert "6 inputs" in section["skipped"]["wE"]
            np.testing.assert_array_equal(after["wE"], before["wE"])
            assert [ly["weight"] for ly in section["layers"]] == ["wD"]
        else:
            assert section["skipped"] == {}


def test_two_four_on_a_batched_matmul_weight() -> None:
    rng = np.random.default_rng(5)
    w = _rand(rng, 3, 8, 5)  # [batch, K, N]: blocks of 4 along K
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="bmm")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2, 5])],
        {"w": w},
    )
    new, _ = magnitude(model, "magnitude:pattern=2:4")
    got = _inits(new)["w"]
    assert ((got.reshape(3, 2, 4, 5) == 0).sum(axis=2) == 2).all()


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        ("magnitude:pattern=4:4", "N:M"),
        ("magnitude:pattern=2-4", "N:M"),
        ("magnitude:pattern=0:4", "N:M"),
        ("magnitude:sparsity=1", "sparsity"),
        ("magnitude:method=l2", "method"),
    ],
)
def test_option_errors(spec: str, text: str) -> None:
    with pytest.raises(PassOptionError) as err:
        onnxprune.run(dense_model(), [spec])
    assert str(err.value).startswith("pass magnitude: ") and text in str(err.value)


def test_skip_leaves_matching_weights_dense() -> None:
    model = dense_model()
    new, section = magnitude(model, "magnitude:skip=^gB$|wC")
    assert [ly["weight"] for ly in section["layers"]] == ["wA"]
    for name in ("wB", "wC"):
        np.testing.assert_array_equal(_inits(new)[name], _inits(model)[name])


# ---------------------------------------------------------------------------------------------
# sharing, sizes, structure


def test_shared_weight_is_sparsified_once_and_stays_shared() -> None:
    """W is read by a transB=1 Gemm (rows = outputs) and a transB=0 Gemm (columns = outputs):
    sparsifying it for each reader would zero 75%; once, exactly half, by the first reader."""
    rng = np.random.default_rng(3)
    w = _rand(rng, 8, 8)
    model = _model(
        [
            helper.make_node("Gemm", ["x", "W"], ["a"], name="first", transB=1),
            helper.make_node("Relu", ["a"], ["r"]),
            helper.make_node("Gemm", ["r", "W"], ["y"], name="second"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        {"W": w},
    )
    new, section = magnitude(model, "magnitude:sparsity=0.5")
    assert [t.name for t in new.graph.initializer] == ["W"]
    assert [n.input[1] for n in new.graph.node if n.op_type == "Gemm"] == ["W", "W"]
    got = _inits(new)["W"]
    assert ((got == 0).sum(axis=1) == 4).all()  # per row: the first reader's outputs
    assert (got == 0).sum() == 32
    assert section["weights"] == 1 and section["sparsity"] == 0.5
    new, _ = magnitude(model, "magnitude:pattern=2:4")
    got = _inits(new)["W"]
    assert ((got.reshape(8, 2, 4) == 0).sum(axis=-1) == 2).all() and (got == 0).sum() == 32


def _structure(model: onnx.ModelProto) -> tuple:
    return (
        [(n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node],
        [(t.name, tuple(t.dims), t.data_type) for t in model.graph.initializer],
        sum(t.ByteSize() for t in model.graph.initializer),
    )


FIXTURES = sorted(glob.glob(str(MODELS / "*" / "*.onnx")))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("path", params("magnitude", FIXTURES))
def test_only_values_change_on_fixtures(path: str) -> None:
    """Same nodes, same initializers (names, shapes, types, stored bytes), same file size apart
    from the provenance metadata; the sparsified model still runs on its sample."""
    model = onnxprune.load(path)
    new, section = magnitude(model, "magnitude:pattern=2:4")
    assert section["weights"] > 0
    assert _structure(new) == _structure(model)
    bare, orig = copy.deepcopy(new), copy.deepcopy(model)
    del bare.metadata_props[:], orig.metadata_props[:]
    assert bare.ByteSize() == orig.ByteSize()
    sample = Path(path).with_suffix("").with_suffix(".sample.npz")
    with np.load(sample) as npz:
        feeds = {k[3:]: npz[k] for k in npz.files if k.startswith("in/")}
    assert all(np.isfinite(v).all() for v in run_model(new, feeds).values())


def test_report_says_there_is_no_speedup() -> None:
    _, section = magnitude(dense_model(), "magnitude")
    assert "no faster" in section["note"]
    total = 12 * 8 + 12 * 8 + 8 * 4
    assert section["sparsity"] == round((48 + 48 + 16) / total, 4)
    assert [ly["sparsity"] for ly in section["layers"]] == [0.5, 0.5, 0.5]


# ---------------------------------------------------------------------------------------------
# Wanda


def test_wanda_weighs_weights_by_input_norms(tmp_path: Path) -> None:
    """Input 0 is 10x larger than the others, input 3 10x smaller: by |w| alone output 0 loses
    inputs 0 and 1, by |w| x ||x_j|| it loses 1 and 3."""
    w = np.array([[1.0, 4.0], [2.0, 3.0], [3.0, 2.0], [4.0, 1.0]], np.float32)  # [K=4, N=2]
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        {"w": w},
    )
    rng = np.random.default_rng(8)
    x = (rng.normal(size=(256, 4)) * np.array([10.0, 1.0, 1.0, 0.1])).astype(np.float32)
    data = tmp_path / "x.npz"
    np.savez(data, x=x)
    norms = np.sqrt((x.astype(np.float64) ** 2).sum(axis=0))
    for spec in ("magnitude:sparsity=0.5", "magnitude:pattern=2:4"):
        by_w, _ = magnitude(model, spec, data=data)
        by_wanda, _ = magnitude(model, spec + ",method=wanda", data=data)
        zero_w = _inits(by_w)["w"] == 0
        zero_wanda = _inits(by_wanda)["w"] == 0
        for col in range(2):
            assert set(np.flatnonzero(zero_w[:, col])) == set(np.argsort(np.abs(w[:, col]))[:2])
            want = set(np.argsort(np.abs(w[:, col]) * norms)[:2].tolist())
            assert set(np.flatnonzero(zero_wanda[:, col]).tolist()) == want
        assert set(np.flatnonzero(zero_w[:, 0])) == {0, 1}
        assert set(np.flatnonzero(zero_wanda[:, 0])) == {1, 3}
        assert set(np.flatnonzero(zero_wanda[:, 1])) == {2, 3}


def test_wanda_on_a_conv_uses_per_channel_input_norms(tmp_path: Path) -> None:
    model = conv_model()
    rng = np.random.default_rng(9)
    scale = np.array([5, 1, 1, 0.2, 1, 3, 1, 0.5])[None, :, None, None]
    x = (rng.normal(size=(16, 8, 5, 5)) * scale).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    new, section = magnitude(model, "magnitude:sparsity=0.5,method=wanda", data=tmp_path / "x.npz")
    norms = np.sqrt((x.astype(np.float64) ** 2).sum(axis=(0, 2, 3)))
    wd = _inits(model)["wD"].astype(np.float64)
    score = (np.abs(wd) * norms[None, :, None, None]).reshape(6, -1)
    expected = np.zeros_like(score, bool)
    np.put_along_axis(expected, np.argsort(score, axis=1)[:, :36], True, axis=1)
    np.testing.assert_array_equal(_inits(new)["wD"].reshape(6, -1) == 0, expected)
