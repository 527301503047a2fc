"""Reconstruction that only helps, and free channels first.

* ``pruning.reconstruct.solve`` never returns weights whose error on the held-out rows (measured
  here on the rows themselves, not from the sums) is above that of the current weights, over
  random layers and data: wide and narrow, fewer rows than inputs, exact and noisy targets.
* The planted-zero MLP (half of every hidden layer's neurons have zero weights and bias: fold
  alone is exact) stays exact through vote + refit + fold, and vote without data removes the
  dead neurons first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxprune
from onnxprune.pruning.reconstruct import HELD, Streams, solve
from onnxprune.runner import run_model
from tests.gemm_mlp import gemm_mlp


def _held_mse(x: np.ndarray, r: np.ndarray, w: np.ndarray, b: np.ndarray) -> float:
    d = x @ w + b - r
    return float((d * d).sum(axis=1).mean())


@pytest.mark.parametrize("seed", range(24))
def test_solve_never_raises_the_held_out_error(seed: int) -> None:
    """The layer computes ``x_K w0_K`` (its removed inputs are zero); the target is a linear
    map of all inputs plus noise. Whatever ``solve`` returns, the layer's error on the
    held-out rows does not grow."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 40))
    n_out = int(rng.integers(1, 70))  # past the sketch's width too
    rows = int(rng.integers(20, 4 * k + 60))  # often fewer rows than 4 per input
    x = rng.standard_normal((rows, k)) @ rng.standard_normal((k, k)) * rng.uniform(0.1, 3)
    w_true = rng.standard_normal((k, n_out))
    noise = [0.0, 0.01, 1.0, 10.0][seed % 4]
    target = x @ w_true + noise * rng.standard_normal((rows, n_out))
    keep = np.sort(rng.choice(k, int(rng.integers(1, k + 1)), replace=False))
    # current weights: the truth (exact when every input is kept), or a perturbed copy
    w0 = (w_true + (seed % 3) * 0.3 * rng.standard_normal(w_true.shape))[keep]
    xk = x[:, keep]
    streams = Streams(np.random.default_rng(seed))
    streams.add(xk, target - xk @ w0)
    held = np.random.default_rng(seed).random(rows) < 1.0 / HELD  # the same split
    dw, db, info = solve(streams, None, None, seed)
    before = _held_mse(xk[held], target[held], w0, np.zeros(n_out))
    after = _held_mse(xk[held], target[held], w0 + dw, db)
    assert info["rows"] == (~held).sum() and info["rows_held"] == held.sum()
    assert info["held_before"] == pytest.approx(before, rel=1e-9, abs=1e-12)
    if info["kept"]:
        assert after < before
        assert info["held_after"] == pytest.approx(after, rel=1e-6, abs=1e-9)
    else:
        assert not dw.any() and not db.any()
    assert after <= before + 1e-9 * max(before, 1.0)


