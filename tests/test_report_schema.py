"""The CI-grade report (schema 2): status and gates as the final line says, versions, seed,
device, argv and SHA-256 of every file read and written; --inspect --json; -q silent on every
path; the layer diff of validate:layers=true."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import build_model
from conftest import invoke as cli
from onnx import TensorProto, helper

import onnxprune
from onnxprune import provenance
from onnxprune.report import REPORT_SCHEMA_VERSION, layers_table
from onnxprune.synthesis import load_data
from onnxprune.validation.gates import verdict
from onnxprune.validation.layers import compare_layers, shared_tensors

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits"
MODEL = DIGITS / "torch_cnn.onnx"
DATA = DIGITS / "torch_cnn.test.npz"
LONG = "/encoder/" + "block_with_a_really_long_descriptive_name/" * 3 + "Conv"
VERSIONS = {"onnxprune", "onnx", "onnxruntime", "numpy", "python"}
DIGEST = {"path", "bytes", "sha256"}


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def prep_cnn() -> onnx.ModelProto:
    """x -> Mul (a preprocessing scale) -> Conv (16, long name) -> Relu -> Conv (8) -> pool -> Gemm."""
    rng = np.random.default_rng(0)
    f = np.float32
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["scaled"], name="prep"),
        helper.make_node("Conv", ["scaled", "w1", "b1"], ["c1"], name=LONG, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    inits = {
        "scale": np.asarray(0.5, f),
        "w1": rng.normal(size=(16, 3, 3, 3)).astype(f),
        "b1": rng.normal(size=16).astype(f),
        "w2": rng.normal(size=(8, 16, 3, 3)).astype(f),
        "b2": rng.normal(size=8).astype(f),
        "wf": rng.normal(size=(4, 8)).astype(f),
        "bf": rng.normal(size=4).astype(f),
    }
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    return build_model(nodes, [x], [y], inits)


@pytest.fixture
def prep(tmp_path: Path) -> Path:
    path = tmp_path / "prep.onnx"
    onnx.save(prep_cnn(), path)
    return path


def _run(tmp_path: Path, *args: object) -> tuple[object, dict]:
    report = tmp_path / "r.json"
    result = cli(MODEL, "-o", tmp_path / "o.onnx", "--report", report, "--device", "cpu", *args)
    return result, json.loads(report.read_text())


# --- status, gates, versions, files ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "status", "word"),
    [
        (["-p", "validate:runs=0", "--data", DATA, "--min-cosine", 0.5], "passed", "PASSED"),
        (["-p", "vote:sparsity=0.9", "-p", "fold", "-p", "validate:runs=0", "--data", DATA,
          "--max-accuracy-drop", 0.0001], "failed", "FAILED"),
        (["-p", "cleanup"], "no gates", "DONE"),
    ],
)  # fmt: skip
def test_status_and_gates_follow_the_final_line(tmp_path, monkeypatch, args, status, word):
    monkeypatch.setattr(sys, "argv", ["onnxprune", str(MODEL), "--seed", "3"])  # as a shell sets it
    result, data = _run(tmp_path, *args, "--seed", 3)
    assert data["schema"] == REPORT_SCHEMA_VERSION == 2
    assert list(data)[:2] == ["schema", "status"]  # status first, for a reader by eye
    assert data["status"] == status
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith(word) and verdict(data).split()[0] == word
    assert result.exit_code == (1 if status == "failed" else 0), result.stderr
    section_gates = [g for s in data["passes"] if s["pass"] == "validate" for g in s["gates"]]
    assert data["gates"] == [{k: g[k] for k in provenance.GATE_KEYS} for g in section_gates]
    assert (status == "no gates") == (not data["gates"])
    assert any(not g["passed"] for g in data["gates"]) == (status == "failed")
    assert set(data["versions"]) == VERSIONS
    assert data["versions"]["onnxprune"] == onnxprune.__version__
    assert data["versions"]["onnx"] == onnx.__version__
    assert data["seed"] == 3 and data["device"] == "cpu"
    assert data["providers"] == ["CPUExecutionProvider"]
    assert data["argv"] == ["onnxprune", str(MODEL), "--seed", "3"]


def test_files_hold_the_sha256_of_what_was_read_and_written(tmp_path):
    result, data = _run(tmp_path, "-p", "cleanup", "--data", DATA)
    assert result.exit_code == 0, result.stderr
    files = data["files"]
    assert set(files) == {"model", "data", "output"}
    assert files["model"] == [
        {"path": str(MODEL), "bytes": MODEL.stat().st_size, "sha256": sha(MODEL)}
    ]
    assert files["data"][0]["sha256"] == sha(DATA)
    (out,) = files["output"]
    assert set(out) == DIGEST and out["path"] == str(tmp_path / "o.onnx")
    assert out["sha256"] == sha(tmp_path / "o.onnx")  # the file as committed, not the staged one


def test_external_data_is_hashed_on_both_sides(tmp_path):
    first = tmp_path / "a.onnx"
    assert cli(MODEL, "-p", "cleanup", "-o", first, "--external-data", "-q").exit_code == 0
    report = tmp_path / "r.json"
    out = tmp_path / "b.onnx"
    result = cli(first, "-p", "cleanup", "-o", out, "--external-data", "--report", report)
    assert result.exit_code == 0, result.stderr
    files = json.loads(report.read_text())["files"]
    assert [Path(f["path"]).name for f in files["model"]] == ["a.onnx", "a.onnx.data"]
    assert [f["sha256"] for f in files["model"]] == [sha(first), sha(tmp_path / "a.onnx.data")]
    assert [Path(f["path"]).name for f in files["output"]] == ["b.onnx", "b.onnx.data"]
    assert [f["sha256"] for f in files["output"]] == [sha(out), sha(tmp_path / "b.onnx.data")]


def test_the_python_api_report_has_the_keys_too():
    _, report = onnxprune.run(MODEL, ["cleanup"], device="cpu", seed=5)
    assert report["status"] == "no gates" and report["gates"] == []
    assert report["seed"] == 5 and report["device"] == "cpu" and report["argv"] is None
    assert report["files"]["model"][0]["sha256"] == sha(MODEL)
    assert report["files"]["output"] == []  # nothing written yet


def test_sweep_report_has_the_keys_that_apply(tmp_path):
    report = tmp_path / "r.json"
    folder = tmp_path / "pts"
    result = cli(MODEL, "-p", "vote", "-p", "fold", "--sweep", "0.25,0.5", "--data", DATA,
                 "--device", "cpu", "-o", folder, "--report", report, "-q")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    data = json.loads(report.read_text())
    assert "status" not in data and "gates" not in data  # a sweep explores: its points say
    assert set(data["versions"]) == VERSIONS and data["seed"] == 0 and data["device"] == "cpu"
    assert data["argv"] == ["onnxprune", *sys.argv[1:]]  # the final line's command line
    assert data["files"]["model"][0]["sha256"] == sha(MODEL)
    written = {f["path"]: f["sha256"] for f in data["files"]["output"]}
    assert set(written) == {p["output"] for p in data["points"]}
    assert all(sha(Path(p)) == h for p, h in written.items())


def test_schema_doc_names_the_new_keys():
    doc = (ROOT / "docs" / "report-schema.md").read_text()
    assert "# Report schema (version 2)" in doc and "## Changes" in doc
    for key in ("status", "versions", "argv", "files", "sha256", "layers", "layers_skipped",
                "layers_samples", "groups", "producers", "no gates"):  # fmt: skip
        assert f"`{key}`" in doc, key


def test_file_digest_is_cached_per_version(tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(b"one")
    assert provenance.file_digest(f)["sha256"] == hashlib.sha256(b"one").hexdigest()
    f.write_bytes(b"two!")  # a new size (and time): hashed again
    assert provenance.file_digest(f)["sha256"] == hashlib.sha256(b"two!").hexdigest()


# --- --inspect --json -----------------------------------------------------------------------------


def test_inspect_json_has_full_node_names(prep, tmp_path):
    result = cli(prep, "--inspect", "--json", "--device", "cpu", "--seed", 4)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)  # JSON alone on stdout
    assert data["schema"] == 2 and data["seed"] == 4 and data["device"] == "cpu"
    assert data["providers"] == ["CPUExecutionProvider"] and data["data"] is None
    assert data["files"]["model"][0]["sha256"] == sha(prep)
    producers = [p for g in data["groups"] for p in g["producers"]]
    assert {"op": "Conv", "node": LONG, "channels": 16} in producers
    assert set(data["groups"][0]) == {
        "index", "channels", "pinned", "prunable", "macs", "producers", "members", "reasons",
    }  # fmt: skip
    report = tmp_path / "g.json"
    assert cli(prep, "--inspect", "--report", report, "--device", "cpu", "--seed", 4).exit_code == 0
    written = json.loads(report.read_text())
    assert written["groups"] == data["groups"]


def test_inspect_table_wraps_long_names_instead_of_cutting_them(prep):
    result = cli(prep, "--inspect", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert "…" not in result.stdout and "providers: CPUExecutionProvider" in result.stdout
    cells = [line.split("│")[5].strip() for line in result.stdout.splitlines() if "│" in line]
    assert LONG in "".join(cells)  # the producers column holds the whole name, wrapped


def test_inspect_probes_on_the_data(monkeypatch):
    import onnxprune.analysis.inspect as inspect_module

    seen = {}
    real = inspect_module.probe

    def spy(model, seed=0, providers=None, *, data=None):
        seen.update(seed=seed, providers=providers, data=data)
        return real(model, seed, providers, data=data)

    monkeypatch.setattr(inspect_module, "probe", spy)
    result = cli(MODEL, "--inspect", "--json", "--data", DATA, "--seed", 7, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["data"] == str(DATA)
    assert seen["seed"] == 7 and seen["providers"] == ["CPUExecutionProvider"]
    assert seen["data"] is not None and seen["data"].source == str(DATA)


def test_json_needs_inspect():
    result = cli(MODEL, "-p", "cleanup", "--json")
    assert result.exit_code == 2 and "--json needs --inspect" in result.stderr


# --- -q prints nothing on success, on every path ---------------------------------------------------


def test_quiet_prints_nothing_on_every_path(tmp_path):
    env = {**os.environ, "COLUMNS": "80"}
    base = [sys.executable, "-m", "onnxprune", str(MODEL), "-q", "--device", "cpu"]
    runs = {
        "summary": [],
        "run": ["-p", "cleanup", "-o", tmp_path / "a.onnx"],
        "gated run": ["-p", "vote", "-p", "fold", "--data", DATA, "-o", tmp_path / "b.onnx",
                      "--min-cosine", "0", "--report", tmp_path / "b.json"],
        "layers": ["-p", "validate:layers=true,runs=0", "-o", tmp_path / "c.onnx"],
        "sweep": ["-p", "vote", "-p", "fold", "--sweep", "0.25,0.5", "-o", tmp_path / "pts"],
        "inspect": ["--inspect", "--data", DATA],
        "inspect report": ["--inspect", "--report", tmp_path / "g.json"],
    }  # fmt: skip
    for what, args in runs.items():
        proc = subprocess.run(
            [*base, *map(str, args)], capture_output=True, text=True, env=env, check=False
        )
        assert proc.returncode == 0, (what, proc.stderr)
        assert (proc.stdout, proc.stderr) == ("", ""), what


# --- the layer diff -------------------------------------------------------------------------------


def test_layer_diff_after_vote_and_fold(prep, tmp_path):
    report = tmp_path / "r.json"
    result = cli(prep, "-p", "vote:sparsity=0.5,round_to=1", "-p", "fold",
                 "-p", "validate:layers=true,layer_samples=4,runs=0,gates=off", "-o", tmp_path / "o.onnx",
                 "--report", report, "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    section = json.loads(report.read_text())["passes"][-1]
    layers = section["layers"]
    assert [r["tensor"] for r in layers][0] == "scaled"  # graph order, inputs left out
    assert set(layers[0]) == {"tensor", "op", "shape", "cosine", "max_abs"}
    assert layers[0]["op"] == "Mul" and layers[0]["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert layers[0]["max_abs"] == 0.0
    names = [r["tensor"] for r in layers]
    # both convs lost channels: c1, r1, c2 and the pooled p, flat changed shape, y did not
    assert names == ["scaled", "y"] and layers[-1]["shape"] == [4, 4]
    assert section["layers_skipped"] == 5 and section["layers_samples"] == 4
    assert "validate: layers on 4 samples" in result.stdout and "scaled" in result.stdout
    assert "5 shared tensors skipped" in result.stdout


def test_layer_diff_of_a_model_with_itself_agrees_everywhere():
    model = prep_cnn()
    names = [n for n, _ in shared_tensors(model, model)]
    assert names == ["scaled", "c1", "r1", "c2", "p", "flat", "y"]
    diff = compare_layers(model, model, load_data(None, model, seed=0), ["CPUExecutionProvider"], 3)
    assert diff["skipped"] == 0 and diff["samples"] == 3
    assert all(r["cosine"] == pytest.approx(1.0) and r["max_abs"] == 0 for r in diff["layers"])
    table = layers_table({"layers": diff["layers"], "layers_skipped": 0, "layers_samples": 3})
    assert "every tensor agrees" in str(table.caption)


def test_layers_table_shows_where_agreement_drops_first():
    rows = [{"tensor": f"t{i}", "op": "Relu", "shape": [1], "cosine": 1.0, "max_abs": 0.0}
            for i in range(100)]  # fmt: skip
    rows[70]["cosine"] = 0.5
    table = layers_table({"layers": rows, "layers_skipped": 3, "layers_samples": 8})
    assert table.row_count == 30
    assert "agreement drops first at #70 t70" in str(table.caption)
    assert "rows 67-96 of 100" in str(table.caption)


def test_validate_without_layers_records_none():
    _, report = onnxprune.run(MODEL, ["validate:runs=0"], data=DATA, device="cpu")
    section = report["passes"][-1]
    assert section["layers"] is None and section["layers_skipped"] is None


BUDGET_KEYS = {"max_accuracy_drop", "min_cosine", "calibration", "evaluation", "measured",
               "original_accuracy", "mac_ratio", "phases", "evaluations", "judge", "groups"}  # fmt: skip
SENSITIVITY_KEYS = {"ratios", "data", "samples", "labels", "calibration", "evaluation", "groups"}


def test_budget_and_sensitivity_keys_are_pinned_and_documented(tmp_path):
    result, data = _run(tmp_path, "-p", "vote:max_accuracy_drop=0.02,round_to=1", "-p", "fold",
                        "--data", DATA)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    vote = data["passes"][0]
    budget, sens = vote["budget"], vote["sensitivity"]
    assert set(budget) == BUDGET_KEYS and set(sens) == SENSITIVITY_KEYS
    assert set(budget["calibration"]) == set(budget["evaluation"]) == {
        "source", "samples", "labels", "rows"}  # fmt: skip
    assert set(budget["measured"]) == {"cosine", "accuracy_drop"}
    assert set(budget["phases"]) == {"uniform", "threshold", "refined"}
    assert set(budget["groups"][0]) == {"group", "layers", "channels", "pruned", "ratio"}
    assert set(sens["groups"][0]) == {"group", "layers", "channels", "points"}
    point_keys = {"asked", "ratio", "pruned", "cosine", "accuracy_drop"}
    assert set(sens["groups"][0]["points"][0]) == point_keys
    assert all("ratio" in g for g in vote["groups"])
    doc = (ROOT / "docs" / "report-schema.md").read_text()
    for key in BUDGET_KEYS | SENSITIVITY_KEYS | point_keys | {"budget", "sensitivity", "rows"}:
        assert f"`{key}`" in doc, key
