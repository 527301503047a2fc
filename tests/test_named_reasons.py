"""Named reasons: written-out normalisations are named, every weighted layer is in a group or
listed with why, "run -p cleanup first" where cleanup would help, and constants computed from
fixed sizes (the raw legacy softmax scale) count as constants."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from attention_models import E, H, legacy_encoder
from conftest import MODELS, invoke
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.analysis.fixed_values import data_independent
from onnxprune.analysis.probe import probe
from onnxprune.analysis.walk import analyse
from onnxprune.graph import prepare_for_pruning
from onnxprune.runner import run_model

W = 8
VOTE = "vote:sparsity=0.25,round_to=1,protect=linear"  # one head of four
SIZES = [(1, 5), (1, 8), (3, 5), (3, 8)]  # batch, sequence


def _model(nodes, inits, opset=17, inputs=None, shape=(2, 3, W), out=(2, 3, W)):
    x = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out))
    init = [numpy_helper.from_array(v, k) for k, v in inits.items()]
    graph = helper.make_graph(nodes, "g", x, [y], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _weights(*names):
    rng = np.random.default_rng(0)
    return {n: rng.standard_normal((W, W)).astype(np.float32) for n in names}


def _around(norm_nodes, extra_inits):
    """MatMul w1 -> ``norm_nodes`` (reading ``h``, writing ``n``) -> MatMul w2 -> y."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        *norm_nodes,
        helper.make_node("MatMul", ["n", "w2"], ["y"], name="fc2"),
    ]
    return _model(nodes, {**_weights("w1", "w2"), **extra_inits})


def _f(v):
    return np.array(v, np.float32)


def mean(i, o):
    return helper.make_node("ReduceMean", [i], [o], axes=[-1])


def layer_norm_pow():
    """torch < 17: ReduceMean -> Sub -> Pow -> ReduceMean -> Add -> Sqrt -> Div."""
    return [
        mean("h", "m"),
        helper.make_node("Sub", ["h", "m"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["sq"]),
        mean("sq", "var"),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["s"]),
        helper.make_node("Div", ["d", "s"], ["n"]),
    ], {"two": _f(2.0), "eps": _f(1e-5)}


def layer_norm_reciprocal():
    """tf2onnx/jax2tf: ReduceMean -> Sub -> Mul -> ReduceMean -> Add -> Sqrt -> Reciprocal ->
    Mul, the scale applied to x and the mean apart."""
    return [
        mean("h", "m"),
        helper.make_node("Sub", ["h", "m"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["sq"]),
        mean("sq", "var"),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["s"]),
        helper.make_node("Reciprocal", ["s"], ["r"]),
        helper.make_node("Mul", ["r", "gamma"], ["rg"]),
        helper.make_node("Mul", ["h", "rg"], ["xs"]),
        helper.make_node("Mul", ["m", "rg"], ["ms"]),
        helper.make_node("Sub", ["beta", "ms"], ["shift"]),
        helper.make_node("Add", ["xs", "shift"], ["n"]),
    ], {"eps": _f(1e-5), "gamma": _f(np.ones(W)), "beta": _f(np.zeros(W))}


def rms_norm():
    return [
        helper.make_node("Pow", ["h", "two"], ["sq"]),
        mean("sq", "var"),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["s"]),
        helper.make_node("Div", ["h", "s"], ["n"]),
    ], {"two": _f(2.0), "eps": _f(1e-6)}


def softmax(stable):
    nodes = [helper.make_node("Exp", ["c" if stable else "h"], ["e"])]
    if stable:
        nodes[:0] = [
            helper.make_node("ReduceMax", ["h"], ["top"], axes=[-1]),
            helper.make_node("Sub", ["h", "top"], ["c"]),
        ]
    nodes += [
        helper.make_node("ReduceSum", ["e", "axes"], ["total"]),
        helper.make_node("Div", ["e", "total"], ["n"]),
    ]
    return nodes, {"axes": np.array([-1], np.int64)}


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (
            layer_norm_pow,
            "LayerNormalization over the channel axis (ReduceMean -> Sub -> Pow -> "
            "ReduceMean -> Add -> Sqrt -> Div)",
        ),
        (
            layer_norm_reciprocal,
            "LayerNormalization over the channel axis (ReduceMean -> Sub -> "
            "Mul -> ReduceMean -> Add -> Sqrt -> Reciprocal -> Mul)",
        ),
        (rms_norm, "RMSNorm over the channel axis (Pow -> ReduceMean -> Add -> Sqrt -> Div)"),
        (lambda: softmax(False), "Softmax over the channel axis (Exp -> ReduceSum -> Div)"),
        (
            lambda: softmax(True),
            "Softmax over the channel axis (ReduceMax -> Sub -> Exp -> ReduceSum -> Div)",
        ),
    ],
)
def test_a_written_out_normalisation_is_named(build, name) -> None:
    nodes, inits = build()
    groups = onnxprune.channel_groups(_around(nodes, inits))
    (fc1,) = [g for g in groups if g.spaces[0].node == "fc1"]
    assert fc1.pinned == fc1.channels
    assert fc1.reasons == [f"{fc1.reasons[0].split(':')[0]}: written-out {name}: channels stay"]


