"""Real models from the ONNX project's backend test data, IR 3 models, and float16 folds.

The onnx pip package ships 140 small models with inputs and expected outputs
(``onnx/backend/test/data/{pytorch-converted,pytorch-operator,simple}/*/``); most are IR 3
(opset 6-9) exports. Every one onnxruntime can run must come through cleanup and fold with
the outputs it had, and the ones it cannot run must still come through without an error.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.analysis.probe import Probe
from onnxprune.graph import allow_unlisted_initializers
from onnxprune.passes import fold as fold_module
from onnxprune.validation.selfcheck import output_tolerance
from tests.conftest import invoke, ort_run

BACKEND = Path(onnx.__file__).parent / "backend" / "test" / "data"
BACKEND_MODELS = sorted(BACKEND.glob("*/*/model.onnx"))


def _tensor(path: Path) -> np.ndarray:
    proto = onnx.TensorProto()
    proto.ParseFromString(path.read_bytes())
    return numpy_helper.to_array(proto)


def _case(path: Path) -> tuple[onnx.ModelProto, dict, dict]:
    """The model, its shipped inputs (by real input name) and expected outputs (by name)."""
    model = onnx.load(path)
    data = path.parent / "test_data_set_0"

    def numbered(prefix: str) -> list[Path]:
        return sorted(data.glob(f"{prefix}_*.pb"), key=lambda p: int(p.stem.split("_")[1]))

    inits = {t.name for t in model.graph.initializer}
    real = [i.name for i in model.graph.input if i.name not in inits]
    inputs = {n: _tensor(p) for n, p in zip(real, numbered("input"), strict=False)}
    outputs = {
        o.name: _tensor(p) for o, p in zip(model.graph.output, numbered("output"), strict=False)
    }
    return model, inputs, outputs


def _close(got: np.ndarray, want: np.ndarray, rtol: float, atol: float, what: str) -> None:
    assert got.shape == want.shape, what
    if np.issubdtype(want.dtype, np.floating):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, equal_nan=True, err_msg=what)
    else:
        np.testing.assert_array_equal(got, want, err_msg=what)


def test_the_backend_data_is_there() -> None:
    assert len(BACKEND_MODELS) == 140
    assert sum(onnx.load(p).ir_version == 3 for p in BACKEND_MODELS) == 115


@pytest.mark.parametrize(
    "path", BACKEND_MODELS, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}"
)
def test_backend_model_keeps_its_outputs_through_cleanup_and_fold(path: Path) -> None:
    model, inputs, expected = _case(path)
    new, report = onnxprune.run(model, ["cleanup", "fold"], device="cpu")
    onnx.checker.check_model(new)
    cleanup = report["passes"][0]
    if model.ir_version < 4 and cleanup["initializer_inputs_removed"]:
        assert new.ir_version == 4 and "IR version raised from 3 to 4" in cleanup["note"]
    try:
        before = ort_run(model, inputs)
    except Exception:  # noqa: BLE001 - opset-6 kernels this onnxruntime no longer has
        return  # nothing to compare: it is enough that onnxprune came through
    after = ort_run(new, inputs)
    for name, want in expected.items():
        _close(after[name], before[name], 1e-5, 1e-6, f"{name} against the original")
        _close(after[name], want, 1e-3, 1e-5, f"{name} against the shipped output")


def test_ir3_model_on_the_command_line_gets_ir4(tmp_path: Path, capfd) -> None:
    src = BACKEND / "pytorch-converted" / "test_Conv2d" / "model.onnx"
    model, inputs, expected = _case(src)
    assert model.ir_version == 3
    out = tmp_path / "out.onnx"
    result = invoke(src, "-q", "--device", "cpu", "-p", "cleanup", "-p", "fold", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert capfd.readouterr().err == ""  # nothing from onnxruntime either
    saved = onnx.load(out)
    assert saved.ir_version == 4
    assert [i.name for i in saved.graph.input] == ["0"]  # weights "1", "2" are constants now
    _close(ort_run(saved, inputs)["3"], expected["3"], 1e-3, 1e-5, "output 3")


def test_allow_unlisted_initializers_raises_ir3_only_when_needed() -> None:
    model, _, _ = _case(BACKEND / "pytorch-converted" / "test_Conv2d" / "model.onnx")
    assert not allow_unlisted_initializers(model)  # every initializer is still listed
    del model.graph.input[1:]
    assert allow_unlisted_initializers(model) and model.ir_version == 4
    onnx.checker.check_model(model, full_check=True)  # IR 4 with opset 6 is valid
    assert not allow_unlisted_initializers(model)


def test_keep_initializer_inputs_leaves_ir3_as_it_was() -> None:
    model, inputs, _ = _case(BACKEND / "pytorch-converted" / "test_Conv2d" / "model.onnx")
    new, report = onnxprune.run(model, ["cleanup:keep_initializer_inputs=true"], device="cpu")
    assert new.ir_version == 3 and "note" not in report["passes"][0]
    assert [i.name for i in new.graph.input] == [i.name for i in model.graph.input]


# --- float16: the tolerance follows the dtype, the reference is a plain run ------------------


def _fp16_mlp(layers: int = 4, width: int = 32) -> onnx.ModelProto:
    """x[N,16] -> (MatMul, Add, Relu) x layers -> MatMul -> y[N,10], all float16; the first
    four columns of every weight are zero, so those channels are the constant relu(bias)."""
    rng = np.random.default_rng(1)
    nodes, inits, prev, fan_in = [], [], "x", 16
    for i in range(layers):
        w = (rng.standard_normal((fan_in, width)) * 0.5).astype(np.float16)
        w[:, :4] = 0
        inits += [numpy_helper.from_array(w, f"w{i}")]
        inits += [numpy_helper.from_array(rng.standard_normal(width).astype(np.float16), f"b{i}")]
        nodes += [
            helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
            helper.make_node("Relu", [f"a{i}"], [f"r{i}"]),
        ]
        prev, fan_in = f"r{i}", width
    inits.append(numpy_helper.from_array(rng.standard_normal((width, 10)).astype(np.float16), "wo"))
    nodes.append(helper.make_node("MatMul", [prev, "wo"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "fp16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_output_tolerance_follows_the_dtype() -> None:
    assert output_tolerance(np.dtype(np.float32)) == 1e-4
    assert output_tolerance(np.dtype(np.float64)) == 1e-4
    assert output_tolerance(np.dtype(np.float16)) == 16 * 2.0**-10


@pytest.mark.parametrize(("layers", "width"), [(1, 32), (4, 32), (4, 64)])
def test_float16_fold_is_accepted_and_stays_within_float16_rounding(layers, width) -> None:
    """Folding constant channels into float16 biases rounds them: outputs move by a few
    float16 units, which a float32-sized tolerance (1e-4) used to reject."""
    model = _fp16_mlp(layers, width)
    new, report = onnxprune.run(model, ["fold"], device="cpu")
    section = report["passes"][0]
    assert section["channels_removed"] == 4 * layers
    assert section["verified"].startswith("outputs equal")
    x = np.random.default_rng(2).standard_normal((8, 16)).astype(np.float16)
    want, got = ort_run(model, {"x": x})["y"], ort_run(new, {"x": x})["y"]
    scale = float(np.abs(want.astype(np.float64)).max())
    assert np.abs(got.astype(np.float64) - want).max() <= output_tolerance(want.dtype) * (1 + scale)


def test_the_self_check_compares_plain_runs_not_the_diagnostic_probe(monkeypatch) -> None:
    """The probe run (every tensor exposed, optimisations off) may round differently from a
    user's session; fold's self-check must not use its outputs as the reference."""
    real_probe = fold_module.probe_run

    def skewed(model, ctx) -> Probe:
        pr = real_probe(model, ctx)
        values = dict(pr.values)
        for o in model.graph.output:  # a reference that is off by far more than the tolerance
            if o.name in values:
                values[o.name] = values[o.name] + np.float16(1.0)
        return Probe(pr.shapes, values, pr.error, pr.inputs)

    monkeypatch.setattr(fold_module, "probe_run", skewed)
    model = _fp16_mlp(2, 32)
    _, report = onnxprune.run(copy.deepcopy(model), ["fold"], device="cpu")
    assert report["passes"][0]["verified"].startswith("outputs equal")
