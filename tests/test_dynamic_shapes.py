"""Heads prune on exports with dynamic batch and sequence: Reshape targets computed at run time
(``Shape -> Gather -> Unsqueeze -> Concat``) are followed, and their constants rewritten."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from attention_models import D, E, H, dynamo_encoder, legacy_encoder, split_heads
from conftest import MODELS, invoke
from onnx import helper, numpy_helper

import onnxprune
from onnxprune.analysis.handlers.reshape import factor_blocks
from onnxprune.analysis.labels import ChannelGroup
from onnxprune.analysis.probe import probe
from onnxprune.analysis.shape_expr import Dim, value
from onnxprune.analysis.state import Analysis
from onnxprune.analysis.static_dims import fixed_axis
from onnxprune.analysis.walk import analyse
from onnxprune.graph import prepare_for_pruning
from onnxprune.runner import run_model

VOTE = "vote:sparsity=0.25,round_to=1,protect=linear"
SIZES = [(1, 5), (1, 8), (3, 5), (3, 8)]

CASES: dict[str, tuple[Callable[[], onnx.ModelProto], list[str]]] = {
    # the legacy scale is computed from Shape (Cast, Sqrt, Div): cleanup folds it to a constant
    "legacy_encoder": (legacy_encoder, ["cleanup"]),
    "dynamo_encoder": (dynamo_encoder, []),
    "dynamo_encoder_cleaned": (dynamo_encoder, ["cleanup"]),
    **{f"split_heads_{s}": (lambda s=s: split_heads(s), []) for s in ("legacy", "dynamo")},
    **{f"split_heads_{s}": (lambda s=s: split_heads(s), []) for s in ("zeros", "mul", "sizes")},
}


def _feeds(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((batch, seq, E)).astype(np.float32)
    return {"input": x}


def _assert_same_at_every_size(want: onnx.ModelProto, got: onnx.ModelProto) -> None:
    for batch, seq in SIZES:
        feeds = _feeds(batch, seq)
        a, b = run_model(want, feeds), run_model(got, feeds)
        for name, value_ in a.items():
            assert b[name].shape == (batch, seq, E)
            np.testing.assert_allclose(b[name], value_, rtol=1e-5, atol=1e-5, err_msg=name)


def _heads(model: onnx.ModelProto) -> ChannelGroup:
    groups = onnxprune.channel_groups(model)
    heads = [g for g in groups if g.channels == H]
    assert len(heads) == 1, [g.to_dict() for g in groups]
    return heads[0]


@pytest.mark.parametrize("case", list(CASES))
def test_heads_are_prunable_on_the_raw_export(case: str) -> None:
    """Without cleanup the heads group is free: no target is 'computed at run time'."""
    build, _ = CASES[case]
    heads = _heads(build())
    assert heads.prunable and heads.pinned == 0, heads.to_dict()
    assert not any("computed at run time" in r for r in heads.reasons)


@pytest.mark.parametrize("case", list(CASES))
def test_one_head_of_four_prunes_and_fold_is_exact_at_every_size(case: str) -> None:
    """vote (a quarter of 4 heads, round_to=1) zeroes one head; fold removes its q, k, v
    columns and out-projection rows, rewrites the head count in every computed target, and
    the folded model gives the zeroed model's outputs at batch 1 and 3, sequence 5 and 8."""
    build, before = CASES[case]
    model, _ = onnxprune.run(build(), before) if before else (build(), None)
    zeroed, _ = onnxprune.run(model, [VOTE])
    folded, report = onnxprune.run(zeroed, ["fold"])
    section = report["passes"][0]
    assert section["channels_removed"] == 1, section["blocked"]
    assert section["verified"].startswith("outputs equal")
    sizes = [list(t.dims) for t in folded.graph.initializer]
    if case.startswith("split_heads"):
        assert sizes.count([E, (H - 1) * D]) == 3 and [(H - 1) * D, E] in sizes, sizes
    else:
        assert [E, 3 * (H - 1) * D] in sizes and [E, (H - 1) * D] in sizes, sizes
    _assert_same_at_every_size(zeroed, folded)


def test_the_real_legacy_export_with_a_dynamic_batch_prunes_heads() -> None:
    """models/digits/torch_encoder.onnx: torch's legacy export, batch ``N``: the model width is
    read with Shape (``embed_dim``), divided by the head count, and merged back; every target
    is followed, the width entry of the merge becomes a constant, and one head goes."""
    path = MODELS / "digits/torch_encoder.onnx"
    if not path.exists():
        pytest.skip("fixture not present")
    model = onnxprune.load(path)
    assert _heads(model).prunable
    cleaned, _ = onnxprune.run(model, ["cleanup"])
    zeroed, _ = onnxprune.run(cleaned, [VOTE])
    folded, report = onnxprune.run(zeroed, ["fold"])
    assert report["passes"][0]["channels_removed"] == 1
    x = np.random.default_rng(1).standard_normal((3, 8, 8)).astype(np.float32)
    want, got = run_model(zeroed, {"input": x}), run_model(folded, {"input": x})
    np.testing.assert_allclose(got["output"], want["output"], rtol=1e-5, atol=1e-5)


