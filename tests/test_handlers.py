"""register_handler: a plugin teaches the channel analysis an op, and fold then prunes through it."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxprune
from onnxprune.analysis.handlers import HANDLERS, handler_key, register_handler
from onnxprune.analysis.handlers.elementwise import zero_preserving
from onnxprune.analysis.labels import State
from onnxprune.analysis.probe import probe
from onnxprune.analysis.state import Analysis
from onnxprune.analysis.walk import analyse
from onnxprune.errors import OnnxPruneError
from onnxprune.runner import run_model

h = onnx.helper


@pytest.fixture
def own_handlers() -> Iterator[None]:
    """Handlers registered by a test disappear after it (the built-ins stay)."""
    saved = dict(HANDLERS)
    yield
    HANDLERS.clear()
    HANDLERS.update(saved)


def _conv_op_conv(op: str, domain: str = "") -> onnx.ModelProto:
    """x -> Conv w1 (output channel 1 all zero) -> ``op`` -> Conv w2 -> y."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(4, 3, 1, 1)).astype(np.float32)
    w1[1] = 0
    w2 = rng.normal(size=(2, 4, 1, 1)).astype(np.float32)
    nodes = [
        h.make_node("Conv", ["x", "w1"], ["a"], name="conv1"),
        h.make_node("Relu", ["a"], ["r"], name="relu"),
        h.make_node(op, ["r"], ["b"], name="plugin_op", domain=domain),
        h.make_node("Conv", ["b", "w2"], ["y"], name="conv2"),
    ]
    graph = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 4, 4])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2, 4, 4])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    opsets = [h.make_opsetid("", 17)] + ([h.make_opsetid(domain, 1)] if domain else [])
    model = h.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _sizes(model: onnx.ModelProto) -> dict[str, list[int]]:
    return {t.name: list(t.dims) for t in model.graph.initializer}


def test_a_handler_for_an_op_without_one_makes_its_channels_prunable(own_handlers: None) -> None:
    """Sqrt has no built-in rule: it pins. With a plugin rule (sqrt(0) = 0) fold removes the
    zero channel through it, and onnxruntime gives the same outputs."""
    assert "Sqrt" not in HANDLERS
    model = _conv_op_conv("Sqrt")
    kept, report = onnxprune.run(model, ["fold"])
    assert _sizes(kept)["w1"][0] == 4
    assert any("not understood" in r for r in report["passes"][0]["blocked"])

    assert register_handler("Sqrt")(zero_preserving) is zero_preserving
    folded, report = onnxprune.run(model, ["fold"])
    assert _sizes(folded)["w1"] == [3, 3, 1, 1] and _sizes(folded)["w2"] == [2, 3, 1, 1]
    assert report["passes"][0]["verified"].startswith("outputs equal")
    x = {"x": np.random.default_rng(1).normal(size=(1, 3, 4, 4)).astype(np.float32)}
    np.testing.assert_allclose(run_model(folded, x)["y"], run_model(model, x)["y"], rtol=1e-5)


def _lowered(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with the custom ``FusedRelu`` replaced by the standard op it stands for."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.op_type == "FusedRelu":
            node.op_type, node.domain = "Relu", ""
    return out


def test_a_custom_domain_handler_is_keyed_domain_op(own_handlers: None) -> None:
    """``test.plugin::FusedRelu`` pins until a plugin registers it; then its channels form one
    group and fold removes the zero one. onnxruntime cannot run the custom op, so the outputs
    are compared on both models with the op lowered to the Relu it stands for."""
    model = _conv_op_conv("FusedRelu", "test.plugin")
    an = analyse(model, probe(model).shapes)
    assert any("custom domain 'test.plugin'" in r for g in an.groups() for r in g.reasons)

    @register_handler("test.plugin::FusedRelu")
    def fused_relu(an: Analysis, node: onnx.NodeProto) -> None:
        """FusedRelu is Relu: f(0) = 0 per element."""
        zero_preserving(an, node)

    assert HANDLERS[handler_key("FusedRelu", "test.plugin")] is fused_relu
    an = analyse(model, probe(model).shapes)
    (group,) = [g for g in an.groups() if any(s.node == "conv1" for s in g.spaces)]
    assert group.prunable and group.pinned == 0
    assert an.labels["b"].state.tolist() == [State.VAR, State.ZERO, State.VAR, State.VAR]

    folded, report = onnxprune.run(model, ["fold"])
    assert report["passes"][0]["channels_removed"] == 1
    assert _sizes(folded)["w1"] == [3, 3, 1, 1] and _sizes(folded)["w2"] == [2, 3, 1, 1]
    x = {"x": np.random.default_rng(2).normal(size=(1, 3, 4, 4)).astype(np.float32)}
    want = run_model(_lowered(model), x)["y"]
    np.testing.assert_allclose(run_model(_lowered(folded), x)["y"], want, rtol=1e-5, atol=1e-6)


def test_a_second_handler_for_an_op_is_an_error_naming_it(own_handlers: None) -> None:
    def other(an: Analysis, node: onnx.NodeProto) -> None:
        """Does nothing."""

    with pytest.raises(OnnxPruneError, match="'Relu'.*zero_preserving.*other"):
        register_handler("Relu")(other)
    with pytest.raises(OnnxPruneError, match="'Relu'"):
        register_handler("ai.onnx::Relu")(other)  # the default domain, spelt out
    assert HANDLERS["Relu"] is zero_preserving
    register_handler("Relu")(zero_preserving)  # the same function again is fine
    register_handler("my.dom::Relu")(other)  # another domain is another op
    assert HANDLERS["my.dom::Relu"] is other


@pytest.mark.parametrize("bad", [(), ("",), ("::Relu",), ("my.dom::",)])
def test_register_handler_rejects_malformed_op_types(bad: tuple[str, ...]) -> None:
    with pytest.raises(OnnxPruneError):
        register_handler(*bad)


def test_handler_keys_and_public_api() -> None:
    assert handler_key("Relu") == handler_key("Relu", "ai.onnx") == "Relu"
    assert handler_key("Gelu", "com.microsoft") == "com.microsoft::Gelu"
    assert onnxprune.register_handler is register_handler


def test_every_builtin_handler_is_public_and_states_its_rule() -> None:
    for key, fn in HANDLERS.items():
        assert not fn.__name__.startswith("_"), key
        assert fn.__doc__ and len(fn.__doc__.strip()) > 20, f"{key}: {fn.__name__} has no rule"
