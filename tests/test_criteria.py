"""Channel criteria against values computed by hand (numpy) on tiny hand-built models.

Weight criteria are checked against the initializers; activation criteria against statistics
that numpy computes from the activations onnxruntime produces on the same data (the tensor
is exposed as an extra output of a copy of the model).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import build_model as _model
from onnx import TensorProto, helper

from onnxprune.context import Context
from onnxprune.errors import PassOptionError
from onnxprune.graph import get_init
from onnxprune.pruning.criteria import CRITERIA, GroupView, get_criterion, rank_normalise
from onnxprune.pruning.workspace import Workspace

RNG = np.random.default_rng(1234)
WEIGHT_CRITERIA = ["l1", "l2", "mean", "std", "bn", "consumer", "random"]
DATA_CRITERIA = ["act_mean", "act_var", "act_std", "act_l2", "apoz", "flap", "wanda"]


# ---------------------------------------------------------------------------------------------
# tiny models


def _f32(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def conv_bn_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x[N,2,6,6] -> conv1 (4, 3x3) -> bn -> Relu -> r -> conv2 (3, 1x1) -> y."""
    inits = {
        "w1": _f32(4, 2, 3, 3),
        "b1": _f32(4),
        "gamma": np.array([0.5, -2.0, 1.25, 0.1], np.float32),
        "beta": _f32(4, scale=0.5),
        "bn_mean": _f32(4, scale=0.1),
        "bn_var": np.array([1.0, 0.5, 2.0, 1.5], np.float32),
        "w2": _f32(3, 4, 1, 1),
        "b2": _f32(3),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1"),
        helper.make_node(
            "BatchNormalization", ["c1", "gamma", "beta", "bn_mean", "bn_var"], ["n1"], name="bn"
        ),
        helper.make_node("Relu", ["n1"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="conv2"),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4])],
        inits,
    )
    return model, inits


def mlp_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x[N,5] -> fc1 (6, transB=1) -> Relu -> a1 -> fc2 (4, transB=0) -> Relu -> a2 -> fc3 (3)."""
    inits = {
        "w1": _f32(6, 5),
        "b1": _f32(6),
        "w2": _f32(6, 4),
        "b2": _f32(4),
        "w3": _f32(3, 4),
        "b3": _f32(3),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1", transB=1),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("Gemm", ["a1", "w2", "b2"], ["h2"], name="fc2"),
        helper.make_node("Relu", ["h2"], ["a2"]),
        helper.make_node("Gemm", ["a2", "w3", "b3"], ["y"], name="fc3", transB=1),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    return model, inits


def residual_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """convA(x) + convB(x) -> Relu -> r -> convC: one class per channel index spans A and B."""
    inits = {
        "wa": _f32(4, 2, 1, 1),
        "ba": _f32(4),
        "wb": _f32(4, 2, 1, 1, scale=3.0),
        "bb": _f32(4),
        "wc": _f32(3, 4, 1, 1),
    }
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="convA"),
        helper.make_node("Conv", ["x", "wb", "bb"], ["b"], name="convB"),
        helper.make_node("Add", ["a", "b"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r"]),
        helper.make_node("Conv", ["r", "wc"], ["y"], name="convC"),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 5, 5])],
        inits,
    )
    return model, inits


def flatten_models() -> tuple[onnx.ModelProto, onnx.ModelProto, dict[str, np.ndarray]]:
    """The same conv -> Relu -> r, read by a 1x1 conv, or by Flatten -> Gemm (4 positions/channel)."""
    inits = {
        "w1": _f32(4, 2, 3, 3),
        "b1": _f32(4, scale=0.3),
        "wg": _f32(3, 16),
        "wc": _f32(3, 4, 1, 1),
    }
    head = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv1"),
        helper.make_node("Relu", ["c"], ["r"]),
    ]
    x = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])]
    dense = _model(
        head
        + [
            helper.make_node("Flatten", ["r"], ["f"]),
            helper.make_node("Gemm", ["f", "wg"], ["y"], name="fc", transB=1),
        ],
        x,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        {k: v for k, v in inits.items() if k != "wc"},
    )
    conv = _model(
        head + [helper.make_node("Conv", ["r", "wc"], ["y"], name="conv2")],
        x,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 2, 2])],
        {k: v for k, v in inits.items() if k != "wg"},
    )
    return dense, conv, inits


# ---------------------------------------------------------------------------------------------
# helpers


def _save_data(tmp_path: Path, name: str, **arrays: np.ndarray) -> Path:
    path = tmp_path / f"{name}.npz"
    np.savez(path, **arrays)
    return path


def views(model: onnx.ModelProto, data: Path | None = None, seed: int = 0) -> dict[str, GroupView]:
    """First producer's node name -> GroupView of its group's free classes."""
    ctx = Context(original=model, data_path=data, seed=seed)
    ws = Workspace.open(copy.deepcopy(model), ctx)
    stats = ws.stats() if data is not None else {}
    out = {}
    for g in ws.groups:
        classes = ws.free_classes(g)
        if len(classes):
            out[g.spaces[0].node] = GroupView(
                ws.an, classes, lambda n, m=ws.model: get_init(m.graph, n), stats, seed
            )
    return out


def activations(model: onnx.ModelProto, tensor: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """``tensor``'s value on ``feeds`` (exposed as an extra output of a copy), float64."""
    exposed = copy.deepcopy(model)
    exposed.graph.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([tensor], feeds)[0].astype(np.float64)


