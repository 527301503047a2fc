"""Property-based tests of the ``fold`` pass on random CNNs with known zeroed channels.

The models come from :mod:`graphgen` (random valid opset-17 graphs whose generator records which
channels it zeroed); the hand-built regression tests at the bottom pin down one structure each.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnxprune

sys.path.insert(0, str(Path(__file__).resolve().parent))
import graphgen  # noqa: E402
from graphgen import CONST, VAR, Case, cases, fc_heads, pinned_cases, plain_chains  # noqa: E402

# FOLD_PROPERTY_EXAMPLES=500 for a longer hunt; the default keeps the file at a few seconds
EXAMPLES = int(os.environ.get("FOLD_PROPERTY_EXAMPLES", "40"))
PROPERTY = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


# -- helpers -------------------------------------------------------------------------------------
def fold(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """``onnxprune.run(model, ["fold"])``: the folded model and the fold report section."""
    new, report = onnxprune.run(model, ["fold"])
    section = report["passes"][0]
    assert section["pass"] == "fold"
    return new, section


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return session(model).run(["y"], {"x": x})[0]


def inputs(model: onnx.ModelProto, seed: int, n: int = 2) -> list[np.ndarray]:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(dims).astype(np.float32) for _ in range(n)]


def assert_close(ref: np.ndarray, got: np.ndarray, what: str = "") -> None:
    """Equal within rtol 1e-5 and atol 1e-5 * max(1, max|ref|)."""
    assert ref.shape == got.shape, (what, ref.shape, got.shape)
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * scale, err_msg=what)


def parameters(model: onnx.ModelProto) -> int:
    """Elements of float initializers and float Constant-node tensors (main graph)."""
    total = sum(
        int(np.prod(t.dims, dtype=np.int64))
        for t in model.graph.initializer
        if t.data_type in FLOAT_TYPES
    )
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type in FLOAT_TYPES:
                    total += int(np.prod(a.t.dims, dtype=np.int64))
    return total


def weight(model: onnx.ModelProto, node_name: str, index: int = 1) -> np.ndarray:
    """Input ``index`` of node ``node_name`` as an array (initializer or Constant node)."""
    node = next(n for n in model.graph.node if n.name == node_name)
    name = node.input[index]
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    const = next(n for n in model.graph.node if n.op_type == "Constant" and n.output[0] == name)
    return numpy_helper.to_array(const.attribute[0].t)


def explain(case: Case, section: dict[str, Any]) -> str:
    return f"{case!r}\nremoved={section['channels_removed']} blocked={section['blocked']}"


# -- the generator itself ------------------------------------------------------------------------
@PROPERTY
@given(
    st.one_of(
        cases(), plain_chains(), pinned_cases(), cases(pin=True), fc_heads(), cases(extra=True)
    )
)
def test_generator_ground_truth_holds(case: Case) -> None:
    """Channels the generator says are zero (constant) are exactly 0 (constant) in onnxruntime."""
    graphgen.check_ground_truth(case)


# -- 1 and 2: exact, valid, runnable -------------------------------------------------------------
def assert_fold_exact(case: Case, seed: int) -> None:
    new, section = fold(case.model)
    ref_sess, new_sess = session(case.model), session(new)
    for x in inputs(case.model, seed):
        ref = ref_sess.run(["y"], {"x": x})[0]
        got = new_sess.run(["y"], {"x": x})[0]
        assert_close(ref, got, explain(case, section))


@PROPERTY
@given(cases(), st.integers(0, 2**31 - 1))
def test_fold_is_exact(case: Case, seed: int) -> None:
    """The folded model computes the same outputs as the zeroed model, on random inputs."""
    assert_fold_exact(case, seed)


@PROPERTY
@given(fc_heads(), st.integers(0, 2**31 - 1))
def test_fold_is_exact_in_fc_heads(case: Case, seed: int) -> None:
    """Same, for constants folded into Gemm biases (any shape, alpha/beta) and MatMul + Add."""
    assert_fold_exact(case, seed)


@PROPERTY
@given(cases(extra=True, max_blocks=6), st.integers(0, 2**31 - 1))
def test_fold_is_exact_with_more_ops(case: Case, seed: int) -> None:
    """Same, with pooling, explicit Pad, channel Slice, Sub/Div, swish/PRelu, ConvTranspose,
    Resize, Clip bounds of shape [1], and Reshape / Reduce heads mixed in."""
    assert_fold_exact(case, seed)


@PROPERTY
@given(st.one_of(cases(), cases(pin=True), cases(extra=True)))
def test_folded_model_is_valid_onnx(case: Case) -> None:
    """onnx's full checker accepts the folded model and onnxruntime runs it."""
    new, _ = fold(case.model)
    onnx.checker.check_model(new, full_check=True)
    y = run(new, inputs(new, 0, 1)[0])
    assert y.shape == tuple(
        d.dim_value for d in case.model.graph.output[0].type.tensor_type.shape.dim
    )
    assert np.isfinite(y).all()


