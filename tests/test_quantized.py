"""Quantized graphs (issue 10): pruning through QuantizeLinear / DequantizeLinear.

Fixtures are small float models (a CNN and an MLP built with onnx.helper) quantized by
onnxruntime's ``quantize_static`` in QDQ format, per channel and per tensor, calibrated on
random data. QOperator models (QLinearConv, ...) are pinned with the op named.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import build_model
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)

import onnxprune
from onnxprune.analysis.dequant import dequantize, find_dequantized
from onnxprune.analysis.handlers.quantized import QOPERATOR_REASON
from onnxprune.analysis.inspect import channel_groups
from onnxprune.analysis.labels import State
from onnxprune.analysis.probe import probe
from onnxprune.analysis.walk import analyse
from onnxprune.graph import get_init
from onnxprune.pruning.criteria import GroupView, get_criterion
from onnxprune.runner import run_model

F = TensorProto.FLOAT
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


def float_cnn() -> onnx.ModelProto:
    """x[1,3,8,8] -> conv1 (8, 3x3) -> Relu -> conv2 (8, 3x3) -> Relu -> GAP -> MatMul (4) + b."""
    rng = np.random.default_rng(0)
    inits = {
        "w1": rng.normal(size=(8, 3, 3, 3)).astype(np.float32),
        "b1": rng.normal(size=8).astype(np.float32),
        "w2": rng.normal(size=(8, 8, 3, 3)).astype(np.float32) * 0.3,
        "b2": rng.normal(size=8).astype(np.float32),
        "wf": rng.normal(size=(8, 4)).astype(np.float32),
        "bf": rng.normal(size=4).astype(np.float32),
    }
    pads = [1, 1, 1, 1]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv1", pads=pads),
        helper.make_node("Relu", ["a"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["b"], name="conv2", pads=pads),
        helper.make_node("Relu", ["b"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("MatMul", ["f", "wf"], ["m"], name="fc"),
        helper.make_node("Add", ["m", "bf"], ["y"]),
    ]
    x = [helper.make_tensor_value_info("x", F, [1, 3, 8, 8])]
    return build_model(nodes, x, [helper.make_tensor_value_info("y", F, [1, 4])], inits, 13)


def float_mlp() -> onnx.ModelProto:
    """x[2,6] -> Gemm (16) -> Relu -> Gemm (12) -> Relu -> Gemm (3)."""
    rng = np.random.default_rng(1)
    inits = {
        "w1": rng.normal(size=(16, 6)).astype(np.float32),
        "b1": rng.normal(size=16).astype(np.float32),
        "w2": rng.normal(size=(12, 16)).astype(np.float32) * 0.3,
        "b2": rng.normal(size=12).astype(np.float32),
        "w3": rng.normal(size=(3, 12)).astype(np.float32),
        "b3": rng.normal(size=3).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1", transB=1),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], name="fc2", transB=1),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("Gemm", ["r2", "w3", "b3"], ["y"], name="fc3", transB=1),
    ]
    x = [helper.make_tensor_value_info("x", F, [2, 6])]
    return build_model(nodes, x, [helper.make_tensor_value_info("y", F, [2, 3])], inits, 13)


class RandomReader(CalibrationDataReader):
    """Four random batches for the input ``x`` of ``shape``."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        rng = np.random.default_rng(7)
        self.batches = iter([{"x": rng.normal(size=shape).astype(np.float32)} for _ in range(4)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def quantized(
    model: onnx.ModelProto,
    folder: Path,
    per_channel: bool,
    fmt: QuantFormat = QuantFormat.QDQ,
    weight_type: QuantType = QuantType.QInt8,
) -> onnx.ModelProto:
    """``model`` quantized by onnxruntime (uint8 activations), calibrated on random data."""
    src, dst = folder / "float.onnx", folder / f"q{int(per_channel)}{fmt}{weight_type}.onnx"
    onnx.save(model, src)
    shape = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim)
    quantize_static(
        str(src),
        str(dst),
        RandomReader(shape),
        quant_format=fmt,
        per_channel=per_channel,
        activation_type=QuantType.QUInt8,
        weight_type=weight_type,
    )
    return onnx.load(dst)


@pytest.fixture(scope="module")
def qdq_cnns(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, onnx.ModelProto]:
    """The CNN in QDQ format, per_channel False and True."""
    folder = tmp_path_factory.mktemp("qdq_cnn")
    return {pc: quantized(float_cnn(), folder, pc) for pc in (False, True)}


def _x(seed: int = 3, shape: tuple[int, ...] = (1, 3, 8, 8)) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(size=shape).astype(np.float32)}


