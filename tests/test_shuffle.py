"""Channel shuffle (``Reshape [N, g, C/g, H, W] -> Transpose(0, 2, 1, 3, 4) -> Reshape``) is a
permutation of channel labels: the ``g`` channels of each column go together, the shuffle's
targets are rewritten, and fold removes what was zeroed exactly."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import build_model
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.analysis.probe import probe
from onnxprune.analysis.walk import analyse
from onnxprune.pruning.zero import zero_classes
from onnxprune.runner import run_model

REAL = Path(__file__).resolve().parents[1] / "models" / "real"
G, M, HW = 2, 8, 4


def shuffle_model(group_in: int = 1) -> onnx.ModelProto:
    """x[1,4,4,4] -> Conv s (4) -> Conv a (16, group ``group_in``) -> Relu -> shuffle(2) -> Conv b (1x1, 3)."""
    rng = np.random.default_rng(0)
    c = G * M
    inits = {
        "ws": rng.normal(size=(4, 4, 1, 1)).astype(np.float32),
        "wa": rng.normal(size=(c, 4 // group_in, 1, 1)).astype(np.float32),
        "ba": rng.normal(size=c).astype(np.float32),
        "wb": rng.normal(size=(3, c, 1, 1)).astype(np.float32),
        "split": np.array([1, G, M, HW, HW], np.int64),
        "merge": np.array([1, c, HW, HW], np.int64),
    }
    nodes = [
        helper.make_node("Conv", ["x", "ws"], ["h"], name="s"),
        helper.make_node("Conv", ["h", "wa", "ba"], ["a"], name="a", group=group_in),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Reshape", ["r", "split"], ["s"], name="split"),
        helper.make_node("Transpose", ["s"], ["t"], perm=[0, 2, 1, 3, 4]),
        helper.make_node("Reshape", ["t", "merge"], ["u"], name="merge"),
        helper.make_node("Conv", ["u", "wb"], ["y"], name="b"),
    ]
    return build_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, HW, HW])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, HW, HW])],
        inits,
    )


def _analysis(model: onnx.ModelProto):
    return analyse(model, probe(model).shapes)


def test_the_shuffled_tensor_carries_the_permuted_channels() -> None:
    model = shuffle_model()
    an = _analysis(model)
    roots = an.roots()
    a_ids = an.labels["a"].ids
    # the g channels of column j (conv a's outputs j and M + j) are one class; columns differ
    columns = [{int(roots[a_ids[i * M + j]]) for i in range(G)} for j in range(M)]
    assert all(len(c) == 1 for c in columns)
    assert len({next(iter(c)) for c in columns}) == M
    # after the shuffle, position j * g + i holds conv a's channel i * M + j
    u = an.labels["u"]
    assert u.axis == 1
    want = [roots[a_ids[i * M + j]] for j in range(M) for i in range(G)]
    assert roots[u.ids].tolist() == [int(w) for w in want]
    assert not set(an.pinned_roots()) & {int(r) for r in roots[a_ids]}


def test_fold_removes_zeroed_columns_and_rewrites_both_targets() -> None:
    model = shuffle_model()
    an = _analysis(model)
    roots = an.roots()
    a_ids = an.labels["a"].ids
    chosen = {int(roots[a_ids[j]]) for j in (1, 4, 6)}
    zeroed = copy.deepcopy(model)
    zero_classes(zeroed, an, chosen)
    folded, report = onnxprune.run(zeroed, ["fold"])
    assert report["passes"][0]["channels_removed"] == 3
    inits = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    assert inits["wa"].shape[0] == G * (M - 3)
    assert inits["wb"].shape[1] == G * (M - 3)
    target = {
        n.name: inits[n.input[1]].tolist() for n in folded.graph.node if n.op_type == "Reshape"
    }
    assert target == {"split": [1, G, M - 3, HW, HW], "merge": [1, G * (M - 3), HW, HW]}
    x = np.random.default_rng(1).normal(size=(1, 4, HW, HW)).astype(np.float32)
    np.testing.assert_allclose(
        run_model(folded, {"x": x})["y"], run_model(zeroed, {"x": x})["y"], rtol=1e-5, atol=1e-5
    )


def test_a_shuffle_of_whole_groups_is_pinned_with_its_reason() -> None:
    """Grouped Conv a (2 groups, pruned whole) before the shuffle: every column joins both
    groups, so nothing can go; the reason names the shuffle."""
    groups = onnxprune.channel_groups(shuffle_model(group_in=2))
    (group,) = [g for g in groups if any(s.node == "a" for s in g.spaces)]
    assert not group.prunable
    assert any("channel shuffle of whole groups" in r and "split" in r for r in group.reasons)


def test_shufflenet_v2_fixture_prunes_its_shuffled_streams() -> None:
    model, _ = onnxprune.run(onnxprune.load(REAL / "caffe2_shufflenet_v2.onnx"), ["cleanup"])
    groups = onnxprune.channel_groups(model)
    shuffled = [g for g in groups if len(g.spaces) > 1]
    assert shuffled and all(g.prunable and g.channels > 1 for g in shuffled)


@pytest.mark.parametrize("name", ["caffe2_shufflenet_v2", "caffe2_densenet", "caffe2_inception"])
def test_default_chain_removes_channels_with_fold_exact(name: str) -> None:
    path = REAL / f"{name}.onnx"
    data = REAL / f"{name}.calib.npz"
    new, report = onnxprune.run(
        onnxprune.load(path), ["cleanup", "vote", "fold"], data=data, device="cpu"
    )
    fold = report["passes"][-1]
    assert fold["channels_removed"] > 0
    assert fold["verified"].startswith("outputs equal")
    assert fold["parameters_after"] < fold["parameters_before"]


def test_shufflenet_v1_names_the_reason_of_every_group() -> None:
    model, _ = onnxprune.run(onnxprune.load(REAL / "caffe2_shufflenet.onnx"), ["cleanup"])
    groups = onnxprune.channel_groups(model)
    assert groups and all(g.prunable or g.reasons for g in groups)
    assert any("channel shuffle of whole groups" in r for g in groups for r in g.reasons)
