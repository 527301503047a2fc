"""Ensemble pruning within a MAC budget (fuse:max_macs): the kept members fit the budget, are
the best log-likelihood the search tried, the fused graph costs what the report says, and bad
values exit 2; vote's MAC target then cuts a fused ensemble to a budget."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import invoke as cli
from test_fuse_select import CALIB, DIGITS, NAMES, TEST, fuse, kept_members

import onnxprune
from onnxprune.cost import summarize
from onnxprune.fusion import select as sel


def test_within_macs_keeps_the_budget_and_beats_every_member_alone():
    """Four synthetic members: a strong expensive one (over the budget), a good cheap pair
    that errs on different rows, and a weak cheap one; the budget admits the cheap ones."""
    rng = np.random.default_rng(0)
    n, c = 400, 5
    labels = rng.integers(0, c, n)

    def member(wrong: np.ndarray, sure: float) -> np.ndarray:
        p = np.full((n, c), (1 - sure) / (c - 1))
        cls = np.where(wrong, (labels + 1) % c, labels)
        p[np.arange(n), cls] = sure
        return p

    rows = np.arange(n)
    parts = [
        member(rows % 50 == 0, 0.9),  # strong, costs 100
        member(rows % 5 == 0, 0.6),  # errs on rows 0, 5, 10, ...
        member(rows % 5 == 1, 0.6),  # errs on other rows: the pair covers both
        member(rows % 2 == 0, 0.5),  # weak
    ]
    costs = [100, 30, 30, 30]
    full = np.full(4, 0.25)
    chosen = sel.within_macs(parts, full, costs, 65, labels)
    kept = list(np.flatnonzero(chosen.weights))
    assert sum(costs[i] for i in kept) <= 65 and 0 not in kept
    assert kept == [1, 2]
    assert chosen.weights.sum() == pytest.approx(1.0)
    for bag in itertools.chain.from_iterable(
        itertools.combinations([1, 2, 3], k) for k in (1, 2)
    ):  # every affordable ensemble: none scores better than the chosen one
        w = np.zeros(4)
        w[list(bag)] = 1
        assert sel.log_likelihood(sel.combine(parts, w), labels) <= chosen.score + 1e-12
    assert sel.within_macs(parts, full, costs, 1000, labels).weights[0] > 0
    with pytest.raises(ValueError, match="below every member"):
        sel.within_macs(parts, full, costs, 10, labels)


def test_fuse_max_macs_keeps_members_within_the_budget(noisy_member):
    """The digits members and a noise member, the budget keras_cnn's MACs: the kept members'
    MACs sum to at most it, the fused graph's MACs are theirs, the report gives every
    member's MACs and marginal contribution."""
    macs = {n: summarize(onnxprune.load(DIGITS / f"{n}.onnx")).macs for n in NAMES}
    budget = macs["keras_cnn"]
    model, section = fuse(f",select=forward,max_macs={budget}", noisy_member)
    members = section["selection"]["members"]
    kept = {n for n, m in members.items() if m["weight"] > 0}
    assert kept == kept_members(model) and kept
    assert "noise" not in kept
    assert section["max_macs"] == budget
    assert section["macs_kept"] == sum(members[n]["macs"] for n in kept) <= budget
    assert summarize(model).macs <= budget
    assert all(members[n]["macs"] == macs[n] for n in NAMES)
    assert set(members) == {*NAMES, "noise"} and all("marginal" in m for m in members.values())
    assert section["log_likelihood_kept"] <= 0 and "contributions" in section


def test_fuse_max_macs_weighted_refits_the_kept_weights(noisy_member):
    _, section = fuse(",combine=weighted,select=forward,max_macs=500000", noisy_member)
    weights = [m["weight"] for m in section["selection"]["members"].values()]
    assert sum(weights) == pytest.approx(1.0) and section["macs_kept"] <= 500000
    kept = [w for w in weights if w > 0]
    assert len(kept) >= 1 and all(w > 0 for w in kept)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (",max_macs=300000", "max_macs= is a budget for select=forward"),
        (",select=backward,max_macs=300000", "max_macs= is a budget for select=forward"),
        (",select=forward,max_macs=0", "max_macs"),
        (",select=forward,max_macs=1000", "below every member"),
    ],
)
def test_bad_fuse_budgets_exit_2(tmp_path, spec, message):
    members = "+".join(str(DIGITS / f"{n}.onnx") for n in NAMES[1:])
    result = cli(DIGITS / "torch_cnn.onnx", "-p", f"fuse:members={members}{spec}", "--data",
                 CALIB, "--eval-data", TEST, "-o", tmp_path / "o.onnx")  # fmt: skip
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_vote_cuts_a_fused_ensemble_to_a_mac_budget():
    """fuse (two members) then vote:max_macs: the folded ensemble costs at most the budget."""
    members = str(DIGITS / "torch_encoder.onnx")
    chain = [f"fuse:members={members}", "vote:max_macs=300000,sparsity=0.9,round_to=1", "fold"]
    model, report = onnxprune.run(
        DIGITS / "torch_cnn.onnx", chain, data=CALIB, eval_data=TEST, device="cpu"
    )
    budget = report["passes"][1]["budget"]
    assert budget["target"]["max_macs"] == 300000
    assert summarize(model).macs <= 300000
    assert budget["measured"]["accuracy_drop"] is not None
