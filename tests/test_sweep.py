"""``--sweep``: values, the chain per point, the table, the JSON report and the PNG plot.

No real pruning pass with a ``sparsity`` option exists yet, so the tests register a test-only
``test-random-prune`` (zero a random share of channel classes) and follow it with ``fold``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
from conftest import invoke as cli

import onnxprune
from onnxprune import Pass, PassResult, option, register_pass
from onnxprune.analysis.probe import probe
from onnxprune.analysis.walk import analyse
from onnxprune.errors import PassOptionError
from onnxprune.graph import lift_constants
from onnxprune.plot import write_plot
from onnxprune.pruning.zero import random_classes, zero_classes
from onnxprune.sweep import apply_value, parse_values, run_sweep

DIGITS = Path(__file__).resolve().parents[1] / "models" / "digits"
MODEL = DIGITS / "torch_cnn.onnx"
DATA = DIGITS / "torch_cnn.test.npz"
PNG = b"\x89PNG\r\n\x1a\n"


@dataclass
class RandomPrune(Pass):
    """Zero a random share of the free channel classes of every group (test only)."""

    name: ClassVar[str] = "test-random-prune"
    sparsity: float = option(0.5, "share of channel classes to zero")

    def run(self, model, ctx):
        lift_constants(model.graph)
        an = analyse(model, probe(model, ctx.seed).shapes)
        chosen = random_classes(an, self.sparsity, ctx.seed)
        zero_classes(model, an, chosen)
        return PassResult(model, bool(chosen), {"classes_zeroed": len(chosen)})


@dataclass
class Rounds(Pass):
    """A pass with an integer option, for type coercion (test only)."""

    name: ClassVar[str] = "test-rounds"
    rounds: int = option(1, "an integer")

    def run(self, model, ctx):
        return PassResult(model, False, {"rounds": self.rounds})


@pytest.fixture
def random_prune(isolated_registry):
    register_pass(RandomPrune)
    register_pass(Rounds)


def one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("Error: "), err
    return err


# --- values -------------------------------------------------------------------------------------


def test_parse_values():
    assert parse_values("0.1:0.8:0.1") == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]  # stop included
    assert parse_values("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_values("0.1:0.35:0.1") == [0.1, 0.2, 0.3]
    assert parse_values("0.5") == [0.5]
    assert parse_values("0.1, 0.5,0.9") == [0.1, 0.5, 0.9]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1:0:0.1", "STOP is below START"),
        ("0:1:0", "STEP must be > 0"),
        ("0:1", "expected START:STOP:STEP"),
        ("a:b:c", "must be numbers"),
        ("0.1,x", "expected numbers"),
        ("", "no values"),
        ("0:1:0.001", "at most 200"),
    ],
)
def test_bad_values(text, message):
    with pytest.raises(ValueError, match=message):
        parse_values(text)


def test_apply_value(random_prune):
    chain = [onnxprune.get_pass("cleanup")(), RandomPrune(), Rounds(), RandomPrune(sparsity=0.1)]
    swept = apply_value(chain, "sparsity", 0.3)
    assert [getattr(p, "sparsity", None) for p in swept] == [None, 0.3, None, 0.3]
    assert chain[1].sparsity == 0.5  # the chain itself is unchanged
    assert apply_value(chain, "rounds", 3.0)[2].rounds == 3
    with pytest.raises(PassOptionError, match=r"pass test-rounds: rounds=2.5: expected an integer"):
        apply_value(chain, "rounds", 2.5)
    with pytest.raises(
        PassOptionError, match="--sweep-key ratio: no pass in the chain has an option 'ratio'"
    ):
        apply_value(chain, "ratio", 0.5)


# --- the command --------------------------------------------------------------------------------


def test_sweep_writes_table_report_plot_and_models(tmp_path, random_prune):
    plot, report, folder = tmp_path / "sweep.png", tmp_path / "sweep.json", tmp_path / "points"
    result = cli(
        MODEL,
        "-p",
        "test-random-prune",
        "-p",
        "fold",
        "-p",
        "validate:runs=2,warmup=0",
        "--sweep",
        "0.25,0.5",
        "--data",
        DATA,
        "--plot",
        plot,
        "--report",
        report,
        "-o",
        folder,
        "--max-accuracy-drop",
        0.01,
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.stderr  # a sweep explores: failed gates do not fail it
    out = result.stdout
    assert "sweep of sparsity (original accuracy 0.9889)" in out
    for col in ("sparsity", "parameters", "MACs ratio", "accuracy", "latency ratio", "gates"):
        assert col in out
    assert plot.read_bytes().startswith(PNG) and plot.stat().st_size > 10_000
    data = json.loads(report.read_text())
    assert set(data) == {
        "schema",
        "onnxprune",
        "model",
        "providers",
        "before",
        "sweep",
        "points",
        "recommended",
        "plot",
        "versions",  # schema 2
        "seed",
        "device",
        "argv",
        "files",
    }
    assert data["sweep"] == {
        "key": "sparsity",
        "values": [0.25, 0.5],
        "passes": ["test-random-prune", "fold", "validate"],
    }
    assert data["plot"] == str(plot)
    assert [p["value"] for p in data["points"]] == [0.25, 0.5]
    for point in data["points"]:
        assert set(point) == {"value", "output", "after", "passes", "row"}
        assert point["passes"][0]["options"]["sparsity"] == point["value"]
        assert point["passes"][-1]["pass"] == "validate"
        assert set(point["row"]) == {
            "value",
            "parameters",
            "macs_ratio",
            "metric",
            "score",
            "reference",
            "latency_ratio",
            "gates_passed",
        }
        assert point["row"]["metric"] == "accuracy"
        assert Path(point["output"]).is_file()
    rows = [p["row"] for p in data["points"]]
    assert rows[0]["parameters"] > rows[1]["parameters"]  # more sparsity, fewer parameters
    assert rows[0]["macs_ratio"] > rows[1]["macs_ratio"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "torch_cnn.sparsity-0.25.onnx",
        "torch_cnn.sparsity-0.5.onnx",
    ]


def test_sweep_appends_validate_and_uses_cosine_without_labels(random_prune, tmp_path):
    model = onnxprune.load(MODEL)
    seen = []
    report = run_sweep(
        model,
        [RandomPrune(), onnxprune.get_pass("fold")()],
        [0.0, 0.5],
        device="cpu",
        on_point=lambda v, _: seen.append(v),
    )
    assert seen == [0.0, 0.5]
    assert report["sweep"]["passes"] == ["test-random-prune", "fold", "validate"]
    rows = [p["row"] for p in report["points"]]
    assert [r["metric"] for r in rows] == ["cosine", "cosine"]
    assert rows[0]["score"] == pytest.approx(1.0) and rows[0]["macs_ratio"] == 1.0
    assert rows[1]["score"] < 1.0
    path = write_plot(report, tmp_path / "cos.png")
    assert path.read_bytes().startswith(PNG)


def test_plot_without_matplotlib_is_a_one_line_error(tmp_path, monkeypatch, random_prune):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    err = one_line_error(
        cli(MODEL, "-p", "test-random-prune", "--sweep", "0.5", "--plot", tmp_path / "p.png")
    )
    assert err == 'Error: --plot needs matplotlib: pip install "onnxprune[plot]"'
    assert list(tmp_path.iterdir()) == []


def test_plot_needs_sweep(tmp_path):
    result = cli(MODEL, "-p", "cleanup", "--plot", tmp_path / "p.png")
    assert result.exit_code == 2 and "--plot needs --sweep" in result.stderr


def test_sweep_key_no_pass_has(random_prune):
    err = one_line_error(cli(MODEL, "-p", "cleanup", "--sweep", "0.5"))
    assert "--sweep-key sparsity: no pass in the chain has an option 'sparsity'" in err
    assert "(chain: cleanup, validate)" in err


def test_bad_sweep_values_exit_2(random_prune):
    result = cli(MODEL, "-p", "test-random-prune", "--sweep", "0.8:0.1:0.1")
    assert result.exit_code == 2 and "Invalid value for '--sweep'" in result.stderr
    assert "STOP is below START" in result.stderr


def test_sweep_output_must_be_a_folder(random_prune, tmp_path):
    result = cli(MODEL, "-p", "test-random-prune", "--sweep", "0.5", "-o", tmp_path / "x.onnx")
    assert result.exit_code == 2 and "-o is a folder" in result.stderr


def test_main_command_unchanged_without_sweep(tmp_path):
    result = cli(MODEL, "-p", "cleanup", "-o", tmp_path / "o.onnx", "-q")
    assert result.exit_code == 0 and result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx"]


def test_a_sweep_calibrates_once_for_all_its_points(monkeypatch):
    """Every point votes on the same model with the same data: one calibration run serves all."""
    from onnxprune.pruning import calibrate

    runs = []
    real = calibrate.collect

    def counting(*args, **kwargs):
        runs.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(calibrate, "collect", counting)
    digits = Path(__file__).resolve().parents[1] / "models" / "digits"
    model = onnxprune.load(digits / "torch_cnn.onnx")
    chain = [onnxprune.get_pass("vote")(criteria=["act_mean", "l1"], select="local")]
    report = run_sweep(
        model, chain, [0.25, 0.5, 0.75], data=digits / "torch_cnn.calib.npz", device="cpu"
    )
    assert len(report["points"]) == 3
    assert len(runs) == 1
