"""Budget mode (vote:max_accuracy_drop / vote:min_cosine) and the sensitivity analysis
(vote:sensitivity=on): the budget holds on held-back rows, calibration and judging use
different rows, the table has a row per group and degrades as more is pruned."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import build_model
from conftest import invoke as cli
from onnx import TensorProto, helper

import onnxprune
from onnxprune.cost import summarize
from onnxprune.report import budget_tables
from onnxprune.runtime import session
from onnxprune.validation.compare import cosine_similarity

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits"
CNN = DIGITS / "torch_cnn.onnx"
TEST = DIGITS / "torch_cnn.test.npz"


def section(report: dict, name: str = "vote") -> dict:
    return next(s for s in report["passes"] if s["pass"] == name)


def mlp(sizes: tuple[int, ...] = (16, 64, 64, 8), seed: int = 0) -> onnx.ModelProto:
    """A random Gemm+Relu MLP, input x [N, sizes[0]], output y."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], {}
    x = "x"
    for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
        inits[f"w{i}"] = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        inits[f"b{i}"] = (0.1 * rng.standard_normal(b)).astype(np.float32)
        y = "y" if i == len(sizes) - 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [y], name=f"fc{i}"))
        if y != "y":
            nodes.append(helper.make_node("Relu", [y], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", sizes[0]])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", sizes[-1]])
    return build_model(nodes, [inp], [out], inits)


def accuracy(model: onnx.ModelProto, x: np.ndarray, labels: np.ndarray) -> float:
    sess = session(model)
    return float((sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1) == labels).mean())


def test_accuracy_budget_holds_on_the_rows_that_judged_and_prunes(tmp_path):
    """digits CNN, --data split in halves: rows 0..178 calibrate, 179..358 judge; the folded
    model's accuracy drop on the judged rows, measured here, is within the budget."""
    limit = 0.02
    base, _ = onnxprune.run(onnxprune.load(CNN), ["cleanup"], device="cpu")
    pruned, report = onnxprune.run(
        base,
        [f"vote:max_accuracy_drop={limit},sparsity=0.9,round_to=1", "fold"],
        data=TEST,
        device="cpu",
    )
    budget = section(report)["budget"]
    assert budget["calibration"]["rows"] == [0, 179] and budget["evaluation"]["rows"] == [179, 359]
    with np.load(TEST) as d:
        x, labels = d["input"][179:], d["labels"][179:]
    drop = accuracy(base, x, labels) - accuracy(pruned, x, labels)
    assert drop <= limit + 1e-9
    assert budget["measured"]["accuracy_drop"] == pytest.approx(drop, abs=1e-3)
    ratio = summarize(pruned).macs / summarize(base).macs
    assert ratio < 0.9  # it found something to remove
    assert budget["mac_ratio"] == pytest.approx(ratio, abs=0.02)  # the estimate is the real one
    ratios = {g["ratio"] for g in budget["groups"]}
    assert len(ratios) > 1  # not one uniform share
    assert all(0 <= g["ratio"] <= 0.9 for g in budget["groups"])  # sparsity is the upper bound


def test_cosine_budget_holds_on_eval_data_and_uses_most_of_it(tmp_path):
    """An MLP with --data and --eval-data: the pruned model's lowest cosine on the eval data,
    measured here, is >= min_cosine; a looser budget prunes more."""
    model = mlp()
    rng = np.random.default_rng(3)
    data, held = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(data, x=rng.standard_normal((256, 16)).astype(np.float32))
    x_eval = rng.standard_normal((200, 16)).astype(np.float32)
    np.savez(held, x=x_eval)
    ref = session(model).run(None, {"x": x_eval})[0]
    macs = {}
    for limit in (0.99, 0.9):
        pruned, report = onnxprune.run(
            model,
            [f"vote:min_cosine={limit},sparsity=0.9,round_to=1", "fold"],
            data=data,
            eval_data=held,
            device="cpu",
        )
        budget = section(report)["budget"]
        assert budget["evaluation"]["source"].endswith("eval.npz")
        assert "rows" not in budget["evaluation"]
        got = session(pruned).run(None, {"x": x_eval})[0]
        cosine = float(cosine_similarity(ref, got).mean())
        assert cosine >= limit
        assert cosine == pytest.approx(budget["measured"]["cosine"], abs=1e-4)
        macs[limit] = summarize(pruned).macs
    assert macs[0.9] < macs[0.99] < summarize(model).macs