def crit(name: str, view: GroupView) -> np.ndarray | None:
    return CRITERIA[name].fn(view)


def close(got: np.ndarray | None, want: np.ndarray) -> None:
    assert got is not None
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)


def per_channel(r: np.ndarray, axis: int = 1) -> dict[str, np.ndarray]:
    """Reference activation statistics: every element except the channel axis."""
    flat = np.moveaxis(r, axis, 0).reshape(r.shape[axis], -1)
    return {
        "mean": flat.mean(1),
        "var": flat.var(1),
        "std": flat.std(1),
        "rms": np.sqrt((flat**2).mean(1)),
        "apoz": (flat == 0).mean(1),
    }


# ---------------------------------------------------------------------------------------------
# weight criteria


def test_weight_criteria_on_conv_filters() -> None:
    model, w = conv_bn_model()
    v = views(model)
    assert set(v) == {"conv1"}, "conv2 reaches the graph output: pinned, no free classes"
    view = v["conv1"]
    assert len(view.classes) == 4
    f = w["w1"].astype(np.float64).reshape(4, -1)
    close(crit("l1", view), np.abs(f).mean(1))
    close(crit("l2", view), np.sqrt((f**2).mean(1)))
    close(crit("mean", view), np.abs(f.mean(1)))
    close(crit("std", view), f.std(1))
    close(crit("bn", view), np.abs(w["gamma"]))
    rows = w["w2"].astype(np.float64).reshape(3, 4).T  # the weights reading channel c
    close(crit("consumer", view), np.linalg.norm(rows, axis=1))
    # one channel per class: ranking is the raw value times the sign
    assert np.argmin(get_criterion("bn").rank_scores(view)) == 3


def test_weight_criteria_follow_gemm_orientation() -> None:
    """transB=1 stores neurons as rows, transB=0 as columns; both producer and consumer side."""
    model, w = mlp_model()
    v = views(model)
    assert set(v) == {"fc1", "fc2"}
    w1, w2, w3 = (w[k].astype(np.float64) for k in ("w1", "w2", "w3"))
    close(crit("l1", v["fc1"]), np.abs(w1).mean(1))  # [6, 5]: neuron c is row c
    close(crit("l2", v["fc2"]), np.sqrt((w2**2).mean(0)))  # [6, 4]: neuron c is column c
    close(crit("std", v["fc2"]), w2.std(0))
    close(crit("mean", v["fc1"]), np.abs(w1.mean(1)))
    close(crit("consumer", v["fc1"]), np.linalg.norm(w2, axis=1))  # fc2 reads a1[c] with row c
    close(crit("consumer", v["fc2"]), np.linalg.norm(w3, axis=0))  # fc3 (transB=1): column c