def test_a_plain_reduction_over_the_channels_keeps_the_plain_reason() -> None:
    model = _around([mean("h", "m"), helper.make_node("Mul", ["h", "m"], ["n"])], {})
    groups = onnxprune.channel_groups(model)
    (fc1,) = [g for g in groups if g.spaces[0].node == "fc1"]
    assert any(r.endswith("reduces over the channel axis") for r in fc1.reasons), fc1.reasons


# -- layers in no group ------------------------------------------------------------------------


def _conv_net(weight_nodes, w_name, inits, inputs=None):
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="convA"),
        helper.make_node("Relu", ["a"], ["r"]),
        *weight_nodes,
        helper.make_node("Conv", ["r", w_name], ["y"], name="convB"),
    ]
    inits = {"wa": rng.standard_normal((4, 3, 1, 1)).astype(np.float32), **inits}
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])
    return _model(nodes, inits, inputs=[x, *(inputs or [])], out=(1, 6, 5, 5))


WB = np.random.default_rng(2).standard_normal((6, 4, 1, 1)).astype(np.float32)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("cast", ["computed by Cast", "run -p cleanup first"]),
        ("identity", ["computed by Identity", "run -p cleanup first"]),
        ("transpose", ["computed by Transpose", "run -p cleanup first"]),
        ("input", ["'wb' is a graph input"]),
        ("runtime", ["computed at run time (by Mul)"]),
    ],
)
def test_each_weighted_layer_is_in_a_group_or_listed_with_why(case, expected) -> None:
    inputs = []
    if case == "cast":
        weight, inits = (
            [helper.make_node("Cast", ["wb16"], ["wb"], to=1)],
            {"wb16": WB.astype(np.float16)},
        )
    elif case == "identity":
        weight, inits = [helper.make_node("Identity", ["wb0"], ["wb"])], {"wb0": WB}
    elif case == "transpose":
        weight = [helper.make_node("Transpose", ["wbt"], ["wb"], perm=[1, 0, 2, 3])]
        inits = {"wbt": WB.transpose(1, 0, 2, 3).copy()}
    elif case == "input":
        weight, inits = [], {}
        inputs = [helper.make_tensor_value_info("wb", TensorProto.FLOAT, list(WB.shape))]
    else:
        weight = [helper.make_node("Mul", ["wb0", "g"], ["wb"])]
        inits = {"wb0": WB}
        inputs = [helper.make_tensor_value_info("g", TensorProto.FLOAT, [1])]
    model = _conv_net(weight, "wb", inits, inputs)
    (layer,) = onnxprune.uncovered_layers(model)
    assert layer.layer == "Conv convB" and layer.weight == "wb" and layer.channels == 6
    for text in expected:
        assert text in layer.reason, layer.reason
    assert [g.spaces[0].node for g in onnxprune.channel_groups(model)] == ["convA"]
    if "run -p cleanup first" in expected:  # as the reason says
        cleaned, _ = onnxprune.run(model, ["cleanup"])
        assert onnxprune.uncovered_layers(cleaned) == []


def test_recurrent_layers_and_subgraph_layers_are_listed() -> None:
    rng = np.random.default_rng(3)
    body_w = numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "wi")
    branch = helper.make_graph(
        [helper.make_node("Conv", ["x", "wi"], ["bo"], name="inner_conv")],
        "branch",
        [],
        [helper.make_tensor_value_info("bo", TensorProto.FLOAT, [1, 4, 5, 5])],
        [body_w],
    )
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])
    seq = helper.make_tensor_value_info("s", TensorProto.FLOAT, [5, 1, 3])
    nodes = [
        helper.make_node(
            "If", ["cond"], ["y"], name="gate", then_branch=branch, else_branch=branch
        ),
        helper.make_node("LSTM", ["s", "W", "R"], ["ys"], name="lstm", hidden_size=2),
    ]
    inits = {
        "W": rng.standard_normal((1, 8, 3)).astype(np.float32),
        "R": rng.standard_normal((1, 8, 2)).astype(np.float32),
    }
    ys = helper.make_tensor_value_info("ys", TensorProto.FLOAT, [5, 1, 1, 2])
    graph = helper.make_graph(
        nodes,
        "g",
        [cond, x, seq],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5]), ys],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    layers = {u.layer: u for u in onnxprune.uncovered_layers(model)}
    assert set(layers) == {"Conv inner_conv"}
    assert layers["Conv inner_conv"].reason.startswith("inside the body of If gate")
    assert layers["Conv inner_conv"].channels == 4
    # the LSTM has a rule now: its hidden size is a group of its own, pinned with the reason
    (lstm,) = [g for g in onnxprune.channel_groups(model) if g.spaces[0].op == "LSTM"]
    assert not lstm.prunable and lstm.channels == 2
    assert any("state interface" in r for r in lstm.reasons)


