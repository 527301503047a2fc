"""Fold on every fixture: zero random channels of every prunable group, fold, compare.

The zeroing here uses the analysis only to know which tensors belong to a group; the checks
(outputs equal to the zeroed model's, parameter count, checker, idempotence) are independent.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from known_gaps import gap, params
from onnx import numpy_helper

import onnxprune
from onnxprune.analysis.probe import probe
from onnxprune.analysis.walk import analyse
from onnxprune.data import load_npz
from onnxprune.graph import lift_constants
from onnxprune.pruning.zero import random_classes, zero_classes
from onnxprune.runner import run_model

MODELS = Path(__file__).resolve().parents[1] / "models"
FIXTURES = sorted(p for p in MODELS.glob("*/*.onnx"))


def _sample(path: Path) -> dict[str, np.ndarray]:
    with np.load(path.with_suffix("").with_suffix(".sample.npz")) as npz:
        return {k[3:]: npz[k] for k in npz.files if k.startswith("in/")}


def _calib(path: Path) -> Path | None:
    """The calibration file the fixture's manifest entry names (valid ids, masks, states)."""
    entries = json.loads((path.parent / "MANIFEST.json").read_text())
    entry = next((e for e in entries.values() if e["file"] == path.name), {})
    return path.parent / entry["calib"] if "calib" in entry else None


def _params(model: onnx.ModelProto) -> int:
    return int(
        sum(
            np.prod(t.dims, dtype=np.int64)
            for t in model.graph.initializer
            if t.data_type == onnx.TensorProto.FLOAT
        )
    )


def zero_random_channels(
    model: onnx.ModelProto, seed: int, data: Path | None = None
) -> tuple[onnx.ModelProto, int, int]:
    """Zero half the free channel classes; return the model, expected parameters, classes.
    ``data``: the inputs the shape probe runs on (synthetic without)."""
    model = copy.deepcopy(model)
    lift_constants(model.graph)
    an = analyse(model, probe(model, data=load_npz(data, model) if data else None).shapes)
    chosen = random_classes(an, 0.5, seed)
    zero_classes(model, an, chosen)
    roots = an.roots()
    shapes = {
        t.name: list(t.dims)
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT
    }
    done = set()
    for m in an.members:  # expected shapes, counted independently of fold
        if (m.init, m.axis) in done or m.init not in shapes:
            continue
        done.add((m.init, m.axis))
        shapes[m.init][m.axis] -= sum(i >= 0 and int(roots[i]) in chosen for i in m.ids)
    expected = sum(int(np.prod(s, dtype=np.int64)) for s in shapes.values())
    return model, expected, len(chosen)


@pytest.mark.parametrize("path", params("fold_exact", FIXTURES))
def test_fold_removes_zeroed_channels_exactly(path: Path) -> None:
    model, _ = onnxprune.run(onnxprune.load(path), ["cleanup"])
    data = _calib(path)  # models whose inputs need valid values (ids, masks) carry their own
    zeroed, expected, count = zero_random_channels(model, seed=len(path.stem), data=data)
    folded, report = onnxprune.run(zeroed, ["fold"], data=data)
    onnx.checker.check_model(folded, full_check=True)
    feeds = _sample(path)
    want, got = run_model(zeroed, feeds), run_model(folded, feeds)
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(w).max()))
    section = report["passes"][0]
    if count:
        assert section["channels_removed"] >= count
    baseline = onnxprune.run(model, ["fold"], data=data)[1]["passes"][0]["channels_removed"]
    if baseline == 0:
        assert _params(folded) == expected
    else:  # the fixture had zero channels of its own (the ln_structured one): those go too
        assert _params(folded) < expected
    again, report2 = onnxprune.run(folded, ["fold"])
    assert report2["passes"][0]["channels_removed"] == 0
    assert not report2["passes"][0]["modified"]


def test_fold_prunes_enough_on_every_framework() -> None:
    """Every framework's CNN has prunable groups: fold is not a silent no-op anywhere."""
    cnns = [p for p in FIXTURES if "cnn" in p.stem]
    assert {p.parent.name for p in cnns} >= {"torch", "tf", "digits"}
    for path in cnns:
        groups = onnxprune.channel_groups(onnxprune.load(path))
        # a known gap must still be one: when it closes, its entry in known_gaps.py goes
        assert any(g.prunable for g in groups) is not bool(gap("prunable", path)), path


