"""The paths taken only for large models, forced on small ones: same results as the plain ones.

Past 64 MiB of weights, sessions read large initializers in place (external initializers),
onnx.checker and shape inference see a weightless skeleton. Fixtures are tiny, so the limits
are lowered here to run those paths on them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune import model as model_module
from onnxprune import runtime
from onnxprune.runner import run_model
from onnxprune.runtime import session

MODELS = Path(__file__).resolve().parents[1] / "models"
CASES = ["torch/cnn_legacy_bn", "tf/cnn", "mxnet/mlp", "torch/encoder_legacy", "paddle/cnn"]


def _feeds(rel: str) -> dict[str, np.ndarray]:
    with np.load(MODELS / f"{rel}.sample.npz") as npz:
        return {k[3:]: npz[k] for k in npz.files if k.startswith("in/")}


@pytest.fixture
def large_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "SHARE_WEIGHTS_BYTES", 0)
    monkeypatch.setattr(runtime, "_SHARE_MIN_ELEMENTS", 1)
    monkeypatch.setattr(model_module, "LIGHT_CHECK_BYTES", 0)


@pytest.mark.parametrize("rel", CASES)
def test_shared_weight_session_gives_the_same_outputs(rel: str, large_paths: None) -> None:
    model = onnxprune.load(MODELS / f"{rel}.onnx")
    before = model.SerializeToString()
    shared = run_model(session(model, share_weights=True), _feeds(rel))
    plain = run_model(session(model, share_weights=False), _feeds(rel))
    for name, value in plain.items():
        np.testing.assert_allclose(shared[name], value, rtol=1e-5, atol=1e-6)  # other kernels
    assert model.SerializeToString() == before, "the caller's model must not change"


@pytest.mark.parametrize("rel", CASES)
def test_fold_on_the_large_model_paths_is_exact(rel: str, large_paths: None) -> None:
    model, _ = onnxprune.run(onnxprune.load(MODELS / f"{rel}.onnx"), ["cleanup"])
    zeroed, _ = onnxprune.run(model, ["vote:sparsity=0.5,round_to=1"], device="cpu")
    folded, report = onnxprune.run(zeroed, ["fold"], device="cpu", inplace=False)
    onnx.checker.check_model(folded, full_check=True)
    want, got = run_model(zeroed, _feeds(rel)), run_model(folded, _feeds(rel))
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(w).max()))
    assert "verified" in report["passes"][0] or report["passes"][0]["channels_removed"] == 0


def test_light_checker_still_rejects_a_broken_model(large_paths: None) -> None:
    model = onnxprune.load(MODELS / "tf/mlp.onnx")
    model.graph.node[0].input[0] = "missing"
    with pytest.raises(onnxprune.OnnxPruneError, match="onnx.checker rejects"):
        model_module.check_model(model, "broken")