def test_solve_keeps_an_exact_layer_exact() -> None:
    """All inputs kept and the current weights already exact: nothing can beat them."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 10))
    w0 = rng.standard_normal((10, 3))
    streams = Streams(np.random.default_rng(1))
    streams.add(x, x @ w0 - x @ w0)
    dw, db, info = solve(streams)
    assert info["held_before"] < 1e-20
    assert _held_mse(x, x @ w0, w0 + dw, db) < 1e-12


def test_solve_says_when_rows_are_short_or_too_few_to_validate() -> None:
    rng = np.random.default_rng(0)
    x, w0 = rng.standard_normal((100, 30)), rng.standard_normal((30, 2))
    streams = Streams(np.random.default_rng(0))
    streams.add(x, rng.standard_normal((100, 2)))
    _, _, info = solve(streams)
    assert "ridge chosen on held-out rows" in info["note"]
    few = Streams(np.random.default_rng(0))
    few.add(x[:20], x[:20] @ w0)
    dw, _, info = solve(few)
    assert not info["kept"] and "too few to validate" in info["note"]
    assert not dw.any()


# ---------------------------------------------------------------------------------------------
# the planted-zero MLP


def planted_mlp(sizes: tuple[int, ...] = (16, 32, 32, 8), seed: int = 0) -> onnx.ModelProto:
    """Gemm + Relu MLP; half of every hidden layer's neurons have zero weights and bias."""
    rng = np.random.default_rng(seed)
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:], strict=False)):
        w = rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)
        b = rng.standard_normal(n_out) * 0.1
        if i < len(sizes) - 2:
            dead = rng.permutation(n_out)[: n_out // 2]
            w[:, dead], b[dead] = 0, 0
        layers.append((w, b))
    return gemm_mlp(layers, "planted")


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[onnx.ModelProto, Path, np.ndarray]:
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("planted") / "calib.npz"
    np.savez(path, x=rng.standard_normal((512, 16)).astype(np.float32))
    return planted_mlp(), path, rng.standard_normal((256, 16)).astype(np.float32)


def _compare(a: onnx.ModelProto, b: onnx.ModelProto, x: np.ndarray) -> tuple[float, float]:
    """(max |dy|, lowest cosine per sample) of ``b``'s output against ``a``'s."""
    ya = next(iter(run_model(a, {"x": x}).values())).astype(np.float64)
    yb = next(iter(run_model(b, {"x": x}).values())).astype(np.float64)
    cos = (ya * yb).sum(1) / (np.linalg.norm(ya, axis=1) * np.linalg.norm(yb, axis=1))
    return float(np.abs(ya - yb).max()), float(cos.min())


def test_planted_zero_mlp_stays_exact_through_vote_refit_fold(planted) -> None:
    model, path, held = planted
    new, report = onnxprune.run(model, ["vote:sparsity=0.5", "refit", "fold"], data=path)
    worst, cosine = _compare(model, new, held)
    assert worst < 1e-5 and cosine > 1 - 1e-9, (worst, cosine)
    vote, refit, fold = report["passes"]
    assert [g["zero_or_constant"] for g in vote["groups"]] == [16, 16]
    assert fold["parameters_after"] < fold["parameters_before"]
    layers = refit["layers"]
    assert [layer["node"] for layer in layers] == ["fc1", "fc2"]
    for layer in layers:  # nothing beats the exact weights on held-out rows
        assert layer["held_before"] < 1e-9
        assert layer["kept"] is False or layer["held_after"] < layer["held_before"]
    assert refit["refitted"] + refit["rejected"] == 2


def test_vote_without_data_removes_the_dead_neurons_first(planted) -> None:
    model, _, held = planted
    new, report = onnxprune.run(model, ["vote:sparsity=0.5", "fold"])
    worst, _ = _compare(model, new, held)
    assert worst == 0.0
    assert report["passes"][0]["channels_pruned"] == 32
    # a quarter: only dead neurons go, whichever criterion ranks them
    new, _ = onnxprune.run(model, ["vote:sparsity=0.25,criteria=l1+l2+random,round_to=1"])
    assert _compare(model, new, held)[0] == 0.0


def test_refit_reports_kept_and_rejected_layers(tmp_path: Path) -> None:
    """A live MLP pruned by l1: refit's new weights beat the pruned ones on held-out rows and
    are kept; on the planted MLP (exact already) the pass changes nothing it cannot improve."""
    model = planted_mlp()
    inits = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    rng = np.random.default_rng(3)
    inits["w0"] = rng.standard_normal(inits["w0"].shape).astype(np.float32) / 4
    inits["b0"] = rng.standard_normal(inits["b0"].shape).astype(np.float32) * 0.1
    for i, t in enumerate(model.graph.initializer):
        model.graph.initializer[i].CopyFrom(numpy_helper.from_array(inits[t.name], t.name))
    low_rank = rng.standard_normal((2048, 3)) @ rng.standard_normal((3, 16))
    path = tmp_path / "calib.npz"
    np.savez(path, x=(low_rank + 0.05 * rng.standard_normal((2048, 16))).astype(np.float32))
    _, report = onnxprune.run(
        model, ["vote:criteria=l1,sparsity=0.5,round_to=1,check=off", "refit"], data=path
    )
    refit = report["passes"][1]
    fc1 = next(layer for layer in refit["layers"] if layer["node"] == "fc1")
    assert fc1["kept"] is True and fc1["held_after"] < fc1["held_before"]
    assert fc1["rows"] + fc1["rows_held"] == 2048 and "ridge" in fc1
    assert refit["refitted"] >= 1 and refit["modified"]
