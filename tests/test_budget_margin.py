"""Budget mode's margin (vote:confidence) and its dual, the MAC target (vote:max_macs,
vote:max_mac_ratio): the bound covers the true drop, the budget holds with its margin on rows
no step saw, the target is met after fold, bad values are refused with exit 2."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import invoke as cli
from test_budget import DIGITS, accuracy, mlp, section

import onnxprune
from onnxprune.cost import summarize
from onnxprune.pruning.margin import drop_upper
from onnxprune.runtime import session
from onnxprune.validation.compare import cosine_similarity


def test_the_bound_is_the_plain_drop_without_confidence_and_grows_with_it():
    assert drop_upper(3, 1, 200, 0.0) == pytest.approx(0.01)
    assert drop_upper(0, 0, 200, 0.9) > 0  # nothing lost on 200 samples still leaves doubt
    bounds = [drop_upper(k, 0, 200, 0.9) for k in range(5)]
    assert bounds == sorted(bounds) and bounds[2] > 2 / 200
    assert drop_upper(2, 0, 200, 0.95) > drop_upper(2, 0, 200, 0.8)
    assert drop_upper(4, 0, 800, 0.9) < drop_upper(1, 0, 200, 0.9)  # more samples: tighter


@pytest.mark.parametrize(
    ("lost", "gained", "n"), [(0.02, 0.005, 200), (0.03, 0.01, 360), (0.05, 0.02, 180)]
)
def test_the_bound_covers_the_true_drop_at_its_confidence(lost, gained, n):
    """Paired samples drawn with a known drop: the 90% bound is at or above the true drop in
    at least 89% of 4000 draws; the measured drop alone is, far less often."""
    rng = np.random.default_rng(0)
    a = rng.binomial(n, lost, 4000)
    b = rng.binomial(n - a, gained / (1 - lost))
    true = lost - gained
    covered = np.mean([drop_upper(x, y, n, 0.9) >= true for x, y in zip(a, b, strict=True)])
    plain = np.mean([(x - y) / n >= true for x, y in zip(a, b, strict=True)])
    assert covered >= 0.89 and plain < 0.7


def test_a_margin_keeps_the_budget_on_rows_no_step_saw(tmp_path):
    """An MLP whose labels are its own classes with 15% flipped: 512 rows calibrate, 300 judge
    with confidence=0.9; the report's bound is within the budget and above the measured drop,
    its counts are the judged rows' own, and on 4000 rows no step saw the drop is within the
    budget too; the margin prunes no more than the plain budget, and still prunes."""
    limit = 0.03
    model = mlp((16, 64, 64, 8), seed=3)
    rng = np.random.default_rng(6)

    def rows(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.standard_normal((n, 16)).astype(np.float32)
        y = session(model).run(None, {"x": x})[0].argmax(1)
        flip = rng.random(n) < 0.15
        return x, np.where(flip, rng.integers(0, 8, n), y)

    (xc, yc), (xj, yj), (xu, yu) = rows(512), rows(300), rows(4000)
    data, held = tmp_path / "calib.npz", tmp_path / "judge.npz"
    np.savez(data, x=xc, labels=yc)
    np.savez(held, x=xj, labels=yj)
    runs = {}
    for extra in ("", ",confidence=0.9"):
        runs[extra] = onnxprune.run(
            model,
            [f"vote:max_accuracy_drop={limit},sparsity=0.9,round_to=1{extra}", "fold"],
            data=data,
            eval_data=held,
            device="cpu",
        )
    pruned, report = runs[",confidence=0.9"]
    budget = section(report)["budget"]
    mg = budget["margin"]
    assert mg["confidence"] == 0.9 and mg["samples"] == 300
    assert budget["measured"]["accuracy_drop"] <= mg["drop_upper"] <= limit
    assert (mg["lost"] - mg["gained"]) / 300 == pytest.approx(
        budget["measured"]["accuracy_drop"], abs=1e-4
    )
    base_right = session(model).run(None, {"x": xj})[0].argmax(1) == yj
    now_right = session(pruned).run(None, {"x": xj})[0].argmax(1) == yj
    assert int((base_right & ~now_right).sum()) == mg["lost"]
    assert int((~base_right & now_right).sum()) == mg["gained"]
    assert accuracy(model, xu, yu) - accuracy(pruned, xu, yu) <= limit
    assert "margin" not in section(runs[""][1])["budget"]
    assert summarize(runs[""][0]).macs <= summarize(pruned).macs < summarize(model).macs


@pytest.mark.parametrize("how", ["ratio", "macs"])
def test_a_mac_target_is_met_after_fold_with_the_least_damage_judged(tmp_path, how):
    """An MLP, --data and --eval-data: max_mac_ratio=0.5 (or max_macs at half the MACs) gives
    a folded model at or below the target; the result judges no worse than any allocation the
    search started from, and a looser target changes the outputs less."""
    model = mlp((16, 64, 64, 8), seed=2)
    rng = np.random.default_rng(5)
    data, held = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(data, x=rng.standard_normal((512, 16)).astype(np.float32))
    x_eval = rng.standard_normal((200, 16)).astype(np.float32)
    np.savez(held, x=x_eval)
    ref = session(model).run(None, {"x": x_eval})[0]
    total = summarize(model).macs
    cos = {}
    for share in (0.5, 0.8):
        option = f"max_mac_ratio={share}" if how == "ratio" else f"max_macs={int(share * total)}"
        pruned, report = onnxprune.run(
            model,
            [f"vote:{option},sparsity=0.9,round_to=1", "fold"],
            data=data,
            eval_data=held,
            device="cpu",
        )
        budget = section(report)["budget"]
        assert budget["target"]["mac_ratio"] == pytest.approx(share, abs=1e-3)
        assert budget["mac_ratio"] <= share + 1e-9
        assert summarize(pruned).macs <= share * total + 1
        phases = budget["phases"]
        assert set(phases) == {"uniform", "threshold", "greedy", "refined"}
        assert all(phases["refined"]["cosine"] >= p["cosine"] - 1e-9 for p in phases.values())
        got = session(pruned).run(None, {"x": x_eval})[0]
        cos[share] = float(cosine_similarity(ref, got).mean())
        assert cos[share] == pytest.approx(budget["measured"]["cosine"], abs=1e-4)
        assert budget["target"]["damage"] == pytest.approx(1 - budget["measured"]["cosine"])
    assert cos[0.8] > cos[0.5]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("max_mac_ratio=1.5", "max_mac_ratio"),
        ("max_mac_ratio=-0.1", "max_mac_ratio"),
        ("max_macs=0", "max_macs"),
        ("max_accuracy_drop=0.01,confidence=1", "confidence"),
        ("max_accuracy_drop=0.01,confidence=-0.5", "confidence"),
        ("max_macs=1000,max_accuracy_drop=0.01", "exclude each other"),
        ("max_mac_ratio=0.5,min_cosine=0.9", "exclude each other"),
        ("min_cosine=0.9,confidence=0.9", "confidence= is a margin on max_accuracy_drop"),
        ("confidence=0.9", "confidence= is a margin on max_accuracy_drop"),  # not a no-op
        ("max_mac_ratio=0.01,sparsity=0.5,round_to=1", "cannot be reached"),
        ("max_mac_ratio=0.5", "need --data"),
    ],
)
def test_bad_margin_and_target_options_exit_2(tmp_path, options, message):
    model = tmp_path / "mlp.onnx"
    onnx.save(mlp(), model)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32))
    args = [] if message == "need --data" else ["--data", data]
    result = cli(model, "-p", f"vote:{options}", "-o", tmp_path / "o.onnx", *args)
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_the_new_options_are_listed_with_their_ranges():
    result = cli("--list-passes")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    for name in ("confidence", "max_macs", "max_mac_ratio"):
        assert name in text, name
    assert "upper bound of its accuracy drop" in text and "least damage" in text


def test_the_report_schema_documents_the_new_keys():
    doc = (DIGITS.parents[1] / "docs" / "report-schema.md").read_text()
    for key in ("margin", "drop_upper", "lost", "gained", "target", "damage", "greedy",
                "max_macs", "max_mac_ratio", "macs_kept", "log_likelihood_kept"):  # fmt: skip
        assert f"`{key}`" in doc, key
