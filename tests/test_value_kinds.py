"""Valid models with unusual inputs and outputs: rank-0, sequences, optionals, strings, symbolic dims.

Each one must come through cleanup, fold and vote without an error (exit 0 on the command line,
nothing from onnxruntime on stderr), with the outputs it had, or say why it could not.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.data import load_npz
from onnxprune.errors import DataError
from onnxprune.synthesis import synthesize
from tests.conftest import invoke, ort_run

RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((4, 6)).astype(np.float32)
W1[:, 2] = 0  # channel 2 of every 'a' is zero: fold removes it
W2 = RNG.standard_normal((6, 3)).astype(np.float32)


def _tensor(name: str, shape, elem=TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _model(nodes, inputs, outputs, opset: int = 18, inits=None, extra_opsets=()) -> onnx.ModelProto:
    inits = {"w1": W1, "w2": W2} if inits is None else inits
    graph = helper.make_graph(
        nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()]
    )
    opsets = [helper.make_opsetid("", opset), *extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _mlp(src: str = "x", out: str = "y") -> list[onnx.NodeProto]:
    return [
        helper.make_node("MatMul", [src, "w1"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], [out]),
    ]


def _same(got, want) -> None:
    """Equal outputs: arrays, sequences (lists of arrays) or absent optionals (None)."""
    if isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            _same(g, w)
    elif want is None:
        assert got is None
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _chain_keeps_outputs(model, feeds_list, chain=("cleanup", "fold")) -> dict:
    new, report = onnxprune.run(model, list(chain), device="cpu")
    onnx.checker.check_model(new, full_check=True)
    for feeds in feeds_list:
        want, got = ort_run(model, feeds), ort_run(new, feeds)
        assert sorted(got) == sorted(want)
        for name in want:
            _same(got[name], want[name])
    return {s["pass"]: s for s in report["passes"]}


def _cli_ok(tmp_path: Path, capfd, model: onnx.ModelProto, *args: object) -> None:
    """The command line runs ``args`` on ``model`` with exit 0 and a silent stderr."""
    src = tmp_path / "model.onnx"
    onnx.save(model, src)
    result = invoke(src, "-q", "--device", "cpu", "-o", tmp_path / "out.onnx", *args)
    assert result.exit_code == 0, result.stderr
    assert result.stderr.strip() in (
        "",
        "no --data: activation statistics come from synthetic "
        "inputs; data-driven criteria are weak",
    )
    assert "onnxruntime" not in capfd.readouterr().err


X = {"x": RNG.standard_normal((3, 4)).astype(np.float32)}


# --- rank-0 inputs ---------------------------------------------------------------------------


def _scalar_scale() -> onnx.ModelProto:
    nodes = _mlp()
    nodes.insert(1, helper.make_node("Mul", ["a", "s"], ["as"]))
    nodes[2] = helper.make_node("Relu", ["as"], ["r"])
    return _model(nodes, [_tensor("s", []), _tensor("x", ["N", 4])], [_tensor("y", ["N", 3])])


def _if_on_input() -> onnx.ModelProto:
    then = helper.make_graph(
        [helper.make_node("Relu", ["a"], ["t"])], "then", [], [_tensor("t", ["N", 6])]
    )
    other = helper.make_graph(
        [helper.make_node("Neg", ["a"], ["e"])], "else", [], [_tensor("e", ["N", 6])]
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"]),
        helper.make_node("If", ["c"], ["r"], then_branch=then, else_branch=other),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    inputs = [_tensor("c", [], TensorProto.BOOL), _tensor("x", ["N", 4])]
    return _model(nodes, inputs, [_tensor("y", ["N", 3])])


def test_a_scalar_input_comes_through_cleanup_fold_and_vote(tmp_path, capfd) -> None:
    model = _scalar_scale()
    feeds = [dict(X, s=np.array(v, np.float32)) for v in (2.0, -1.0)]
    sections = _chain_keeps_outputs(model, feeds)
    assert sections["fold"]["channels_removed"] == 1
    _cli_ok(tmp_path, capfd, model, "-p", "vote:sparsity=0.5,round_to=1")
    data = tmp_path / "data.npz"
    np.savez(data, x=RNG.standard_normal((40, 4)).astype(np.float32), s=np.float32(2.0))
    chain = ("-p", "vote:sparsity=0.5,round_to=1", "-p", "fold", "-p", "validate:gates=off")
    _cli_ok(tmp_path, capfd, model, *chain, "--data", data)


def test_an_if_on_a_bool_input_comes_through_cleanup_fold_and_vote(tmp_path, capfd) -> None:
    model = _if_on_input()
    _chain_keeps_outputs(model, [dict(X, c=np.array(c)) for c in (True, False)])
    _cli_ok(tmp_path, capfd, model, "-p", "vote:sparsity=0.5,round_to=1", "-p", "fold")


def test_synthetic_data_gives_a_rank0_input_whole_to_every_batch() -> None:
    data = synthesize(_scalar_scale(), samples=5)
    assert data.inputs["s"].shape == () and len(data) == 5
    batches = list(data.batches(2))
    assert [b["x"].shape[0] for b in batches] == [2, 2, 1]
    assert all(b["s"].shape == () for b in batches)


# --- sequences and optionals -----------------------------------------------------------------


def _sequence_in() -> onnx.ModelProto:
    nodes = [helper.make_node("ConcatFromSequence", ["xs"], ["x"], axis=0), *_mlp()]
    xs = helper.make_tensor_sequence_value_info("xs", TensorProto.FLOAT, ["N", 4])
    return _model(nodes, [xs], [_tensor("y", [None, 3])])


def _sequence_out() -> onnx.ModelProto:
    nodes = [*_mlp(), helper.make_node("SequenceConstruct", ["y", "y"], ["ys"])]
    ys = helper.make_tensor_sequence_value_info("ys", TensorProto.FLOAT, None)
    return _model(nodes, [_tensor("x", ["N", 4])], [ys])


def _optional(out_optional: bool) -> onnx.ModelProto:
    nodes = [*_mlp(out="y0"), helper.make_node("Optional", ["y0"], ["o"])]
    if out_optional:
        kind = helper.make_optional_type_proto(
            helper.make_tensor_type_proto(TensorProto.FLOAT, None)
        )
        outputs = [helper.make_value_info("o", kind)]
    else:
        nodes.append(helper.make_node("OptionalGetElement", ["o"], ["y"]))
        outputs = [_tensor("y", ["N", 3])]
    return _model(nodes, [_tensor("x", ["N", 4])], outputs)


def test_a_sequence_input_comes_through_cleanup_fold_and_vote(tmp_path, capfd) -> None:
    model = _sequence_in()
    seq = [RNG.standard_normal((2, 4)).astype(np.float32) for _ in range(3)]
    sections = _chain_keeps_outputs(model, [{"xs": seq}])
    assert sections["fold"]["verified"].startswith("outputs equal")
    chain = ("-p", "vote:sparsity=0.5,round_to=1", "-p", "fold", "-p", "validate:gates=off")
    _cli_ok(tmp_path, capfd, model, *chain)
    xs = synthesize(model, samples=3).inputs["xs"]
    assert isinstance(xs, list) and [x.shape for x in xs] == [(3, 4), (3, 4)]


def test_a_sequence_output_is_compared_element_by_element(tmp_path, capfd) -> None:
    model = _sequence_out()
    sections = _chain_keeps_outputs(model, [X])
    assert sections["fold"]["channels_removed"] == 1
    assert sections["fold"]["verified"].startswith("outputs equal")
    _cli_ok(tmp_path, capfd, model, "-p", "cleanup", "-p", "vote:sparsity=0.5,round_to=1")


@pytest.mark.parametrize("out_optional", [False, True], ids=["inside", "output"])
def test_optional_values_come_through_cleanup(out_optional, tmp_path, capfd) -> None:
    model = _optional(out_optional)
    sections = _chain_keeps_outputs(model, [X])
    assert "note" not in sections["cleanup"]  # graphsurgeon handled it: types set aside
    new, _ = onnxprune.run(model, ["cleanup"], device="cpu")
    assert new.graph.output[0] == model.graph.output[0]  # the declared type is kept
    _cli_ok(tmp_path, capfd, model, "-p", "cleanup", "-p", "vote", "-p", "fold")


# --- strings ---------------------------------------------------------------------------------

ML = helper.make_opsetid("ai.onnx.ml", 2)


def _words_to_ids() -> onnx.ModelProto:
    """Strings only: CategoryMapper to int64 ids. No float channels at all."""
    node = helper.make_node(
        "CategoryMapper", ["words"], ["ids"], domain="ai.onnx.ml",
        cats_strings=["cat", "dog", "fish"], cats_int64s=[1, 2, 3], default_int64=0,
    )  # fmt: skip
    inputs = [_tensor("words", ["N"], TensorProto.STRING)]
    return _model([node], inputs, [_tensor("ids", ["N"], TensorProto.INT64)], 17, {}, [ML])


def _words_to_scores() -> onnx.ModelProto:
    """LabelEncoder -> Gather of an embedding -> MatMul, Relu, MatMul: strings in, floats out."""
    emb = RNG.standard_normal((4, 4)).astype(np.float32)
    nodes = [
        helper.make_node(
            "LabelEncoder", ["words"], ["ids"], domain="ai.onnx.ml",
            keys_strings=["cat", "dog", "fish"], values_int64s=[1, 2, 3], default_int64=0,
        ),
        helper.make_node("Gather", ["emb", "ids"], ["x"], axis=0),
        *_mlp(),
    ]  # fmt: skip
    inputs = [_tensor("words", ["N"], TensorProto.STRING)]
    inits = {"emb": emb, "w1": W1, "w2": W2}
    return _model(nodes, inputs, [_tensor("y", ["N", 3])], 17, inits, [ML])


def test_strings_are_synthesised_from_the_consumers_vocabulary() -> None:
    words = synthesize(_words_to_scores(), samples=16).inputs["words"]
    assert words.dtype == object and words.shape == (16,)
    assert set(words) <= {"cat", "dog", "fish"}


@pytest.mark.parametrize("with_data", [False, True], ids=["synthetic", "npz"])
def test_a_strings_only_model_has_nothing_to_prune_and_says_so(tmp_path, capfd, with_data) -> None:
    model = _words_to_ids()
    data = ()
    if with_data:
        np.savez(tmp_path / "words.npz", words=np.array(["cat", "bird", "fish"]))  # dtype <U4
        data = ("--data", tmp_path / "words.npz")
    report = tmp_path / "report.json"
    _cli_ok(
        tmp_path,
        capfd,
        model,
        "-p",
        "cleanup",
        "-p",
        "vote",
        "-p",
        "fold",
        "--report",
        report,
        *data,
    )
    cleanup, vote, fold = json.loads(report.read_text())["passes"]
    assert cleanup["modified"] is False
    for section in (vote, fold):
        assert section["note"].startswith("nothing to prune: no channel groups")
        assert section["modified"] is False


def test_string_data_from_an_npz_feeds_a_model_with_float_channels(tmp_path) -> None:
    model = _words_to_scores()
    np.savez(tmp_path / "words.npz", words=np.array(["cat", "dog", "bird", "fish", "dog"]))
    data = load_npz(tmp_path / "words.npz", model)
    assert data.inputs["words"].dtype == object and len(data) == 5
    new, report = onnxprune.run(
        model, ["vote:sparsity=0.5,round_to=1", "fold"], data=tmp_path / "words.npz", device="cpu"
    )
    assert report["passes"][1]["verified"].startswith("outputs equal")
    assert report["passes"][1]["channels_removed"] >= 1
    _chain_keeps_outputs(model, [{"words": data.inputs["words"]}])


# --- symbolic dims ---------------------------------------------------------------------------


def _reshaped(target: list[int], dims: list) -> onnx.ModelProto:
    nodes = [helper.make_node("Reshape", ["x0", "t"], ["x"]), *_mlp()]
    inits = {"t": np.array(target, np.int64), "w1": W1, "w2": W2}
    return _model(nodes, [_tensor("x0", dims)], [_tensor("y", ["B", 3])], 17, inits)


def test_symbolic_dims_are_read_from_the_consumers() -> None:
    model = _model(_mlp(), [_tensor("x", ["B", "D"])], [_tensor("y", ["B", 3])])
    assert synthesize(model, samples=3).inputs["x"].shape == (3, 4)  # D from w1 [4, 6]
    _chain_keeps_outputs(model, [X])


def test_symbolic_dims_fall_back_to_one_when_that_is_what_runs() -> None:
    model = _reshaped([0, 4], ["B", "S", 4])  # [B, S, 4] -> [B, 4]: only S = 1 fits
    assert synthesize(model, samples=2).inputs["x0"].shape == (2, 1, 4)
    sections = _chain_keeps_outputs(model, [{"x0": X["x"][:, None, :]}])
    assert sections["fold"]["verified"].startswith("outputs equal")


def test_symbolic_dims_nothing_fits_is_one_line_naming_the_input(tmp_path, capfd) -> None:
    model = _reshaped([0, 4], ["B", "D"])  # D must be 4: neither 16 nor 1 fits
    with pytest.raises(DataError) as exc:
        synthesize(model)
    message = str(exc.value)
    assert message.startswith("input 'x0' (dims ['D']): synthetic values do not fit")
    assert message.endswith("pass --data with real inputs") and "\n" not in message
    sections = _chain_keeps_outputs(model, [{"x0": X["x"]}])  # fold does what it can prove
    assert sections["fold"]["probe_error"] == message
    assert sections["fold"]["verified"].startswith("not checked")
    src = tmp_path / "model.onnx"
    onnx.save(model, src)
    result = invoke(src, "-q", "--device", "cpu", "-p", "vote", "-o", tmp_path / "out.onnx")
    assert result.exit_code == 2
    assert result.stderr.strip() == f"Error: {message}"
    assert "onnxruntime:" not in capfd.readouterr().err.replace(message, "")
