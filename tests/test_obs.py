"""The ``obs`` criterion: greedy structured OBS (which consumer inputs go when the rest are
re-solved), against a brute-force least-squares search and against magnitude on a planted
case where magnitude picks what cannot be reconstructed."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import onnx
from attention_models import D, E, split_heads
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.analysis.groups import classes_of
from onnxprune.analysis.probe import probe
from onnxprune.analysis.walk import analyse
from onnxprune.pruning import obs as obs_module
from onnxprune.pruning.criteria import CRITERIA, GroupView
from onnxprune.pruning.obs import DAMP, Consumer, removal_order
from onnxprune.runner import run_model


def _lsq_error(h: np.ndarray, w: np.ndarray, gone: list[int]) -> float:
    """Brute force: E||x W - x_R W'||^2 with W' the least-squares re-solve on the kept R."""
    keep = [i for i in range(len(h)) if i not in gone]
    full = float(np.trace(w.T @ h @ w))
    if not keep:
        return full
    cross = h[np.ix_(keep, range(len(h)))] @ w  # [R, N]
    return full - float(np.trace(cross.T @ np.linalg.solve(h[np.ix_(keep, keep)], cross)))


def _damped(cov: np.ndarray) -> np.ndarray:
    return cov + DAMP * np.trace(cov) / len(cov) * np.eye(len(cov))


def _correlated(k: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.random.default_rng(seed)
    x = r.normal(size=(4000, k)) @ r.normal(size=(k, k)) * 0.5 + r.normal(size=(4000, k))
    return np.cov(x.T, bias=True), r.normal(size=(k, n))


def test_greedy_steps_match_brute_force_least_squares() -> None:
    """Each removal is the one whose least-squares re-solve of the others costs least, given
    the ones removed before (exact greedy while the group has fewer than ROUNDS classes)."""
    cov, w = _correlated(7, 5, 0)
    order = removal_order([Consumer.of(cov, w, np.arange(7), 7)], 7)
    h = _damped(cov)
    gone: list[int] = []
    for _ in range(4):
        rest = [i for i in range(7) if i not in gone]
        best = min(rest, key=lambda i: _lsq_error(h, w, [*gone, i]))
        assert int(np.argsort(order)[len(gone)]) == best
        gone.append(best)


def test_block_classes_cost_their_whole_block() -> None:
    """A class of two positions (a head of width 2) is removed as a block: the first class to
    go is the pair whose joint removal costs least, found by brute force."""
    cov, w = _correlated(8, 3, 1)
    slots = np.repeat(np.arange(4), 2)
    order = removal_order([Consumer.of(cov, w, slots, 4)], 4)
    h = _damped(cov)
    costs = [_lsq_error(h, w, [2 * c, 2 * c + 1]) for c in range(4)]
    assert int(np.argmin(order)) == int(np.argmin(costs))
    assert sorted(order.tolist()) == [0.0, 1.0, 2.0, 3.0]


def test_greedy_is_never_worse_than_any_pair_by_much() -> None:
    """Removing 2 of 7 the greedy way costs no more than 1.5x the best pair (and far less
    than the worst)."""
    cov, w = _correlated(7, 4, 2)
    order = removal_order([Consumer.of(cov, w, np.arange(7), 7)], 7)
    h = _damped(cov)
    pairs = [_lsq_error(h, w, list(p)) for p in combinations(range(7), 2)]
    mine = _lsq_error(h, w, [int(i) for i in np.argsort(order)[:2]])
    assert mine <= 1.5 * min(pairs) + 1e-12
    assert mine < max(pairs)


def test_abstains_without_a_workspace() -> None:
    """Outside vote (or for an ensemble member) there is no model to measure: no score."""
    model = _planted()
    an = analyse(model, probe(model).shapes)
    (group,) = [g for g in an.groups() if [s.node for s in g.spaces] == ["fc1"]]
    classes = np.array(sorted(classes_of(an.roots(), group.spaces)))
    getter = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}.__getitem__
    view = GroupView(an, classes, getter)
    assert len(classes) == 8 and CRITERIA["obs"].rank_scores(view) is None
    assert CRITERIA["l1"].rank_scores(view) is not None  # the view itself is usable


def _planted() -> onnx.ModelProto:
    """x[N,12] -> Gemm (8 hidden) -> Relu -> Gemm (4). Hidden 0-3: independent, small
    filters read with large weights; 4, 5: large filters; 6, 7: exact copies of 4, 5."""
    r = np.random.default_rng(3)
    w1 = r.normal(size=(8, 12))
    w1[:4] *= 0.2
    w1[4:6] *= 3.0
    w1[6:8] = w1[4:6]
    b1 = np.abs(r.normal(size=8)) * 0.5
    b1[6:8] = b1[4:6]
    w2 = r.normal(size=(4, 8))
    w2[:, :4] *= 10.0  # small filters, but what they add to y is large
    inits = {"w1": w1, "b1": b1, "w2": w2, "b2": r.normal(size=4)}
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
            helper.make_node("Relu", ["h"], ["a"], name="act"),
            helper.make_node("Gemm", ["a", "w2", "b2"], ["y"], name="fc2", transB=1),
        ],
        "planted",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_obs_beats_magnitude_on_planted_duplicates(tmp_path: Path) -> None:
    """Magnitude drops two small independent neurons (lost for good); obs drops one of each
    duplicate pair, which refit restores exactly."""
    model = _planted()
    x = np.random.default_rng(4).normal(size=(512, 12)).astype(np.float32)
    data = tmp_path / "d.npz"
    np.savez(data, x=x)
    ref = run_model(model, {"x": x})["y"]
    errors = {}
    for crit in ("l1", "obs"):
        vote = f"vote:criteria={crit},sparsity=0.25,round_to=1"
        pruned, report = onnxprune.run(model, [vote, "refit"], data=data, device="cpu")
        got = run_model(pruned, {"x": x})["y"]
        errors[crit] = float(np.mean((got - ref) ** 2) / np.mean(ref**2))
        w1 = onnx.numpy_helper.to_array(next(i for i in pruned.graph.initializer if i.name == "w1"))
        gone = sorted(int(i) for i in np.flatnonzero(~w1.any(axis=1)))
        if crit == "obs":
            assert len(gone) == 2 and {g % 2 for g in gone} == {0, 1} and min(gone) >= 4
        else:
            assert max(gone) < 4  # magnitude takes the small independent ones
    assert errors["obs"] < 1e-6 < errors["l1"]


def test_obs_scores_heads_and_refit_repairs_the_output_projection(tmp_path: Path) -> None:
    """An attention layer: obs scores each head as the block of its 8 positions at the output
    projection; one head of four goes, and refit re-solves that projection from the three
    heads left, lowering its held-out error (random heads: little to recover)."""
    model = split_heads("zeros")
    rng = np.random.default_rng(5)
    data = tmp_path / "d.npz"
    np.savez(data, input=rng.standard_normal((256, 6, E)).astype(np.float32))
    vote = "vote:criteria=obs,sparsity=0.25,round_to=1"
    _, report = onnxprune.run(model, [vote, "refit"], data=data, device="cpu")
    vote_section, refit_section = report["passes"]
    (heads,) = [g for g in vote_section["groups"] if g["pruned"]]
    assert heads["pruned"] == 1 and heads["abstained"] == []  # one class: a head
    (layer,) = refit_section["layers"]
    assert layer["inputs"] == E and layer["inputs_kept"] == E - D
    assert layer["kept"] and layer["held_after"] < layer["held_before"]


def test_abstains_when_no_counted_consumer_reads_the_group(tmp_path: Path, monkeypatch) -> None:
    """A consumer wider than MAX_INPUTS does not count; a class no counted consumer reads
    gets no order (never a free pass): obs abstains and the group says so."""
    monkeypatch.setattr(obs_module, "MAX_INPUTS", 4)  # the hidden layer has 8 channels
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(4).normal(size=(256, 12)).astype(np.float32))
    vote = "vote:criteria=obs,sparsity=0.25,round_to=1"
    _, report = onnxprune.run(_planted(), [vote], data=data, device="cpu")
    (group,) = [g for g in report["passes"][0]["groups"] if g["producers"] == ["fc1"]]
    assert group["abstained"] == ["obs"] and group["pruned"] == 0
