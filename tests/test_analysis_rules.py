"""The analysis vocabulary and rules that were wrong or dead: reductions, Split, LpPool, the
never-empty guard, and initializers read only by a nested subgraph."""

from __future__ import annotations

from typing import get_args

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxprune
from onnxprune.analysis.groups import keep_one_per_tensor, last_channel_classes
from onnxprune.analysis.handlers.elementwise import REDUCE, reduced_state
from onnxprune.analysis.labels import (
    GroupRewrite,
    ReshapeRewrite,
    RewriteKind,
    ShapeRewrite,
    SliceRewrite,
    SplitRewrite,
    State,
    UnionFind,
)
from onnxprune.analysis.probe import probe
from onnxprune.analysis.walk import analyse
from onnxprune.pruning.zero import random_classes
from onnxprune.runner import run_model

h = onnx.helper
F = onnx.TensorProto.FLOAT
Z, C, V = State.ZERO, State.CONST, State.VAR


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    graph = h.make_graph(
        nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()]
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _sizes(model: onnx.ModelProto) -> dict[str, list[int]]:
    return {t.name: list(t.dims) for t in model.graph.initializer}


def _same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    want, got = run_model(a, feeds), run_model(b, feeds)
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, rtol=1e-5, atol=1e-5, err_msg=name)


def test_state_join_product_and_constant() -> None:
    a = np.array([Z, Z, Z, C, C, V], np.uint8)
    b = np.array([Z, C, V, C, V, V], np.uint8)
    assert State.join(a, b).tolist() == [Z, C, V, C, V, V]
    assert State.join(a, State.CONST).tolist() == [C, C, C, C, C, V]
    assert State.product(a, b).tolist() == [Z, Z, Z, C, V, V]
    assert State.join_along(np.stack([a, b]), axis=0).tolist() == State.join(a, b).tolist()
    assert State.of_constant(np.array([True, False])).tolist() == [Z, C]
    assert State.join(a, b).dtype == np.uint8


def test_each_rewrite_kind_has_one_class() -> None:
    classes = (GroupRewrite, ReshapeRewrite, SplitRewrite, SliceRewrite, ShapeRewrite)
    kinds = [cls.kind for cls in classes]
    assert sorted(kinds) == sorted(get_args(RewriteKind))


def test_union_find_compresses_paths_to_the_smallest_root() -> None:
    uf = UnionFind()
    uf.add(5)
    for a, b in ((4, 3), (3, 2), (2, 1)):
        uf.union(a, b)
    assert uf.find(4) == 1
    assert uf.parent[4] == 1 and uf.parent[3] == 1  # re-pointed on the way
    assert uf.roots().tolist() == [0, 1, 1, 1, 1]


@pytest.mark.parametrize("op", sorted(REDUCE))
def test_reduced_state_matches_onnxruntime(op: str) -> None:
    """Reduce a zero and a constant channel over the spatial axes: the output is exactly 0
    where the rule says ZERO, and one value per channel where it says CONST."""
    model = _model(
        [h.make_node(op, ["x", "axes"], ["y"], keepdims=1)],
        [h.make_tensor_value_info("x", F, [1, 2, 3, 3])],
        [h.make_tensor_value_info("y", F, [1, 2, 1, 1])],
        {"axes": np.array([2, 3], np.int64)},
        opset=18,
    )
    x = np.zeros((1, 2, 3, 3), np.float32)
    x[0, 1] = 0.5
    y = run_model(model, {"x": x})["y"].reshape(2)
    zero, const = reduced_state(op, np.array([Z, C], np.uint8)).tolist()
    assert (zero == Z) == (y[0] == 0.0), f"{op} of a zero channel is {y[0]}"
    assert zero != V and const == C