def test_inspect_no_longer_says_computed_at_run_time(tmp_path: Path) -> None:
    for name, build in (("legacy", legacy_encoder), ("dynamo", dynamo_encoder)):
        path = tmp_path / f"{name}.onnx"
        onnx.save(build(), path)
        result = invoke(path, "--inspect")
        assert result.exit_code == 0, result.stderr
        assert "computed at run time" not in result.stdout
        assert f"{H}/{H}" in result.stdout, result.stdout


def test_head_size_read_from_the_channel_count_pins() -> None:
    """``x.view(B, S, 4, x.size(-1) // 4)``: the head size follows the width, so removing a
    head would change it; the heads stay, and fold leaves an exact model."""
    model = split_heads("head_size_from_width")
    heads = _heads(model)
    assert not heads.prunable
    assert any("reads a channel count at run time" in r for r in heads.reasons), heads.reasons
    zeroed, _ = onnxprune.run(model, ["vote:sparsity=0.25,round_to=1"])
    folded, report = onnxprune.run(zeroed, ["fold"])
    _assert_same_at_every_size(zeroed, folded)


def test_shape_constants_shared_between_targets_are_copied_on_write() -> None:
    """The dynamo export shares ``[32]`` between the (3, E) unflatten, the merge of the heads
    (both must become 24) and the view after the output projection (must stay 32), and one
    ``Concat`` between the q, k and v views: each rewritten target gets its own copy."""
    zeroed, _ = onnxprune.run(dynamo_encoder(), [VOTE])
    folded, _ = onnxprune.run(zeroed, ["fold"])
    inits = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    readers = {t: [n for n in folded.graph.node if t in n.input] for t in inits}
    width = [t for t, a in inits.items() if a.dtype == np.int64 and a.tolist() == [E]]
    cut = [t for t, a in inits.items() if a.dtype == np.int64 and a.tolist() == [(H - 1) * D]]
    assert len(width) == 1 and len(readers[width[0]]) == 1, "the view after out_proj keeps it"
    assert len(cut) == 2 and all(len(readers[t]) == 1 for t in cut)
    three = [a.ndim for a in inits.values() if a.dtype == np.int64 and a.tolist() in ([3], 3)]
    # bsz * 3 for each of the q, k, v views (their shared Concat copied per view), the head
    # count of the two 4-D views sharing a Concat and of k's, and the (3, E) unflatten's 3
    assert sorted(three) == [0, 0, 0, 1, 1, 1, 1], three
    assert not [n for n in folded.graph.node if not any(o in _read(folded) for o in n.output)]


def _read(model: onnx.ModelProto) -> set[str]:
    return {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}


def _analysis(model: onnx.ModelProto) -> tuple[Analysis, onnx.ModelProto]:
    prepare_for_pruning(model.graph)
    return analyse(model, probe(model).shapes), model


def test_shape_expressions_of_the_legacy_unflatten_and_views() -> None:
    """``Concat(Slice(Shape(p), 0, Mod(2, 3)), [3, E], Slice(Shape(p), Mod(2, 3) + 1, end))``
    is (p[0], p[1], 3, E); ``view(tgt_len, bsz * 4, head_dim)`` is (x[1], x[0] * 4, E / 4)."""
    an, model = _analysis(legacy_encoder())
    targets = [n.input[1] for n in model.graph.node if n.op_type == "Reshape"]
    unflatten = value(an, targets[2])
    assert unflatten is not None
    first, second, three, width = unflatten.terms
    assert first is not None and second is not None and three is not None and width is not None
    p = first.dims[0].tensor
    assert first.dims == (Dim(p, 0),) and second.dims == (Dim(p, 1),)
    assert three.constant and three.coef == 3 and three.leaves
    assert width.dims[0].axis == 2 and width.origin is not None  # the width, read at run time
    q_view = value(an, targets[3])
    assert q_view is not None
    mul = q_view.terms[1]
    assert mul is not None and mul.coef == H and mul.dims[0].axis == 1 and mul.leaves
    assert q_view.terms[2] is not None and q_view.terms[2].opaque  # E // 4: a quotient


def test_bsz_times_heads_regroups_the_channel_axis() -> None:
    """(L, N, 32) -> (L, N * 4, 8): the head axis merges with the batch; its labels repeat the
    four heads over N, and the target's ``4`` (in ``Mul(bsz, 4)``) is the rewritten constant."""
    an, model = _analysis(legacy_encoder())
    views = [n for n in model.graph.node if n.op_type == "Reshape"][3:6]
    for node in views:
        lab = an.labels[node.output[0]]
        assert lab.axis == 1 and len(lab.ids) == 2 * H  # the probe runs two samples
        roots = an.roots()[lab.ids]
        assert roots[:H].tolist() == roots[H:].tolist() and len(set(roots.tolist())) == H
    rewrites = [rw for rw in an.rewrites if rw.kind == "shape" and rw.node in views]
    assert len(rewrites) == 3
    assert all(
        rw.init is not None and int(an.array(rw.init).reshape(-1)[rw.index]) == H for rw in rewrites
    )