# -- 3: parameter count --------------------------------------------------------------------------
@PROPERTY
@given(st.one_of(cases(), cases(pin=True), cases(extra=True)))
def test_fold_never_adds_parameters(case: Case) -> None:
    """Float parameters never grow, and shrink whenever a channel goes."""
    new, section = fold(case.model)
    before, after = parameters(case.model), parameters(new)
    assert after <= before, explain(case, section)
    if section["channels_removed"]:
        assert after < before, explain(case, section)


def expected_plain_chain(case: Case) -> tuple[int, int]:
    """(parameters, channels removed) after folding a ``plain_chains`` case, by hand.

    Every zeroed channel goes (exactly-zero ones anywhere, constant ones only feed 1x1 convs or
    the head). A constant that is not exactly 0 is moved into its consumer's bias, which is
    created when the consumer has none (a Gemm gets a C; a MatMul its bias Add, or a new one).
    """
    need = {layer["input"] for layer in case.layers if "input" in layer}
    x = inputs(case.model, 0, 1)[0]
    values = graphgen.run_all(case.model, x, sorted(need - {"x"}))
    total, removed = 0, 0
    kept = None  # channels of the current activation that stay
    for layer in case.layers:
        op = layer["op"]
        if op in ("conv", "fc"):
            state = layer["in_state"]
            cin = sum(s == VAR for s in state)
            value = values.get(layer["input"])
            consts = [i for i, s in enumerate(state) if s == CONST]
            nonzero_const = value is not None and any(np.abs(value[:, i]).max() > 0 for i in consts)
            n_out = layer["cout"] if op == "conv" else layer["n"]
            kept = n_out - len(layer["zero"])
            removed += len(layer["zero"])
            if op == "conv":
                total += kept * cin * layer["k"] ** 2
                total += kept * (layer["conv_bias"] or nonzero_const)  # Conv bias, maybe new
                total += kept * layer["paddle"]  # the Add [1, C, 1, 1] after it
            else:
                total += kept * cin
                bias = layer["bias"]
                own = {"n": kept, "1n": kept, "1": 1, "scalar": 1, "none": 0}[bias]
                # a constant goes into C (Gemm) or the Add bias after the MatMul (a new Add
                # when there is none), which then has one entry per output
                total += kept if nonzero_const else own
        elif op == "bn":
            total += 4 * kept
        elif op == "chan":
            total += kept
        elif op == "act" and layer["type"] == "Clip":
            total += 2
    return total, removed


@PROPERTY
@given(plain_chains())
def test_plain_chain_parameter_count_is_exact(case: Case) -> None:
    """Conv -> [BN] -> act -> Conv ... chains: every zeroed channel goes, nothing else."""
    params, removed = expected_plain_chain(case)
    new, section = fold(case.model)
    assert (section["channels_removed"], parameters(new)) == (removed, params), explain(
        case, section
    )
    for layer in case.layers:
        if layer["op"] == "conv":
            assert weight(new, layer["name"]).shape[0] == layer["cout"] - len(layer["zero"]), (
                explain(case, section)
            )
    x = inputs(case.model, 1, 1)[0]
    assert_close(run(case.model, x), run(new, x), explain(case, section))


