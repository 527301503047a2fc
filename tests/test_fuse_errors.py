"""Adapters (which mapping, and that its nodes move the data as said) and the fuse pass's
errors: each a one-line message naming the member and the shapes, exit 2."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import MODELS, build_model, ort_run, tiny_linear
from conftest import invoke as cli
from onnx import TensorProto, helper

import onnxprune
from onnxprune.errors import PassOptionError, UnsupportedModelError
from onnxprune.fusion.adapters import plan_adapter

DIGITS = MODELS / "digits"
CNN = DIGITS / "torch_cnn.onnx"


def apply(adapter, x: np.ndarray, opset: int = 17) -> np.ndarray:
    """Run the adapter's nodes on ``x`` in onnxruntime."""
    nodes, inits = adapter.nodes("x", "y", "m/", opset)
    graph = helper.make_graph(
        nodes,
        "adapter",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return ort_run(model, {"x": x})["y"]


X = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)


@pytest.mark.parametrize(
    ("fused", "member", "expect"),
    [
        (["N", 3, 4, 5], ["n", 4, 5, 3], lambda x: x.transpose(0, 2, 3, 1)),  # NCHW -> NHWC
        (["N", 4, 5, 3], ["n", 3, 4, 5], lambda x: x.transpose(0, 3, 1, 2)),  # NHWC -> NCHW
        (["N", 1, 4, 5], ["N", 4, 5], lambda x: x[:, 0]),  # squeezed channel axis
        (["N", 4, 5], ["N", 1, 4, 5], lambda x: x[:, None]),
        (["N", 1, 4, 5], ["N", 4, 5, 1], lambda x: x[:, 0, :, :, None]),  # NHWC with C = 1
        (["N", 3, 4, 5], ["N", 3, 4, 5], lambda x: x),
        (["N", "C", "H", "W"], ["N", "H", "W", "C"], lambda x: x.transpose(0, 2, 3, 1)),
    ],
)
@pytest.mark.parametrize("opset", [11, 17])
def test_the_adapter_moves_the_data_as_the_layouts_say(fused, member, expect, opset):
    x = X[:, :1] if fused[1] == 1 else X
    x = x[:, 0] if len(fused) == 3 else x
    x = x.transpose(0, 2, 3, 1) if fused == ["N", 4, 5, 3] else x
    adapter = plan_adapter("m.onnx", "x", fused, member)
    got = apply(adapter, x, opset) if not adapter.empty else x
    np.testing.assert_array_equal(got, expect(x))
    assert adapter.empty == (fused == member)


def test_ambiguous_and_impossible_mappings_name_the_member_and_both_shapes():
    with pytest.raises(UnsupportedModelError, match="ambiguous") as err:
        plan_adapter("b.onnx", "x", ["N", "C", "H", "W"], ["n", "h", "w", "c"])
    msg = str(err.value)
    assert "member b.onnx" in msg and "[n, h, w, c]" in msg and "[N, C, H, W]" in msg
    assert "layout=b.onnx:" in msg and "\n" not in msg
    with pytest.raises(UnsupportedModelError, match="no layout change") as err:
        plan_adapter("b.onnx", "x", ["N", 1, 8, 8], ["N", 64])
    assert "[N, 64]" in str(err.value) and "[N, 1, 8, 8]" in str(err.value)


def test_a_mapping_set_by_hand_wins_and_is_checked():
    a = plan_adapter("b.onnx", "x", ["N", "C", "H", "W"], ["n", "h", "w", "c"], "nhwc")
    np.testing.assert_array_equal(apply(a, X), X.transpose(0, 2, 3, 1))
    assert a.how.endswith("(set by hand)")
    b = plan_adapter("b.onnx", "x", ["N", "C", "H", "W"], ["n", "h", "w", "c"], "0.3.2.1")
    np.testing.assert_array_equal(apply(b, X), X.transpose(0, 3, 2, 1))
    with pytest.raises(PassOptionError, match="not nhwc, nchw, same or a permutation"):
        plan_adapter("b.onnx", "x", ["N", 3, 4, 5], ["N", 4, 5, 3], "0.1.1.2")
    with pytest.raises(PassOptionError, match="does not fit"):
        plan_adapter("b.onnx", "x", ["N", 3, 4, 5], ["N", 4, 5, 3], "nchw")


def one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("Error: "), err
    assert "internal error" not in err and "bug" not in err
    return err


def test_a_missing_or_unreadable_member_is_one_line(tmp_path):
    out = tmp_path / "o.onnx"
    err = one_line_error(cli(CNN, "-p", f"fuse:members={tmp_path / 'nope.onnx'}", "-o", out))
    assert f"pass fuse: member {tmp_path / 'nope.onnx'}: no such file" in err
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model at all")
    err = one_line_error(cli(CNN, "-p", f"fuse:members={junk}", "-o", out))
    assert f"member {junk}" in err and "not an ONNX model" in err
    assert not out.exists()


def save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, path)
    return str(path)


