"""The ``onnxprune`` command: runs, outputs, reports, recipes, and one-line errors with exit 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

import onnxprune
from onnxprune import Pass, register_pass
from onnxprune.cli import main
from onnxprune.model import provenance
from onnxprune.runtime import cuda_works

MODELS = Path(__file__).resolve().parents[1] / "models"


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        return CliRunner()  # click >= 8.2 keeps stderr apart by default


def cli(*args: object):
    return _runner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, *expected: str, code: int = 2) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    err = result.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("Error: ")
    for text in expected:
        assert text in err, err
    return err


@pytest.fixture
def model(model_path, tmp_path) -> Path:
    """A private copy of tf/cnn.onnx in the test's folder."""
    return Path(shutil.copy(model_path("tf/cnn.onnx"), tmp_path / "cnn.onnx"))


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- runs ---------------------------------------------------------------------------------------


def test_summary_only(model, tmp_path):
    result = cli(model)
    assert result.exit_code == 0, result.stderr
    assert "parameters" in result.stdout and "TensorFlow (tf2onnx)" in result.stdout
    assert "summary only, nothing written" in result.stdout
    assert _files(tmp_path) == ["cnn.onnx"]


def test_cleanup_end_to_end(model, tmp_path, run_ort, same_outputs):
    out = tmp_path / "sub" / "clean.onnx"
    out.parent.mkdir()
    result = cli(model, "-p", "cleanup:fold_limit_mb=8", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    assert "cleanup" in result.stdout and "DONE (no gates checked" in result.stdout
    new = onnxprune.load(out)
    assert provenance(new)[-1]["passes"][0]["options"]["fold_limit_mb"] == 8.0
    with np.load(MODELS / "tf" / "cnn.sample.npz") as sample:
        feeds = {k[3:]: sample[k] for k in sample.files if k.startswith("in/")}
    same_outputs(run_ort(new, feeds), run_ort(onnxprune.load(model), feeds), tol=1e-5)
    assert _files(out.parent) == ["clean.onnx"]


def test_default_output_name(model, tmp_path):
    result = cli(model, "-p", "cleanup", "-q")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""  # -q
    assert _files(tmp_path) == ["cnn.onnx", "cnn.pruned.onnx"]
    onnxprune.load(tmp_path / "cnn.pruned.onnx")


def test_external_data_flag(model_path, tmp_path):
    src = model_path("tf/mlp.onnx")
    result = cli(src, "-p", "cleanup", "-o", tmp_path / "o.onnx", "--external-data")
    assert result.exit_code == 0, result.stderr
    assert _files(tmp_path) == ["o.onnx", "o.onnx.data"]
    new = onnxprune.load(tmp_path / "o.onnx")
    assert sorted(t.name for t in new.graph.initializer) == sorted(
        t.name for t in onnxprune.load(src).graph.initializer
    )


def test_report_json_schema(model, tmp_path):
    report = tmp_path / "r.json"
    result = cli(
        model, "-p", "cleanup", "-o", tmp_path / "o.onnx", "--report", report, "--device", "cpu"
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(report.read_text())
    assert set(data) == {
        "schema",
        "onnxprune",
        "model",
        "providers",
        "before",
        "passes",
        "after",
        "output",
        "status",
        "gates",
        "versions",
        "seed",
        "device",
        "argv",
        "files",
    }
    assert data["schema"] == 2 and data["onnxprune"] == onnxprune.__version__
    assert data["providers"] == ["CPUExecutionProvider"]
    assert data["model"] == str(model) and data["output"] == str(tmp_path / "o.onnx")
    summary_keys = {
        "nodes",
        "parameters",
        "macs",
        "bytes",
        "opset",
        "ir_version",
        "framework",
        "op_histogram",
        "macs_by_op",
    }
    assert set(data["before"]) == set(data["after"]) == summary_keys
    (section,) = data["passes"]
    assert {
        "pass",
        "options",
        "modified",
        "seconds",
        "constants_lifted",
        "identities_bypassed",
        "initializer_inputs_removed",
        "nodes_before",
        "nodes_after",
    } <= set(section)
    assert section["options"] == {
        "fold_constants": True,
        "fold_limit_mb": 64.0,
        "keep_initializer_inputs": False,
    }
    assert _files(tmp_path) == ["cnn.onnx", "o.onnx", "r.json"]


def test_recipe(model, tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    recipe = folder / "deploy.toml"
    recipe.write_text(
        'device = "cpu"\nseed = 3\noutput = "out/small.onnx"\nreport = "small.json"\n\n'
        '[[pass]]\nname = "cleanup"\nfold_limit_mb = 8\nfold_constants = true\n'
    )
    (folder / "out").mkdir()
    monkeypatch.chdir(tmp_path)  # paths in the recipe are relative to the recipe, not the cwd
    result = cli(model, "--recipe", recipe, "-p", "cleanup:fold_constants=false")
    assert result.exit_code == 0, result.stderr
    assert (folder / "out" / "small.onnx").is_file()
    passes = json.loads((folder / "small.json").read_text())["passes"]
    assert [
        (p["pass"], p["options"]["fold_limit_mb"], p["options"]["fold_constants"]) for p in passes
    ] == [("cleanup", 8.0, True), ("cleanup", 64.0, False)]

    result = cli(model, "--recipe", recipe, "-o", tmp_path / "override.onnx")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "override.onnx").is_file()


def test_list_passes_shows_cleanup_and_options():
    result = cli("--list-passes")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert any(ln.startswith("cleanup  ") and "(onnxprune.passes.cleanup)" in ln for ln in lines)
    for opt in (
        "fold_constants: bool = True",
        "fold_limit_mb: float = 64.0",
        "keep_initializer_inputs: bool = False",
    ):
        assert any(ln.strip().startswith(opt) for ln in lines), opt


def test_version():
    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.startswith(f"onnxprune {onnxprune.__version__} ")
    assert f"onnx {onnx.__version__}" in result.stdout and "onnxruntime" in result.stdout


# --- bad input: exit 2, one line, no traceback -----------------------------------------------------


def _write_model(path: Path, nodes, inputs=("x",)) -> Path:
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in inputs]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    m = helper.make_model(
        helper.make_graph(nodes, "g", vi, [y]), opset_imports=[helper.make_opsetid("", 17)]
    )
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def _bad_model(kind: str, model: Path, tmp: Path) -> Path:
    if kind == "missing":
        return tmp / "nope.onnx"
    if kind == "folder":
        return tmp
    path = tmp / f"{kind}.onnx"
    if kind == "text":
        path.write_text("this is not a model\nbut a text file\n")
    elif kind == "png":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = model.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "unknown-op":
        _write_model(path, [helper.make_node("NoSuchOp", ["x"], ["y"])])
    elif kind == "dangling":
        _write_model(path, [helper.make_node("Add", ["x", "ghost"], ["y"])])
    return path


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("missing", "no such file"),
        ("folder", "is a folder"),
        ("text", "not an ONNX model"),
        ("png", "not an ONNX model"),
        ("empty", "not an ONNX model"),
        ("truncated", "truncated.onnx"),
        ("unknown-op", "onnx.checker rejects the model: No Op registered for NoSuchOp"),
        ("dangling", "input 'ghost' of node"),
    ],
)
def test_bad_model_files(kind, expected, model, tmp_path):
    bad = _bad_model(kind, model, tmp_path)
    before = _files(tmp_path)
    assert_one_line_error(cli(bad, "-p", "cleanup"), expected)
    assert _files(tmp_path) == before


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-p", "nope"], ["unknown pass 'nope'", "known passes: ", "cleanup"]),
        (
            ["-p", "cleanup:foo=1"],
            [
                "pass cleanup: unknown option 'foo'",
                "fold_constants",
                "fold_limit_mb",
                "keep_initializer_inputs",
            ],
        ),
        (
            ["-p", "cleanup:fold_limit_mb=abc"],
            ["pass cleanup: option fold_limit_mb='abc'", "expected a number"],
        ),
        (["-p", "cleanup:fold_constants=maybe"], ["expected true or false"]),
        (["-p", "cleanup:oops"], ["expected key=value"]),
        (["-p", "cleanup", "--data", "missing.npz"], ["missing.npz: no such data file"]),
    ],
)
def test_bad_passes_and_options(args, expected, model, tmp_path):
    assert_one_line_error(cli(model, *args, "-o", tmp_path / "o.onnx"), *expected)
    assert _files(tmp_path) == ["cnn.onnx"]


