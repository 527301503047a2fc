"""cleanup on If subgraphs that read outer-scope tensors, and Ifs whose condition is constant.

onnx-graphsurgeon's own If flattening left such models unsorted ("input ... is not output of any
previous nodes") or crashed; cleanup inlines constant-condition Ifs itself, and where the
library still fails, it leaves the graph as it was and says why.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.graph import lift_constants
from onnxprune.passes import cleanup as cleanup_module
from onnxprune.passes.cleanup import inline_constant_ifs
from tests.conftest import ort_run

RNG = np.random.default_rng(0)


def _v(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, 6])


def _const(name: str, value) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], value=numpy_helper.from_array(np.asarray(value))
    )


def _branch(name: str, nodes: list[onnx.NodeProto], out: str) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [_v(out)])


def _model(nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
    inputs = [_v("x"), helper.make_tensor_value_info("c", TensorProto.BOOL, [])]
    model = helper.make_model(
        helper.make_graph(nodes, "g", inputs, [_v("y")]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _floats(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 6)).astype(np.float32)


def _lifted(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with Constant nodes as initializers (what cleanup inlines from)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    lift_constants(out.graph)
    return out


def _cleaned(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """cleanup's result (checked) and its section; the outputs are those of ``model``."""
    new, report = onnxprune.run(model, ["cleanup"], device="cpu")
    onnx.checker.check_model(new, full_check=True)
    for c in (True, False):
        feeds = {"x": _floats(1), "c": np.array(c)}
        want, got = ort_run(model, feeds), ort_run(new, feeds)
        np.testing.assert_allclose(got["y"], want["y"], rtol=1e-6, atol=1e-6)
    return new, report["passes"][0]


def test_constant_if_whose_branch_reads_an_outer_constant_is_inlined() -> None:
    model = _model(
        [
            _const("c1", _floats(2)),
            _const("never", np.array(False)),
            helper.make_node(
                "If", ["never"], ["b"],
                then_branch=_branch("th", [helper.make_node("Identity", ["x"], ["t"])], "t"),
                else_branch=_branch("el", [helper.make_node("Identity", ["c1"], ["e"])], "e"),
            ),
            helper.make_node("Relu", ["b"], ["r"]),
            helper.make_node("Add", ["r", "x"], ["y"]),
        ]
    )  # fmt: skip
    new, section = _cleaned(model)
    assert section["constant_ifs_inlined"] == 1 and "note" not in section
    assert [n.op_type for n in new.graph.node] == ["Add"]  # relu(c1) folded into a constant


def test_constant_and_input_conditions_with_outer_reads_stay_sorted() -> None:
    """Two Ifs read the same outer tensors; one condition is constant, the other a graph input."""
    then_a = [
        helper.make_node("Identity", ["c1"], ["t1"]),
        helper.make_node("Add", ["x", "c1"], ["t2"]),
    ]
    model = _model(
        [
            _const("c1", _floats(3)),
            _const("always", np.array(True)),
            helper.make_node(
                "If", ["always"], ["b1"],
                then_branch=_branch("th", then_a + [helper.make_node("Identity", ["t2"], ["t"])], "t"),
                else_branch=_branch("el", [helper.make_node("Neg", ["x"], ["e"])], "e"),
            ),
            helper.make_node(
                "If", ["c"], ["b2"],
                then_branch=_branch("th", [helper.make_node("Identity", ["c1"], ["t"])], "t"),
                else_branch=_branch("el", [helper.make_node("Mul", ["x", "b1"], ["e"])], "e"),
            ),
            helper.make_node("Add", ["b1", "b2"], ["y"]),
        ]
    )  # fmt: skip
    new, section = _cleaned(model)
    assert section["constant_ifs_inlined"] == 1 and "note" not in section
    # the inlined branch's last Identity writes b1, which the other If's branch reads: it stays
    assert [n.op_type for n in new.graph.node] == ["Add", "Identity", "If", "Add"]


def test_if_on_an_input_reading_a_deep_outer_chain_keeps_its_order() -> None:
    then = _branch("th", [helper.make_node("Add", ["a", "k"], ["t"])], "t")
    other = _branch("el", [helper.make_node("Sub", ["a", "k"], ["e"])], "e")
    model = _model(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("Sigmoid", ["a"], ["k0"]),
            helper.make_node("Identity", ["k0"], ["k1"]),
            helper.make_node("Tanh", ["k1"], ["k"]),
            helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other),
        ]
    )
    new, section = _cleaned(model)
    assert [n.op_type for n in new.graph.node] == ["Relu", "Sigmoid", "Tanh", "If"]
    assert section["identities_bypassed"] == 1