def test_fold_removes_torch_ln_structured_channels() -> None:
    """A model masked by torch.nn.utils.prune.ln_structured gets smaller, exactly."""
    path = MODELS / "torch" / "cnn_masked_legacy.onnx"
    manifest = json.loads((MODELS / "torch" / "MANIFEST.json").read_text())
    zeroed = json.loads(manifest["cnn_masked_legacy"]["notes"])["zeroed"]
    model = onnxprune.load(path)
    folded, report = onnxprune.run(model, ["fold"])
    section = report["passes"][0]
    # pw's 12 zeroed filters feed a 1x1 conv-free head: all removed with their fc columns
    sizes = {t.name: list(t.dims) for t in folded.graph.initializer}
    assert sizes["pw.weight"][0] == 24 - len(zeroed["pw.weight"])
    assert section["parameters_before"] - section["parameters_after"] == 12 * 32 + 12 + 12 * 10
    # stem/b1 zeroed filters become BN shifts, then feed a zero-padded 3x3 conv: kept, and said
    assert any("zero-pads" in reason for reason in section["blocked"])
    feeds = _sample(path)
    want, got = run_model(model, feeds), run_model(folded, feeds)
    np.testing.assert_allclose(got["output"], want["output"], rtol=1e-5, atol=1e-6)