def test_unwritable_output(model, tmp_path):
    assert_one_line_error(
        cli(model, "-p", "cleanup", "-o", tmp_path / "no" / "o.onnx"),
        "output folder",
        "does not exist",
    )
    (tmp_path / "dir.onnx").mkdir()
    assert_one_line_error(cli(model, "-p", "cleanup", "-o", tmp_path / "dir.onnx"), "is a folder")
    assert _files(tmp_path) == ["cnn.onnx", "dir.onnx"]


def test_output_equal_to_input_leaves_input_unchanged(model, tmp_path, monkeypatch):
    original = model.read_bytes()
    assert_one_line_error(cli(model, "-p", "cleanup", "-o", model), "refusing to overwrite")
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(cli("cnn.onnx", "-p", "cleanup", "-o", "./cnn.onnx"), "refusing")
    assert model.read_bytes() == original
    assert _files(tmp_path) == ["cnn.onnx"]


def test_device_cuda_without_gpu(model, tmp_path):
    if cuda_works():
        pytest.skip("CUDA works here")
    assert_one_line_error(
        cli(model, "-p", "cleanup", "--device", "cuda", "-o", tmp_path / "o.onnx"),
        "--device cuda",
        "cannot use CUDA",
        "--device auto or cpu",
    )
    assert _files(tmp_path) == ["cnn.onnx"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[[pass]\nname = 'cleanup'\n", "not valid TOML"),
        ("colour = 'red'\n", "unknown key(s) ['colour']"),
        ("[[pass]]\nfold_limit_mb = 3\n", "has no name"),
        ("[[pass]]\nname = 'cleanup'\nfold_limit_mb = 'big'\n", "fold_limit_mb='big'"),
        ("[[pass]]\nname = 'nope'\n", "unknown pass 'nope'"),
        ("pass = 3\n", "must be an array of tables"),
        (b"\x89PNG\r\n\x1a\n\xff\xfe", "cannot read the recipe"),
    ],
)
def test_bad_recipes(text, expected, model, tmp_path):
    recipe = tmp_path / "r.toml"
    if isinstance(text, bytes):
        recipe.write_bytes(text)
    else:
        recipe.write_text(text)
    assert_one_line_error(cli(model, "--recipe", recipe), expected)
    assert_one_line_error(cli(model, "--recipe", tmp_path / "none.toml"), "no such recipe file")


