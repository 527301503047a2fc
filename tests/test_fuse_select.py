"""Ensemble pruning (select=forward|backward) changes the fused output exactly as its report says,
and vote, fold and scope=global work across the members of a fused graph."""

from __future__ import annotations

import collections
import json
import re
import shlex

import numpy as np
import onnx
import pytest
from conftest import MODELS, ROOT, ort_run
from conftest import invoke as cli

import onnxprune

DIGITS = MODELS / "digits"
NAMES = ["torch_cnn", "keras_cnn", "torch_encoder"]
CALIB = DIGITS / "torch_cnn.calib.npz"
TEST = DIGITS / "torch_cnn.test.npz"


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def images() -> tuple[np.ndarray, np.ndarray]:
    with np.load(TEST) as npz:
        return npz["input"], npz["labels"]


def member_outputs(noise_path: str) -> dict[str, np.ndarray]:
    """Each member alone on the test images, in its own layout."""
    x, _ = images()
    feeds = {"torch_cnn": x, "keras_cnn": x.transpose(0, 2, 3, 1), "torch_encoder": x[:, 0]}
    out = {
        n: next(iter(ort_run(DIGITS / f"{n}.onnx", {"input": f}).values()))
        for n, f in feeds.items()
    }
    out["noise"] = next(iter(ort_run(noise_path, {"input": x}).values()))
    return {n: o.astype(np.float64) for n, o in out.items()}


def fuse(spec: str, noise_path: str, eval_data=TEST) -> tuple[onnx.ModelProto, dict]:
    members = "+".join([str(DIGITS / f"{n}.onnx") for n in NAMES[1:]] + [noise_path])
    model, report = onnxprune.run(
        DIGITS / "torch_cnn.onnx",
        [f"fuse:members={members}{spec}"],
        data=CALIB,
        eval_data=eval_data,
        device="cpu",
    )
    return model, report["passes"][0]


def kept_members(model: onnx.ModelProto) -> set[str]:
    return {t.name.split("/", 1)[0] for t in model.graph.initializer} - {"fuse"}


@pytest.mark.parametrize("mode", ["backward", "forward"])
def test_the_pruned_ensemble_is_what_the_report_says(mode, noisy_member):
    model, section = fuse(f",select={mode}", noisy_member)
    weights = {n: m["weight"] for n, m in section["selection"]["members"].items()}
    kept = {n for n, w in weights.items() if w > 0}
    assert kept_members(model) == kept and section["kept"] == "+".join(
        n for n in [*NAMES, "noise"] if n in kept
    )
    assert "noise" not in kept and section["models"] == len(kept)
    outs = member_outputs(noisy_member)
    want = sum(weights[n] * softmax(outs[n]) for n in kept)
    x, y = images()
    (got,) = ort_run(model, {"input": x}).values()
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert section["score_kept"] == pytest.approx(np.mean(got.argmax(axis=1) == y), abs=1e-6)
    full = np.mean([softmax(o) for o in outs.values()], axis=0)
    assert section["score_full"] == pytest.approx(np.mean(full.argmax(axis=1) == y), abs=1e-6)
    assert section["score_kept"] >= section["score_full"]  # tolerance 0
    if mode == "forward":  # with replacement: weights are counts over one bag
        sizes = range(1, len(weights) + len(section["selection"]["steps"]) + 1)
        assert any(all(abs(w * b - round(w * b)) < 1e-6 for w in weights.values()) for b in sizes)


def test_a_vote_ensemble_is_pruned_too(noisy_member):
    model, section = fuse(",combine=vote,select=forward,label=true", noisy_member)
    weights = {n: m["weight"] for n, m in section["selection"]["members"].items()}
    outs = member_outputs(noisy_member)
    want = 0
    for n, w in weights.items():
        want = want + w * np.eye(10)[outs[n].argmax(axis=1)]
    x, y = images()
    got = ort_run(model, {"input": x})
    np.testing.assert_allclose(got["output"], want, atol=1e-6)
    assert section["score_kept"] == pytest.approx(np.mean(got["output_label"] == y), abs=1e-6)
    assert section["score_kept"] >= section["score_full"]


def test_marginal_contributions_are_leave_one_out_differences(noisy_member):
    _, section = fuse(",select=backward", noisy_member)
    _, y = images()
    probs = {n: softmax(o) for n, o in member_outputs(noisy_member).items()}

    def acc(names):
        return np.mean(np.mean([probs[n] for n in names], axis=0).argmax(axis=1) == y)

    everyone = list(probs)
    for name, row in section["selection"]["members"].items():
        loo = acc(everyone) - acc([n for n in everyone if n != name])
        assert row["marginal"] == pytest.approx(loo, abs=1e-6), name
        assert row["alone"] == pytest.approx(acc([name]), abs=1e-6), name
    assert (
        f"noise {section['selection']['members']['noise']['marginal']:+.4f}"
        in (section["contributions"])
    )