def test_fold_leaves_subgraph_and_unknown_ops_whole() -> None:
    """An If node reading a channel tensor pins that group; a plain group still folds."""
    h = onnx.helper
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(4, 3, 1, 1)).astype(np.float32)
    w2 = rng.normal(size=(5, 4, 1, 1)).astype(np.float32)
    w3 = rng.normal(size=(2, 5, 1, 1)).astype(np.float32)
    w1[1] = 0
    w2[2] = 0
    then = h.make_graph(
        [h.make_node("Identity", ["b"], ["t"])],
        "then",
        [],
        [h.make_tensor_value_info("t", onnx.TensorProto.FLOAT, None)],
    )
    other = h.make_graph(
        [h.make_node("Softplus", ["b"], ["e"])],
        "else",
        [],
        [h.make_tensor_value_info("e", onnx.TensorProto.FLOAT, None)],
    )
    nodes = [
        h.make_node("Conv", ["x", "w1"], ["a"]),
        h.make_node("Relu", ["a"], ["a2"]),
        h.make_node("Conv", ["a2", "w2"], ["b"]),
        h.make_node("If", ["cond"], ["c"], then_branch=then, else_branch=other),
        h.make_node("Conv", ["c", "w3"], ["y"]),
    ]
    graph = h.make_graph(
        nodes,
        "g",
        [
            h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 4, 4]),
            h.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []),
        ],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2, 4, 4])],
        [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"))],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    folded, report = onnxprune.run(model, ["fold"])
    sizes = {t.name: list(t.dims) for t in folded.graph.initializer}
    assert sizes["w1"] == [3, 3, 1, 1] and sizes["w2"][1] == 3
    assert sizes["w2"][0] == 5, "channels read inside a subgraph must stay"
    assert any("If" in r for g in report["passes"][0]["groups"] for r in g["reasons"])
    x = rng.normal(size=(1, 3, 4, 4)).astype(np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        np.testing.assert_allclose(
            run_model(folded, feeds)["y"], run_model(model, feeds)["y"], rtol=1e-5, atol=1e-6
        )


def _conv_chain_around(
    middle: list[onnx.NodeProto],
    extra_inits: dict[str, np.ndarray],
    extra_inputs: list[onnx.ValueInfoProto] | None = None,
) -> onnx.ModelProto:
    """x -> [middle: produces 'a' from 'x'] -> Relu -> Conv w2 (channel 2 zeroed) -> Relu ->
    Conv w3 -> y."""
    h = onnx.helper
    rng = np.random.default_rng(3)
    w2 = rng.normal(size=(5, 4, 1, 1)).astype(np.float32)
    w2[2] = 0
    w3 = rng.normal(size=(2, 5, 1, 1)).astype(np.float32)
    nodes = [
        *middle,
        h.make_node("Relu", ["a"], ["a2"]),
        h.make_node("Conv", ["a2", "w2"], ["b"]),
        h.make_node("Relu", ["b"], ["b2"]),
        h.make_node("Conv", ["b2", "w3"], ["y"]),
    ]
    inits = {"w2": w2, "w3": w3, **extra_inits}
    graph = h.make_graph(
        nodes,
        "g",
        [
            h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 4, 4]),
            *(extra_inputs or []),
        ],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2, 4, 4])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_fold_cuts_a_zero_int8_filter_of_a_qdq_layer_and_folds_the_rest() -> None:
    """A QDQ conv (int8 weights, per-channel scales) loses its zero int8 filter (issue 10:
    it was left whole before) with its scale and zero point; the float conv after it folds."""
    h = onnx.helper
    rng = np.random.default_rng(4)
    wq = rng.integers(-100, 100, size=(4, 3, 1, 1)).astype(np.int8)
    wq[1] = 0  # zero int8 filter (q == zp): removed with its scale and zero point
    qdq = [
        h.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        h.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        h.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w1"], axis=0),
        h.make_node("Conv", ["xd", "w1"], ["a"]),
    ]
    model = _conv_chain_around(
        qdq,
        {
            "xs": np.array(0.05, np.float32),
            "xz": np.array(0, np.int8),
            "wq": wq,
            "ws": rng.uniform(0.01, 0.02, 4).astype(np.float32),
            "wz": np.zeros(4, np.int8),
        },
    )
    folded, report = onnxprune.run(model, ["fold"])
    sizes = {t.name: list(t.dims) for t in folded.graph.initializer}
    assert sizes["wq"] == [3, 3, 1, 1] and sizes["ws"] == [3] and sizes["wz"] == [3]
    assert sizes["w2"] == [4, 3, 1, 1] and sizes["w3"] == [2, 4, 1, 1]
    x = rng.normal(size=(1, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(
        run_model(folded, {"x": x})["y"], run_model(model, {"x": x})["y"], rtol=1e-5, atol=1e-6
    )


def test_fold_leaves_channels_read_by_a_loop_whole() -> None:
    """A Loop body that reads a channel tensor from the outer scope pins it; others fold."""
    h = onnx.helper
    rng = np.random.default_rng(5)
    w1 = rng.normal(size=(4, 3, 1, 1)).astype(np.float32)
    w1[0] = 0
    body = h.make_graph(
        [
            h.make_node("Identity", ["cond_in"], ["cond_out"]),
            h.make_node("Add", ["carry", "a0"], ["carry_out"]),
        ],  # a0: from the outer scope
        "body",
        [
            h.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
            h.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []),
            h.make_tensor_value_info("carry", onnx.TensorProto.FLOAT, None),
        ],
        [
            h.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []),
            h.make_tensor_value_info("carry_out", onnx.TensorProto.FLOAT, None),
        ],
    )
    middle = [
        h.make_node("Conv", ["x", "w1"], ["a0"]),
        h.make_node("Loop", ["trips", "", "a0"], ["a"], body=body),
    ]
    model = _conv_chain_around(middle, {"w1": w1, "trips": np.array(2, np.int64)})
    folded, report = onnxprune.run(model, ["fold"])
    sizes = {t.name: list(t.dims) for t in folded.graph.initializer}
    assert sizes["w1"] == [4, 3, 1, 1], "a0 is read inside the Loop body: its channels stay"
    assert sizes["w2"] == [4, 4, 1, 1], "the conv after the loop still folds"
    assert any("subgraph" in r for r in report["passes"][0]["blocked"])
    x = rng.normal(size=(1, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(
        run_model(folded, {"x": x})["y"], run_model(model, {"x": x})["y"], rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("rel", ["torch/encoder_legacy", "torch/encoder_dynamo"])
def test_attention_heads_are_groups_and_fold_whole(rel: str) -> None:
    """q, k, v projections split into heads: each head is one class; pruning two of the four
    heads removes their q, k, v and out-projection slices and rewrites the head count."""
    model, _ = onnxprune.run(onnxprune.load(MODELS / f"{rel}.onnx"), ["cleanup"])
    groups = onnxprune.channel_groups(model)
    heads = [g for g in groups if g.channels == 4]
    assert len(heads) == 1 and heads[0].prunable, [g.to_dict() for g in groups]
    zeroed, _ = onnxprune.run(model, ["vote:sparsity=0.5,round_to=1,protect=linear"])
    folded, report = onnxprune.run(zeroed, ["fold"])
    assert report["passes"][0]["channels_removed"] == 2  # the FFN group is protected
    sizes = {t.name: list(t.dims) for t in folded.graph.initializer}
    in_proj = [s for s in sizes.values() if s[-1:] == [48]]  # 3 x 2 heads x 8
    assert in_proj, sizes
    feeds = _sample(MODELS / f"{rel}.onnx")
    want, got = run_model(zeroed, feeds), run_model(folded, feeds)
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, rtol=1e-5, atol=1e-5)


def _grouped_model(groups: int, cin_g: int, cout_g: int, seed: int) -> onnx.ModelProto:
    """x -> Conv 3->C1 -> Relu -> grouped Conv (3x3, pad 1) -> Relu -> Conv 1x1 -> y."""
    h = onnx.helper
    rng = np.random.default_rng(seed)
    c1, c2 = groups * cin_g, groups * cout_g
    inits = {
        "w1": rng.normal(size=(c1, 3, 1, 1)).astype(np.float32),
        "b1": rng.normal(size=c1).astype(np.float32),
        "wg": rng.normal(size=(c2, cin_g, 3, 3)).astype(np.float32),
        "bg": rng.normal(size=c2).astype(np.float32),
        "w3": rng.normal(size=(2, c2, 1, 1)).astype(np.float32),
    }
    nodes = [
        h.make_node("Conv", ["x", "w1", "b1"], ["a"]),
        h.make_node("Relu", ["a"], ["a2"]),
        h.make_node("Conv", ["a2", "wg", "bg"], ["g"], group=groups, pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["g"], ["g2"]),
        h.make_node("Conv", ["g2", "w3"], ["y"]),
    ]
    graph = h.make_graph(
        nodes,
        "grouped",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 6, 6])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2, 6, 6])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize(("groups", "cin_g", "cout_g"), [(4, 2, 3), (3, 1, 2), (2, 4, 4)])
