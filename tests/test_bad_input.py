"""Bad input is refused with one line naming the file, the array and what to do (exit 2).

Never exit 3 (a bug in onnxprune) and never silently accepted: ``--data`` files that do not fit
the model, Python API arguments of the wrong type, and a third-party pass that crashes.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import build_model
from conftest import invoke as cli
from onnx import TensorProto, helper

import onnxprune
from onnxprune.data import load_npz
from onnxprune.errors import ArgumentError, DataError, OnnxPruneError, PassFailedError
from onnxprune.passes import registry

N = 6


def model_two_inputs() -> onnx.ModelProto:
    """x float[n, 4] + Cast(k int64[n, 4]) -> MatMul(W[4, 3]) -> y[n, 3] (classifier-like)."""
    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Add", ["x", "kf"], ["s"], name="add"),
        helper.make_node("MatMul", ["s", "W"], ["y"], name="fc"),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
        helper.make_tensor_value_info("k", TensorProto.INT64, ["n", 4]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])]
    return build_model(nodes, inputs, outputs, {"W": w})


def good_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "x": rng.standard_normal((N, 4)).astype(np.float32),
        "k": rng.integers(0, 5, (N, 4)).astype(np.int64),
        "labels": rng.integers(0, 3, N).astype(np.int64),
    }


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(model_two_inputs(), path)
    return path


def _with(**changes) -> dict[str, np.ndarray]:
    arrays = good_arrays()
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    return arrays


def _onehot(labels: np.ndarray) -> np.ndarray:
    return np.eye(3, dtype=np.float32)[labels]


def _nan_x() -> np.ndarray:
    x = good_arrays()["x"]
    x[3, 1] = np.nan
    return x


def _inf_x() -> np.ndarray:
    x = good_arrays()["x"]
    x[0, 0] = -np.inf
    return x


# (arrays to save, text the error must contain)
BAD_ARRAYS = {
    "strings for a float input": (
        _with(x=np.full((N, 4), "1.5")),
        ["input 'x' holds strings", "float32"],
    ),
    "NaN": (_with(x=_nan_x()), ["input 'x' has 1 NaN or infinite value(s)", "sample 3"]),
    "Inf": (_with(x=_inf_x()), ["input 'x' has 1 NaN or infinite value(s)", "sample 0"]),
    "complex": (_with(x=np.ones((N, 4), np.complex64)), ["input 'x' holds complex numbers"]),
    "one-hot labels": (
        _with(labels=_onehot(good_arrays()["labels"])),
        ["labels have shape [6, 3]", "one-hot", "labels=onehot.argmax(axis=1)"],
    ),
    "labels as a column": (_with(labels=np.zeros((N, 1), np.int64)), ["labels.reshape(-1)"]),
    "fractional labels": (_with(labels=np.full(N, 0.5)), ["labels must be class indices"]),
    "negative labels": (_with(labels=np.full(N, -1)), ["labels must be class indices >= 0"]),
    "string labels": (_with(labels=np.array(["cat"] * N)), ["map class names to indices"]),
    "extra key": (
        _with(mask=np.ones((N, 4), np.float32), extra=np.ones(N)),
        ["array(s) ['extra', 'mask'] are no input of the model", "its inputs are ['k', 'x']"],
    ),
    "label for labels": (
        _with(labels=None, label=np.zeros(N, np.int64)),
        ["array(s) ['label'] are no input", "did you mean 'labels'?"],
    ),
    "different sample counts": (
        _with(k=np.zeros((N - 2, 4), np.int64), labels=np.zeros(N + 1, np.int64)),
        ["different sample counts", "'x' has 6", "'k' has 4", "'labels' has 7"],
    ),
    "missing input, near miss": (
        _with(x=None, X=good_arrays()["x"]),
        ["no array for model input(s) ['x']", "did you mean 'x' for 'X'?"],
    ),
    "fractions for an int input": (
        _with(k=np.full((N, 4), 1.5)),
        ["input 'k' has values that change when cast to int64 (e.g. 1.5)", "integers in"],
    ),
    "wrong rank": (_with(x=np.zeros((N, 4, 1), np.float32)), ["has shape [6, 4, 1]"]),
    "wrong fixed size": (_with(x=np.zeros((N, 5), np.float32)), ["the model declares ['n', 4]"]),
    "no samples": (
        _with(x=np.zeros((0, 4), np.float32), k=np.zeros((0, 4), np.int64), labels=None),
        ["input 'x' has no samples"],
    ),
    "a scalar": (_with(x=np.float32(1.0)), ["input 'x' is a single value"]),
    "out of float range": (_with(x=np.full((N, 4), 1e300)), ["beyond the range of float32"]),
}


@pytest.mark.parametrize("case", sorted(BAD_ARRAYS))
def test_bad_arrays_are_refused_in_one_line(case, model_file, tmp_path):
    arrays, expected = BAD_ARRAYS[case]
    data = tmp_path / "d.npz"
    np.savez(data, **arrays)
    result = cli(model_file, "-p", "validate:runs=0", "--data", data, "-o", tmp_path / "o.onnx")
    err = _one_line_error(result)
    assert str(data) in err
    for text in expected:
        assert text in err, err
    assert not (tmp_path / "o.onnx").exists()


def _one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("Error: "), err
    assert "internal error" not in err
    return err


def test_good_arrays_load_and_cast(tmp_path):
    arrays = good_arrays()
    arrays["x"] = arrays["x"].astype(np.float64)  # float64 data for a float32 input: cast
    arrays["k"] = arrays["k"].astype(np.float32)  # integral floats for an int64 input: exact
    arrays["labels"] = arrays["labels"].astype(np.float64)  # integral float labels
    np.savez(tmp_path / "d.npz", **arrays)
    data = load_npz(tmp_path / "d.npz", model_two_inputs())
    assert data.inputs["x"].dtype == np.float32 and data.inputs["k"].dtype == np.int64
    assert data.labels is not None and data.labels.dtype == np.int64 and len(data) == N


def _write_npy_as_npz(path: Path) -> None:
    with path.open("wb") as f:
        np.save(f, good_arrays()["x"])


def _write_zip_with_text(path: Path) -> None:
    np.savez(path, **good_arrays())
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("notes.txt", "calibration set, version 2")


def _write_object_array(path: Path) -> None:
    np.savez(path, **_with(x=np.array([{"a": 1}] * N, dtype=object)))


@pytest.mark.parametrize(
    ("write", "expected"),
    [
        (_write_npy_as_npz, "holds one .npy array, not an .npz archive"),
        (_write_zip_with_text, "member 'notes.txt' is not a numpy array"),
        (_write_object_array, "array 'x' cannot be read"),
        (lambda p: p.write_bytes(b""), "not a numpy .npz archive"),
        (lambda p: p.write_text("x,k\n1,2\n"), "not a numpy .npz archive"),
        (lambda p: p.mkdir(), "is a folder"),
    ],
)
def test_files_that_are_not_an_npz_of_arrays(write, expected, model_file, tmp_path):
    data = tmp_path / "d.npz"
    write(data)
    with pytest.raises(DataError) as err:
        load_npz(data, model_two_inputs())
    assert str(err.value).startswith(f"{data}: ") and expected in str(err.value)
    assert "\n" not in str(err.value) and err.value.exit_code == 2
    result = cli(model_file, "-p", "validate:runs=0", "--data", data, "-o", tmp_path / "o.onnx")
    assert expected in _one_line_error(result)


def test_extra_key_naming_a_weight_says_so(tmp_path):
    np.savez(tmp_path / "d.npz", **_with(W=np.ones((4, 3), np.float32)))
    with pytest.raises(DataError, match=r"\['W'\] are weights of the model, not inputs"):
        load_npz(tmp_path / "d.npz", model_two_inputs())


# --- Python API arguments ----------------------------------------------------------------------


def test_run_and_load_take_a_path_or_a_model(model_file):
    model = onnxprune.load(model_file)
    assert onnxprune.load(model) is model  # checked, returned as it is
    new, report = onnxprune.run(model_file, ["cleanup"])
    assert report["model"] == str(model_file) and new.graph.output[0].name == "y"
    new, _ = onnxprune.run(str(model_file), "cleanup")  # one spec, not a list: fine too
    assert provenance_names(new) == ["cleanup"]
    with pytest.raises(OnnxPruneError, match="no such file"):
        onnxprune.run(model_file.with_name("missing.onnx"), ["cleanup"])
    with pytest.raises(OnnxPruneError, match="not an ONNX model"):
        onnxprune.load(onnx.ModelProto())


def provenance_names(model: onnx.ModelProto) -> list[str]:
    from onnxprune.model import provenance

    return [p["name"] for p in provenance(model)[-1]["passes"]]


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda m: onnxprune.run(None, ["cleanup"]), "onnxprune.run: model must be a file path"),
        (lambda m: onnxprune.run(m.SerializeToString(), []), "onnx.load_model_from_string"),
        (lambda m: onnxprune.run(m.graph, []), "got GraphProto; wrap a graph with"),
        (lambda m: onnxprune.run(m, [42]), "passes[0] must be a Pass or a 'name:key=value' spec"),
        (lambda m: onnxprune.run(m, None), "passes must be a list of Pass objects"),
        (lambda m: onnxprune.run(m, [onnxprune.get_pass("cleanup")]), "give an instance"),
        (lambda m: onnxprune.run(m, [], seed=-1), "seed must be an integer >= 0, got -1"),
        (lambda m: onnxprune.run(m, [], seed=1.5), "seed must be an integer >= 0"),
        (lambda m: onnxprune.run(m, [], data=5), "data must be a path"),
        (lambda m: onnxprune.run(m, [], ctx="ctx"), "ctx must be an onnxprune.Context"),
        (lambda m: onnxprune.save("not a model", "o.onnx"), "onnxprune.save: model must be"),
        (lambda m: onnxprune.save(m, 5), "onnxprune.save: path must be a str or os.PathLike"),
        (lambda m: onnxprune.load(5), "onnxprune.load: path must be a file path"),
        (lambda m: onnxprune.load(b"\x08\x07"), "onnx.load_model_from_string"),
    ],
)
def test_wrong_argument_types_are_clear_errors(call, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ArgumentError) as err:
        call(model_two_inputs())
    assert isinstance(err.value, OnnxPruneError) and isinstance(err.value, TypeError)
    assert err.value.exit_code == 2 and expected in str(err.value), str(err.value)
    assert list(tmp_path.iterdir()) == []


# --- a third-party pass that crashes --------------------------------------------------------------

PLUGIN = '''
from dataclasses import dataclass
from typing import ClassVar

from onnxprune import Pass


@dataclass
class Crash(Pass):
    """Always fails."""

    name: ClassVar[str] = "{name}"

    def run(self, model, ctx):
        raise ZeroDivisionError("division by zero\\nsecond line")
'''


def _plugin_site(root: Path, module: str, dist: str, entry: str | None) -> Path:
    """An installed distribution ``dist`` with module ``module`` (and an entry point)."""
    site = root / "site"
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "top_level.txt").write_text(f"{module}\n")
    if entry:
        (info / "entry_points.txt").write_text(f"[onnxprune.passes]\n{entry} = {module}:Crash\n")
    (site / f"{module}.py").write_text(PLUGIN.format(name=entry or "test-registered-crash"))
    return site


def test_a_crashing_entry_point_pass_names_its_distribution(
    model_file, tmp_path, monkeypatch, isolated_registry
):
    site = _plugin_site(tmp_path, "crash_plugin_ep", "crash-plugin", "test-ep-crash")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(registry, "_loaded", False)  # find the new entry point
    monkeypatch.setattr(registry, "_UNAVAILABLE", dict(registry._UNAVAILABLE))
    monkeypatch.delitem(sys.modules, "crash_plugin_ep", raising=False)
    result = cli(model_file, "-p", "test-ep-crash", "-o", tmp_path / "o.onnx")
    err = _one_line_error(result)
    assert "pass test-ep-crash (from dist crash-plugin) failed: ZeroDivisionError" in err
    assert "second line" not in err and "bug in onnxprune" not in err


def test_a_crashing_registered_pass_names_its_distribution(
    tmp_path, monkeypatch, isolated_registry
):
    site = _plugin_site(tmp_path, "crash_plugin_reg", "crash-registered", None)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "crash_plugin_reg", raising=False)
    import crash_plugin_reg

    onnxprune.register_pass(crash_plugin_reg.Crash)
    with pytest.raises(PassFailedError) as err:
        onnxprune.run(model_two_inputs(), ["test-registered-crash"])
    assert str(err.value).startswith(
        "pass test-registered-crash (from dist crash-registered) failed: ZeroDivisionError"
    )
    assert err.value.exit_code == 2