def _conv_reduce_conv() -> onnx.ModelProto:
    """Conv w1 (channel 1 zero, no bias) -> ReduceLogSumExp over H, W -> Conv w2."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(4, 3, 1, 1)).astype(np.float32)
    w1[1] = 0
    w2 = rng.normal(size=(2, 4, 1, 1)).astype(np.float32)
    return _model(
        [
            h.make_node("Conv", ["x", "w1"], ["a"]),
            h.make_node("ReduceLogSumExp", ["a"], ["r"], axes=[2, 3], keepdims=1),
            h.make_node("Conv", ["r", "w2"], ["y"]),
        ],
        [h.make_tensor_value_info("x", F, [1, 3, 4, 4])],
        [h.make_tensor_value_info("y", F, [1, 2, 1, 1])],
        {"w1": w1, "w2": w2},
    )


def test_logsumexp_of_a_zero_channel_is_a_constant_and_folds_into_the_bias() -> None:
    """log(sum(exp(0))) over 16 positions is log 16: CONST, not ZERO. Fold moves it into the
    next Conv's bias instead of keeping the channel as a disagreement with the probe."""
    model = _conv_reduce_conv()
    an = analyse(model, probe(model).shapes)
    assert an.labels["r"].state.tolist() == [V, C, V, V]
    folded, report = onnxprune.run(model, ["fold"])
    assert _sizes(folded)["w1"] == [3, 3, 1, 1]
    assert not any("disagrees" in r for r in report["passes"][0]["blocked"])
    x = np.random.default_rng(1).normal(size=(1, 3, 4, 4)).astype(np.float32)
    _same_outputs(model, folded, {"x": x})


def _conv1d_split_batch() -> onnx.ModelProto:
    """x[4,3,2] -> Conv1d w1 -> a[4,2,2] (channels on axis 1) -> Split 2+2 on axis 0 ->
    Conv1d w2, Conv1d w3. Channel 1 of w1 is zero."""
    rng = np.random.default_rng(2)
    w1 = rng.normal(size=(2, 3, 1)).astype(np.float32)
    w1[1] = 0
    w2 = rng.normal(size=(3, 2, 1)).astype(np.float32)
    w3 = rng.normal(size=(3, 2, 1)).astype(np.float32)
    return _model(
        [
            h.make_node("Conv", ["x", "w1"], ["a"]),
            h.make_node("Split", ["a", "sizes"], ["a1", "a2"], axis=0),
            h.make_node("Conv", ["a1", "w2"], ["y1"]),
            h.make_node("Conv", ["a2", "w3"], ["y2"]),
        ],
        [h.make_tensor_value_info("x", F, [4, 3, 2])],
        [
            h.make_tensor_value_info("y1", F, [2, 3, 2]),
            h.make_tensor_value_info("y2", F, [2, 3, 2]),
        ],
        {"w1": w1, "w2": w2, "w3": w3, "sizes": np.array([2, 2], np.int64)},
    )


def test_split_along_another_axis_keeps_the_channel_axis() -> None:
    """(4, 2, 2) with channels on axis 1, split 2+2 on axis 0: both parts carry the channels
    on axis 1 (the shape-matching guess said 2), so the next Convs read them and fold prunes."""
    model = _conv1d_split_batch()
    an = analyse(model, probe(model).shapes)
    assert an.labels["a1"].axis == an.labels["a2"].axis == 1
    assert all(
        g.prunable for g in an.groups() if any(s.op == "Conv" and s.size == 2 for s in g.spaces)
    )
    folded, _ = onnxprune.run(model, ["fold"])
    sizes = _sizes(folded)
    assert sizes["w1"] == [1, 3, 1] and sizes["w2"] == [3, 1, 1] and sizes["w3"] == [3, 1, 1]
    assert sizes["sizes"] == [2]  # the batch split is not rewritten
    x = np.random.default_rng(3).normal(size=(4, 3, 2)).astype(np.float32)
    _same_outputs(model, folded, {"x": x})


def _conv_lppool_conv(pads: list[int]) -> onnx.ModelProto:
    """Conv w1 (channel 1: zero filter, bias 0.7) -> LpPool 3x3 -> Conv w2."""
    rng = np.random.default_rng(4)
    w1 = rng.normal(size=(3, 2, 1, 1)).astype(np.float32)
    w1[1] = 0
    b1 = np.array([0.1, 0.7, -0.2], np.float32)
    w2 = rng.normal(size=(2, 3, 1, 1)).astype(np.float32)
    side = 6 + sum(pads[:2]) - 2
    return _model(
        [
            h.make_node("Conv", ["x", "w1", "b1"], ["a"]),
            h.make_node("LpPool", ["a"], ["p"], kernel_shape=[3, 3], pads=pads, p=2),
            h.make_node("Conv", ["p", "w2"], ["y"]),
        ],
        [h.make_tensor_value_info("x", F, [1, 2, 6, 6])],
        [h.make_tensor_value_info("y", F, [1, 2, side, side])],
        {"w1": w1, "b1": b1, "w2": w2},
    )


