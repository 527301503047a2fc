"""LSTM/GRU/RNN: the input features prune (the producer of X and W's columns), the hidden size
stays with its reason, and fold gives the zeroed model's outputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

import onnxprune
from onnxprune.analysis.probe import probe
from onnxprune.analysis.walk import analyse
from onnxprune.runner import run_model

h = onnx.helper
SEQ, BATCH, FEAT, MID, HIDDEN = 5, 2, 6, 8, 4
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _model(
    op: str = "LSTM", producer: str = "Gemm", zero: tuple[int, ...] = (), dirs: int = 1
) -> onnx.ModelProto:
    """A batch-first recurrent block, as torch writes one (batch N on axis 0 of every input).

    MatMul: x [N, SEQ, FEAT] -> MatMul + Add (MID) -> Relu -> Transpose -> [SEQ, N, MID].
    Gemm: x [N, FEAT] -> Gemm (MID) -> Relu -> Reshape [1, -1, MID] (one step).
    Then ``op`` with initial_h (and initial_c) from graph inputs h0/c0 [N, 1, HIDDEN]
    (transposed), outputs Y, Y_h (and Y_c). Producer columns ``zero`` are all zero, biases too.
    """
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(FEAT, MID)).astype(np.float32)
    b1 = rng.normal(size=(MID,)).astype(np.float32)
    w1[:, list(zero)] = 0
    b1[list(zero)] = 0
    g = GATES[op]
    w = rng.normal(size=(dirs, g * HIDDEN, MID)).astype(np.float32) * 0.5
    r = rng.normal(size=(dirs, g * HIDDEN, HIDDEN)).astype(np.float32) * 0.5
    b = rng.normal(size=(dirs, 2 * g * HIDDEN)).astype(np.float32) * 0.1
    arrays = {"w1": w1, "b1": b1, "W": w, "R": r, "B": b}
    arrays["shape"] = np.array([1, -1, MID], np.int64)
    inits = [numpy_helper.from_array(a, n) for n, a in arrays.items()]
    if producer == "Gemm":
        x = h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEAT])
        first = [
            h.make_node("Gemm", ["x", "w1", "b1"], ["p"], name="fc"),
            h.make_node("Relu", ["p"], ["a"], name="act"),
            h.make_node("Reshape", ["a", "shape"], ["seq"], name="to_seq"),
        ]
        steps = 1
    else:
        x = h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", SEQ, FEAT])
        first = [
            h.make_node("MatMul", ["x", "w1"], ["m"], name="fc"),
            h.make_node("Add", ["m", "b1"], ["p"], name="fc_bias"),
            h.make_node("Relu", ["p"], ["a"], name="act"),
            h.make_node("Transpose", ["a"], ["seq"], perm=[1, 0, 2], name="to_seq"),
        ]
        steps = SEQ
    state_in = ["h0", "c0"] if op == "LSTM" else ["h0"]
    outs = ["Y", "Y_h", "Y_c"] if op == "LSTM" else ["Y", "Y_h"]
    to_state = [h.make_node("Transpose", [n], [f"{n}_t"], perm=[1, 0, 2]) for n in state_in]
    rnn_in = ["seq", "W", "R", "B", "", *[f"{n}_t" for n in state_in]]
    direction = "bidirectional" if dirs == 2 else "forward"
    rnn = h.make_node(op, rnn_in, outs, hidden_size=HIDDEN, direction=direction, name="rnn")
    nodes = [*first, *to_state, rnn]
    state = [h.make_tensor_value_info(n, TensorProto.FLOAT, ["N", dirs, HIDDEN]) for n in state_in]
    graph = h.make_graph(
        nodes,
        "g",
        [x, *state],
        [h.make_tensor_value_info("Y", TensorProto.FLOAT, [steps, dirs, "N", HIDDEN])]
        + [h.make_tensor_value_info(n, TensorProto.FLOAT, [dirs, "N", HIDDEN]) for n in outs[1:]],
        inits,
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _feed(op: str, producer: str, seed: int = 3, dirs: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (BATCH, FEAT) if producer == "Gemm" else (BATCH, SEQ, FEAT)
    feed = {"x": rng.normal(size=shape).astype(np.float32)}
    for n in ("h0", "c0") if op == "LSTM" else ("h0",):
        feed[n] = rng.normal(size=(BATCH, dirs, HIDDEN)).astype(np.float32)
    return feed


def _dims(model: onnx.ModelProto) -> dict[str, list[int]]:
    return {t.name: list(t.dims) for t in model.graph.initializer}


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_input_features_are_a_sink_and_the_hidden_size_is_pinned(op: str) -> None:
    model = _model(op, "MatMul")
    an = analyse(model, probe(model).shapes)
    (sink,) = [s for s in an.sinks if s.node.op_type == op]
    assert (sink.tensor, sink.weight, sink.weight_axis) == ("seq", "W", 2)
    fc = next(g for g in an.groups() if any(s.node == "fc" for s in g.spaces))
    assert fc.prunable and fc.pinned == 0 and "W[axis 2]" in fc.members
    rnn = next(g for g in an.groups() if any(s.node == "rnn" for s in g.spaces))
    assert rnn.pinned == rnn.channels == HIDDEN
    assert rnn.reasons == [
        f"{op} rnn: {op} hidden size is part of the state interface (initial_h/initial_c, Y_h/Y_c)"
    ]


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("producer", ["Gemm", "MatMul"])
def test_vote_and_fold_remove_producer_channels_and_w_columns(op: str, producer: str) -> None:
    model = _model(op, producer)
    zeroed, _ = onnxprune.run(model, ["vote:sparsity=0.5,round_to=1"])
    folded, report = onnxprune.run(zeroed, ["fold"])
    section = report["passes"][0]
    assert section["channels_removed"] == MID // 2
    assert section["verified"].startswith("outputs equal")
    dims = _dims(folded)
    assert dims["w1"] == [FEAT, MID // 2] and dims["W"] == [1, GATES[op] * HIDDEN, MID // 2]
    assert dims["R"] == [1, GATES[op] * HIDDEN, HIDDEN]  # the hidden size stays
    feed = _feed(op, producer)
    want, got = run_model(zeroed, feed), run_model(folded, feed)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_a_constant_feature_folds_into_the_gate_bias(op: str) -> None:
    """Producer column 1 is zero but its bias is not: a constant feature of X. It goes, and
    its contribution W[:, :, 1] * value moves into the first half of B."""
    model = _model(op, "Gemm", zero=(1,))
    b1 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "b1")).copy()
    b1[1] = 0.7
    for t in model.graph.initializer:
        if t.name == "b1":
            t.CopyFrom(numpy_helper.from_array(b1, "b1"))
    folded, report = onnxprune.run(model, ["fold"])
    assert report["passes"][0]["channels_removed"] == 1
    assert _dims(folded)["W"][2] == MID - 1
    feed = _feed(op, "Gemm")
    want, got = run_model(model, feed), run_model(folded, feed)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)


def test_refit_skips_a_recurrent_consumer_with_a_reason() -> None:
    model = _model("LSTM", "Gemm")
    _, report = onnxprune.run(model, ["vote:sparsity=0.5,round_to=1", "refit"])
    refit = report["passes"][1]
    assert refit["skipped"] == {
        "rnn": "LSTM is not refitted: its output is not linear in X (gates and a recurrent state)"
    }


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_a_bidirectional_layer_loses_the_columns_of_both_directions(op: str) -> None:
    model = _model(op, "MatMul", zero=(0, 5), dirs=2)
    folded, report = onnxprune.run(model, ["fold"])
    assert report["passes"][0]["channels_removed"] == 2
    assert _dims(folded)["W"] == [2, GATES[op] * HIDDEN, MID - 2]
    feed = _feed(op, "MatMul", dirs=2)
    want, got = run_model(model, feed), run_model(folded, feed)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