def test_grouped_convolution_prunes_whole_groups(groups: int, cin_g: int, cout_g: int) -> None:
    """Zeroing one group's filters removes that group: its input block upstream, its output
    block downstream, and the group attribute drops by one."""
    model = _grouped_model(groups, cin_g, cout_g, seed=groups)
    wg = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "wg")).copy()
    wg[cout_g : 2 * cout_g] = 0  # group 1 (its bias stays: a constant after Relu, then 1x1)
    model.graph.initializer[2].CopyFrom(numpy_helper.from_array(wg, "wg"))
    folded, report = onnxprune.run(model, ["fold"])
    node = next(n for n in folded.graph.node if "wg" in n.input)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["group"] == groups - 1
    sizes = {t.name: list(t.dims) for t in folded.graph.initializer}
    assert sizes["w1"][0] == (groups - 1) * cin_g and sizes["wg"][0] == (groups - 1) * cout_g
    assert sizes["w3"][1] == (groups - 1) * cout_g
    x = np.random.default_rng(0).normal(size=(1, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(
        run_model(folded, {"x": x})["y"], run_model(model, {"x": x})["y"], rtol=1e-5, atol=1e-5
    )


def test_grouped_convolution_with_random_zeroing_is_exact() -> None:
    for seed in range(4):
        model = _grouped_model(4, 2, 2, seed)
        zeroed, expected, _ = zero_random_channels(model, seed)
        folded, _ = onnxprune.run(zeroed, ["fold"])
        x = np.random.default_rng(seed).normal(size=(1, 3, 6, 6)).astype(np.float32)
        np.testing.assert_allclose(
            run_model(folded, {"x": x})["y"], run_model(zeroed, {"x": x})["y"], rtol=1e-5, atol=1e-5
        )
        assert _params(folded) == expected


def test_expand_and_tile_follow_the_channels() -> None:
    """GAP -> Expand back to the map (shape constant counts channels) and Tile on space."""
    h = onnx.helper
    rng = np.random.default_rng(9)
    w1 = rng.normal(size=(4, 3, 1, 1)).astype(np.float32)
    w1[1] = 0
    inits = {
        "w1": w1,
        "w2": rng.normal(size=(2, 4, 1, 1)).astype(np.float32),
        "shape": np.array([1, 4, 3, 3], np.int64),
        "reps": np.array([1, 1, 2, 2], np.int64),
    }
    nodes = [
        h.make_node("Conv", ["x", "w1"], ["a"]),
        h.make_node("Relu", ["a"], ["r"]),
        h.make_node("GlobalAveragePool", ["r"], ["p"]),
        h.make_node("Expand", ["p", "shape"], ["e"]),
        h.make_node("Tile", ["e", "reps"], ["t"]),
        h.make_node("Conv", ["t", "w2"], ["y"]),
    ]
    graph = h.make_graph(
        nodes,
        "expand",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 3, 3])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2, 6, 6])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    folded, report = onnxprune.run(model, ["fold"])
    assert report["passes"][0]["channels_removed"] == 1
    shape = next(
        numpy_helper.to_array(t)
        for t in folded.graph.initializer
        if t.name in next(n for n in folded.graph.node if n.op_type == "Expand").input
    )
    assert shape.tolist() == [1, 3, 3, 3]
    x = rng.normal(size=(1, 3, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(
        run_model(folded, {"x": x})["y"], run_model(model, {"x": x})["y"], rtol=1e-5, atol=1e-6
    )
