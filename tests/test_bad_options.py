"""Bad options are refused in one line naming the pass, the option and the allowed range (exit 2).

Covers option ranges declared with ``option(..., low=, high=, above=, below=)``, NaN and
infinity where a finite number is needed, regex options, ``quorum`` above the number of
voters, recipe values of the wrong type, ``--sweep`` values and ``--seed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import pytest
from conftest import build_model
from conftest import invoke as cli
from onnx import TensorProto, helper

import onnxprune
from onnxprune import Pass, PassResult, option
from onnxprune.errors import PassOptionError
from onnxprune.passes.base import Bounds
from onnxprune.sweep import parse_values


def mlp() -> onnx.ModelProto:
    """x[n, 4] -> Gemm(8) -> Relu -> Gemm(3) -> y[n, 3]."""
    rng = np.random.default_rng(0)
    inits = {
        "w1": rng.standard_normal((8, 4)).astype(np.float32),
        "b1": rng.standard_normal(8).astype(np.float32),
        "w2": rng.standard_normal((3, 8)).astype(np.float32),
        "b2": rng.standard_normal(3).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1, name="fc2"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
    return build_model(nodes, [x], [y], inits)


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(mlp(), path)
    return path


def one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("Error: "), err
    assert "internal error" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("vote:protect=fc(", "option protect='fc(': not a valid regular expression"),
        ("stats:below=0.1,protect=[", "option protect='[': not a valid regular expression"),
        ("magnitude:skip=*", "option skip='*': not a valid regular expression"),
        ("vote:criteria=l1+l2,quorum=3", "allowed: 1 <= quorum <= 2"),
        ("vote:criteria=l1,ensemble=m.onnx,quorum=3", "(1 criteria x 2 model(s))"),
        ("vote:quorum=0", "allowed: quorum >= 1"),
        ("vote:sparsity=inf", "expected a finite number; allowed: 0 <= sparsity < 1"),
        ("vote:sparsity=-0.1", "out of range; allowed: 0 <= sparsity < 1"),
        ("vote:floor=1.5", "allowed: 0 <= floor <= 1"),
        ("fold:tolerance=nan", "option tolerance='nan': expected a finite number; allowed: "),
        ("fold:tolerance=-1", "allowed: tolerance >= 0"),
        ("fold:max_rounds=0", "allowed: max_rounds >= 1"),
        ("cleanup:fold_limit_mb=-inf", "allowed: fold_limit_mb >= 0"),
        ("refit:ridge=nan", "allowed: ridge >= 0"),
        ("refit:max_rows=0", "allowed: max_rows >= 1"),
        ("magnitude:sparsity=nan", "allowed: 0 <= sparsity < 1"),
        ("stats:below=nan", "option below='nan': expected a finite number"),
        ("validate:max_latency_ratio=nan", "allowed: max_latency_ratio > 0"),
        ("validate:min_cosine=-inf", "allowed: -1 <= min_cosine <= 1"),
        ("validate:max_accuracy_drop=2", "allowed: 0 <= max_accuracy_drop <= 1"),
        ("validate:runs=-1", "allowed: runs >= 0"),
        ("validate:latency_batch=0", "allowed: latency_batch >= 1"),
    ],
)
def test_bad_option_values_name_pass_option_and_range(spec, expected, model_file, tmp_path):
    name = spec.split(":")[0]
    err = one_line_error(cli(model_file, "-p", spec, "-o", tmp_path / "o.onnx"))
    assert err.startswith(f"Error: pass {name}: "), err
    assert expected in err, err
    assert not (tmp_path / "o.onnx").exists()


def test_nan_gate_flag_is_refused(model_file, tmp_path):
    err = one_line_error(
        cli(model_file, "-p", "cleanup", "--max-latency-ratio", "nan", "-o", tmp_path / "o.onnx")
    )
    assert "pass validate: option max_latency_ratio=nan" in err
    assert "allowed: max_latency_ratio > 0" in err


def test_the_default_quorum_fits_a_single_voter():
    new, report = onnxprune.run(mlp(), ["vote:criteria=l1,sparsity=0.5,round_to=1"])
    assert report["passes"][0]["channels_pruned"] == 4
    vote = onnxprune.get_pass("vote")
    with pytest.raises(ValueError, match=r"allowed: 1 <= quorum <= 3"):
        vote(quorum=4)


def test_seed_must_not_be_negative(model_file, tmp_path):
    result = cli(model_file, "-p", "cleanup", "--seed", "-1", "-o", tmp_path / "o.onnx")
    assert result.exit_code == 2
    assert "Invalid value for '--seed'" in result.stderr and ">=0" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0:inf:0.1", "must be finite numbers"),
        ("nan:1:0.1", "must be finite numbers"),
        ("0:1:inf", "must be finite numbers"),
        ("0.1,nan", "nan is not a finite number"),
        ("inf", "inf is not a finite number"),
    ],
)
def test_sweep_values_must_be_finite(text, expected, model_file, tmp_path):
    with pytest.raises(ValueError, match=expected):
        parse_values(text)
    result = cli(model_file, "-p", "vote", "--sweep", text, "-o", tmp_path / "pts")
    assert result.exit_code == 2 and "Invalid value for '--sweep'" in result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_sweep_value_out_of_range_is_refused_before_any_work(model_file, tmp_path):
    err = one_line_error(cli(model_file, "-p", "vote", "--sweep", "0.5,1.5", "-o", tmp_path / "p"))
    assert "pass vote: sparsity=1.5: out of range; allowed: 0 <= sparsity < 1" in err
    assert not (tmp_path / "p").exists()  # a refused sweep leaves no folder behind


# --- recipes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[[pass]]\nname = "vote"\nsparsity = "abc"\n', ["option sparsity='abc'", "number"]),
        ('[[pass]]\nname = "vote"\nsparsity = [0.1, 0.2]\n', ["expected a number"]),
        ('[[pass]]\nname = "vote"\nquorum = 1.5\n', ["expected an integer"]),
        ('[[pass]]\nname = "vote"\nprotect = ["fc1"]\n', ["expected a single value, not a list"]),
        ('[[pass]]\nname = "vote"\nsparsity = nan\n', ["expected a finite number"]),
        ('[[pass]]\nname = "vote"\nfill = "maybe"\n', ["expected true or false"]),
        ("pass = [1, 2]\n", ["'pass' must be an array of tables"]),
        ('seed = "abc"\n', ["seed = 'abc': expected an integer >= 0"]),
        ("seed = -1\n", ["seed = -1: expected an integer >= 0"]),
        ("seed = 1.5\n", ["seed = 1.5: expected an integer >= 0"]),
        ("seed = true\n", ["seed = True: expected an integer >= 0"]),
        ('device = "gpu"\n', ["device = 'gpu': expected one of auto, cpu, cuda"]),
        ("data = 5\n", ["data = 5: expected a path (a string)"]),
        ("output = [1]\n", ["output = [1]: expected a path"]),
    ],
)
def test_recipe_values_of_the_wrong_type(text, expected, model_file, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    err = one_line_error(cli(model_file, "--recipe", recipe, "-o", tmp_path / "o.onnx"))
    assert str(recipe) in err
    for part in expected:
        assert part in err, err
    assert not (tmp_path / "o.onnx").exists()


# --- declaring ranges in a pass of one's own -------------------------------------------------------


@dataclass
class Ranged(Pass):
    """A pass with declared ranges (never registered)."""

    name: ClassVar[str] = "ranged"
    share: float = option(0.5, "a share", low=0, high=1)
    step: float = option(1.0, "a step", above=0)
    count: int = option(1, "a count", low=1, below=10)
    limits: tuple[float, ...] = option((0.5,), "each within [0, 1]", low=0, high=1)
    scale: float = option(math.inf, "may be infinite", finite=False, low=0)
    pattern: str = option("", "a regex", regex=True)
    free: float = option(0.0, "any finite number")

    def run(self, model, ctx):
        return PassResult(model, False)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"share": "1.5"}, "option share='1.5': out of range; allowed: 0 <= share <= 1"),
        ({"share": "abc"}, "option share='abc': expected a number; allowed: 0 <= share <= 1"),
        ({"step": 0}, "option step=0: out of range; allowed: step > 0"),
        ({"count": "10"}, "allowed: 1 <= count < 10"),
        ({"limits": "0.5+2"}, "option limits='0.5+2': out of range; allowed: 0 <= limits <= 1"),
        ({"scale": "-inf"}, "allowed: scale >= 0"),
        ({"pattern": "a)"}, "option pattern='a)': not a valid regular expression"),
        ({"free": "inf"}, "option free='inf': expected a finite number"),
    ],
)
def test_declared_ranges_are_enforced(options, expected):
    with pytest.raises(PassOptionError) as err:
        Ranged.from_options(options)
    assert str(err.value) == f"pass ranged: {expected}" or expected in str(err.value)
    assert str(err.value).startswith("pass ranged: option ")


def test_ranges_hold_when_a_pass_is_made_directly():
    ok = Ranged.from_options({"scale": "inf", "limits": "0+1", "count": 9})
    assert ok.scale == math.inf and ok.limits == (0.0, 1.0)
    bad = Ranged(share=float("nan"))
    with pytest.raises(PassOptionError, match=r"^pass ranged: option share=nan: expected a finite"):
        bad.check_options()
    with pytest.raises(PassOptionError, match="allowed: 0 <= share <= 1"):
        onnxprune.run(mlp(), [bad])  # before any pass runs
    with pytest.raises(PassOptionError, match="allowed: 0 <= share <= 1"):
        bad(mlp(), onnxprune.Context(original=None))  # calling the pass checks too
    specs = {name: help_ for name, _, _, help_ in Ranged.option_specs()}
    assert specs["count"] == "a count [1 <= count < 10]"
    assert specs["free"] == "any finite number"


@pytest.mark.parametrize(
    ("bounds", "text"),
    [
        (Bounds(low=0, below=1), "0 <= x < 1"),
        (Bounds(low=-1, high=1), "-1 <= x <= 1"),
        (Bounds(above=0), "x > 0"),
        (Bounds(low=1), "x >= 1"),
        (Bounds(high=5), "x <= 5"),
        (Bounds(above=0, below=1), "0 < x < 1"),
    ],
)
def test_bounds_describe_themselves(bounds, text):
    assert bounds.describe("x") == text
