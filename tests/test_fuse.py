"""The fuse pass on the digits models: each combination equals the members' outputs combined in
numpy (members run on their own, each on its own layout of the same images), adapters give each
branch exactly its standalone output, opsets and domains are reconciled."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from conftest import MODELS, ort_run

import onnxprune

DIGITS = MODELS / "digits"
NAMES = ["torch_cnn", "keras_cnn", "torch_encoder"]  # NCHW, NHWC, [N, 8, 8]
TOL = 1e-6
# raw logits (up to ~12) of a member converted from opset 17 to 20 differ from its own run by an
# ulp or two: onnxruntime picks other kernels at opset 20 (none without its optimisations)
RAW = {"atol": TOL, "rtol": TOL}


def path(name: str) -> str:
    return str(DIGITS / f"{name}.onnx")


def images(name: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(DIGITS / f"{name}.test.npz") as npz:
        return npz["input"], npz["labels"]


def standalone(name: str) -> np.ndarray:
    """The member's own output on the test images in its own layout (float64)."""
    x, _ = images(name)
    (out,) = ort_run(path(name), {"input": x}).values()
    return out.astype(np.float64)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def fuse(first: str, spec: str, **kwargs) -> tuple[onnx.ModelProto, dict]:
    others = "+".join(path(n) for n in NAMES if n != first)
    model, report = onnxprune.run(
        path(first),
        [f"fuse:members={others}{spec}"],
        data=DIGITS / f"{first}.calib.npz",
        device="cpu",
        **kwargs,
    )
    onnx.checker.check_model(model, full_check=True)
    return model, report["passes"][0]


def fused_run(model: onnx.ModelProto, first: str) -> dict[str, np.ndarray]:
    x, _ = images(first)
    return ort_run(model, {"input": x})


def order(first: str) -> list[str]:
    return [first] + [n for n in NAMES if n != first]


def test_mean_is_the_mean_of_the_members_probabilities():
    model, section = fuse("torch_cnn", ",combine=mean")
    want = np.mean([softmax(standalone(n)) for n in order("torch_cnn")], axis=0)
    got = fused_run(model, "torch_cnn")
    assert list(got) == ["output"]  # the first model's output name
    np.testing.assert_allclose(got["output"], want, atol=TOL, rtol=0)
    assert section["softmax"].startswith("applied to torch_cnn, keras_cnn, torch_encoder")
    assert section["models"] == 3 and [m["outputs"] for m in section["members"]] == ["logits"] * 3


def test_weighted_with_given_weights_and_a_label_output():
    model, section = fuse("keras_cnn", ",combine=weighted,weights=0.5+0.3+0.2,label=true")
    probs = [softmax(standalone(n)) for n in order("keras_cnn")]
    want = 0.5 * probs[0] + 0.3 * probs[1] + 0.2 * probs[2]
    got = fused_run(model, "keras_cnn")
    np.testing.assert_allclose(got["fc2"], want, atol=TOL, rtol=0)
    np.testing.assert_array_equal(got["fc2_label"], got["fc2"].argmax(axis=1))
    assert [m["weight"] for m in section["members"]] == [0.5, 0.3, 0.2]


def test_weighted_fits_weights_that_raise_the_likelihood_of_the_labels():
    model, section = fuse("torch_cnn", ",combine=weighted")
    weights = np.array([m["weight"] for m in section["members"]])
    assert section["weights_from"].startswith("fitted on 256 labels")
    assert abs(weights.sum() - 1) < 1e-5 and not np.allclose(weights, 1 / 3, atol=1e-3)
    probs = [softmax(standalone(n)) for n in order("torch_cnn")]
    got = fused_run(model, "torch_cnn")["output"]
    np.testing.assert_allclose(
        got, sum(w * p for w, p in zip(weights, probs, strict=True)), atol=1e-6, rtol=0
    )
    # fitted on the calibration labels: their likelihood beats equal weights there
    with np.load(DIGITS / "torch_cnn.calib.npz") as npz:
        x, y = npz["input"], npz["labels"]
    calib = [
        softmax(ort_run(path(n), {"input": xs})["output" if n != "keras_cnn" else "fc2"])
        for n, xs in zip(order("torch_cnn"), (x, x.transpose(0, 2, 3, 1), x[:, 0]), strict=True)
    ]

    def nll(w):
        mix = sum(wi * p for wi, p in zip(w, calib, strict=True))
        return -np.log(mix[np.arange(len(y)), y]).mean()

    assert nll(weights) < nll(np.full(3, 1 / 3))