def test_without_labels_members_are_kept_by_agreement(noisy_member, tmp_path):
    x, _ = images()
    np.savez(tmp_path / "unlabelled.npz", input=x)
    model, section = fuse(",select=backward", noisy_member, eval_data=tmp_path / "unlabelled.npz")
    assert section["metric"] == "agreement with the full ensemble"
    assert section["score_full"] == 1.0 and section["score_kept"] == 1.0
    weights = {n: m["weight"] for n, m in section["selection"]["members"].items()}
    outs = member_outputs(noisy_member)
    (got,) = ort_run(model, {"input": x}).values()
    full = np.mean([softmax(o) for o in outs.values()], axis=0)
    np.testing.assert_array_equal(got.argmax(axis=1), full.argmax(axis=1))
    want = sum(w * softmax(outs[n]) for n, w in weights.items() if w > 0)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_a_tolerance_keeps_fewer_members(noisy_member):
    _, strict = fuse(",select=backward", noisy_member)
    model, loose = fuse(",select=backward,tolerance=0.05", noisy_member)
    assert loose["models"] <= strict["models"] and loose["models"] == len(kept_members(model))
    assert loose["score_kept"] >= loose["score_full"] - 0.05


def test_vote_and_fold_prune_across_members_and_fold_exactly():
    members = "+".join(str(DIGITS / f"{n}.onnx") for n in NAMES[1:])
    chain = [f"fuse:members={members}", "vote:sparsity=0.3,round_to=1"]
    voted, _ = onnxprune.run(DIGITS / "torch_cnn.onnx", chain, data=CALIB, device="cpu")
    folded, report = onnxprune.run(
        DIGITS / "torch_cnn.onnx", [*chain, "fold"], data=CALIB, device="cpu"
    )
    vote, fold = report["passes"][1], report["passes"][2]
    assert fold["channels_removed"] == vote["channels_pruned"] > 0
    for g in vote["groups"]:  # every channel group lies inside one member
        assert len({p.split("/", 1)[0] for p in g["producers"]}) == 1, g["producers"]
    assert {g["producers"][0].split("/", 1)[0] for g in vote["groups"] if g["pruned"]} == set(NAMES)
    x, _ = images()
    (a,) = ort_run(voted, {"input": x}).values()
    (b,) = ort_run(folded, {"input": x}).values()
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert fold["parameters_after"] < fold["parameters_before"]


def test_a_global_vote_spreads_one_budget_over_the_members():
    members = "+".join(str(DIGITS / f"{n}.onnx") for n in NAMES[1:])
    per_scope = {}
    for scope in ("local", "global"):
        chain = [f"fuse:members={members}", f"vote:sparsity=0.3,round_to=1,scope={scope}", "fold"]
        _, report = onnxprune.run(DIGITS / "torch_cnn.onnx", chain, data=CALIB, device="cpu")
        vote = report["passes"][1]
        pruned: collections.Counter[str] = collections.Counter()
        for g in vote["groups"]:
            pruned[g["producers"][0].split("/", 1)[0]] += g["pruned"]
            if scope == "global":  # at least floor (10%) of every group stays
                assert g["channels"] - g["pruned"] >= np.ceil(0.1 * g["channels"])
        assert (
            sum(pruned.values())
            == vote["channels_pruned"]
            == report["passes"][2]["channels_removed"]
        )
        per_scope[scope] = (pruned, vote)
    pruned, vote = per_scope["global"]
    free = sum(g["channels"] for g in vote["groups"])
    assert vote["channels_pruned"] == int(0.3 * free)  # one budget for the whole ensemble
    assert set(pruned) == set(NAMES) and pruned != per_scope["local"][0]


def test_the_readme_fusion_example_runs(tmp_path):
    """README's Fusion command, as written there (output into tmp_path): it passes validate's
    default gate on the held-out digits."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Fusion\n.*?```bash\n(.*?)```", text, re.S)
    assert block, "README.md lost its Fusion example"
    lines = block.group(1).replace("\\\n", " ").splitlines()
    folder = lines[0].partition("=")[2]
    args = shlex.split(lines[1].replace("$D", str(ROOT / folder)))
    assert args[0] == "onnxprune"
    out = tmp_path / "ens.onnx"
    args = [str(out) if a == "/tmp/digits.ens.onnx" else a for a in args[1:]]
    result = cli(*args, "--report", tmp_path / "r.json", "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["status"] == "passed" and out.exists()
    fuse, vote, fold = report["passes"][:3]
    assert fuse["select"] == "backward" and fold["channels_removed"] == vote["channels_pruned"]


def test_passes_after_fuse_compare_with_the_ensemble():
    """fuse makes the ensemble the reference: refit fits the pruned ensemble to it (on a fused
    graph whose tensors the first model lacks) and validate's original is the ensemble."""
    members = f"{DIGITS / 'torch_cnn_seed1.onnx'}+{DIGITS / 'keras_cnn.onnx'}"
    fuse = f"fuse:members={members},combine=mean"
    ensemble, _ = onnxprune.run(DIGITS / "torch_cnn.onnx", [fuse], device="cpu")
    chain = [fuse, "vote:sparsity=0.25", "refit", "fold", "validate:runs=0"]
    _, report = onnxprune.run(
        DIGITS / "torch_cnn.onnx", chain, data=CALIB, eval_data=TEST, device="cpu"
    )
    with np.load(TEST) as npz:
        (probs,) = ort_run(ensemble, {"input": npz["input"]}).values()
        want = float((probs.argmax(1) == npz["labels"]).mean())
    refit, validate = report["passes"][2], report["passes"][4]
    assert refit["refitted"] + refit["rejected"] > 0
    assert validate["classification"]["original"]["accuracy"] == pytest.approx(want, abs=1e-9)
