"""Attention heads of the transformers SDPA exports: the softmax's NaN rows are masked with
``IsNaN -> Where(isnan, 0, softmax)``, per element and per head, so the head count is not
fixed by it; heads prune at the default settings, and fold removes them exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import build_model
from onnx import TensorProto, helper

import onnxprune
from onnxprune.analysis.labels import State
from onnxprune.analysis.probe import probe
from onnxprune.analysis.walk import analyse

REAL = Path(__file__).resolve().parents[1] / "models" / "real"
HF = ["bert_legacy", "bert_dynamo", "gpt2_legacy", "gpt2_dynamo"]


def _cleaned(name: str) -> onnx.ModelProto:
    return onnxprune.run(onnxprune.load(REAL / f"{name}.onnx"), ["cleanup"])[0]


@pytest.mark.parametrize("name", HF)
def test_no_group_is_pinned_by_the_sdpa_mask(name: str) -> None:
    groups = onnxprune.channel_groups(_cleaned(name))
    reasons = [r for g in groups for r in g.reasons]
    assert not any("IsNaN" in r or "Where" in r for r in reasons), reasons
    heads = [g for g in groups if g.channels == 4 and g.prunable]
    assert len(heads) == 2  # one group of 4 heads per layer, both free


@pytest.mark.parametrize("name", ["bert_legacy", "gpt2_dynamo"])
def test_the_default_chain_removes_heads_with_fold_exact(name: str) -> None:
    data = REAL / f"{name}.calib.npz"
    new, report = onnxprune.run(_cleaned(name), ["vote", "fold"], data=data)
    assert report["passes"][-1]["verified"].startswith("outputs equal")
    sizes = sorted(g.channels for g in onnxprune.channel_groups(new) if g.prunable)
    # the two layers' groups of 4 heads keep 2 each (half, at the defaults); FFNs shrink too
    assert sizes.count(2) == 2 and 4 not in sizes, sizes


def test_a_zero_bias_keeps_a_zeroed_channel_zero() -> None:
    """Add(bias, x @ W): where both the column of W and the bias are 0, the sum is ZERO (not
    just CONST), so a consumer reading it through a value-independent op may drop it."""
    w = np.ones((3, 4), np.float32)
    w[:, 1] = 0
    b = np.array([0.5, 0.0, 0.0, 0.25], np.float32)
    model = build_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"]),
            helper.make_node("Add", ["b", "m"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        {"w": w, "b": b},
    )
    an = analyse(model, probe(model).shapes)
    assert an.labels["y"].state.tolist() == [State.VAR, State.ZERO, State.VAR, State.VAR]