def test_shape_of_a_channel_count_read_elsewhere_pins() -> None:
    """Shape of a labelled tensor whose channel count flows into an op no rule follows (here
    ConstantOfShape) pins."""
    rng = np.random.default_rng(0)
    inits = {
        "w": rng.standard_normal((E, E)).astype(np.float32),
        "w2": rng.standard_normal((E, 2)).astype(np.float32),
        "two": np.array([2], np.int64),
    }
    nodes = [
        helper.make_node("MatMul", ["input", "w"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Shape", ["r"], ["s"]),
        helper.make_node("Gather", ["s", "two"], ["width"], axis=0),
        helper.make_node("ConstantOfShape", ["width"], ["ones"]),
        helper.make_node("MatMul", ["r", "w2"], ["y0"]),
        helper.make_node("Shape", ["ones"], ["n"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["b", "s", E])],
        [
            helper.make_tensor_value_info("y0", onnx.TensorProto.FLOAT, ["b", "s", 2]),
            helper.make_tensor_value_info("n", onnx.TensorProto.INT64, [1]),
        ],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (group,) = [g for g in onnxprune.channel_groups(model) if g.channels == E]
    assert not group.prunable
    assert any("read at run time by ConstantOfShape" in r for r in group.reasons), group.reasons


def test_the_shape_caches_do_not_keep_the_analysis_alive() -> None:
    an, _ = _analysis(dynamo_encoder())
    ref = weakref.ref(an)
    del an
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize(
    ("src", "dst", "axis", "parts"),
    [
        ((16, 2, 32), (16, 8, 8), 2, [(1, 4), (2, 8)]),  # (L, N, E) -> (L, N * 4, 8)
        ((2, 16, 32), (2, 16, 4, 8), 2, [(2, 4), (3, 8)]),  # view(B, S, H, d)
        ((2, 16, 4, 8), (2, 16, 32), 2, [(2, 4)]),  # back to (B, S, H * d)
        ((8, 16, 8), (2, 4, 16, 8), 0, [(0, 2), (1, 4)]),  # (N * H, L, d) -> (N, H, L, d)
        ((2, 4, 3, 3), (2, 36), 1, [(1, 4)]),  # Flatten
    ],
)
def test_factor_blocks_cut_the_channel_axis_where_it_lands(
    src: tuple[int, ...], dst: tuple[int, ...], axis: int, parts: list[tuple[int, int]]
) -> None:
    """(output axis, size of the part of the channel axis it holds) for each output axis."""
    found = factor_blocks(src, dst, axis)
    assert found is not None
    factors, (c0, c1), out_axes = found
    got = [
        (j, int(np.prod(factors[max(a, c0) : min(b, c1)])))
        for j, (a, b) in sorted(out_axes.items())
        if max(a, c0) < min(b, c1)
    ]
    assert got == parts, (factors, (c0, c1), out_axes)


def test_factor_blocks_refuse_a_piece_of_another_axis_next_to_the_channels() -> None:
    """(B, 16, 32) -> (B, 8, 64) puts half of the sequence with the channels: the landing would
    depend on the sequence length seen, so the reshape is not followed."""
    assert factor_blocks((2, 16, 32), (2, 8, 64), 2) is None


def test_expand_to_a_shape_read_at_run_time_follows_the_channels() -> None:
    """An SE-like gate, ``x * pooled.expand_as(x)`` (``Expand(pooled, Shape(x))``): the entry
    of the channel axis reads the same channels' count; a zeroed channel folds away."""
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((4, 3, 1, 1)).astype(np.float32)
    w1[2] = 0
    inits = {"w1": w1, "w2": rng.standard_normal((2, 4, 1, 1)).astype(np.float32)}
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Shape", ["r"], ["s"]),
        helper.make_node("Expand", ["p", "s"], ["e"]),
        helper.make_node("Mul", ["r", "e"], ["m"]),
        helper.make_node("Conv", ["m", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "se",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 2, "h", "w"])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folded, report = onnxprune.run(model, ["fold"])
    assert report["passes"][0]["channels_removed"] == 1
    for shape in ((1, 3, 5, 5), (3, 3, 7, 4)):
        x = {"x": rng.standard_normal(shape).astype(np.float32)}
        np.testing.assert_allclose(
            run_model(folded, x)["y"], run_model(model, x)["y"], rtol=1e-5, atol=1e-5
        )


def test_fixed_axes_come_from_weights_and_declared_sizes() -> None:
    """In the legacy export, ``q.view(bsz, 4, tgt_len, E // 4)``: the head size is fixed (the
    declared width of the input, divided by a constant), the batch and sequence are not."""
    an, model = _analysis(legacy_encoder())
    q4 = [n for n in model.graph.node if n.op_type == "Reshape"][6].output[0]
    assert [fixed_axis(an, q4, a) for a in range(4)] == [False, True, False, True]
    proj = next(n for n in model.graph.node if n.op_type == "MatMul").output[0]
    assert [fixed_axis(an, proj, a) for a in range(3)] == [False, False, True]
