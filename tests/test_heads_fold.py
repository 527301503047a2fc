"""Heads of a sentence encoder exported as all-MiniLM-L6-v2 is (eager attention, masked mean
pooling, legacy exporter at opset 17: models/real/bert_pooled): vote zeroes whole heads and
fold removes every one of them exactly; a zeroed head fold cannot remove gets a shortfall row
naming the consumer and the node where the analysis lost the zero (never silently nothing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import numpy_helper

import onnxprune
from onnxprune.cost import summarize
from onnxprune.runner import run_model

REAL = Path(__file__).resolve().parents[1] / "models" / "real"
MODEL = REAL / "bert_pooled.onnx"
CALIB = REAL / "bert_pooled.calib.npz"
HEADS = "vote:sparsity=0.5,round_to=1,protect=intermediate"  # heads only: the FFNs protected


def _feeds() -> dict[str, np.ndarray]:
    with np.load(CALIB) as d:
        return {k: d[k] for k in d.files}


def test_vote_zeroes_heads_and_fold_removes_them_all_exactly() -> None:
    model = onnxprune.load(MODEL)
    voted, vote_report = onnxprune.run(model, [HEADS], data=CALIB)
    zeroed = vote_report["passes"][0]["channels_pruned"]
    assert zeroed == 4  # 2 of the 4 heads in each of the 2 layers
    folded, report = onnxprune.run(voted, ["fold"], data=CALIB)
    fold = report["passes"][0]
    assert fold["channels_removed"] == zeroed, fold["shortfall"]
    assert fold["kept_zero"] == 0 and fold["shortfall"] == []
    assert fold["verified"].startswith("outputs equal")
    heads = [g for g in fold["groups"] if g["channels"] == 4]
    assert [g["channels_after"] for g in heads] == [2, 2]
    feeds = _feeds()
    want = run_model(voted, feeds)["embedding"]
    got = run_model(folded, feeds)["embedding"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert summarize(folded).macs < summarize(model).macs


def test_vote_and_fold_in_one_chain_without_cleanup() -> None:
    """The benchmark's chain: vote then fold on the export as it is (Constant nodes and all)."""
    _, report = onnxprune.run(onnxprune.load(MODEL), [HEADS, "fold"], data=CALIB)
    vote, fold = report["passes"]
    assert fold["channels_removed"] == vote["channels_pruned"] == 4


def test_a_zeroed_head_that_stays_is_reported_with_where_its_zero_was_lost() -> None:
    """Columns of head 0 zeroed in Q, K and V, their biases not: the head is a non-zero
    constant after the bias, the attention makes it a variable, and fold keeps it; the
    shortfall row says so, naming the output projection and both nodes."""
    model = onnxprune.load(MODEL)
    inits = {t.name: t for t in model.graph.initializer}
    projections = {
        f"/bert/encoder/layer.0/attention/self/{p}/MatMul" for p in ("query", "key", "value")
    }
    for node in model.graph.node:
        if node.name in projections:
            w = numpy_helper.to_array(inits[node.input[1]]).copy()
            w[:, :8] = 0  # head 0 of 4 (head size 8)
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(w, node.input[1]))
    folded, report = onnxprune.run(model, ["fold"], data=CALIB)
    fold = report["passes"][0]
    assert fold["channels_removed"] == 0
    assert fold["kept_zero"] == 1
    (row,) = fold["shortfall"]
    assert row["group"] == 0 and row["kept"] == 1
    reason = row["reason"]
    assert reason.startswith("zero at its producers")
    assert "MatMul /bert/encoder/layer.0/attention/output/dense/MatMul" in reason
    assert "not provably zero after Add /bert/encoder/layer.0/attention/self/query/Add" in reason
    assert "a variable after Add /bert/encoder/layer.0/attention/self/Add" in reason
    assert summarize(folded).parameters == summarize(model).parameters
