"""Every fixture model under models/*/ (from the manifests): load, check, run, round-trip, cleanup,
and its calibration file where the manifest names one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.data import load_npz
from onnxprune.graph import graph_input_names

MODELS = Path(__file__).resolve().parents[1] / "models"


def test_manifests_parse():
    for manifest in sorted(MODELS.glob("*/MANIFEST.json")):
        entries = json.loads(manifest.read_text())  # discovery skips a manifest mid-rewrite
        assert isinstance(entries, dict) and entries, manifest
        for name, entry in entries.items():
            assert {"file", "sample", "sha256", "opset", "ir_version"} <= set(entry), (
                manifest,
                name,
            )


def test_manifest_matches_file(fixture_model):
    data = fixture_model.path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == fixture_model.entry["sha256"]
    assert fixture_model.sample.is_file()
    inputs, outputs = fixture_model.inputs(), fixture_model.outputs()
    model = onnx.load_from_string(data)
    assert sorted(inputs) == sorted(graph_input_names(model.graph))
    assert list(outputs) == [o.name for o in model.graph.output]


def test_loads_checks_and_matches_framework(fixture_model, run_ort, same_outputs):
    model = onnxprune.load(fixture_model.path)
    onnx.checker.check_model(model, full_check=True)
    got = run_ort(model, fixture_model.inputs())
    same_outputs(got, fixture_model.outputs(), tol=1e-4)


def test_save_load_roundtrip_is_identical(fixture_model, tmp_path, run_ort, same_outputs):
    model = onnxprune.load(fixture_model.path)
    out = onnxprune.save(model, tmp_path / "copy.onnx")
    again = onnxprune.load(out)
    feeds = fixture_model.inputs()
    same_outputs(run_ort(again, feeds), run_ort(model, feeds))
    assert again.graph == model.graph
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.onnx"]


def test_cleanup_keeps_outputs(fixture_model, run_ort, same_outputs):
    model = onnxprune.load(fixture_model.path)
    new, report = onnxprune.run(model, ["cleanup"])
    onnx.checker.check_model(new, full_check=True)
    feeds = fixture_model.inputs()
    same_outputs(run_ort(new, feeds), run_ort(model, feeds), tol=1e-5)
    same_outputs(run_ort(new, feeds), fixture_model.outputs(), tol=1e-4)
    section = report["passes"][0]
    assert section["pass"] == "cleanup"
    assert section["nodes_after"] <= section["nodes_before"]


def test_calib_is_valid_data_for_its_model(fixture_model, run_ort):
    """A manifest's ``calib`` file is --data for its model: every input, a few dozen samples,
    each of which onnxruntime runs to finite outputs (valid ids, masks, states)."""
    if "calib" not in fixture_model.entry:
        pytest.skip("no calibration file in the manifest entry")
    path = fixture_model.path.parent / fixture_model.entry["calib"]
    model = onnxprune.load(fixture_model.path)
    data = load_npz(path, model)
    assert not data.synthetic and len(data) >= 16
    assert sorted(data.inputs) == sorted(graph_input_names(model.graph))
    for i in range(len(data)):
        outs = run_ort(model, {k: v[i : i + 1] for k, v in data.inputs.items()})
        assert all(np.isfinite(v).all() for v in outs.values() if v.dtype.kind == "f"), i


def test_real_fixtures_are_small_and_carry_calibration():
    """models/real/ is committed, never downloaded: every file small, every entry with calib."""
    folder = MODELS / "real"
    if not folder.is_dir():
        pytest.skip("no models/real/ yet")
    entries = json.loads((folder / "MANIFEST.json").read_text())
    for name, entry in entries.items():
        assert "calib" in entry and (folder / entry["calib"]).is_file(), name
        for key in ("file", "sample", "calib"):
            assert (folder / entry[key]).stat().st_size < 2 * 1024 * 1024, (name, key)