def test_sensitivity_table_has_a_row_per_group_and_degrades(tmp_path):
    report_path = tmp_path / "r.json"
    result = cli(CNN, "-p", "vote:sensitivity=on,round_to=1", "-p", "fold", "--data", TEST,
                 "-o", tmp_path / "o.onnx", "--report", report_path, "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "sensitivity on 359 samples" in result.stdout
    vote = section(json.loads(report_path.read_text()))
    sens = vote["sensitivity"]
    assert sens["ratios"] == [0.25, 0.5, 0.75] and sens["labels"] is True
    assert [r["group"] for r in sens["groups"]] == [g["group"] for g in vote["groups"]]
    for row in sens["groups"]:
        assert [p["asked"] for p in row["points"]] == sens["ratios"]
        shares = [p["ratio"] for p in row["points"]]
        assert shares == sorted(shares) and shares[-1] > 0
        cos = [p["cosine"] for p in row["points"]]
        assert cos[-1] < 1.0 and cos[-1] <= cos[0] + 1e-3  # more pruned, more change
        assert row["points"][-1]["accuracy_drop"] >= row["points"][0]["accuracy_drop"] - 0.02
    assert "budget" not in vote  # the analysis alone decides nothing
    assert budget_tables(vote)[0].row_count == len(sens["groups"])


@pytest.mark.parametrize(
    ("options", "data", "message"),
    [
        ("max_accuracy_drop=0.01", None, "need --data"),
        ("min_cosine=0.9", None, "need --data"),
        ("max_accuracy_drop=0.01", "nolabels", "needs labels in the evaluation data"),
    ],
)
def test_budget_without_what_it_needs_is_refused(tmp_path, options, data, message):
    args = []
    if data:
        with np.load(TEST) as d:
            np.savez(tmp_path / "x.npz", input=d["input"])
        args = ["--data", tmp_path / "x.npz"]
    result = cli(CNN, "-p", f"vote:{options}", "-o", tmp_path / "o.onnx", "--device", "cpu", *args)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_sensitivity_plot_from_a_run(tmp_path):
    """--plot without --sweep: the sensitivity plot, one line per group, the budget's ratios
    starred; refused (nothing written) when no pass measured sensitivity."""
    pytest.importorskip("matplotlib")
    from onnxprune.plot import sensitivity_figure

    png, report_path = tmp_path / "s.png", tmp_path / "r.json"
    result = cli(CNN, "-p", "vote:max_accuracy_drop=0.02,round_to=1", "-p", "fold", "--data",
                 TEST, "-o", tmp_path / "o.onnx", "--report", report_path, "--plot", png,
                 "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(report_path.read_text())
    fig = sensitivity_figure(report)
    cos_axis, drop_axis = fig.axes[:2]
    groups = len(section(report)["sensitivity"]["groups"])
    assert len([ln for ln in cos_axis.get_lines() if ln.get_label().startswith("group")]) == groups
    assert any(ln.get_label() == "budget" for ln in drop_axis.get_lines())
    bare = cli(CNN, "-p", "vote", "-p", "fold", "-o", tmp_path / "b.onnx", "--plot",
               tmp_path / "b.png", "--device", "cpu")  # fmt: skip
    assert bare.exit_code == 2 and "--plot needs --sweep" in bare.stderr
    assert not (tmp_path / "b.onnx").exists() and not (tmp_path / "b.png").exists()


def test_judge_refit_budget_holds_after_the_chains_refit(tmp_path):
    """judge=refit with -p refit on the same --data: the refitted model holds min_cosine on
    --eval-data and prunes more than judging zeroed candidates does."""
    model = mlp((16, 64, 64, 8), seed=1)
    rng = np.random.default_rng(4)
    data, held = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(data, x=rng.standard_normal((512, 16)).astype(np.float32))
    x_eval = rng.standard_normal((200, 16)).astype(np.float32)
    np.savez(held, x=x_eval)
    ref = session(model).run(None, {"x": x_eval})[0]
    macs = {}
    for judge in ("zeros", "refit"):
        pruned, report = onnxprune.run(
            model,
            [f"vote:min_cosine=0.98,sparsity=0.9,round_to=1,judge={judge}", "refit", "fold"],
            data=data,
            eval_data=held,
            device="cpu",
        )
        assert section(report)["budget"]["judge"] == judge
        got = session(pruned).run(None, {"x": x_eval})[0]
        if judge == "refit":
            assert float(cosine_similarity(ref, got).mean()) >= 0.98
        macs[judge] = summarize(pruned).macs
    assert macs["refit"] < macs["zeros"]


def test_budget_on_groups_whose_size_is_no_multiple_of_the_step():
    """A group whose size is no multiple of the runtime's step keeps the count 0 (whole) on its
    ladder: the LSTM fixture's budget search runs (it crashed on an empty ladder) and holds."""
    real = ROOT / "models" / "real"
    _, report = onnxprune.run(
        real / "lstm_legacy.onnx",
        ["vote:min_cosine=0.99", "fold"],
        data=real / "lstm_legacy.calib.npz",
        device="cpu",
    )
    budget = section(report)["budget"]
    assert budget["measured"]["cosine"] >= 0.99
    assert all(0 <= g["ratio"] < 1 for g in budget["groups"])
