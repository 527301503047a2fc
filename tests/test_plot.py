"""The sweep plot: one panel per metric, failed gates on their own panel, the recommended point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import invoke as cli

from onnxprune.plot import figure, panels, title
from onnxprune.sweep import recommend

pytest.importorskip("matplotlib")

DIGITS = Path(__file__).resolve().parents[1] / "models" / "digits"
MODEL = DIGITS / "torch_cnn.onnx"
DATA = DIGITS / "torch_cnn.test.npz"
PNG = b"\x89PNG\r\n\x1a\n"


def point(value, macs, params, gates, score=0.98, latency=1.0):
    """A point as a sweep records it, with only what the plot and recommend() read."""
    section = {
        "pass": "validate",
        "gates": [{"name": n, "limit": lim, "passed": ok} for n, lim, ok in gates],
        "cost": {"ratio": {"macs": macs, "parameters": params}},
        "latency": {"ratio": latency, "interval": [latency - 0.1, latency + 0.1]},
    }
    row = {
        "value": value,
        "parameters": params,
        "macs_ratio": macs,
        "metric": "accuracy",
        "score": score,
        "reference": 0.99,
        "latency_ratio": latency,
        "gates_passed": all(ok for _, _, ok in gates),
    }
    return {"value": value, "passes": [section], "row": row}


def sweep_report(points):
    return {
        "model": "m.onnx",
        "sweep": {"key": "sparsity"},
        "points": points,
        "recommended": recommend(points),
    }


ACC_OK, ACC_BAD = ("max_accuracy_drop", 0.01, True), ("max_accuracy_drop", 0.01, False)
LAT_OK, LAT_BAD = ("max_latency_ratio", 0.9, True), ("max_latency_ratio", 0.9, False)


def test_recommend_is_the_smallest_point_that_passes_every_gate():
    points = [
        point(0.25, 0.8, 800, [ACC_OK, LAT_OK]),
        point(0.5, 0.5, 500, [ACC_OK, LAT_OK]),
        point(0.75, 0.3, 300, [ACC_BAD, LAT_OK]),  # smaller, but the accuracy gate failed
        point(0.6, 0.4, 400, [ACC_OK, LAT_BAD]),  # smaller, but the latency gate failed
    ]
    assert recommend(points) == {"value": 0.5, "index": 1}
    assert recommend(points[2:]) is None
    assert recommend([point(0.1, 0.9, 900, [])]) is None  # no gate checked: nothing to vouch


def test_failed_gates_are_marked_on_their_own_panel_only():
    report = sweep_report(
        [
            point(0.25, 0.8, 800, [ACC_OK, LAT_OK]),
            point(0.5, 0.5, 500, [ACC_OK, LAT_BAD], latency=1.2),
            point(0.75, 0.3, 300, [ACC_BAD, LAT_OK], score=0.5),
        ]
    )
    score, cost, latency = panels(report)
    assert [p.name for p in (score, cost, latency)] == ["accuracy", "cost", "latency"]
    assert score.failed == [(0.75, 0.5, ["max_accuracy_drop"])]
    assert latency.failed == [(0.5, 1.2, ["max_latency_ratio"])]
    assert cost.failed == []
    assert score.gate == pytest.approx(0.98) and latency.gate == 0.9 and cost.gate is None
    assert latency.series[0].interval[1] == pytest.approx((1.1, 1.3))
    assert title(report) == "m.onnx: sweep of sparsity; recommended sparsity=0.25 (point 1)"
    fig = figure(report)
    axes = fig.get_axes()
    assert len(axes) == 3
    assert all(ax.get_shared_x_axes().joined(axes[0], ax) for ax in axes)
    for ax in axes:
        labels = ax.get_legend_handles_labels()[1]
        assert "recommended" in labels
        assert ("gate failed" in labels) == (ax is not axes[1])


def test_no_passing_point_is_said_in_the_title():
    report = sweep_report([point(0.5, 0.5, 500, [ACC_BAD, LAT_OK])])
    assert report["recommended"] is None
    assert title(report) == "m.onnx: sweep of sparsity; no point passes every gate"
    labels = [lab for ax in figure(report).get_axes() for lab in ax.get_legend_handles_labels()[1]]
    assert "recommended" not in labels


def test_a_failing_latency_gate_is_marked_on_the_latency_panel_only(tmp_path):
    plot, report = tmp_path / "sweep.png", tmp_path / "sweep.json"
    result = cli(
        MODEL,
        "-p",
        "vote",
        "-p",
        "fold",
        "-p",
        "validate:runs=3,warmup=0",
        "--sweep",
        "0.25,0.5",
        "--data",
        DATA,
        "--max-accuracy-drop",
        1.0,  # accuracy passes at every point
        "--max-latency-ratio",
        0.01,  # latency fails at every point
        "--plot",
        plot,
        "--report",
        report,
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.stderr
    assert plot.read_bytes().startswith(PNG)
    data = json.loads(report.read_text())
    assert data["recommended"] is None
    assert "recommended: none (no point passes every gate)" in result.stdout
    score, cost, latency = panels(data)
    assert score.failed == [] and cost.failed == []
    assert [(x, names) for x, _, names in latency.failed] == [
        (0.25, ["max_latency_ratio"]),
        (0.5, ["max_latency_ratio"]),
    ]
    # without the latency gate the smallest point passes and is the recommendation
    for p in data["points"]:
        p["passes"][-1]["gates"] = [
            g for g in p["passes"][-1]["gates"] if g["name"] != "max_latency_ratio"
        ]
    assert recommend(data["points"]) == {"value": 0.5, "index": 1}
