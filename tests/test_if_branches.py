"""Channels through and inside If branches: each branch analysed as a graph of its own.

The condition is a graph input, so both branches are run; fold must give the input model's
outputs for either value, and onnx.checker and onnxruntime must accept the result.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.analysis.walk import analyse
from onnxprune.cost import infer_shapes

REAL = Path(__file__).resolve().parent.parent / "models" / "real"


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(arr.astype(np.float32), name)


def _model(agree: bool = True) -> onnx.ModelProto:
    """x -> conv0 (channels 1, 5 zero) -> Relu -> a; If(c): then Relu(Conv(a)) with the branch's
    own weights, else Relu(Conv(a)) with outer weights (or, disagreeing, a graph input y);
    both branches give channel 2 zero, only the then-branch channel 3 -> conv_out."""
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(8, 4, 3, 3))
    b0 = rng.normal(size=8)
    w0[[1, 5]] = 0
    b0[[1, 5]] = 0
    wt, bt = rng.normal(size=(6, 8, 1, 1)), rng.normal(size=6)
    we, be = rng.normal(size=(6, 8, 1, 1)), rng.normal(size=6)
    wt[[2, 3]], bt[[2, 3]] = 0, 0
    we[2], be[2] = 0, 0
    then = helper.make_graph(
        [
            helper.make_node("Conv", ["a", "wt", "bt"], ["t1"], name="then_conv"),
            helper.make_node("Relu", ["t1"], ["t_out"]),
        ],
        "then_branch",
        [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, ["N", 6, 8, 8])],
        [_init("wt", wt), _init("bt", bt)],
    )
    if agree:
        nodes = [
            helper.make_node("Conv", ["a", "we", "be"], ["e1"], name="else_conv"),
            helper.make_node("Relu", ["e1"], ["e_out"]),
        ]
    else:
        nodes = [helper.make_node("Identity", ["y"], ["e_out"])]
    other = helper.make_graph(
        nodes,
        "else_branch",
        [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, ["N", 6, 8, 8])],
    )
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8]),
        helper.make_tensor_value_info("c", TensorProto.BOOL, []),
    ]
    if not agree:
        inputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 8, 8]))
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c0"], ["a"]),
            helper.make_node("If", ["c"], ["b"], name="if0", then_branch=then, else_branch=other),
            helper.make_node("Conv", ["b", "wo", "bo"], ["out"], name="conv_out"),
        ],
        "g",
        inputs,
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [
            _init("w0", w0),
            _init("b0", b0),
            _init("we", we),
            _init("be", be),
            _init("wo", rng.normal(size=(3, 6, 1, 1))),
            _init("bo", rng.normal(size=3)),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, feeds)[0])


def _feeds(cond: bool, agree: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    feeds = {"x": rng.normal(size=(2, 4, 8, 8)).astype(np.float32), "c": np.array(cond)}
    if not agree:
        feeds["y"] = rng.normal(size=(2, 6, 8, 8)).astype(np.float32)
    return feeds


def _branch_inits(model: onnx.ModelProto, name: str) -> dict[str, tuple[int, ...]]:
    node = next(n for n in model.graph.node if n.op_type == "If")
    g = next(a.g for a in node.attribute if a.name == name)
    return {t.name: tuple(t.dims) for t in g.initializer}


def test_fold_removes_channels_through_and_inside_the_if_exactly_for_both_conditions() -> None:
    model = _model()
    new, report = onnxprune.run(copy.deepcopy(model), ["fold"], device="cpu")
    onnx.checker.check_model(new, full_check=True)
    inits = {t.name: tuple(t.dims) for t in new.graph.initializer}
    assert inits["w0"] == (6, 4, 3, 3)  # channels 1 and 5 of a: zero, read inside both branches
    assert inits["we"] == (5, 6, 1, 1)  # outer weights read by the else branch: both axes cut
    assert _branch_inits(new, "then_branch") == {"wt": (5, 6, 1, 1), "bt": (5,)}
    assert inits["wo"] == (3, 5, 1, 1)  # channel 2 of the If's output: zero in both branches
    assert report["passes"][0]["verified"]
    for cond in (True, False):
        feeds = _feeds(cond)
        np.testing.assert_allclose(_run(new, feeds), _run(model, feeds), rtol=1e-5, atol=1e-5)


def test_branches_that_disagree_pin_the_if_output_with_the_reason() -> None:
    model = _model(agree=False)
    an = analyse(model, {k: tuple(v) for k, v in infer_shapes(model).items()})
    reasons = set(an.pins.values())
    assert "If if0: output 'b' carries channels in then_branch only" in reasons
    new, _ = onnxprune.run(copy.deepcopy(model), ["fold"], device="cpu")
    onnx.checker.check_model(new, full_check=True)
    inits = {t.name: tuple(t.dims) for t in new.graph.initializer}
    assert inits["wo"] == (3, 6, 1, 1)  # the If output stays whole
    assert inits["w0"] == (6, 4, 3, 3)  # a's zero channels still go: only the then-branch reads a
    assert _branch_inits(new, "then_branch") == {"wt": (6, 6, 1, 1), "bt": (6,)}
    for cond in (True, False):
        feeds = _feeds(cond, agree=False)
        np.testing.assert_allclose(_run(new, feeds), _run(model, feeds), rtol=1e-5, atol=1e-5)


def test_loop_bodies_stay_pinned_with_the_reason() -> None:
    model = _model()
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["v_in", "a"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, ["N", 8, 8, 8]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, ["N", 8, 8, 8]),
        ],
    )
    model.graph.initializer.append(numpy_helper.from_array(np.array(2, np.int64), "trips"))
    model.graph.node.insert(
        2, helper.make_node("Loop", ["trips", "", "a"], ["looped"], name="loop0", body=body)
    )
    model.graph.output.append(
        helper.make_tensor_value_info("looped", TensorProto.FLOAT, ["N", 8, 8, 8])
    )
    an = analyse(model, {k: tuple(v) for k, v in infer_shapes(model).items()})
    assert any(
        "Loop loop0: its body (a subgraph) carries state across iterations" in r
        for r in an.pins.values()
    )


def test_real_if_fixture_prunes_inside_the_then_branch_and_fold_is_exact() -> None:
    model = onnx.load(str(REAL / "if_conv.onnx"))
    calib = str(REAL / "if_conv.calib.npz")
    chain = ["cleanup", "vote:round_to=1"]  # cleanup records symbolic shapes in the branches
    voted, _ = onnxprune.run(copy.deepcopy(model), chain, data=calib, device="cpu")
    new, _ = onnxprune.run(copy.deepcopy(voted), ["fold"], data=calib, device="cpu")
    onnx.checker.check_model(new, full_check=True)
    assert _branch_inits(new, "then_branch")["then.conv_a.weight"][0] < 32
    assert _branch_inits(new, "else_branch")["else.conv.weight"][0] < 8  # (cleanup moved it)
    x = np.random.default_rng(2).normal(size=(2, 3, 16, 16)).astype(np.float32)
    for shift in (2.0, -2.0):  # mean(x) > 0: then-branch; < 0: else-branch
        feeds = {"x": x + shift}
        np.testing.assert_allclose(_run(new, feeds), _run(voted, feeds), rtol=1e-4, atol=1e-4)


def test_refit_leaves_layers_inside_branches_as_they_are() -> None:
    model = onnx.load(str(REAL / "if_conv.onnx"))
    chain = ["cleanup", "vote:round_to=1", "refit", "fold"]
    new, report = onnxprune.run(model, chain, data=str(REAL / "if_conv.calib.npz"), device="cpu")
    onnx.checker.check_model(new, full_check=True)
    refit = next(p for p in report["passes"] if p["pass"] == "refit")
    assert refit["skipped"]["then_conv_a"] == "inside If branch then_branch: not refitted"
    assert next(p for p in report["passes"] if p["pass"] == "fold")["verified"]
