"""Padding masks: statistics over token positions skip padded tokens.

The model is a small encoder block applied per token (embedding, FFN with a Relu, output
masked), so the hidden activations of a real token do not depend on the padding around it: the
statistics of a padded calibration batch with its mask must equal those of the real tokens run
without any padding, one sentence at a time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.context import Context
from onnxprune.data import Dataset
from onnxprune.errors import OnnxPruneError
from onnxprune.pruning.calibrate import ChannelStats, activation_stats, collect
from onnxprune.pruning.masks import mask_input, positions
from onnxprune.runner import expose
from onnxprune.runtime import session

VOCAB, D, F, S = 20, 8, 16, 7


def encoder(
    mask_name: str = "attention_mask", mask_type: int = TensorProto.INT64
) -> onnx.ModelProto:
    """input_ids, mask [B, S] -> Gather(emb) -> MatMul(w1) + b1 -> Relu (h) -> MatMul(w2) -> *mask."""
    rng = np.random.default_rng(0)
    inits = {
        "emb": rng.standard_normal((VOCAB, D)),
        "w1": rng.standard_normal((D, F)),
        "b1": rng.standard_normal(F) * 0.5,
        "w2": rng.standard_normal((F, D)),
        "axes": np.array([2], np.int64),
    }
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
        helper.make_node("MatMul", ["e", "w1"], ["m1"]),
        helper.make_node("Add", ["m1", "b1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["m2"]),
        helper.make_node("Cast", [mask_name], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mf", "axes"], ["mu"]),
        helper.make_node("Mul", ["m2", "mu"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "encoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"]),
            helper.make_tensor_value_info(mask_name, mask_type, ["B", "S"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", D])],
        [
            numpy_helper.from_array(a if a.dtype == np.int64 else a.astype(np.float32), n)
            for n, a in inits.items()
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def padded(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``n`` sentences of 2..S tokens, right-padded with token 0 to S (mask 0 there)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, S + 1, n)
    ids = np.zeros((n, S), np.int64)
    mask = np.zeros((n, S), np.int64)
    for i, length in enumerate(lengths):
        ids[i, :length] = rng.integers(1, VOCAB, length)
        mask[i, :length] = 1
    return ids, mask


def real_token_stats(model: onnx.ModelProto, ids: np.ndarray, mask: np.ndarray) -> ChannelStats:
    """Statistics of ``h`` over the real tokens, each sentence run alone without padding."""
    sess = session(expose(model, ["h"]))
    stats = ChannelStats.empty(F)
    for row, m in zip(ids, mask, strict=True):
        length = int(m.sum())
        feed = {"input_ids": row[None, :length], "attention_mask": m[None, :length]}
        (h,) = sess.run(["h"], feed)
        stats.update(h, 2)
    return stats


def test_stats_skip_padding_and_equal_the_unpadded_tokens() -> None:
    model = encoder()
    ids, mask = padded(40)
    data = Dataset({"input_ids": ids, "attention_mask": mask}, None, "test")
    want = real_token_stats(model, ids, mask)
    got = collect(model, {"h": 2}, data, batch_size=16, mask="attention_mask")["h"]
    assert got.count == int(mask.sum()) == want.count
    for name in ("sum", "sumsq", "zeros", "min", "max"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got.var, want.var, rtol=1e-6, atol=1e-9)
    # without the mask the padded positions count: another mean (token 0's embedding)
    whole = collect(model, {"h": 2}, data, batch_size=16)["h"]
    assert whole.count == ids.size
    assert not np.allclose(whole.mean, want.mean)


def test_mask_input_is_detected_by_name_and_type() -> None:
    assert mask_input(encoder()) == "attention_mask"
    assert mask_input(encoder("input_mask", TensorProto.BOOL)) == "input_mask"
    assert mask_input(encoder("segment", TensorProto.INT64)) is None  # not named like a mask
    assert mask_input(encoder(), "none") is None
    assert mask_input(encoder("segment"), "segment") == "segment"  # named by the option
    with pytest.raises(OnnxPruneError, match="not a model input"):
        mask_input(encoder(), "nope", "pass vote")
    with pytest.raises(OnnxPruneError, match="padding mask is an integer or bool input"):
        mask_input(_float_input_model(), "x", "pass vote")


def _float_input_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "f",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S"])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_positions_only_for_tensors_laid_out_by_token() -> None:
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    assert positions(mask, np.zeros((2, 3, 5)), 2).tolist() == [1, 1, 0, 1, 0, 0]
    assert positions(mask, np.zeros((2, 5)), 1) is None  # pooled: not per token
    assert positions(mask, np.zeros((2, 4, 3, 5)), 3) is None  # heads: measured whole
    assert positions(None, np.zeros((2, 3, 5)), 2) is None


def test_vote_and_activation_stats_use_the_detected_mask(tmp_path: Path) -> None:
    """Through a pass: the workspace detects the mask, the report names it, and the cached
    statistics are those of the real tokens."""
    model = encoder()
    ids, mask = padded(64, seed=2)
    path = tmp_path / "calib.npz"
    np.savez(path, input_ids=ids, attention_mask=mask)
    _, report = onnxprune.run(model, ["vote:criteria=flap,sparsity=0.5,round_to=1"], data=path)
    assert report["passes"][0]["mask_input"] == "attention_mask"
    _, off = onnxprune.run(
        model, ["vote:criteria=flap,sparsity=0.5,round_to=1,mask_input=none"], data=path
    )
    assert "mask_input" not in off["passes"][0]
    ctx = Context(original=model, data_path=path)
    stats = activation_stats(ctx, model, {"h": 2}, mask="attention_mask")["h"]
    want = real_token_stats(model, ids, mask)
    np.testing.assert_allclose(stats.sum, want.sum, rtol=1e-9, atol=1e-9)
    assert activation_stats(ctx, model, {"h": 2})["h"].count == ids.size  # a separate entry