def test_incompatible_inputs_and_outputs_are_one_line(tmp_path):
    linear = save(tiny_linear(), tmp_path / "linear.onnx")
    err = one_line_error(cli(CNN, "-p", f"fuse:members={linear}", "-o", tmp_path / "o.onnx"))
    assert f"member {linear}" in err and "[2, 4]" in err and "[N, 1, 8, 8]" in err
    five = build_model(  # reads the CNN's input, but has 5 classes, not 10
        [
            helper.make_node("Flatten", ["input"], ["f"]),
            helper.make_node("MatMul", ["f", "W"], ["y"]),
        ],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        {"W": np.ones((64, 5), np.float32)},
    )
    path = save(five, tmp_path / "five.onnx")
    err = one_line_error(cli(CNN, "-p", f"fuse:members={path}", "-o", tmp_path / "o.onnx"))
    assert f"member {path}" in err and "[N, 5]" in err and "class counts differ" in err
    result = cli(CNN, "-p", f"fuse:members={path},combine=concat", "-o", tmp_path / "o.onnx")
    assert result.exit_code == 0, result.stderr  # side by side, any class count


def symbolic(layout: str) -> onnx.ModelProto:
    """x (all dims named) -> mean over the spatial axes -> y[N, C]."""
    axes = [2, 3] if layout == "nchw" else [1, 2]
    dims = ["N", "C", "H", "W"] if layout == "nchw" else ["n", "h", "w", "c"]
    return build_model(
        [helper.make_node("ReduceMean", ["x"], ["y"], axes=axes, keepdims=0)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [dims[0], "K"])],
        {},
    )


def test_an_ambiguous_member_is_refused_until_the_layout_is_given(tmp_path):
    first = save(symbolic("nchw"), tmp_path / "first.onnx")
    member = save(symbolic("nhwc"), tmp_path / "member.onnx")
    x = np.random.default_rng(1).standard_normal((6, 3, 4, 5)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    common = ("--data", tmp_path / "d.npz", "-o", tmp_path / "o.onnx")
    err = one_line_error(cli(first, "-p", f"fuse:members={member}", *common))
    assert "ambiguous" in err and f"member {member}" in err and "[n, h, w, c]" in err
    err = one_line_error(cli(first, "-p", f"fuse:members={member},layout=other:nhwc", *common))
    assert "names no member" in err
    result = cli(first, "-p", f"fuse:members={member},layout=member.onnx:nhwc", *common)
    assert result.exit_code == 0, result.stderr
    (got,) = ort_run(tmp_path / "o.onnx", {"x": x}).values()

    def soft(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    mean = x.mean(axis=(2, 3))  # both members compute it, each in its own layout
    np.testing.assert_allclose(got, soft(mean), atol=1e-6)


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        ("fuse", "give the other models"),
        ("fuse:members={m},weights=1+1", "weights= is for combine=weighted or vote"),
        ("fuse:members={m},combine=weighted,weights=1+1+1", "gives 3 weight(s) for 2 models"),
        ("fuse:members={m},combine=concat,select=forward", "select= needs combine=mean"),
        ("fuse:members={m},combine=concat,label=true", "label=true is for combine=mean"),
        ("fuse:members={m},select=backward", "select= needs evaluation data"),
        ("fuse:members={m},combine=weighted", "fits them on --data's labels"),
    ],
)
def test_bad_options_are_one_line(spec, text, tmp_path):
    spec = spec.format(m=DIGITS / "keras_cnn.onnx")
    err = one_line_error(cli(CNN, "-p", spec, "-o", tmp_path / "o.onnx"))
    assert text in err


def test_weighted_without_labels_says_so(tmp_path):
    with np.load(DIGITS / "torch_cnn.calib.npz") as npz:
        np.savez(tmp_path / "d.npz", input=npz["input"])
    spec = f"fuse:members={DIGITS / 'keras_cnn.onnx'},combine=weighted"
    err = one_line_error(cli(CNN, "-p", spec, "--data", tmp_path / "d.npz"))
    assert "which has none" in err and "weights=" in err


def test_combine_weights_of_identical_checkpoints_gives_the_checkpoint():
    """combine=weights is weight-space fusion: a checkpoint merged with itself comes back."""
    merged, _ = onnxprune.run(CNN, [f"fuse:members={CNN},combine=weights"], device="cpu")
    with np.load(DIGITS / "torch_cnn.test.npz") as npz:
        feeds = {"input": npz["input"]}
    (want,) = ort_run(CNN, feeds).values()
    (got,) = ort_run(merged, feeds).values()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_combine_weights_with_data_repairs_and_matches_activations(tmp_path):
    """With --data the merge is REPAIRed and may align by activations; without, that is refused."""
    seed = DIGITS / "torch_cnn_seed1.onnx"
    spec = f"fuse:members={seed},combine=weights,match=activations"
    err = one_line_error(cli(CNN, "-p", spec, "-o", tmp_path / "o.onnx"))
    assert "match=activations needs --data" in err
    report = tmp_path / "r.json"
    out = tmp_path / "m.onnx"
    calib = DIGITS / "torch_cnn.calib.npz"
    res = cli(CNN, "-p", spec, "--data", calib, "-o", out, "--report", report, "-q")
    assert res.exit_code == 0, res.stderr
    section = json.loads(report.read_text())["passes"][0]
    assert section["repair"] is True and section["match"] == "activations"
    assert out.exists()