# -- 4: idempotent -------------------------------------------------------------------------------
@PROPERTY
@given(st.one_of(cases(), cases(pin=True), cases(extra=True)))
def test_fold_is_idempotent(case: Case) -> None:
    """Folding a folded model finds nothing more to do."""
    once, first = fold(case.model)
    twice, second = fold(once)
    assert second["channels_removed"] == 0, explain(case, first) + f"\nsecond: {second['blocked']}"
    assert second["modified"] is False
    assert parameters(twice) == parameters(once)


# -- 5: unknown ops pin their channels, the rest still folds --------------------------------------
@PROPERTY
@given(pinned_cases(), st.integers(0, 2**31 - 1))
def test_unknown_op_pins_its_channels_only(case: Case, seed: int) -> None:
    """conv(zeroed) -> Softmax(axis=1) / Einsum / TopK(axis=1) -> conv(zeroed) -> ... -> head:
    the first conv keeps all its channels (blocked by the op), the second loses its zeroed ones.
    """
    new, section = fold(case.model)
    (pinned,), (pin_op,) = case.pinned, case.pin_ops
    first, second = case.layers[0], case.layers[1]
    assert first["name"] == pinned and first["zero"], case
    # the pinned conv keeps every output channel, zeroed or not, and the report says why
    assert weight(new, pinned).shape == weight(case.model, pinned).shape, explain(case, section)
    assert any(k.startswith(pin_op + ":") for k in section["blocked"]), explain(case, section)
    # the conv after the unknown op is another group: its zeroed channels go
    assert second["zero"]
    assert weight(new, second["name"]).shape[0] == second["cout"] - len(second["zero"]), explain(
        case, section
    )
    assert section["channels_removed"] >= len(second["zero"])
    for x in inputs(case.model, seed):
        assert_close(run(case.model, x), run(new, x), explain(case, section))


# -- hand-built regressions ----------------------------------------------------------------------
RNG_SEED = 1234


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.normal(0.0, 0.5, shape).astype(np.float32)