def test_inlined_names_do_not_clash_with_other_branches() -> None:
    """Both Ifs' branches define ``t``; inlining one must not shadow the other's."""
    first = _branch("th", [helper.make_node("Relu", ["x"], ["t"])], "t")
    model = _model(
        [
            _const("always", np.array(True)),
            helper.make_node(
                "If", ["always"], ["b1"],
                then_branch=first,
                else_branch=_branch("el", [helper.make_node("Neg", ["x"], ["e"])], "e"),
            ),
            helper.make_node(
                "If", ["c"], ["b2"],
                then_branch=_branch("th", [helper.make_node("Relu", ["b1"], ["t"])], "t"),
                else_branch=_branch("el", [helper.make_node("Neg", ["b1"], ["e"])], "e"),
            ),
            helper.make_node("Add", ["b1", "b2"], ["y"]),
        ]
    )  # fmt: skip
    inlined = _lifted(model)
    assert inline_constant_ifs(inlined) == 1
    relu = inlined.graph.node[0]
    assert relu.op_type == "Relu" and list(relu.output) == ["b1"]  # writes the If's output
    onnx.checker.check_model(inlined, full_check=True)
    _cleaned(model)


def test_a_branch_output_that_is_an_initializer_becomes_an_identity() -> None:
    branch = helper.make_graph(
        [], "th", [], [_v("w")], initializer=[numpy_helper.from_array(_floats(4), "w")]
    )
    other = _branch("el", [helper.make_node("Neg", ["x"], ["e"])], "e")
    model = _model(
        [
            _const("always", np.array(True)),
            helper.make_node("If", ["always"], ["b"], then_branch=branch, else_branch=other),
            helper.make_node("Add", ["b", "x"], ["y"]),
        ]
    )
    inlined = _lifted(model)
    assert inline_constant_ifs(inlined) == 1
    assert [n.op_type for n in inlined.graph.node] == ["Identity", "Add"]
    _cleaned(model)


def test_when_graphsurgeon_fails_cleanup_leaves_the_graph_and_says_why() -> None:
    """Dead nodes inside branches that read a folded outer tensor crash graphsurgeon's cleanup
    (onnx-graphsurgeon 0.6: list.remove(x): x not in list)."""
    model = _model(
        [
            _const("c1", _floats(5)),
            helper.make_node("Identity", ["c1"], ["i2"]),
            helper.make_node(
                "If", ["c"], ["b3"],
                then_branch=_branch("th", [helper.make_node("Identity", ["x"], ["th4"]),
                                           helper.make_node("Neg", ["c1"], ["t"])], "t"),
                else_branch=_branch("el", [helper.make_node("Neg", ["c1"], ["e"])], "e"),
            ),
            helper.make_node("Identity", ["i2"], ["i7"]),
            helper.make_node(
                "If", ["c"], ["y"],
                then_branch=_branch("th", [helper.make_node("Identity", ["i2"], ["th9"]),
                                           helper.make_node("Add", ["i7", "b3"], ["t"])], "t"),
                else_branch=_branch("el", [helper.make_node("Relu", ["i2"], ["el13"]),
                                           helper.make_node("Neg", ["i2"], ["e"])], "e"),
            ),
        ]
    )  # fmt: skip
    new, section = _cleaned(model)
    if "note" in section:  # a later onnx-graphsurgeon may handle it
        assert section["note"].startswith("constant folding, Identity bypass and dead-node ")
        assert "the rewrite through onnx-graphsurgeon failed on this model" in section["note"]
        assert section["constants_lifted"] == 1 and section["identities_bypassed"] == 0


def test_a_library_failure_or_an_invalid_result_leaves_the_graph_as_it_was(monkeypatch) -> None:
    model = _model(
        [
            _const("k", _floats(6)),
            helper.make_node("Identity", ["x"], ["i"]),
            helper.make_node("Add", ["i", "k"], ["y"]),
        ]
    )

    def broken(self, m):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cleanup_module.Cleanup, "_surgery", broken)
    new, section = _cleaned(model)
    assert section["note"].endswith("failed on this model (RuntimeError: boom)")
    assert [n.op_type for n in new.graph.node] == ["Identity", "Add"]  # lifted only
    assert section["constants_lifted"] == 1 and section["modified"] is True

    def invalid(self, m):
        out = onnx.ModelProto()
        out.CopyFrom(m)
        out.graph.node.reverse()  # unsorted
        return out, 0, 0

    monkeypatch.setattr(cleanup_module.Cleanup, "_surgery", invalid)
    new, section = _cleaned(model)
    assert "onnx.checker rejects the model" in section["note"]
    assert [n.op_type for n in new.graph.node] == ["Identity", "Add"]