def _assert_still_quantized(model: onnx.ModelProto) -> None:
    ops = {n.op_type for n in model.graph.node}
    assert ops >= QDQ_OPS and not ops & {"QLinearConv", "QLinearMatMul"}
    dtypes = {t.name: t.data_type for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in dtypes and n.input[0][0] == "w":
            assert dtypes[n.input[0]] in (TensorProto.INT8, TensorProto.UINT8)


@pytest.mark.parametrize("per_channel", [False, True])
def test_analysis_lists_the_qdq_conv_groups_as_prunable(qdq_cnns, per_channel) -> None:
    groups = channel_groups(qdq_cnns[per_channel])
    by_layer = {s.node: g for g in groups for s in g.spaces}
    for conv in ("conv1", "conv2"):
        g = by_layer[conv]
        assert g.prunable and g.pinned == 0 and g.channels == 8, g.to_dict()
    first = by_layer["conv1"].members
    assert "w1_quantized[axis 0]" in first and "w2_quantized[axis 1]" in first
    assert ("w1_scale[axis 0]" in first) is per_channel  # a per-tensor scale stays
    assert ("w1_zero_point[axis 0]" in first) is per_channel


@pytest.mark.parametrize("per_channel", [False, True])
def test_vote_and_fold_prune_the_qdq_cnn_and_it_stays_quantized(qdq_cnns, per_channel) -> None:
    model = qdq_cnns[per_channel]
    zeroed, r1 = onnxprune.run(copy.deepcopy(model), ["vote:sparsity=0.5,round_to=1"])
    folded, r2 = onnxprune.run(copy.deepcopy(zeroed), ["fold"])
    assert r1["passes"][0]["channels_pruned"] == 8
    assert r2["passes"][0]["channels_removed"] == 8
    sizes = {t.name: list(t.dims) for t in folded.graph.initializer}
    assert sizes["w1_quantized"] == [4, 3, 3, 3] and sizes["w2_quantized"] == [4, 4, 3, 3]
    assert sizes["wf_quantized"] == [4, 4] and sizes["b1_quantized"] == [4]
    assert sizes["w1_scale"] == ([4] if per_channel else [])
    _assert_still_quantized(folded)
    onnx.checker.check_model(folded, full_check=True)
    for seed in (3, 4):  # the same quantized arithmetic on the channels kept: exactly equal
        np.testing.assert_array_equal(
            run_model(folded, _x(seed))["y"], run_model(zeroed, _x(seed))["y"]
        )


def test_fold_removes_channels_zeroed_in_the_uint8_weight(tmp_path: Path) -> None:
    """Filters set to their zero point (q == zp, here uint8 weights with zp != 0) are zero:
    fold removes them, with their per-channel scale and zero point."""
    model = quantized(float_cnn(), tmp_path, True, weight_type=QuantType.QUInt8)
    graph = model.graph
    q, zp = get_init(graph, "w1_quantized").copy(), get_init(graph, "w1_zero_point")
    assert q.dtype == np.uint8 and zp.any()
    q[[2, 5]] = zp[[2, 5], None, None, None]
    bias = get_init(graph, "b1_quantized").copy()
    bias[[2, 5]] = 0
    for name, arr in (("w1_quantized", q), ("b1_quantized", bias)):
        next(t for t in graph.initializer if t.name == name).CopyFrom(
            numpy_helper.from_array(arr, name)
        )
    folded, report = onnxprune.run(copy.deepcopy(model), ["fold"])
    assert report["passes"][0]["channels_removed"] == 2
    sizes = {t.name: list(t.dims) for t in folded.graph.initializer}
    assert sizes["w1_quantized"] == [6, 3, 3, 3] and sizes["w1_zero_point"] == [6]
    assert sizes["w2_quantized"] == [8, 6, 3, 3]
    kept = [i for i in range(8) if i not in (2, 5)]
    np.testing.assert_array_equal(get_init(folded.graph, "w1_zero_point"), zp[kept])
    _assert_still_quantized(folded)
    np.testing.assert_array_equal(run_model(folded, _x())["y"], run_model(model, _x())["y"])


def test_vote_writes_the_zero_point_into_uint8_weights(tmp_path: Path) -> None:
    """Zeroing a quantized filter writes its zero point (0 would dequantize to -zp * s)."""
    model = quantized(float_cnn(), tmp_path, True, weight_type=QuantType.QUInt8)
    zeroed, _ = onnxprune.run(copy.deepcopy(model), ["vote:sparsity=0.5,round_to=1"])
    q, zp = get_init(zeroed.graph, "w1_quantized"), get_init(zeroed.graph, "w1_zero_point")
    gone = [c for c in range(8) if (q[c] == zp[c]).all()]
    assert len(gone) == 4
    np.testing.assert_array_equal(zp, get_init(model.graph, "w1_zero_point"))  # left alone
    folded, r = onnxprune.run(zeroed, ["fold"])
    assert r["passes"][0]["channels_removed"] >= 4


@pytest.mark.parametrize("per_channel", [False, True])
def test_qdq_mlp_prunes_and_runs(tmp_path: Path, per_channel: bool) -> None:
    model = quantized(float_mlp(), tmp_path, per_channel)
    assert {g.channels for g in channel_groups(model) if g.prunable} == {16, 12}
    zeroed, _ = onnxprune.run(copy.deepcopy(model), ["vote:sparsity=0.5,round_to=1"])
    folded, r = onnxprune.run(copy.deepcopy(zeroed), ["fold"])
    assert r["passes"][0]["channels_removed"] == 14
    _assert_still_quantized(folded)
    x = _x(5, (2, 6))
    np.testing.assert_array_equal(run_model(folded, x)["y"], run_model(zeroed, x)["y"])


def test_magnitude_criteria_read_dequantized_values(qdq_cnns) -> None:
    """l1 on a QDQ model is the mean |scale * (q - zp)|, not the mean |q|."""
    model = copy.deepcopy(qdq_cnns[True])
    an = analyse(model, probe(model).shapes)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    space = next(s for s in an.spaces if s.node == "conv1")
    classes = np.unique(an.roots()[space.start : space.start + space.size])
    view = GroupView(an, classes, inits.__getitem__)
    got = get_criterion("l1").fn(view)
    real = dequantize(an.dequantized["w1_DequantizeLinear_Output"], inits.__getitem__)
    assert np.abs(real).max() < 10  # real magnitudes, not int8 codes
    np.testing.assert_allclose(got, np.abs(real).reshape(8, -1).mean(axis=1), rtol=1e-6)


def _q_dq_chain(q_zp: int, dq_zp: int, per_channel: bool = False) -> onnx.ModelProto:
    """x -> conv1 (4; filter 1 all zero, no bias) -> QuantizeLinear -> DequantizeLinear ->
    conv2 -> y, uint8 with the given zero points (per channel on axis 1 when asked)."""
    rng = np.random.default_rng(2)
    w1 = rng.normal(size=(4, 3, 1, 1)).astype(np.float32)
    w1[1] = 0
    size = (4,) if per_channel else ()
    inits = {
        "w1": w1,
        "w2": rng.normal(size=(2, 4, 1, 1)).astype(np.float32),
        "s": np.full(size, 0.05, np.float32),
        "zq": np.full(size, q_zp, np.uint8),
        "zd": np.full(size, dq_zp, np.uint8),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"]),
        helper.make_node("QuantizeLinear", ["a", "s", "zq"], ["aq"], axis=1),
        helper.make_node("DequantizeLinear", ["aq", "s", "zd"], ["ad"], axis=1),
        helper.make_node("Conv", ["ad", "w2"], ["y"]),
    ]
    x = [helper.make_tensor_value_info("x", F, [1, 3, 4, 4])]
    return build_model(nodes, x, [helper.make_tensor_value_info("y", F, [1, 2, 4, 4])], inits)


@pytest.mark.parametrize(
    ("q_zp", "dq_zp", "quantized_state", "real_state"),
    [
        (0, 0, State.ZERO, State.ZERO),  # zp 0: quantize(0) = 0, dequantize(0) = 0
        (128, 128, State.CONST, State.ZERO),  # the code 128 = zp dequantizes to 0
        (128, 100, State.CONST, State.CONST),  # different zero points: (128 - 100) * s
    ],
)
def test_zero_through_quantize_dequantize(q_zp, dq_zp, quantized_state, real_state) -> None:
    """The exact rule: quantize(0) = zp, dequantize(zp) = 0, so ZERO survives a Q -> DQ pair
    with one zero point; the int tensor alone holds the code zp (CONST unless zp is 0)."""
    model = _q_dq_chain(q_zp, dq_zp)
    an = analyse(model, probe(model).shapes)
    assert an.labels["a"].state[1] == State.ZERO
    assert an.labels["aq"].state[1] == quantized_state
    assert an.labels["ad"].state[1] == real_state
    assert (an.labels["ad"].state[[0, 2, 3]] == State.VAR).all()
    _, report = onnxprune.run(model, ["fold:constants=false"])  # zero channels only
    assert report["passes"][0]["channels_removed"] == (1 if real_state == State.ZERO else 0)


def test_per_channel_activation_qdq_slices_its_scale_and_zero_point() -> None:
    model = _q_dq_chain(128, 128, per_channel=True)
    folded, report = onnxprune.run(copy.deepcopy(model), ["fold"])
    assert report["passes"][0]["channels_removed"] == 1
    sizes = {t.name: list(t.dims) for t in folded.graph.initializer}
    assert sizes["s"] == sizes["zq"] == sizes["zd"] == [3] and sizes["w2"] == [2, 3, 1, 1]
    x = _x(1, (1, 3, 4, 4))
    np.testing.assert_allclose(
        run_model(folded, x)["y"], run_model(model, x)["y"], rtol=1e-6, atol=1e-6
    )


def test_qoperator_layers_are_pinned_naming_the_op(tmp_path: Path) -> None:
    model = quantized(float_cnn(), tmp_path, False, fmt=QuantFormat.QOperator)
    ops = {n.op_type for n in model.graph.node}
    assert "QLinearConv" in ops
    groups = channel_groups(model)
    convs = [g for g in groups if any(s.op == "QLinearConv" for s in g.spaces)]
    assert len(convs) == 2 and not any(g.prunable for g in groups)
    for g in convs:
        assert any(f"{QOPERATOR_REASON} (QLinearConv)" in r for r in g.reasons), g.reasons
    folded, report = onnxprune.run(copy.deepcopy(model), ["fold"])
    assert report["passes"][0]["channels_removed"] == 0
    np.testing.assert_array_equal(run_model(folded, _x())["y"], run_model(model, _x())["y"])


def test_constant_channel_into_a_quantized_layer_stays(qdq_cnns) -> None:
    """A constant non-zero channel is not moved into a quantized bias (it could not be exact)."""
    model = copy.deepcopy(qdq_cnns[True])
    graph = model.graph
    q, zp = get_init(graph, "w1_quantized").copy(), get_init(graph, "w1_zero_point")
    q[3] = zp[3]  # filter 3 is zero, its bias is not: the channel is a constant
    next(t for t in graph.initializer if t.name == "w1_quantized").CopyFrom(
        numpy_helper.from_array(q, "w1_quantized")
    )
    _, report = onnxprune.run(model, ["fold"])
    fold = report["passes"][0]
    assert fold["channels_removed"] == 0
    assert "constant channel feeds a quantized layer (Conv)" in fold["shortfall"][0]["reason"]


def test_vote_with_data_and_refit_on_a_qdq_model(qdq_cnns, tmp_path: Path) -> None:
    """With calibration data the voters' check reads the real weights, compensation leaves
    quantized biases alone, and refit skips quantized layers; the result stays exact."""
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(0).normal(size=(16, 3, 8, 8)).astype(np.float32))
    chain = ["vote:sparsity=0.5,round_to=1", "refit"]
    zeroed, report = onnxprune.run(copy.deepcopy(qdq_cnns[True]), chain, data=str(data))
    vote, refit = report["passes"]
    assert vote["channels_pruned"] == 8
    assert set(refit["skipped"].values()) <= {"quantized weight (QDQ): not refitted"}
    folded, r = onnxprune.run(copy.deepcopy(zeroed), ["fold"])
    assert r["passes"][0]["channels_removed"] == 8
    np.testing.assert_array_equal(run_model(folded, _x())["y"], run_model(zeroed, _x())["y"])