@pytest.mark.parametrize("padded", [False, True])
def test_lppool_with_zero_padding_makes_a_constant_vary(padded: bool) -> None:
    """Unpadded, the LpPool of a constant channel is a constant and folds; zero-padded, the
    border windows see fewer values, so the channel is VAR and stays (no false CONST)."""
    model = _conv_lppool_conv([1, 1, 1, 1] if padded else [0, 0, 0, 0])
    an = analyse(model, probe(model).shapes)
    assert an.labels["p"].state.tolist()[1] == (V if padded else C)
    folded, report = onnxprune.run(model, ["fold"])
    assert _sizes(folded)["w1"][0] == (3 if padded else 2)
    assert not any("disagrees" in r for r in report["passes"][0]["blocked"])
    x = np.random.default_rng(5).normal(size=(1, 2, 6, 6)).astype(np.float32)
    _same_outputs(model, folded, {"x": x})


def test_keep_one_per_tensor_takes_back_the_last_channel_classes() -> None:
    model = _conv_reduce_conv()
    an = analyse(model, probe(model).shapes)
    every = set(random_classes(an, 1.0))  # the guard already applied: some class is kept
    free = {int(r) for r in an.roots()[an.labels["a"].ids]}
    assert every < free
    assert last_channel_classes(an, free) == free - every
    assert keep_one_per_tensor(an, free) == every


def _nested_if(then_node: onnx.NodeProto) -> onnx.GraphProto:
    return h.make_graph(
        [then_node], "branch", [], [h.make_tensor_value_info(then_node.output[0], F, [2])]
    )


def test_fold_keeps_an_initializer_read_only_by_a_nested_subgraph() -> None:
    """``deep`` is read only inside an If nested in another If's branch: fold must keep it."""
    rng = np.random.default_rng(6)
    w1 = rng.normal(size=(4, 3, 1, 1)).astype(np.float32)
    w1[1] = 0
    w2 = rng.normal(size=(2, 4, 1, 1)).astype(np.float32)
    inner = h.make_node(
        "If",
        ["cond"],
        ["inner"],
        then_branch=_nested_if(h.make_node("Identity", ["deep"], ["t"])),
        else_branch=_nested_if(h.make_node("Neg", ["deep"], ["e"])),
    )
    outer_then = h.make_graph(
        [inner], "outer_then", [], [h.make_tensor_value_info("inner", F, [2])]
    )
    outer_else = _nested_if(
        h.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.zeros(2, np.float32)))
    )
    model = _model(
        [
            h.make_node("Conv", ["x", "w1"], ["a"]),
            h.make_node("Relu", ["a"], ["r"]),
            h.make_node("Conv", ["r", "w2"], ["y"]),
            h.make_node("If", ["cond"], ["z"], then_branch=outer_then, else_branch=outer_else),
        ],
        [
            h.make_tensor_value_info("x", F, [1, 3, 2, 2]),
            h.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []),
        ],
        [h.make_tensor_value_info("y", F, [1, 2, 2, 2]), h.make_tensor_value_info("z", F, [2])],
        {"w1": w1, "w2": w2, "deep": np.array([1.0, 2.0], np.float32)},
    )
    folded, _ = onnxprune.run(model, ["fold"])
    assert _sizes(folded)["w1"] == [3, 3, 1, 1]
    assert "deep" in _sizes(folded)
    onnx.checker.check_model(folded, full_check=True)
    x = rng.normal(size=(1, 3, 2, 2)).astype(np.float32)
    for cond in (True, False):
        _same_outputs(model, folded, {"x": x, "cond": np.array(cond)})