def test_verbose_shows_traceback(model, tmp_path):
    result = cli(model, "-p", "cleanup:fold_limit_mb=abc", "-v")
    assert result.exit_code == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert "PassOptionError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: pass cleanup")


def test_crashing_pass_is_an_internal_error(model, tmp_path, isolated_registry):
    @register_pass
    @dataclass
    class Crash(Pass):
        name: ClassVar[str] = "test-crash"

        def run(self, model, ctx):
            raise ZeroDivisionError("oops")

    err = assert_one_line_error(
        cli(model, "-p", "test-crash", "-o", tmp_path / "o.onnx"),
        "internal error",
        "test-crash",
        "ZeroDivisionError",
        code=3,
    )
    assert "rerun with -v" in err
    assert _files(tmp_path) == ["cnn.onnx"]


# --- the installed console script, for real ----------------------------------------------------------


def _script() -> Path:
    path = Path(sys.executable).with_name("onnxprune")
    if not path.exists():
        pytest.skip("the onnxprune console script is not installed next to this Python")
    return path


def test_console_script(model, tmp_path):
    env = dict(os.environ, NO_COLOR="1")
    run = lambda *a: subprocess.run(  # noqa: E731
        [str(_script()), *map(str, a)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    ok = run("cnn.onnx", "-p", "cleanup")
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr == ""
    assert "DONE (no gates checked" in ok.stdout and "onnxprune cnn.onnx -p cleanup" in ok.stdout
    assert "PASSED" not in ok.stdout  # no gate was checked: no pass is claimed
    assert _files(tmp_path) == ["cnn.onnx", "cnn.pruned.onnx"]

    (tmp_path / "half.onnx").write_bytes(model.read_bytes()[:5000])
    bad = run("half.onnx", "-p", "cleanup")
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("Error: half.onnx")
    assert "Traceback" not in bad.stderr


def test_a_closed_stdout_ends_quietly_with_the_sigpipe_status() -> None:
    """`onnxprune --list-passes | head -0`: no 'internal error', exit 141 as coreutils."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line is written
    try:
        done = subprocess.run(
            [sys.executable, "-m", "onnxprune", "--list-passes"],
            stdout=write,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)
    err = done.stderr.decode()
    assert done.returncode == 141, err
    assert "internal error" not in err and "Traceback" not in err