def test_criteria_abstain_where_they_do_not_apply(tmp_path: Path) -> None:
    model, _ = mlp_model()
    v = views(model)
    assert crit("bn", v["fc1"]) is None, "no BatchNormalization after fc1"
    for name in DATA_CRITERIA:
        assert crit(name, v["fc1"]) is None, f"{name} without activation statistics"
        assert get_criterion(name).needs_data
        assert get_criterion(name).rank_scores(v["fc1"]) is None
    for name in ["l1", "l2", "mean", "std", "consumer", "random"]:
        assert crit(name, v["fc1"]) is not None
        assert not get_criterion(name).needs_data
    data = _save_data(tmp_path, "mlp", x=_f32(32, 5))
    with_data = views(model, data)
    assert crit("bn", with_data["fc2"]) is None
    assert all(crit(name, with_data["fc2"]) is not None for name in DATA_CRITERIA)


def test_random_is_deterministic_per_seed() -> None:
    model, _ = conv_bn_model()
    a, b, c = (views(model, seed=s)["conv1"] for s in (7, 7, 8))
    ra, rb, rc = crit("random", a), crit("random", b), crit("random", c)
    assert ra is not None and rc is not None
    np.testing.assert_array_equal(ra, rb)
    assert not np.array_equal(ra, rc)
    assert ra.shape == (4,) and ((ra >= 0) & (ra < 1)).all()


def test_residual_class_averages_both_producers_slices() -> None:
    """A class with a filter in each of two producers gets the mean of their values (so a
    threshold means the same with and without a residual)."""
    model, w = residual_model()
    v = views(model)
    assert list(v) == ["convA"], "convA and convB are one group (the Add unites them)"
    view = v["convA"]
    assert len(view.classes) == 4
    fa = w["wa"].astype(np.float64).reshape(4, -1)
    fb = w["wb"].astype(np.float64).reshape(4, -1)
    close(crit("l1", view), (np.abs(fa).mean(1) + np.abs(fb).mean(1)) / 2)
    close(crit("l2", view), (np.sqrt((fa**2).mean(1)) + np.sqrt((fb**2).mean(1))) / 2)
    close(crit("std", view), (fa.std(1) + fb.std(1)) / 2)
    close(crit("consumer", view), np.linalg.norm(w["wc"].astype(np.float64).reshape(3, 4), axis=0))
    assert crit("bn", view) is None


# ---------------------------------------------------------------------------------------------
# activation criteria


def test_activation_criteria_against_numpy(tmp_path: Path) -> None:
    model, w = conv_bn_model()
    x = RNG.standard_normal((40, 2, 6, 6)).astype(np.float32)
    view = views(model, _save_data(tmp_path, "conv", x=x))["conv1"]
    ref = per_channel(activations(model, "r", {"x": x}))
    assert 0 < ref["apoz"].max() < 1, "the data should give some, not all, zeros"
    close(crit("act_mean", view), np.abs(ref["mean"]))
    close(crit("act_var", view), ref["var"])
    close(crit("act_std", view), ref["std"])
    close(crit("act_l2", view), ref["rms"])
    close(crit("apoz", view), ref["apoz"])
    w2 = w["w2"].astype(np.float64).reshape(3, 4)
    close(crit("flap", view), ref["var"] * (w2**2).sum(0))
    close(crit("wanda", view), ref["rms"] * np.abs(w2).sum(0))
    # apoz: more zeros = less important
    close(get_criterion("apoz").rank_scores(view), -ref["apoz"])