def test_inspect_prints_the_layers_in_no_group(tmp_path: Path) -> None:
    path = tmp_path / "cast.onnx"
    cast = [helper.make_node("Cast", ["wb16"], ["wb"], to=1)]
    onnx.save(_conv_net(cast, "wb", {"wb16": WB.astype(np.float16)}), path)
    result = invoke(path, "--inspect")
    assert result.exit_code == 0, result.stderr
    out = " ".join(result.stdout.split())
    assert "layers in no group" in out and "Conv convB" in out
    assert "cleanup first" in out


def test_a_half_precision_out_projection_of_the_legacy_encoder_points_at_cleanup() -> None:
    """models/torch/encoder_legacy.onnx with its out-projection stored in float16 behind a Cast
    (as mixed-precision exports write it): the Gemm is in no group and the reason says to run
    cleanup; the heads it reads are pinned until then, and prunable after."""
    path = MODELS / "torch/encoder_legacy.onnx"
    if not path.exists():
        pytest.skip("fixture not present")
    model = onnxprune.load(path)
    name = "layer.self_attn.out_proj.weight"
    (w,) = [t for t in model.graph.initializer if t.name == name]
    w16 = numpy_helper.from_array(numpy_helper.to_array(w).astype(np.float16), name + ".fp16")
    model.graph.initializer.remove(w)
    model.graph.initializer.append(w16)
    model.graph.node.insert(0, helper.make_node("Cast", [w16.name], [name], to=1, name="cast_w"))
    (layer,) = onnxprune.uncovered_layers(model)
    assert layer.layer == "Gemm /layer/self_attn/Gemm" and layer.channels == 32
    assert "computed by Cast cast_w" in layer.reason and "run -p cleanup first" in layer.reason
    heads = [g for g in onnxprune.channel_groups(model) if g.channels == H]
    assert heads and not heads[0].prunable
    cleaned, _ = onnxprune.run(model, ["cleanup"])
    assert onnxprune.uncovered_layers(cleaned) == []
    assert [g for g in onnxprune.channel_groups(cleaned) if g.channels == H][0].prunable


# -- constants computed from fixed sizes -----------------------------------------------------


def test_the_legacy_scale_is_data_independent_and_the_batch_is_not() -> None:
    work = legacy_encoder()
    prepare_for_pruning(work.graph)
    an = analyse(work, probe(work, 0).shapes)
    by_op: dict[str, list[str]] = {}
    for node in work.graph.node:
        by_op.setdefault(node.op_type, []).append(node.output[0])
    sqrt = by_op["Sqrt"]  # Sqrt(Cast(head size)), then Sqrt(scale) twice
    assert all(data_independent(an, t) for t in sqrt)
    t0 = by_op["Transpose"][0]  # (sequence, batch, width)
    shapes = {n.output[0] for n in work.graph.node if n.op_type == "Shape" and n.input == [t0]}
    sizes = {
        int(an.array(n.input[1])): n.output[0]
        for n in work.graph.node
        if n.op_type == "Gather" and n.input[0] in shapes
    }
    assert not data_independent(an, sizes[0]) and not data_independent(an, sizes[1])
    assert data_independent(an, sizes[2])  # the width: fixed by the weights
    assert not data_independent(an, "input")


def test_vote_and_fold_remove_a_head_of_the_raw_legacy_export_without_cleanup() -> None:
    """The raw legacy export scales q and k by ``Sqrt(1 / Sqrt(Cast(Shape(q)[-1])))``: made of
    the fixed head size, it is a constant, so a zeroed head stays constant through ``q *
    scale`` and fold removes it, exact at every batch and sequence size."""
    zeroed, _ = onnxprune.run(legacy_encoder(), [VOTE])
    folded, report = onnxprune.run(zeroed, ["fold"])
    assert report["passes"][0]["channels_removed"] == 1, report["passes"][0]["blocked"]
    for batch, seq in SIZES:
        x = np.random.default_rng(batch + seq).standard_normal((batch, seq, E))
        feeds = {"input": x.astype(np.float32)}
        want, got = run_model(zeroed, feeds), run_model(folded, feeds)
        np.testing.assert_allclose(got["output"], want["output"], rtol=1e-5, atol=1e-5)


def test_a_computed_per_channel_constant_pins_and_points_at_cleanup() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Cast", ["s16"], ["s"], to=1, name="cast_s"),
        helper.make_node("Mul", ["h", "s"], ["n"], name="scale"),
        helper.make_node("MatMul", ["n", "w2"], ["y"], name="fc2"),
    ]
    model = _model(nodes, {**_weights("w1", "w2"), "s16": np.ones(W, np.float16)})
    (fc1,) = [g for g in onnxprune.channel_groups(model) if g.spaces[0].node == "fc1"]
    assert fc1.reasons == [
        "Mul scale: per-channel constant 's' is computed by Cast cast_s, not stored: "
        "run -p cleanup first"
    ]