def _graph(
    nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], c_in: int, k: int
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "hand",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, k])],
        initializer=[numpy_helper.from_array(v, n) for n, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _conv(name: str, x: str, k: int = 1, bias: bool = True) -> onnx.NodeProto:
    ins = [x, f"{name}_W"] + ([f"{name}_B"] if bias else [])
    return helper.make_node("Conv", ins, [name], name=name, kernel_shape=[k, k], pads=[k // 2] * 4)


def _head(x: str) -> list[onnx.NodeProto]:
    return [
        helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc_W", "fc_B"], ["y"], name="fc"),
    ]


def _check_exact(model: onnx.ModelProto, new: onnx.ModelProto) -> None:
    onnx.checker.check_model(new, full_check=True)
    for x in inputs(model, 7, 3):
        assert_close(run(model, x), run(new, x))


@pytest.mark.parametrize("same_channel", [True, False])
def test_residual_stream_zeroed_in_both_branches(same_channel: bool) -> None:
    """x -> a; a + c(relu(b(a))): channel 1 zero in a and in c -> removed; in a only -> kept."""
    rng = np.random.default_rng(RNG_SEED)
    inits = {
        "a_W": _w(rng, 4, 3, 1, 1),
        "a_B": _w(rng, 4),
        "b_W": _w(rng, 4, 4, 3, 3),
        "b_B": _w(rng, 4),
        "c_W": _w(rng, 4, 4, 1, 1),
        "c_B": _w(rng, 4),
        "fc_W": _w(rng, 4, 2),
        "fc_B": _w(rng, 2),
    }
    inits["a_W"][1] = inits["a_B"][1] = 0.0
    zc = 1 if same_channel else 2
    inits["c_W"][zc] = inits["c_B"][zc] = 0.0
    nodes = [
        _conv("a", "x"),
        _conv("b", "a", 3),
        helper.make_node("Relu", ["b"], ["r"], name="relu"),
        _conv("c", "r"),
        helper.make_node("Add", ["a", "c"], ["s"], name="res"),
        *_head("s"),
    ]
    model = _graph(nodes, inits, 3, 2)
    new, section = fold(model)
    _check_exact(model, new)
    if same_channel:
        assert section["channels_removed"] == 1
        assert weight(new, "a").shape == (3, 3, 1, 1)
        assert weight(new, "b").shape == (4, 3, 3, 3)
        assert weight(new, "c").shape == (3, 4, 1, 1)
        assert weight(new, "fc").shape == (3, 2)
        np.testing.assert_array_equal(weight(new, "fc"), inits["fc_W"][[0, 2, 3]])
    else:
        assert section["channels_removed"] == 0
        assert weight(new, "a").shape == (4, 3, 1, 1)


def test_concat_offsets_after_removing_channels_of_one_branch() -> None:
    """Concat(a[3], b[4]) with b's channels 1 and 3 zero: the consumer keeps columns 0,1,2,3,5."""
    rng = np.random.default_rng(RNG_SEED)
    inits = {
        "a_W": _w(rng, 3, 2, 3, 3),
        "a_B": _w(rng, 3),
        "b_W": _w(rng, 4, 2, 1, 1),
        "b_B": _w(rng, 4),
        "d_W": _w(rng, 5, 7, 1, 1),
        "d_B": _w(rng, 5),
        "fc_W": _w(rng, 5, 3),
        "fc_B": _w(rng, 3),
    }
    for ch in (1, 3):
        inits["b_W"][ch] = inits["b_B"][ch] = 0.0
    nodes = [
        _conv("a", "x", 3),
        _conv("b", "x"),
        helper.make_node("Concat", ["a", "b"], ["cat"], name="cat", axis=1),
        _conv("d", "cat"),
        *_head("d"),
    ]
    model = _graph(nodes, inits, 2, 3)
    new, section = fold(model)
    _check_exact(model, new)
    assert section["channels_removed"] == 2
    np.testing.assert_array_equal(weight(new, "b"), inits["b_W"][[0, 2]])
    np.testing.assert_array_equal(weight(new, "d"), inits["d_W"][:, [0, 1, 2, 3, 5]])
    np.testing.assert_array_equal(weight(new, "a"), inits["a_W"])


def test_split_sizes_rewritten() -> None:
    """a[5] (channels 1, 3 zero) -> Split [2, 3] -> convs -> Concat: split sizes become [1, 2]."""
    rng = np.random.default_rng(RNG_SEED)
    inits = {
        "a_W": _w(rng, 5, 3, 3, 3),
        "a_B": _w(rng, 5),
        "p_W": _w(rng, 3, 2, 1, 1),
        "p_B": _w(rng, 3),
        "q_W": _w(rng, 2, 3, 3, 3),
        "q_B": _w(rng, 2),
        "sizes": np.array([2, 3], np.int64),
        "fc_W": _w(rng, 5, 2),
        "fc_B": _w(rng, 2),
    }
    for ch in (1, 3):
        inits["a_W"][ch] = inits["a_B"][ch] = 0.0
    nodes = [
        _conv("a", "x", 3),
        helper.make_node("Split", ["a", "sizes"], ["s0", "s1"], name="split", axis=1),
        _conv("p", "s0"),
        _conv("q", "s1", 3),
        helper.make_node("Concat", ["p", "q"], ["cat"], name="cat", axis=1),
        *_head("cat"),
    ]
    model = _graph(nodes, inits, 3, 2)
    new, section = fold(model)
    _check_exact(model, new)
    assert section["channels_removed"] == 2
    assert weight(new, "split").tolist() == [1, 2]
    np.testing.assert_array_equal(weight(new, "p"), inits["p_W"][:, [0]])
    np.testing.assert_array_equal(weight(new, "q"), inits["q_W"][:, [0, 2]])


def test_nhwc_matmul_rows_removed() -> None:
    """conv[4] (channel 2 zero) -> Transpose NHWC -> MatMul W[4, 5] + Add -> back: W loses row 2."""
    rng = np.random.default_rng(RNG_SEED)
    inits = {
        "a_W": _w(rng, 4, 3, 3, 3),
        "a_B": _w(rng, 4),
        "m_W": _w(rng, 4, 5),
        "m_B": _w(rng, 5),
        "fc_W": _w(rng, 5, 2),
        "fc_B": _w(rng, 2),
    }
    inits["a_W"][2] = inits["a_B"][2] = 0.0
    nodes = [
        _conv("a", "x", 3),
        helper.make_node("Transpose", ["a"], ["t"], name="to_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["t", "m_W"], ["m"], name="m"),
        helper.make_node("Add", ["m", "m_B"], ["mb"], name="m_add"),
        helper.make_node("Transpose", ["mb"], ["back"], name="to_nchw", perm=[0, 3, 1, 2]),
        *_head("back"),
    ]
    model = _graph(nodes, inits, 3, 2)
    new, section = fold(model)
    _check_exact(model, new)
    assert section["channels_removed"] == 1
    np.testing.assert_array_equal(weight(new, "m"), inits["m_W"][[0, 1, 3]])
    assert weight(new, "a").shape == (3, 3, 3, 3)


@pytest.mark.parametrize("k", [1, 3])
def test_bn_shift_of_zero_channel_folds_into_unpadded_conv_only(k: int) -> None:
    """conv[4] (channel 1 zero) -> BN (shift 0.7 on it) -> conv k x k.

    1x1: the constant BN output goes into the next bias, exactly. 3x3 with padding: the border
    sees 0 instead of the constant, so the channel stays and ``blocked`` says why.
    """
    rng = np.random.default_rng(RNG_SEED)
    inits = {
        "a_W": _w(rng, 4, 3, 3, 3),
        "a_B": _w(rng, 4),
        "bn_s": _w(rng, 4),
        "bn_b": _w(rng, 4),
        "bn_m": _w(rng, 4),
        "bn_v": rng.uniform(0.5, 1.5, 4).astype(np.float32),
        "d_W": _w(rng, 3, 4, k, k),
        "d_B": _w(rng, 3),
        "fc_W": _w(rng, 3, 2),
        "fc_B": _w(rng, 2),
    }
    inits["a_W"][1] = inits["a_B"][1] = 0.0
    inits["bn_b"][1] = 0.7
    nodes = [
        _conv("a", "x", 3),
        helper.make_node(
            "BatchNormalization", ["a", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"], name="bn"
        ),
        _conv("d", "bn", k),
        *_head("d"),
    ]
    model = _graph(nodes, inits, 3, 2)
    new, section = fold(model)
    _check_exact(model, new)
    eps = 1e-5
    v = (
        inits["bn_s"][1] * (0 - inits["bn_m"][1]) / np.sqrt(inits["bn_v"][1] + eps)
        + inits["bn_b"][1]
    )
    if k == 1:
        assert section["channels_removed"] == 1
        assert weight(new, "a").shape == (3, 3, 3, 3)
        assert weight(new, "d").shape == (3, 3, 1, 1)
        expected_bias = inits["d_B"] + v * inits["d_W"][:, 1, 0, 0]
        np.testing.assert_allclose(weight(new, "d", 2), expected_bias, rtol=1e-5, atol=1e-6)
    else:
        assert section["channels_removed"] == 0
        assert weight(new, "a").shape == (4, 3, 3, 3)
        assert any("zero-pads" in reason for reason in section["blocked"]), section["blocked"]


def test_custom_domain_op_pins_its_inputs_and_exact_zeros_still_go() -> None:
    """conv a (channel 1 zero) -> com.example:Mystery -> conv b (channel 2 zero) -> head.

    onnxruntime cannot run the model, so fold has no probe values: it may still remove channels
    that are provably exactly zero (b's), never a's (pinned by the custom-domain op).
    """
    rng = np.random.default_rng(RNG_SEED)
    inits = {
        "a_W": _w(rng, 4, 3, 1, 1),
        "a_B": _w(rng, 4),
        "b_W": _w(rng, 4, 4, 3, 3),
        "b_B": _w(rng, 4),
        "fc_W": _w(rng, 4, 2),
        "fc_B": _w(rng, 2),
    }
    inits["a_W"][1] = inits["a_B"][1] = 0.0
    inits["b_W"][2] = inits["b_B"][2] = 0.0
    nodes = [
        _conv("a", "x"),
        helper.make_node("Mystery", ["a"], ["m"], name="mystery", domain="com.example"),
        _conv("b", "m", 3),
        *_head("b"),
    ]
    graph = helper.make_graph(
        nodes,
        "hand",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        initializer=[numpy_helper.from_array(v, n) for n, v in inits.items()],
        value_info=[helper.make_tensor_value_info("m", TensorProto.FLOAT, [1, 4, 8, 8])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    new, section = fold(model)
    onnx.checker.check_model(new)
    assert section["channels_removed"] == 1
    np.testing.assert_array_equal(weight(new, "a"), inits["a_W"])
    np.testing.assert_array_equal(weight(new, "b"), inits["b_W"][[0, 1, 3]])
    np.testing.assert_array_equal(weight(new, "fc"), inits["fc_W"][[0, 1, 3]])
    assert any("custom domain" in k for k in section["blocked"]), section["blocked"]


# -- regressions: bugs the properties (or reading groups.py) turned up -------------------------
@pytest.mark.parametrize("op", ["Add", "Mul"])
def test_rank0_constant_on_a_one_channel_tensor(op: str) -> None:
    """x[1, 4] -> MatMul W[4, 1] -> Add/Mul a rank-0 constant -> y[1, 1] (a one-logit head).

    The rank-0 constant broadcasts; it must not be taken for a per-channel member (the analysis
    used to compute ``axis % arr.ndim`` with ``ndim == 0`` and crash with ZeroDivisionError).
    The same crash hits any tensor that folding shrinks to one channel before such an op.
    """
    rng = np.random.default_rng(RNG_SEED)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["t"], name="mm"),
        helper.make_node(op, ["t", "b"], ["y"], name="bias"),
    ]
    inits = {"W": _w(rng, 4, 1), "b": np.array(0.5, np.float32)}
    graph = helper.make_graph(
        nodes,
        "hand",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
        initializer=[numpy_helper.from_array(v, n) for n, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    new, section = fold(model)
    assert section["channels_removed"] == 0
    x = rng.standard_normal((1, 4)).astype(np.float32)
    assert_close(run(model, x), run(new, x))


@pytest.mark.parametrize("c_shape", [(1,), ()])
def test_constant_into_broadcast_gemm_bias_while_its_outputs_shrink(
    c_shape: tuple[int, ...],
) -> None:
    """conv[3] (channel 1 zero) -> BN (shift: constant) -> GAP -> Gemm g1 (C broadcast [1] or
    scalar; output column 0 zero, so a constant) -> Gemm g2.

    One round removes conv channel 1 (its constant goes into g1's C, which then needs one entry
    per output) and g1's output 0 (its constant goes into g2's C). g1's new C must be sliced with
    g1's outputs: it used to stay [4] while g1 kept 3 outputs, and onnxruntime refused the model
    ("Gemm: Invalid bias shape for broadcast").
    """
    rng = np.random.default_rng(RNG_SEED)
    inits = {
        "a_W": _w(rng, 3, 2, 1, 1),
        "a_B": _w(rng, 3),
        "bn_s": _w(rng, 3),
        "bn_b": _w(rng, 3),
        "bn_m": _w(rng, 3),
        "bn_v": np.ones(3, np.float32),
        "g1_W": _w(rng, 3, 4),
        "g1_C": np.full(c_shape, 0.3, np.float32),
        "fc_W": _w(rng, 4, 2),
        "fc_B": _w(rng, 2),
    }
    inits["a_W"][1] = inits["a_B"][1] = 0.0
    inits["g1_W"][:, 0] = 0.0
    nodes = [
        _conv("a", "x"),
        helper.make_node(
            "BatchNormalization", ["a", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"], name="bn"
        ),
        helper.make_node("GlobalAveragePool", ["bn"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "g1_W", "g1_C"], ["g1"], name="g1"),
        helper.make_node("Gemm", ["g1", "fc_W", "fc_B"], ["y"], name="fc"),
    ]
    model = _graph(nodes, inits, 2, 2)
    new, section = fold(model)
    _check_exact(model, new)
    assert section["channels_removed"] == 2
    assert weight(new, "g1").shape == (2, 3)
    assert weight(new, "g1", 2).shape in ((3,), (1, 3))


def test_clip_bounds_of_shape_one() -> None:
    """Clip(0, 6) with min/max of shape [1] (the spec says scalars; onnx's checker and
    onnxruntime accept [1], and exporters write it): fold must not crash.

    It crashed in the channel analysis (``float(lo)`` on a 1-element array: "only 0-dimensional
    arrays can be converted to Python scalars" with NumPy 2) on any model with such a Clip.
    """
    rng = np.random.default_rng(RNG_SEED)
    inits = {
        "a_W": _w(rng, 3, 2, 1, 1),
        "a_B": _w(rng, 3),
        "lo": np.array([0.0], np.float32),
        "hi": np.array([6.0], np.float32),
        "fc_W": _w(rng, 3, 2),
        "fc_B": _w(rng, 2),
    }
    inits["a_W"][1] = inits["a_B"][1] = 0.0
    nodes = [
        _conv("a", "x"),
        helper.make_node("Clip", ["a", "lo", "hi"], ["c"], name="clip"),
        *_head("c"),
    ]
    model = _graph(nodes, inits, 2, 2)
    new, section = fold(model)
    _check_exact(model, new)
    assert section["channels_removed"] == 1
    assert weight(new, "fc").shape == (2, 2)


def test_reshape_that_drops_the_batch_axis_follows_the_channels() -> None:
    """conv[4] (channel 1 zero) -> Reshape [-1] -> Unsqueeze [0] -> Gemm [256, 2].

    The Reshape spreads each channel over 64 features of a 1-D tensor, as Flatten does; the
    zeroed channel should go with its 64 Gemm rows. ``groups._merge_map`` starts its table of
    output boundaries at ``{0: 0}`` (the empty product is 1), so it finds no merge when the
    output has no batch axis, and pins: "Reshape: splits the channel axis".
    """
    rng = np.random.default_rng(RNG_SEED)
    inits = {
        "a_W": _w(rng, 4, 3, 1, 1),
        "a_B": _w(rng, 4),
        "shape": np.array([-1], np.int64),
        "axes": np.array([0], np.int64),
        "fc_W": _w(rng, 256, 2),
        "fc_B": _w(rng, 2),
    }
    inits["a_W"][1] = inits["a_B"][1] = 0.0
    nodes = [
        _conv("a", "x"),
        helper.make_node("Reshape", ["a", "shape"], ["r"], name="reshape"),
        helper.make_node("Unsqueeze", ["r", "axes"], ["flat"], name="unsqueeze"),
        helper.make_node("Gemm", ["flat", "fc_W", "fc_B"], ["y"], name="fc"),
    ]
    model = _graph(nodes, inits, 3, 2)
    new, section = fold(model)
    _check_exact(model, new)
    assert section["channels_removed"] == 1, section["blocked"]
    np.testing.assert_array_equal(
        weight(new, "fc"), np.delete(inits["fc_W"], np.s_[64:128], axis=0)
    )


def test_one_channel_tensor_is_not_reported_as_split_by_flatten() -> None:
    """conv[2] (channel 0 zero) -> GAP -> Flatten -> Gemm: after folding, conv has 1 channel.

    Folding the folded model must not blame Flatten [1, 1, 1, 1] -> [1, 1] for "splitting the
    channel axis" (``_merge_map`` loses the boundary when the channel axis has size 1); the one
    channel stays because it is the last one of its tensor.
    """
    rng = np.random.default_rng(RNG_SEED)
    inits = {
        "a_W": _w(rng, 2, 3, 1, 1),
        "a_B": _w(rng, 2),
        "fc_W": _w(rng, 2, 2),
        "fc_B": _w(rng, 2),
    }
    inits["a_W"][0] = inits["a_B"][0] = 0.0
    model = _graph([_conv("a", "x"), *_head("a")], inits, 3, 2)
    once, first = fold(model)
    assert first["channels_removed"] == 1
    _, second = fold(once)
    assert second["channels_removed"] == 0
    assert not any("splits the channel axis" in k for k in first["blocked"]), first["blocked"]
    assert not any("splits the channel axis" in k for k in second["blocked"]), second["blocked"]