def test_activation_criteria_on_gemm_columns(tmp_path: Path) -> None:
    model, w = mlp_model()
    x = RNG.standard_normal((64, 5)).astype(np.float32)
    v = views(model, _save_data(tmp_path, "mlp", x=x))
    feeds = {"x": x}
    for producer, tensor, rows in (
        ("fc1", "a1", w["w2"].astype(np.float64)),
        ("fc2", "a2", w["w3"].astype(np.float64).T),
    ):
        ref = per_channel(activations(model, tensor, feeds))
        close(crit("act_mean", v[producer]), np.abs(ref["mean"]))
        close(crit("act_std", v[producer]), ref["std"])
        close(crit("apoz", v[producer]), ref["apoz"])
        close(crit("flap", v[producer]), ref["var"] * (rows**2).sum(1))
        close(crit("wanda", v[producer]), ref["rms"] * np.abs(rows).sum(1))


@pytest.mark.parametrize("name", ["apoz", "act_mean", "act_var", "act_std", "act_l2", "consumer"])
def test_channel_read_through_flatten_is_one_channel(tmp_path: Path, name: str) -> None:
    """A channel flattened into 4 Gemm features is still one channel: its share of zeros is a
    share (<= 1), its std is the std of all its elements, and so on, exactly as when a 1x1
    conv reads the same tensor; ``consumer`` is the L2 norm of all the weights reading it."""
    dense, conv, w = flatten_models()
    x = RNG.standard_normal((50, 2, 4, 4)).astype(np.float32)
    data = _save_data(tmp_path, "flat", x=x)
    ref = per_channel(activations(conv, "r", {"x": x}))
    want = {
        "apoz": ref["apoz"],
        "act_mean": np.abs(ref["mean"]),
        "act_var": ref["var"],
        "act_std": ref["std"],
        "act_l2": ref["rms"],
        "consumer": np.linalg.norm(w["wg"].astype(np.float64).reshape(3, 4, 4), axis=(0, 2)),
    }
    through_conv = crit(name, views(conv, data)["conv1"])
    if name != "consumer":
        close(through_conv, want[name])  # the reference itself is what the conv sink gives
    close(crit(name, views(dense, data)["conv1"]), want[name])


# ---------------------------------------------------------------------------------------------
# rank_normalise and the registry


def test_rank_normalise_ties_share_their_mean_rank() -> None:
    np.testing.assert_allclose(
        rank_normalise(np.array([3.0, 1.0, 3.0, 2.0])), np.array([2.5, 0.0, 2.5, 1.0]) / 3
    )
    np.testing.assert_allclose(rank_normalise(np.array([5.0, 5.0, 5.0])), [0.5, 0.5, 0.5])
    np.testing.assert_allclose(
        rank_normalise(np.array([2.0, 2.0, 0.0, 9.0, 0.0])), np.array([2.5, 2.5, 0.5, 4.0, 0.5]) / 4
    )
    np.testing.assert_allclose(rank_normalise(np.array([0.3, -1.0, 7.0])), [0.5, 0.0, 1.0])
    assert rank_normalise(np.array([4.0])).tolist() == [0.0]
    assert rank_normalise(np.array([])).shape == (0,)
    scores = RNG.standard_normal(50)
    ranks = rank_normalise(scores)
    assert ranks.min() == 0 and ranks.max() == 1
    assert (np.argsort(ranks, kind="stable") == np.argsort(scores, kind="stable")).all()


def test_registry_lists_every_criterion_and_rejects_unknown_names() -> None:
    assert set(WEIGHT_CRITERIA + DATA_CRITERIA) <= set(CRITERIA)
    assert all(CRITERIA[n].summary for n in CRITERIA)
    assert CRITERIA["apoz"].sign < 0 and all(CRITERIA[n].sign > 0 for n in CRITERIA if n != "apoz")
    with pytest.raises(PassOptionError) as err:
        get_criterion("l3", "pass vote")
    msg = str(err.value)
    assert msg.startswith("pass vote: unknown criterion 'l3'") and "l1" in msg and "wanda" in msg
    assert "\n" not in msg
