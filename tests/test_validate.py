"""The validate pass and its parts: metrics against hand-computed cases, interleaved latency
(with a fake clock, never real timings), and the pass on the digits models with real labels."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.analysis.probe import probe
from onnxprune.analysis.walk import analyse
from onnxprune.context import Context
from onnxprune.errors import InputMismatch, OutputMismatch, PassOptionError, UnsupportedModelError
from onnxprune.graph import lift_constants
from onnxprune.passes.validate import Validate
from onnxprune.pruning.zero import random_classes, zero_classes
from onnxprune.runtime import CPU, channel_multiple
from onnxprune.validation.compare import (
    classification_scores,
    compare_classification,
    compare_output,
    cosine_similarity,
    labels_to_classes,
)
from onnxprune.validation.latency import (
    LatencyComparison,
    LatencyStats,
    compare_latency,
    interleaved,
    percentile,
    round_order,
)
from onnxprune.validation.slow import is_slower, slow_causes, slow_message, unaligned_convs

MODELS = Path(__file__).resolve().parents[1] / "models"
DIGITS = MODELS / "digits"


# --- output comparison --------------------------------------------------------------------------


def test_compare_output_hand_computed():
    ref = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    new = np.array([[1.0, 2.5], [2.0, 4.0]], np.float32)
    c = compare_output("y", ref, new)
    assert c.shape == [2, 2]
    assert c.max_abs == pytest.approx(1.0)
    assert c.mean_abs == pytest.approx((0 + 0.5 + 1 + 0) / 4)
    assert c.max_rel == pytest.approx(1 / 3)
    assert c.mean_rel == pytest.approx((0 + 0.25 + 1 / 3 + 0) / 4)
    cos0 = (1 * 1 + 2 * 2.5) / (math.sqrt(5) * math.sqrt(1 + 6.25))
    cos1 = (3 * 2 + 4 * 4) / (5 * math.sqrt(4 + 16))
    assert c.cosine == pytest.approx((cos0 + cos1) / 2)
    assert c.cosine_min == pytest.approx(min(cos0, cos1))
    assert c.top1 == 1.0  # arg-max is column 1 in every row of both
    assert c.nonfinite == 0
    assert c  # no tolerances set: passes unless NaN/Inf
    text = str(c)
    assert "y [2, 2]" in text and "max abs 1" in text and "(atol=1, rtol=0.333)" in text
    assert text.endswith("PASSED")


def test_compare_output_tolerances_and_min_cosine():
    ref = np.array([[1.0, 2.0], [3.0, 4.0]])
    new = ref + 0.01
    assert compare_output("y", ref, new, atol=0.02)
    assert not compare_output("y", ref, new, atol=0.001)
    assert compare_output("y", ref, new, rtol=0.011)  # 0.01 <= 0.011 * |r| for every r >= 1
    assert not compare_output("y", ref, new, rtol=0.004)  # fails at r = 1, 2
    assert compare_output("y", ref, new, min_cosine=0.999)
    flipped = compare_output("y", ref, -ref, min_cosine=0.0)
    assert flipped.cosine == pytest.approx(-1.0) and not flipped
    assert str(flipped).endswith("FAILED")


def test_top1_agreement():
    ref = np.array([[2.0, 1.0], [0.0, 1.0], [5.0, 4.0], [1.0, 9.0]])
    new = np.array([[1.0, 2.0], [0.0, 1.0], [5.0, 4.0], [9.0, 1.0]])
    assert compare_output("logits", ref, new).top1 == 0.5
    assert compare_output("v", ref[:, 0], new[:, 0]).top1 is None  # rank 1: not a classifier
    assert compare_output("i", ref.astype(np.int64), new.astype(np.int64)).top1 is None


def test_cosine_edge_cases():
    zero, one = np.zeros((1, 3)), np.ones((1, 3))
    assert cosine_similarity(zero, zero)[0] == 1.0
    assert cosine_similarity(zero, one)[0] == 0.0
    assert cosine_similarity(one, 2 * one)[0] == pytest.approx(1.0)
    # a rank-1 output is one vector: [1, 0] vs [0, 1] is orthogonal
    assert compare_output("v", np.array([1.0, 0.0]), np.array([0.0, 1.0])).cosine == pytest.approx(
        0.0
    )


def test_new_nan_and_inf_are_counted_and_excluded():
    ref = np.array([[1.0, 2.0], [np.nan, 4.0]])
    new = np.array([[np.nan, 2.0], [np.nan, np.inf]])
    c = compare_output("y", ref, new)
    # (0,0): new NaN where ref is finite; (1,1): new Inf; (1,0): NaN on both sides is not new
    assert c.nonfinite == 2
    assert not c and "2 new NaN/Inf" in str(c)
    assert c.max_abs == 0.0  # the only comparable position, (0,1), is equal
    d = c.to_dict()
    assert d["nonfinite"] == 2 and d["passed"] is False
    json.dumps(d, allow_nan=False)  # JSON-safe
    all_nan = compare_output("y", np.ones((2, 2)), np.full((2, 2), np.nan)).to_dict()
    assert all_nan["max_abs"] is None and all_nan["nonfinite"] == 4


def test_shape_change_is_an_error_naming_the_output():
    with pytest.raises(
        OutputMismatch, match=r"output 'fc2' changed shape: original \[4, 10\], pruned \[4, 9\]"
    ) as exc:
        compare_output("fc2", np.zeros((4, 10)), np.zeros((4, 9)))
    assert exc.value.exit_code == 1


# --- classification ------------------------------------------------------------------------------


def test_classification_scores_hand_computed():
    labels = np.array([0, 0, 1, 1, 2])
    preds = np.array([0, 1, 1, 1, 0])
    s = classification_scores(labels, preds)
    # class 0: P 1/2 R 1/2 F1 1/2; class 1: P 2/3 R 1 F1 4/5; class 2: never predicted, P R F1 0
    assert s.samples == 5
    assert s.accuracy == pytest.approx(0.6)
    assert s.precision == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    assert s.recall == pytest.approx((0.5 + 1 + 0) / 3)
    assert s.f1 == pytest.approx((0.5 + 0.8 + 0) / 3)
    perfect = classification_scores(labels, labels)
    assert (perfect.accuracy, perfect.precision, perfect.recall, perfect.f1) == (1, 1, 1, 1)


def test_compare_classification_with_and_without_labels():
    ref = np.eye(4)[[0, 1, 2, 3]]  # predicts 0, 1, 2, 3
    new = np.eye(4)[[0, 1, 2, 2]]  # last sample wrong
    labels = np.array([0, 1, 2, 2])  # the original gets the last one wrong, the pruned right
    c = compare_classification("y", ref, new, labels, max_drop=0.0)
    assert c.original.accuracy == 0.75 and c.pruned.accuracy == 1.0
    assert c.drop == -0.25 and c and c.difference()["accuracy"] == 0.25
    unlabelled = compare_classification("y", ref, new, None, max_drop=0.2)
    assert unlabelled.original.accuracy == 1.0 and unlabelled.pruned.accuracy == 0.75
    assert unlabelled.drop == 0.25 and not unlabelled
    assert "against the original's predictions" in str(unlabelled) and "FAILED" in str(unlabelled)
    assert set(c.to_dict()) == {
        "output",
        "labels",
        "original",
        "pruned",
        "difference",
        "accuracy_drop",
    }


def test_labels_forms():
    assert labels_to_classes(np.array([[0, 1], [1, 0]])).tolist() == [1, 0]  # one-hot
    assert labels_to_classes(np.array([2.0, 1.0])).tolist() == [2, 1]
    assert labels_to_classes(np.array([[3], [4]])).tolist() == [3, 4]
    with pytest.raises(onnxprune.OnnxPruneError, match="integer class indices"):
        labels_to_classes(np.array([0.5, 1.0]))


# --- latency: order and statistics, never real timings --------------------------------------------


def test_interleaved_order_rotates_each_round():
    calls: list[str] = []
    times = interleaved([lambda: calls.append("a"), lambda: calls.append("b")], runs=4, warmup=2)
    assert calls == [
        "a",
        "b",
        "a",
        "b",  # warm-up
        "a",
        "b",
        "b",
        "a",
        "a",
        "b",
        "b",
        "a",
    ]  # timed, alternating who goes first
    assert [len(t) for t in times] == [4, 4]
    assert round_order(3, 1) == [1, 2, 0] and round_order(3, 3) == [0, 1, 2]


def test_interleaved_times_with_a_fake_clock():
    now = [0.0]
    clock = lambda: now[0]  # noqa: E731
    durations = {"a": iter([1.0, 2.0, 3.0]), "b": iter([10.0, 30.0, 20.0])}

    def step(name: str):
        def fn():
            now[0] += next(durations[name])

        return fn

    t_a, t_b = interleaved([step("a"), step("b")], runs=3, warmup=0, clock=clock)
    assert t_a == [1.0, 2.0, 3.0] and t_b == [10.0, 30.0, 20.0]


def test_latency_stats_median_and_p90():
    s = LatencyStats.from_seconds([i / 1000 for i in range(1, 11)])  # 1..10 ms
    assert s.runs == 10
    assert s.median_ms == pytest.approx(5.5)
    assert s.p90_ms == pytest.approx(9.1)  # rank 8.1 between 9 and 10
    assert s.p90_ms == pytest.approx(float(np.percentile(np.arange(1, 11), 90)))
    assert (s.min_ms, s.max_ms, s.mean_ms) == (
        pytest.approx(1),
        pytest.approx(10),
        pytest.approx(5.5),
    )
    odd = LatencyStats.from_seconds([0.003, 0.001, 0.002])
    assert odd.median_ms == pytest.approx(2.0) and odd.p90_ms == pytest.approx(2.8)
    assert percentile([7.0], 90) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        LatencyStats.from_seconds([])


def test_compare_latency_ratio_and_gate():
    now = [0.0]
    steps = {"a": 0.002, "b": 0.001}

    def fn(name):
        return lambda: now.__setitem__(0, now[0] + steps[name])

    cmp = compare_latency(fn("a"), fn("b"), runs=5, warmup=1, max_ratio=0.6, clock=lambda: now[0])
    assert cmp.original.median_ms == pytest.approx(2.0) and cmp.pruned.median_ms == pytest.approx(
        1.0
    )
    assert cmp.ratio == pytest.approx(0.5) and cmp and not is_slower(cmp)
    assert not LatencyComparison(cmp.original, cmp.pruned, max_ratio=0.4)
    assert "ratio 0.500" in str(cmp)
    with pytest.raises(ValueError):
        interleaved([lambda: None], runs=0)


def _stats(median: float, p90: float) -> LatencyStats:
    return LatencyStats(
        runs=10, median_ms=median, p90_ms=p90, mean_ms=median, min_ms=median, max_ms=p90
    )


def test_slower_needs_margin_and_beyond_noise():
    assert is_slower(LatencyComparison(_stats(1.0, 1.01), _stats(1.2, 1.21)))
    assert not is_slower(LatencyComparison(_stats(1.0, 1.01), _stats(1.03, 1.04)))  # within 5%
    assert not is_slower(LatencyComparison(_stats(1.0, 1.5), _stats(1.2, 1.3)))  # noise


# --- the pass on real models ---------------------------------------------------------------------


def _ctx(model_rel: str, data: str | None = "test") -> tuple[onnx.ModelProto, Context]:
    model = onnxprune.load(MODELS / model_rel)
    npz = (MODELS / model_rel).with_suffix(f".{data}.npz") if data else None
    return model, Context(original=model, data_path=npz, providers=[CPU])


def _manifest_accuracy(name: str) -> float:
    notes = json.loads(json.loads((DIGITS / "MANIFEST.json").read_text())[name]["notes"])
    return next(v for k, v in notes.items() if k.endswith("_test_accuracy"))


@pytest.mark.parametrize("name", ["torch_cnn", "keras_cnn", "torch_encoder"])
def test_digits_against_itself(name):
    model, ctx = _ctx(f"digits/{name}.onnx")
    v = Validate(
        max_accuracy_drop=0.0, min_cosine=0.9999, max_latency_ratio=100.0, runs=3, warmup=1
    )
    section = v.run(copy.deepcopy(model), ctx).report
    cls = section["classification"]
    assert section["data"] == {
        "source": str(DIGITS / f"{name}.test.npz"),
        "synthetic": False,
        "samples": 359,
        "labels": True,
    }
    assert cls["labels"] is True and cls["pruned"] == cls["original"]
    assert cls["original"]["accuracy"] == pytest.approx(_manifest_accuracy(name), abs=2e-3)
    assert cls["accuracy_drop"] == 0.0
    (out,) = section["outputs"]
    assert out["shape"] == [359, 10] and out["max_abs"] == 0.0 and out["top1"] == 1.0
    assert section["cost"]["ratio"] == {"parameters": 1.0, "macs": 1.0, "bytes": 1.0}
    assert section["latency"]["runs"] == 3 and section["latency"]["provider"] == CPU
    assert [g["name"] for g in section["gates"]] == [
        "finite",
        "min_cosine",
        "max_accuracy_drop",
        "max_latency_ratio",
    ]
    assert section["passed"] and all(g["passed"] for g in section["gates"])


def test_macs_use_the_dims_of_the_timed_batch():
    model, ctx = _ctx("digits/torch_cnn.onnx")
    one = Validate(runs=1, warmup=0).run(copy.deepcopy(model), ctx).report["cost"]
    four = Validate(runs=1, warmup=0, latency_batch=4).run(copy.deepcopy(model), ctx).report["cost"]
    assert one["dims"] == {"N": 1} and four["dims"] == {"N": 4}
    assert four["original"]["macs"] == 4 * one["original"]["macs"] > 0
    assert set(one["original"]["macs_by_op"]) == {"Conv", "Gemm"}


def test_synthetic_data_scores_against_the_original():
    model, ctx = _ctx("digits/torch_cnn.onnx", data=None)
    section = Validate(runs=0, samples=8).run(copy.deepcopy(model), ctx).report
    assert section["data"]["synthetic"] and section["data"]["samples"] == 8
    assert section["classification"]["labels"] is False
    assert section["classification"]["original"]["accuracy"] == 1.0
    assert section["latency"] is None
    # no labels and no limit set: the default cosine gate (issue 9: no PASSED on a collapse)
    assert [g["name"] for g in section["gates"]] == ["finite", "min_cosine"]
    assert section["gates"][1]["limit"] == 0.99 and section["gate_defaults"]


def test_damaged_model_fails_gates_without_raising():
    model, ctx = _ctx("digits/torch_cnn.onnx")
    damaged = copy.deepcopy(model)
    last = [n for n in damaged.graph.node if n.op_type == "Gemm"][-1]
    for t in damaged.graph.initializer:
        if t.name in last.input[1:]:
            t.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(t)), t.name))
    section = Validate(max_accuracy_drop=0.01, min_cosine=0.99, runs=0).run(damaged, ctx).report
    failed = {g["name"] for g in section["gates"] if not g["passed"]}
    assert failed == {"max_accuracy_drop", "min_cosine"} and not section["passed"]
    assert section["classification"]["accuracy_drop"] > 0.5


def _linear(
    outputs: int = 3, batch: int = 2, bias: float = 0.0, inp: str = "x", width: int = 4
) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((width, outputs), np.float32), "W")
    b = numpy_helper.from_array(np.full(outputs, bias, np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMul", [inp, "W"], ["t"]), helper.make_node("Add", ["t", "B"], ["y"])],
        "lin",
        [helper.make_tensor_value_info(inp, TensorProto.FLOAT, [batch, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, outputs])],
        [w, b],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize(
    ("pruned", "error", "expected"),
    [
        (_linear(inp="z"), InputMismatch, "the pruned model has no input 'x' (its inputs: z)"),
        (
            _linear(width=5),
            InputMismatch,
            "cannot take input 'x': it declares [2, 5], the original [2, 4]",
        ),
        (
            _linear(outputs=2),
            OutputMismatch,
            "output 'y' changed shape: original [32, 3], pruned [32, 2]",
        ),
    ],
)
def test_structural_errors_name_what_changed(pruned, error, expected):
    ctx = Context(original=_linear(), providers=[CPU])
    with pytest.raises(error) as exc:
        Validate(runs=0).run(pruned, ctx)
    assert expected in str(exc.value) and exc.value.exit_code == 1
    assert "\n" not in str(exc.value)


def test_missing_output_is_an_error():
    pruned = _linear()
    pruned.graph.node[1].output[0] = "z"
    pruned.graph.output[0].name = "z"
    with pytest.raises(
        OutputMismatch, match="the pruned model has no output 'y' \\(its outputs: z\\)"
    ):
        Validate(runs=0).run(pruned, Context(original=_linear(), providers=[CPU]))


def test_nan_appearing_is_a_failed_gate_not_an_error():
    section = (
        Validate(runs=0, min_cosine=0.9)
        .run(_linear(bias=float("nan")), Context(original=_linear(), providers=[CPU]))
        .report
    )
    gates = {g["name"]: g for g in section["gates"]}
    assert gates["finite"] == {
        "name": "finite",
        "output": "y",
        "value": 96,
        "limit": 0,
        "passed": False,
    }
    assert gates["min_cosine"]["passed"] is False and gates["min_cosine"]["value"] is None
    assert not section["passed"]
    json.dumps(section, allow_nan=False)


def test_accuracy_gate_needs_a_classifier_output():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])
    m = helper.make_model(
        helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "r", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    m.ir_version = 8
    with pytest.raises(
        UnsupportedModelError, match="max_accuracy_drop needs a classifier-like output"
    ):
        Validate(runs=0, max_accuracy_drop=0.1).run(copy.deepcopy(m), Context(original=m))
    with pytest.raises(PassOptionError, match="label_output='nope' is not an output"):
        Validate(runs=0, label_output="nope").run(copy.deepcopy(m), Context(original=m))


@pytest.mark.parametrize(
    "spec",
    [
        "validate:min_cosine=2",
        "validate:max_accuracy_drop=-0.1",
        "validate:max_latency_ratio=0",
        "validate:runs=0,max_latency_ratio=1",
        "validate:latency_batch=0",
        "validate:warmup=-1",
    ],
)
def test_bad_options(spec):
    with pytest.raises(PassOptionError, match="pass validate"):
        onnxprune.run(_linear(), [spec])


def _pruned_cnn() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    model = onnxprune.load(DIGITS / "torch_cnn.onnx")
    zeroed = copy.deepcopy(model)
    lift_constants(zeroed.graph)
    an = analyse(zeroed, probe(zeroed).shapes)
    zero_classes(zeroed, an, random_classes(an, 0.5, 0))
    folded, _ = onnxprune.run(zeroed, ["fold"], device="cpu")
    return model, folded


def test_slow_cause_names_unaligned_convs():
    model, folded = _pruned_cnn()
    convs = unaligned_convs(model, folded)
    assert convs and all("->" in c for c in convs)
    cmp = LatencyComparison(_stats(0.1, 0.101), _stats(0.15, 0.151))
    causes = slow_causes(model, folded, CPU, cmp)
    assert f"not multiples of {channel_multiple()}" in causes[0] and "NCHWc" in causes[0]
    assert "very short" in causes[1]
    assert (
        slow_causes(
            model, folded, "CUDAExecutionProvider", LatencyComparison(_stats(1, 1), _stats(2, 2))
        )
        == []
    )
    assert unaligned_convs(model, model) == []
    msg = slow_message(
        {
            "original": cmp.original.to_dict(),
            "pruned": cmp.pruned.to_dict(),
            "ratio": cmp.ratio,
            "provider": CPU,
            "causes": causes,
        }
    )
    assert msg.startswith("the pruned model is SLOWER than the original") and "ratio 1.50" in msg


def test_validate_is_listed():
    assert "validate" in onnxprune.available_passes()
    opts = {name for name, *_ in onnxprune.get_pass("validate").option_specs()}
    assert {
        "max_accuracy_drop",
        "min_cosine",
        "max_latency_ratio",
        "runs",
        "warmup",
        "threads",
    } <= opts


def test_inplace_pipeline_keeps_the_original_for_validate():
    model = onnxprune.load(DIGITS / "torch_cnn.onnx")
    _, report = onnxprune.run(
        copy.deepcopy(model),
        ["validate:runs=0"],
        data=DIGITS / "torch_cnn.test.npz",
        device="cpu",
        inplace=True,
    )
    assert Validate.needs_original
    assert report["passes"][-1]["classification"]["accuracy_drop"] == 0.0
