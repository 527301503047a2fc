"""vote and fold never prune less than asked in silence: each group says why, in the report and
on the terminal (issue 9). One test per case a user met: QDQ weights, bf16 weights behind a
Cast, grouped and dilated convolutions, a weight that is a graph output, an If with a computed
condition, a 16-channel layer that rounding leaves whole, and a 4-head attention group."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import build_model
from conftest import invoke as cli
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.analysis.probe import probe
from onnxprune.analysis.walk import analyse
from onnxprune.graph import prepare_for_pruning
from onnxprune.pruning.shortfall import asked_count, rounding_reason
from onnxprune.pruning.workspace import class_multiples
from onnxprune.runner import run_model
from onnxprune.runtime import channel_multiple

MODELS = Path(__file__).resolve().parents[1] / "models"
F = TensorProto.FLOAT


def cnn(variant: str = "plain") -> onnx.ModelProto:
    """x[1,3,8,8] -> convA (16) -> Relu -> convB (16, 3x3) -> Relu -> GAP -> fc (10), with one
    twist: ``qdq`` (convA's weight through DequantizeLinear; ``qdq_computed``: its scale
    computed by an Identity), ``bf16`` (through a Cast from
    bfloat16), ``grouped`` (convB with group=2), ``dilated`` (convB dilated 2),
    ``weight_output`` (convA's weight also a graph output) or ``if`` (an If on a computed
    condition reads convA's output)."""
    rng = np.random.default_rng(0)
    inits = {
        "wa": rng.normal(size=(16, 3, 3, 3)).astype(np.float32),
        "ba": rng.normal(size=16).astype(np.float32),
        "wb": rng.normal(size=(16, 16, 3, 3)).astype(np.float32),
        "bb": rng.normal(size=16).astype(np.float32),
        "wc": rng.normal(size=(10, 16)).astype(np.float32),
        "bc": rng.normal(size=10).astype(np.float32),
    }
    pre, wa, kb, extra = [], "wa", {"pads": [1, 1, 1, 1]}, []
    if variant.startswith("qdq"):
        inits["wa_q"] = np.clip(np.round(inits.pop("wa") * 40), -127, 127).astype(np.int8)
        inits["wa_s"], inits["wa_z"] = np.array(1 / 40, np.float32), np.array(0, np.int8)
        scale = "wa_s"
        if variant == "qdq_computed":
            pre.append(helper.make_node("Identity", ["wa_s"], ["wa_s2"]))
            scale = "wa_s2"
        pre.append(helper.make_node("DequantizeLinear", ["wa_q", scale, "wa_z"], ["wa_dq"]))
        wa = "wa_dq"
    if variant == "bf16":
        bits = inits.pop("wa").view(np.uint32) >> 16  # bfloat16: the high half of a float32
        inits["wa_bf"] = bits.astype(np.uint16)  # replaced by a BFLOAT16 tensor below
        pre.append(helper.make_node("Cast", ["wa_bf"], ["wa_c"], to=F))
        wa = "wa_c"
    if variant == "grouped":
        inits["wb"] = inits["wb"][:, :8]
        kb["group"] = 2
    if variant == "dilated":
        kb.update(dilations=[2, 2], pads=[2, 2, 2, 2])
    if variant == "weight_output":
        extra = [helper.make_tensor_value_info("wa", F, [16, 3, 3, 3])]
    nodes = [
        *pre,
        helper.make_node("Conv", ["x", wa, "ba"], ["a"], name="convA", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["a2"]),
        helper.make_node("Conv", ["a2", "wb", "bb"], ["b"], name="convB", **kb),
        helper.make_node("Relu", ["b"], ["b2"]),
        helper.make_node("GlobalAveragePool", ["b2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "wc", "bc"], ["y"], name="fc", transB=1),
    ]
    if variant == "if":
        out = lambda n: [helper.make_tensor_value_info(n, F, None)]  # noqa: E731
        then = helper.make_graph([helper.make_node("Relu", ["a"], ["t"])], "then", [], out("t"))
        other = helper.make_graph([helper.make_node("Sigmoid", ["a"], ["e"])], "else", [], out("e"))
        inits["zero"] = np.array(0, np.float32)
        nodes[len(pre) + 1 : len(pre) + 2] = [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["cond"]),
            helper.make_node("If", ["cond"], ["a2"], then_branch=then, else_branch=other),
        ]
    inputs = [helper.make_tensor_value_info("x", F, [1, 3, 8, 8])]
    outputs = [helper.make_tensor_value_info("y", F, [1, 10]), *extra]
    if variant != "bf16":
        return build_model(nodes, inputs, outputs, inits)
    bits = inits.pop("wa_bf")  # numpy has no bfloat16: the tensor is made by hand
    graph = helper.make_graph(
        nodes,
        "test",
        inputs,
        outputs,
        [numpy_helper.from_array(a, n) for n, a in inits.items()]
        + [helper.make_tensor("wa_bf", TensorProto.BFLOAT16, bits.shape, bits.ravel().tolist())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def vote_fold(model: onnx.ModelProto, vote: str = "vote:sparsity=0.5") -> tuple[dict, dict]:
    _, report = onnxprune.run(model, [vote, "fold"])
    return report["passes"][0], report["passes"][1]


def row(section: dict, layer: str) -> dict:
    found = [r for r in section["shortfall"] if layer in r["layers"].split(", ")]
    assert len(found) == 1, section["shortfall"]
    return found[0]


def test_qdq_weight_of_initializers_is_pruned() -> None:
    """Issue 10: a weight stored int8 behind a DequantizeLinear of initializers is a member."""
    vote, fold = vote_fold(cnn("qdq"), "vote:sparsity=0.5,round_to=8")
    assert not [r for r in vote["shortfall"] if "convA" in r["layers"].split(", ")]
    assert vote["channels_pruned"] == 16 and fold["channels_removed"] == 16


def test_qdq_weight_is_named_with_its_reason() -> None:
    vote, fold = vote_fold(cnn("qdq_computed"), "vote:sparsity=0.5,round_to=8")
    r = row(vote, "Conv convA")
    assert r["group"] is None and r["asked"] == 8 and r["pruned"] == 0
    assert "'wa_dq' comes from DequantizeLinear (a QDQ model)" in r["reason"]
    assert vote["channels_pruned"] == 8  # convB still goes down by half
    assert fold["channels_removed"] == 8 and fold["shortfall"] == []


def test_bf16_weight_behind_a_cast_points_at_cleanup() -> None:
    model = cnn("bf16")
    vote, _ = vote_fold(model, "vote:sparsity=0.5,round_to=8")
    r = row(vote, "Conv convA")
    assert "computed by Cast" in r["reason"] and "run -p cleanup first" in r["reason"]
    _, report = onnxprune.run(model, ["cleanup", "vote:sparsity=0.5,round_to=8", "fold"])
    assert report["passes"][1]["channels_pruned"] == 16  # as the reason says: now both convs
    assert not any(r["group"] is None for r in report["passes"][1]["shortfall"])


def test_grouped_conv_rounds_whole_groups_and_says_so() -> None:
    model = cnn("grouped")
    vote, _ = vote_fold(model, "vote:sparsity=0.5,round_to=16")
    r = row(vote, "convB")
    assert r["asked"] == 1 and r["pruned"] == 0  # 2 classes of 8 channels (one per conv group)
    assert "each spans 8 channels" in r["reason"] and "2 at a time" in r["reason"]
    assert "lower round_to" in r["reason"]
    folded, report = onnxprune.run(model, ["vote:sparsity=0.5,round_to=8", "fold"])
    assert report["passes"][1]["channels_removed"] == 1  # one conv group: 8 + 8 channels
    sizes = {t.name: list(t.dims) for t in folded.graph.initializer}
    assert sizes["wa"][0] == 8 and sizes["wb"][0] == 8


def test_dilated_conv_is_rounded_like_any_other() -> None:
    vote, _ = vote_fold(cnn("dilated"), "vote:sparsity=0.5,round_to=16")
    assert row(vote, "convB")["reason"] == (
        "rounding to a multiple of 16 leaves 0 of 16 channels to prune (lower round_to)"
    )
    vote, fold = vote_fold(cnn("dilated"), "vote:sparsity=0.5,round_to=8")
    assert vote["channels_pruned"] == fold["channels_removed"] == 16


def test_weight_that_is_a_graph_output_is_pinned_with_its_reason() -> None:
    model = cnn("weight_output")
    vote, _ = vote_fold(model, "vote:sparsity=0.5,round_to=8")
    r = row(vote, "convA")
    assert r["reason"] == "pinned: initializer 'wa' is a graph input or output"
    assert "convA" not in [g["producers"][0] for g in vote["groups"]]
    # zeroed by someone else, fold keeps them and says which and why
    for t in model.graph.initializer:
        if t.name in ("wa", "ba"):
            arr = numpy_helper.to_array(t).copy()
            arr[:4] = 0
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
    _, report = onnxprune.run(model, ["fold"])
    fold = report["passes"][0]
    assert fold["kept_zero"] == 4
    assert fold["shortfall"] == [
        {
            "group": 0,
            "layers": "convA",
            "kept": 4,
            "reason": "initializer 'wa' is a graph input or output",
        }
    ]


def test_if_with_a_computed_condition_pins_what_it_reads() -> None:
    vote, _ = vote_fold(cnn("if"), "vote:sparsity=0.5,round_to=8")
    # the branches are walked: Relu(a) and Sigmoid(a) differ once a channel of a is zeroed
    assert row(vote, "convA")["reason"] == (
        "pinned: If If(a2): output 'a2': a channel, once zeroed, is not zero in both branches"
    )
    assert vote["channels_pruned"] == 8  # convB is free


def test_sixteen_channels_at_sparsity_03_with_the_default_round_to() -> None:
    vote, fold = vote_fold(cnn(), "vote:sparsity=0.3")
    block = channel_multiple()  # 8 or 16: either keeps all 16 of 16 * 0.7 = 11.2
    reason = f"rounding to a multiple of {block} leaves 0 of 16 channels to prune (lower round_to)"
    assert row(vote, "convA") == {
        "group": 0,
        "layers": "convA",
        "asked": 4,
        "pruned": 0,
        "reason": reason,
    }
    assert row(vote, "fc")["reason"] == "pinned: reaches graph output 'y'"
    assert vote["channels_pruned"] == 0 and vote["channels_asked"] == 4 + 4 + 3
    assert "vote pruned none of the 11 channels asked for" in vote["warnings"][0]
    assert fold["channels_removed"] == 0


def test_terminal_shows_the_reasons_and_claims_no_pass(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(cnn("if"), path)
    result = cli(path, "-p", "vote:sparsity=0.3,round_to=16", "-p", "fold", "-o", tmp_path / "o")
    assert result.exit_code == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "vote: less than asked" in text
    assert "pinned: If If(a2): output 'a2': a channel," in text
    assert "rounding to a multiple of 16 leaves 0 of" in text  # the cell wraps after it
    assert "WARNING: vote pruned none of the 11 channels asked for" in text
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("DONE (no gates checked") and "PASSED" not in result.stdout


def test_fold_table_on_the_terminal(tmp_path: Path) -> None:
    model = cnn("weight_output")
    for t in model.graph.initializer:
        if t.name == "wa":
            arr = numpy_helper.to_array(t).copy()
            arr[:2] = 0
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    result = cli(path, "-p", "fold", "-o", tmp_path / "o.onnx")
    assert result.exit_code == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "fold: zero or constant channels kept" in text
    assert "initializer 'wa' is a graph input or output" in text and "kept_zero=2" in text


# --- heads: rounding counts the channels a class spans ---------------------------------------


def _encoder() -> onnx.ModelProto:
    model, _ = onnxprune.run(onnxprune.load(MODELS / "torch/encoder_legacy.onnx"), ["cleanup"])
    return model


def _heads(section: dict) -> dict:
    found = [g for g in section["groups"] if g["channels"] == 4]
    assert len(found) == 1, section["groups"]
    return found[0]


@pytest.mark.parametrize(
    ("sparsity", "round_to", "pruned"),
    [(0.5, 16, 2), (0.5, 8, 2), (0.3, 8, 1), (0.25, 16, 0), (0.25, 4, 1)],
)
def test_four_heads_of_size_8_round_by_their_channels(sparsity, round_to, pruned) -> None:
    """Head size 8 (q, k, v packed: 24 channels of the in-projection per head): heads go one at
    a time at round_to 8, two at a time at 16; when none can go, the reason says why."""
    model = _encoder()
    zeroed, report = onnxprune.run(model, [f"vote:sparsity={sparsity},round_to={round_to}"])
    heads = _heads(report["passes"][0])
    assert heads["pruned"] == pruned
    if pruned == 0:
        assert heads["reason"] == rounding_reason(4, 0, 16, 2, 8)
        assert "each spans 8 channels" in heads["reason"] and "2 at a time" in heads["reason"]
    folded, report = onnxprune.run(zeroed, ["fold"])  # fold verifies the outputs itself
    sizes = [t.dims[-1] for t in folded.graph.initializer if len(t.dims) == 2]
    assert 3 * 8 * (4 - pruned) in sizes  # the packed q, k, v projection


def test_class_multiples_of_the_encoder() -> None:
    model = _encoder()
    prepare_for_pruning(model.graph)
    an = analyse(model, probe(model).shapes)
    groups = an.groups()
    multiples = class_multiples(an, groups, 16)
    heads = next(g for g in groups if g.channels == 4)
    assert multiples[heads.index] == (2, 8)  # 16 / gcd(16, 8) and 16 / gcd(16, 24): 2
    assert class_multiples(an, groups, 8)[heads.index] == (1, 8)
    ffn = next(g for g in groups if g.channels == 64)
    assert multiples[ffn.index] == (16, 1)


def test_asked_count_is_the_unrounded_target() -> None:
    assert asked_count(16, 0.3) == 4  # keep ceil(11.2) = 12
    assert asked_count(16, 0.5) == 8 and asked_count(1, 0.9) == 0 and asked_count(5, 0.99) == 4


def test_a_folded_head_keeps_the_outputs() -> None:
    model = _encoder()
    zeroed, _ = onnxprune.run(model, ["vote:sparsity=0.3,round_to=8"])
    folded, _ = onnxprune.run(zeroed, ["fold"])
    with np.load(MODELS / "torch/encoder_legacy.sample.npz") as s:
        feeds = {k[3:]: s[k] for k in s.files if k.startswith("in/")}
    want, got = run_model(zeroed, feeds), run_model(folded, feeds)
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, rtol=1e-5, atol=1e-5)


def test_fold_names_constant_channels_a_padded_conv_keeps() -> None:
    """Zeroed channels of convA are 0.5 after a Sigmoid; convB zero-pads them, so the
    constant cannot move into its bias: fold keeps them and says so."""
    model = cnn()
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.op_type = "Sigmoid"
    for t in model.graph.initializer:
        if t.name in ("wa", "ba"):
            arr = numpy_helper.to_array(t).copy()
            arr[:3] = 0
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
    _, report = onnxprune.run(model, ["fold"])
    fold = report["passes"][0]
    assert fold["channels_removed"] == 0 and fold["kept_zero"] == 3
    (r,) = fold["shortfall"]
    assert r["layers"] == "convA" and r["kept"] == 3
    assert r["reason"] == "constant channel feeds Conv convB, which zero-pads its input"
