"""Shared test helpers: fixture-model discovery from the manifests, onnxruntime runs, tiny models.

Fixture models live in ``models/<framework>/`` with a ``MANIFEST.json``; every test that asks for
the ``fixture_model`` argument is parametrized over the manifest entries that exist right now, so
the suite picks up new exports without edits.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxprune.passes import registry

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


@dataclass(frozen=True)
class FixtureModel:
    """One manifest entry: the model, its sample (inputs and framework outputs), its metadata."""

    id: str
    path: Path
    sample: Path
    entry: dict

    def inputs(self) -> dict[str, np.ndarray]:
        with np.load(self.sample) as npz:
            return {k[3:]: npz[k] for k in npz.files if k.startswith("in/")}

    def outputs(self) -> dict[str, np.ndarray]:
        with np.load(self.sample) as npz:
            return {k[4:]: npz[k] for k in npz.files if k.startswith("out/")}


def discover_fixtures() -> list[FixtureModel]:
    """Every entry of every ``models/*/MANIFEST.json`` (sorted by framework folder, then name)."""
    found = []
    for manifest in sorted(MODELS.glob("*/MANIFEST.json")):
        try:
            entries = json.loads(manifest.read_text())
        except ValueError:  # being rewritten by an exporter right now
            continue
        for name, entry in sorted(entries.items()):
            folder = manifest.parent
            found.append(
                FixtureModel(
                    id=f"{folder.name}/{name}",
                    path=folder / entry["file"],
                    sample=folder / entry["sample"],
                    entry=entry,
                )
            )
    return found


FIXTURES = discover_fixtures()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "fixture_model" in metafunc.fixturenames:
        metafunc.parametrize("fixture_model", FIXTURES, ids=[f.id for f in FIXTURES])


def fixture_path(rel: str) -> Path:
    """A fixture model by its path under models/, or skip the test when it is not there (yet)."""
    path = MODELS / rel
    if not path.exists():
        pytest.skip(f"fixture {rel} not present")
    return path


def ort_run(
    model: onnx.ModelProto | Path | str, feeds: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Run a model once on the CPU provider (quiet, single thread); outputs by name."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(feeds)), strict=True))


def assert_same_outputs(
    a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], tol: float = 0.0
) -> None:
    """Same output names; values equal (tol=0) or within ``tol`` absolute and relative."""
    assert sorted(a) == sorted(b)
    for name in a:
        if tol:
            np.testing.assert_allclose(a[name], b[name], rtol=tol, atol=tol, err_msg=name)
        else:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture
def run_ort() -> Callable[..., dict[str, np.ndarray]]:
    return ort_run


@pytest.fixture
def same_outputs() -> Callable[..., None]:
    return assert_same_outputs


@pytest.fixture
def model_path() -> Callable[[str], Path]:
    """``model_path("tf/cnn.onnx")``: a fixture model's path, skipping when it is absent."""
    return fixture_path


@pytest.fixture
def all_fixtures() -> list[FixtureModel]:
    return FIXTURES


@pytest.fixture
def any_fixture() -> FixtureModel:
    """A small fixture model (the first one the manifests list), or skip when there is none."""
    preferred = [f for f in FIXTURES if f.id == "tf/cnn"] + FIXTURES
    if not preferred:
        pytest.skip("no fixture models yet")
    return preferred[0]


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Passes registered by a test disappear after it (built-ins and plugins stay)."""
    registry.available_passes()  # load built-ins and entry points into the real registry first
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_ORIGIN", dict(registry._ORIGIN))


def tiny_linear(opset: int = 17, ir_version: int = 8) -> onnx.ModelProto:
    """x[2,4] -> MatMul(W[4,3]) -> Add(B[3]) -> y[2,3], weights as initializers."""
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W")
    b = onnx.numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "B")
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "W"], ["t"], name="matmul"),
        onnx.helper.make_node("Add", ["t", "B"], ["y"], name="add"),
    ]
    graph = onnx.helper.make_graph(nodes, "tiny", [x], [y], initializer=[w, b])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def tiny() -> onnx.ModelProto:
    return tiny_linear()


@pytest.fixture
def tiny_feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)}


def build_model(
    nodes, inputs, outputs, inits: Mapping[str, np.ndarray], opset: int = 17
) -> onnx.ModelProto:
    """A checked opset-``opset``, IR 8 model from onnx.helper parts; ``inits`` by name."""
    graph = onnx.helper.make_graph(
        nodes,
        "test",
        inputs,
        outputs,
        [onnx.numpy_helper.from_array(np.asarray(a), n) for n, a in inits.items()],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def invoke(*args: object):
    """Run the CLI in-process with stdout and stderr kept apart (any click version)."""
    from click.testing import CliRunner

    from onnxprune.cli import main

    try:
        runner = CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        runner = CliRunner()
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def noisy_member(tmp_path_factory: pytest.TempPathFactory) -> str:
    """torch_cnn with its last layer's weights replaced by noise: a fusion member worth
    dropping (its path)."""
    model = onnx.load(MODELS / "digits" / "torch_cnn.onnx")
    last = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
    for t in model.graph.initializer:
        if t.name == last.input[1]:
            w = onnx.numpy_helper.to_array(t)
            noisy = np.random.default_rng(0).standard_normal(w.shape).astype(np.float32)
            t.CopyFrom(onnx.numpy_helper.from_array(noisy, t.name))
    path = tmp_path_factory.mktemp("members") / "noise.onnx"
    onnx.save(model, path)
    return str(path)
