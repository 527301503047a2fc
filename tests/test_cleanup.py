"""The cleanup pass: Identity bypass, dead nodes, constant folding, its report, idempotence."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxprune

X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
FEEDS = {"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)}


def _model(nodes, outputs, initializer=(), inputs=(X,)) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", list(inputs), outputs, initializer=list(initializer))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _out(name: str, shape=(2, 4)) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _cleanup(model, spec="cleanup"):
    new, report = onnxprune.run(model, [spec])
    onnx.checker.check_model(new, full_check=True)
    return new, report["passes"][0]


def test_identity_chain_bypassed_except_graph_outputs(run_ort, same_outputs):
    model = _model(
        [
            helper.make_node("Identity", ["x"], ["i1"]),
            helper.make_node("Identity", ["i1"], ["i2"]),
            helper.make_node("Relu", ["i2"], ["r"]),
            helper.make_node("Identity", ["r"], ["i3"]),
            helper.make_node("Identity", ["i3"], ["y"]),  # graph output: stays
            helper.make_node("Identity", ["y"], ["z"]),  # graph output of a graph output: stays
        ],
        [_out("y"), _out("z")],
    )
    new, report = _cleanup(model)
    assert _ops(new) == ["Relu", "Identity", "Identity"]
    relu = new.graph.node[0]
    assert list(relu.input) == ["x"]
    assert [list(n.input) for n in new.graph.node[1:]] == [[relu.output[0]], ["y"]]
    assert [o.name for o in new.graph.output] == ["y", "z"]
    assert report["identities_bypassed"] == 3
    assert (report["nodes_before"], report["nodes_after"]) == (6, 3)
    assert report["modified"] is True
    same_outputs(run_ort(new, FEEDS), run_ort(model, FEEDS))


def test_identity_read_by_a_subgraph_is_kept(run_ort, same_outputs):
    then_g = helper.make_graph([helper.make_node("Neg", ["i1"], ["t"])], "then", [], [_out("t")])
    else_g = helper.make_graph([helper.make_node("Abs", ["i1"], ["e"])], "else", [], [_out("e")])
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    model = _model(
        [
            helper.make_node("Identity", ["x"], ["i1"]),
            helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g),
        ],
        [_out("y")],
        inputs=(X, cond),
    )
    new, report = _cleanup(model)
    assert _ops(new) == ["Identity", "If"]
    assert report["identities_bypassed"] == 0
    for c in (True, False):
        feeds = dict(FEEDS, c=np.array(c))
        same_outputs(run_ort(new, feeds), run_ort(model, feeds))


def test_dead_nodes_removed(run_ort, same_outputs):
    model = _model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Neg", ["x"], ["dead1"]),
            helper.make_node("Exp", ["dead1"], ["dead2"]),
            helper.make_node("Shape", ["r"], ["dead3"]),
            helper.make_node("Sigmoid", ["r"], ["y"]),
        ],
        [_out("y")],
    )
    new, report = _cleanup(model)
    assert _ops(new) == ["Relu", "Sigmoid"]
    assert (report["nodes_before"], report["nodes_after"]) == (5, 2)
    assert report["identities_bypassed"] == 0
    same_outputs(run_ort(new, FEEDS), run_ort(model, FEEDS))


def test_unused_initializers_dropped_inputs_kept():
    unused = numpy_helper.from_array(np.ones(3, np.float32), "unused")
    extra = helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1])
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_out("y")], [unused], (X, extra))
    new, _ = _cleanup(model)
    assert list(new.graph.initializer) == []
    assert [i.name for i in new.graph.input] == ["x", "extra"]  # a model's interface is kept


def test_add_of_two_initializers_folded(run_ort, same_outputs):
    a = numpy_helper.from_array(np.full((2, 4), 1.5, np.float32), "a")
    b = numpy_helper.from_array(np.arange(8, dtype=np.float32).reshape(2, 4), "b")
    model = _model(
        [helper.make_node("Add", ["a", "b"], ["ab"]), helper.make_node("Mul", ["x", "ab"], ["y"])],
        [_out("y")],
        [a, b],
    )
    new, report = _cleanup(model)
    assert _ops(new) == ["Mul"]
    (init,) = new.graph.initializer
    np.testing.assert_array_equal(numpy_helper.to_array(init), 1.5 + np.arange(8).reshape(2, 4))
    assert (report["nodes_before"], report["nodes_after"]) == (2, 1)
    assert report["modified"] is True
    same_outputs(run_ort(new, FEEDS), run_ort(model, FEEDS))

    kept, report = _cleanup(model, "cleanup:fold_constants=false")
    assert _ops(kept) == ["Add", "Mul"] and report["modified"] is False


def _shape_chain_model() -> onnx.ModelProto:
    """Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])): static x, so all constant."""
    idx = numpy_helper.from_array(np.array(0, np.int64), "idx")
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes")
    minus1 = numpy_helper.from_array(np.array([-1], np.int64), "minus1")
    return _model(
        [
            helper.make_node("Shape", ["x"], ["shape"]),
            helper.make_node("Gather", ["shape", "idx"], ["batch"], axis=0),
            helper.make_node("Unsqueeze", ["batch", "axes"], ["batch1"]),
            helper.make_node("Concat", ["batch1", "minus1"], ["target"], axis=0),
            helper.make_node("Reshape", ["x", "target"], ["y"]),
        ],
        [_out("y", (2, 4))],
        [idx, axes, minus1],
    )


def test_shape_arithmetic_on_static_shapes_folded(run_ort, same_outputs):
    model = _shape_chain_model()
    new, report = _cleanup(model)
    assert _ops(new) == ["Reshape"]
    (init,) = new.graph.initializer
    assert numpy_helper.to_array(init).tolist() == [2, -1]
    assert (report["nodes_before"], report["nodes_after"]) == (5, 1)
    same_outputs(run_ort(new, FEEDS), run_ort(model, FEEDS))


def test_fold_limit_keeps_large_results_unfolded(run_ort, same_outputs):
    # Expand a scalar to 1 MiB + 8 bytes that a node reads: folding would store the big tensor.
    scalar = numpy_helper.from_array(np.array(0.5, np.float32), "half")
    shape = numpy_helper.from_array(np.array([2, (1 << 17) + 1], np.int64), "shape")
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [1])
    model = _model(
        [
            helper.make_node("Expand", ["half", "shape"], ["big"]),
            helper.make_node("Mul", ["big", "w"], ["y"]),
        ],
        [_out("y", (2, (1 << 17) + 1))],
        [scalar, shape],
        (w,),
    )
    feeds = {"w": np.array([3.0], np.float32)}
    limited, report = _cleanup(model, "cleanup:fold_limit_mb=1")
    assert _ops(limited) == ["Expand", "Mul"] and report["modified"] is False
    folded, report = _cleanup(model, "cleanup:fold_limit_mb=1.5")
    assert _ops(folded) == ["Mul"] and report["modified"] is True
    assert numpy_helper.to_array(folded.graph.initializer[0]).shape == (2, (1 << 17) + 1)
    same_outputs(run_ort(limited, feeds), run_ort(model, feeds))
    same_outputs(run_ort(folded, feeds), run_ort(model, feeds))


def test_clean_model_reports_unmodified(tiny):
    new, report = _cleanup(tiny)
    assert report["modified"] is False
    assert report["constants_lifted"] == report["identities_bypassed"] == 0
    assert report["initializer_inputs_removed"] == 0
    assert report["nodes_before"] == report["nodes_after"] == 2
    assert new.graph.node == tiny.graph.node
    assert new.graph.initializer == tiny.graph.initializer


def test_idempotent_on_synthetic_models():
    for model in (_shape_chain_model(),):
        once, first = _cleanup(model)
        twice, second = _cleanup(once)
        assert first["modified"] is True and second["modified"] is False
        assert twice.graph == once.graph


def test_idempotent_on_fixtures(fixture_model):
    once, _ = _cleanup(onnxprune.load(fixture_model.path))
    twice, second = _cleanup(once)
    assert second["modified"] is False
    assert second["nodes_before"] == second["nodes_after"]
    assert twice.graph == once.graph