def test_vote_outputs_each_class_share_of_the_votes():
    model, section = fuse("torch_encoder", ",combine=vote,label=true")
    outs = [standalone(n) for n in order("torch_encoder")]
    shares = np.zeros_like(outs[0])
    for o in outs:
        shares[np.arange(len(o)), o.argmax(axis=1)] += 1 / 3
    got = fused_run(model, "torch_encoder")
    np.testing.assert_allclose(got["output"], shares, atol=TOL, rtol=0)
    np.testing.assert_array_equal(got["output_label"], shares.argmax(axis=1))
    assert section["softmax"] == "none (votes read the argmax)"


def test_concat_puts_the_raw_outputs_side_by_side():
    model, _ = fuse("torch_cnn", ",combine=concat")
    want = np.concatenate([standalone(n) for n in order("torch_cnn")], axis=1)
    got = fused_run(model, "torch_cnn")["output"]
    assert got.shape == (len(want), 30)
    np.testing.assert_allclose(got, want, **RAW)


def test_probabilities_are_not_softmaxed_again(tmp_path):
    """A member that outputs probabilities (rows >= 0 summing to 1) is averaged as it is."""
    probs = onnx.load(path("keras_cnn"))
    out = probs.graph.output[0].name
    probs.graph.node[-1].output[0] = "logits"
    probs.graph.node.append(onnx.helper.make_node("Softmax", ["logits"], [out], axis=-1))
    member = tmp_path / "keras_probs.onnx"
    onnx.save(probs, member)
    model, report = onnxprune.run(path("torch_cnn"), [f"fuse:members={member}"], device="cpu")
    members = report["passes"][0]["members"]
    assert [m["outputs"] for m in members] == ["logits", "probabilities"]
    assert report["passes"][0]["softmax"] == "applied to torch_cnn (logits)"
    want = (softmax(standalone("torch_cnn")) + softmax(standalone("keras_cnn"))) / 2
    np.testing.assert_allclose(fused_run(model, "torch_cnn")["output"], want, atol=TOL)


@pytest.mark.parametrize("first", NAMES)
def test_each_branch_equals_its_member_run_alone(first):
    """Fused from any of the three layouts, every member's branch gives its own output."""
    model, section = fuse(first, ",combine=mean")
    names = order(first)
    exposed = copy.deepcopy(model)
    outs = {o.name: o for o in exposed.graph.value_info}
    branch_outputs = [f"{n}/{onnx.load(path(n)).graph.output[0].name}" for n in names]
    exposed.graph.output.extend(outs[n] for n in branch_outputs)
    got = fused_run(exposed, first)
    for name, tensor in zip(names, branch_outputs, strict=True):
        np.testing.assert_allclose(got[tensor], standalone(name), **RAW, err_msg=name)
    adapters = {m["name"]: m["adapter"] for m in section["members"]}
    assert adapters[first] == "same"
    assert all(adapters[n] != "same" for n in names[1:])  # three layouts: two adapters


def test_opsets_ir_versions_and_domains_are_reconciled():
    model, section = fuse("torch_encoder", ",combine=mean")  # opset 17 first, torch_cnn at 20
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets == {"": 20, "ai.onnx.ml": 2}  # keras_cnn's ml domain kept
    assert model.ir_version == 9
    notes = {m["name"]: m["notes"] for m in section["members"]}
    assert notes == {
        "torch_encoder": ["opset 17 -> 20"],
        "torch_cnn": [],
        "keras_cnn": ["opset 17 -> 20"],
    }
    assert section["opset"] == 20


def test_names_are_prefixed_per_member():
    model, _ = fuse("torch_cnn", ",combine=mean")
    prefixes = {t.name.split("/", 1)[0] for t in model.graph.initializer}
    assert {"torch_cnn", "keras_cnn", "torch_encoder"} <= prefixes
    outputs = {o for n in model.graph.node for o in n.output} - {"output"}
    assert {o.split("/", 1)[0] for o in outputs} == prefixes | {"fuse"}
    assert [i.name for i in model.graph.input] == ["input"]


def test_vote_weights_and_a_member_fused_twice(tmp_path):
    spec = f"fuse:members={path('torch_cnn')}+{path('keras_cnn')},combine=vote,weights=1+1+3"
    model, report = onnxprune.run(path("torch_cnn"), [spec], device="cpu")
    names = [m["name"] for m in report["passes"][0]["members"]]
    assert names == ["torch_cnn", "torch_cnn_2", "keras_cnn"]
    onnx.checker.check_model(model, full_check=True)
    cnn, keras = standalone("torch_cnn"), standalone("keras_cnn")
    want = 0.4 * np.eye(10)[cnn.argmax(axis=1)] + 0.6 * np.eye(10)[keras.argmax(axis=1)]
    np.testing.assert_allclose(fused_run(model, "torch_cnn")["output"], want, atol=TOL)