def _real(model: onnx.ModelProto, output: str) -> np.ndarray:
    """The real value of the weight a DequantizeLinear makes as ``output``."""
    inits = {t.name: t for t in model.graph.initializer}
    d = find_dequantized(model.graph, inits)[output]
    return dequantize(d, lambda n: numpy_helper.to_array(inits[n]))


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("weight_type", [QuantType.QInt8, QuantType.QUInt8])
def test_magnitude_sparsifies_quantized_weights_at_their_zero_point(
    tmp_path: Path, per_channel: bool, weight_type: QuantType
) -> None:
    """The int8/uint8 data behind DequantizeLinear: per output row, the half with the smallest
    real |w| is set to its zero point (so it dequantizes to exactly 0); the rest is kept."""
    model = quantized(float_cnn(), tmp_path, per_channel, weight_type=weight_type)
    new, report = onnxprune.run(copy.deepcopy(model), ["magnitude:sparsity=0.5"])
    section = report["passes"][0]
    assert section["weights"] == 3  # conv1, conv2 and the Gemm
    deq = {n.input[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    for name in ("w1_quantized", "w2_quantized"):
        node = deq[name]

        before, after = _real(model, node.output[0]), _real(new, node.output[0])
        q_before = np.asarray(get_init(model.graph, name))
        q_after = np.asarray(get_init(new.graph, name))
        assert q_after.dtype == q_before.dtype
        rows_b, rows_a = before.reshape(len(before), -1), after.reshape(len(after), -1)
        k = rows_b.shape[1] // 2
        for b, a in zip(rows_b, rows_a, strict=True):
            gone = a == 0
            assert gone.sum() >= k
            kept = ~gone
            np.testing.assert_array_equal(a[kept], b[kept])  # the others are untouched
            assert np.abs(b[gone]).max() <= np.abs(b[kept]).min()  # the smallest went
    assert {t.name: list(t.dims) for t in new.graph.initializer} == {
        t.name: list(t.dims) for t in model.graph.initializer
    }
    _assert_still_quantized(new)
    assert np.isfinite(run_model(new, _x())["y"]).all()


@pytest.mark.parametrize("per_channel", [False, True])
def test_parameters_count_the_quantized_weights_not_the_scales(tmp_path: Path, per_channel) -> None:
    """A QDQ model has the parameters of its float model: int8 weights and int32 biases
    count, scales and zero points do not; fold's counts follow the channels it removes."""
    from onnxprune.cost import count_parameters

    model = quantized(float_cnn(), tmp_path, per_channel)
    assert count_parameters(model) == count_parameters(float_cnn())
    zeroed, _ = onnxprune.run(copy.deepcopy(model), ["vote:sparsity=0.5,round_to=1"])
    folded, report = onnxprune.run(zeroed, ["fold"])
    section = report["passes"][0]
    assert section["parameters_before"] == count_parameters(float_cnn())
    assert section["parameters_after"] == count_parameters(folded) < section["parameters_before"]
