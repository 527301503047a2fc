"""The ``vote`` pass and the counting rules it shares with every structured pruning pass.

Voting logic is checked with stand-in criteria whose scores are fixed by hand (registered for
the duration of a test only), so the expected choice follows from the rules alone; the rest
runs real criteria on the fixture models and checks that ``vote`` then ``fold`` is exact.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import build_model as _model
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.analysis.probe import probe
from onnxprune.analysis.walk import analyse
from onnxprune.cli import main
from onnxprune.errors import OnnxPruneError, PassOptionError
from onnxprune.passes.registry import parse_pass_spec
from onnxprune.pruning.criteria import CRITERIA, Criterion
from onnxprune.pruning.workspace import allowed_count, round_count
from onnxprune.runner import run_model
from tests.gemm_mlp import gemm_mlp

MODELS = Path(__file__).resolve().parents[1] / "models"
DIGITS = MODELS / "digits"


# ---------------------------------------------------------------------------------------------
# round_count / allowed_count


@pytest.mark.parametrize(
    ("total", "free", "sparsity", "round_to", "expected"),
    [
        (16, 16, 0.5, 8, 8),  # keep 8
        (16, 16, 0.3, 8, 0),  # keep 11.2 -> 16: nothing goes
        (16, 16, 0.6, 8, 8),  # keep 6.4 -> 8
        (10, 10, 0.5, 8, 2),  # keep 5 -> 8 (a multiple of 8, below the total)
        (4, 4, 0.5, 8, 0),  # total < round_to: keeping 8 is impossible, so nothing goes
        (7, 7, 0.9, 8, 0),
        (5, 5, 0.9, 1, 4),  # never all channels
        (3, 3, 0.99, 1, 2),
        (2, 2, 0.5, 1, 1),
        (1, 1, 0.9, 1, 0),
        (20, 20, 0.9, 8, 12),  # keep 2 -> never below round_to: 8
        (32, 5, 0.5, 8, 0),  # 5 free: 27..31 kept are no multiples of 8
        (32, 10, 0.5, 8, 8),  # capped by the free classes, then rounded: keep 24
        (64, 64, 0.3, 3, 19),  # keep 44.8 -> 45
        (10, 10, 0.7, 1, 7),  # 10 * 0.3 is 3.0000000000000004 in floats: still keep 3
        (16, 0, 0.5, 1, 0),
        (16, 16, 0.0, 1, 0),
        (16, 16, 0.5, 0, 8),  # round_to 0 counts as 1
    ],
)
def test_round_count_hand_cases(total, free, sparsity, round_to, expected) -> None:
    assert round_count(total, free, sparsity, round_to) == expected


@pytest.mark.parametrize(
    ("total", "k", "round_to", "expected"),
    [
        (10, 5, 8, 2),
        (16, 7, 8, 0),
        (16, 9, 8, 8),
        (16, 16, 8, 16),
        (7, 3, 1, 3),
        (5, 0, 2, 0),
        (12, 5, 4, 4),
        (12, 3, 4, 0),
    ],
)
def test_allowed_count_hand_cases(total, k, round_to, expected) -> None:
    assert allowed_count(total, k, round_to) == expected


@settings(max_examples=300, deadline=None)
@given(
    total=st.integers(1, 200),
    data=st.data(),
    sparsity=st.floats(0.0, 0.999, allow_nan=False),
    round_to=st.integers(1, 16),
)
def test_round_count_properties(total: int, data, sparsity: float, round_to: int) -> None:
    free = data.draw(st.integers(0, total))
    k = round_count(total, free, sparsity, round_to)
    assert 0 <= k <= free
    assert k < total, "never every channel"
    if k:
        assert (total - k) % round_to == 0, "the kept count is a multiple of round_to"
        assert total - k >= round_to
    # the largest such count within the target (kept >= ceil(total * (1 - sparsity)))
    target_kept = max(math.ceil(total * (1 - sparsity) - 1e-9), 1)
    best = max(
        (
            c
            for c in range(0, min(free, total - 1) + 1)
            if c == 0 or ((total - c) % round_to == 0 and total - c >= max(target_kept, round_to))
        ),
        default=0,
    )
    assert k == best


# ---------------------------------------------------------------------------------------------
# voting rules with hand-made criteria


def mlp() -> onnx.ModelProto:
    """x[N,6] -> fc1 (8) -> Relu -> fc2 (8) -> Relu -> fc3 (3): two free groups of 8."""
    rng = np.random.default_rng(3)
    inits = {
        "w1": rng.normal(size=(8, 6)),
        "b1": rng.normal(size=8) + 2,
        "w2": rng.normal(size=(8, 8)),
        "b2": rng.normal(size=8) + 2,
        "w3": rng.normal(size=(3, 8)),
        "b3": rng.normal(size=3),
    }
    inits = {k: v.astype(np.float32) for k, v in inits.items()}
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1", transB=1),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("Gemm", ["a1", "w2", "b2"], ["h2"], name="fc2", transB=1),
        helper.make_node("Relu", ["h2"], ["a2"]),
        helper.make_node("Gemm", ["a2", "w3", "b3"], ["y"], name="fc3", transB=1),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        inits,
    )


# ranks (higher = keep) of fc1's 8 channels under three criteria that disagree:
#   A votes {0,1,2,3}, B votes {0,1,4,5}, C votes {0,2,6,7} (the lowest 4 each)
#   votes:     ch0 3, ch1 2, ch2 2, every other channel 1
#   rank sums: ch0 0, ch1 13, ch2 7, ch3 14, ch4 9, ch5 12, ch6 13, ch7 16
SCORES = {
    "_t_a": [0, 3, 1, 2, 4, 5, 6, 7],
    "_t_b": [0, 3, 5, 6, 1, 2, 4, 7],
    "_t_c": [0, 7, 1, 6, 4, 5, 3, 2],
}


@pytest.fixture
def hand_criteria(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[int, np.ndarray]]:
    """Criteria ``_t_*`` scoring groups by their first class id (abstaining elsewhere)."""
    table: dict[str, dict[int, np.ndarray]] = {
        n: {0: np.array(s, float)} for n, s in SCORES.items()
    }
    table["_t_g"] = {}

    def make(name: str):
        def fn(view):
            s = table[name].get(int(view.classes[0]))
            return None if s is None else np.asarray(s, float)[: len(view.classes)]

        return fn

    for name in table:
        monkeypatch.setitem(CRITERIA, name, Criterion(name, make(name), 1.0, False, "test"))
    return table


def pruned_rows(model: onnx.ModelProto, weight: str) -> set[int]:
    """Neurons of a transB=1 Gemm weight whose row is entirely zero."""
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == weight))
    return set(np.flatnonzero(~w.reshape(w.shape[0], -1).any(axis=1)).tolist())


def vote(model: onnx.ModelProto, spec: str, **kw):
    new, report = onnxprune.run(model, [spec], **kw)
    return new, report["passes"][0]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ("quorum=2,fill=false", {0, 1, 2}),  # only 3 channels have 2 votes: fewer than 4
        ("quorum=3,fill=false", {0}),
        ("quorum=1,fill=false", {0, 1, 2, 4}),  # most votes first, then the lowest mean rank
        ("quorum=2,fill=true", {0, 1, 2, 4}),  # topped up with ch4 (1 vote, best mean rank)
        ("quorum=3,fill=true", {0, 1, 2, 4}),
        ("mode=average", {0, 2, 4, 5}),  # lowest rank sums; ch1 (2 votes) loses to ch5
    ],
)
def test_quorum_fill_and_average(hand_criteria, options: str, expected: set[int]) -> None:
    model = mlp()
    spec = f"vote:criteria=_t_a+_t_b+_t_c,sparsity=0.5,round_to=1,{options}"
    new, section = vote(model, spec)
    assert pruned_rows(new, "w1") == expected
    assert pruned_rows(new, "w2") == set(), "the other group abstains everywhere"
    g = next(g for g in section["groups"] if g["producers"] == ["fc1"])
    assert g["target"] == 4 and g["pruned"] == len(expected)
    assert section["channels_pruned"] == len(expected)
    b1 = numpy_helper.to_array(next(t for t in new.graph.initializer if t.name == "b1"))
    assert set(np.flatnonzero(b1 == 0).tolist()) == expected, "biases of pruned neurons zeroed"
    w2 = numpy_helper.to_array(next(t for t in new.graph.initializer if t.name == "w2"))
    assert w2.any(axis=0).all(), "consumer rows are left for fold"
    folded, report = onnxprune.run(new, ["fold"])
    assert report["passes"][0]["channels_removed"] == len(expected)
    x = np.random.default_rng(0).normal(size=(16, 6)).astype(np.float32)
    np.testing.assert_allclose(
        run_model(folded, {"x": x})["y"], run_model(new, {"x": x})["y"], rtol=1e-5, atol=1e-5
    )


def test_round_to_limits_the_quorum_choice(hand_criteria) -> None:
    """fill=false and round_to=2: 3 channels reach the quorum, 2 of them may go."""
    _, section = vote(
        mlp(), "vote:criteria=_t_a+_t_b+_t_c,sparsity=0.5,round_to=2,quorum=2,fill=false"
    )
    assert section["channels_pruned"] == 2


def test_global_scope_prunes_more_in_weak_groups_and_keeps_the_floor(hand_criteria) -> None:
    """fc1: seven equally weak neurons and one strong one; fc2: evenly spread scores. After
    per-group normalisation fc2's three weakest come first, then fc1's weak ones."""
    hand_criteria["_t_g"][0] = np.array([0, 0, 0, 0, 0, 0, 0, 10], float)
    hand_criteria["_t_g"][8] = np.arange(1, 9, dtype=float)
    model = mlp()
    spec = "vote:criteria=_t_g,scope=global,round_to=1"
    new, section = vote(model, spec + ",sparsity=0.5")  # budget 8 of 16
    assert pruned_rows(new, "w1") == {0, 1, 2, 3, 4}
    assert pruned_rows(new, "w2") == {0, 1, 2}
    assert {g["producers"][0]: g["pruned"] for g in section["groups"]} == {"fc1": 5, "fc2": 3}
    new, _ = vote(model, spec + ",sparsity=0.5,floor=0.5")  # at most 4 of 8 per group
    assert pruned_rows(new, "w1") == {0, 1, 2, 3}
    assert pruned_rows(new, "w2") == {0, 1, 2, 3}
    new, _ = vote(model, spec + ",sparsity=0.9,floor=0.1")  # budget 14: floor keeps 1 each
    assert pruned_rows(new, "w1") == set(range(7))
    assert pruned_rows(new, "w2") == set(range(7))
    new, _ = vote(model, spec + ",sparsity=0.9,floor=0.3")  # keep ceil(2.4) = 3 per group
    assert len(pruned_rows(new, "w1")) == 5 and len(pruned_rows(new, "w2")) == 5
    new, section = vote(model, spec + ",sparsity=0.5,round_to=2")  # fc1 5 -> 4 (round_to)
    assert len(pruned_rows(new, "w1")) == 4 and len(pruned_rows(new, "w2")) == 2


def test_protect_leaves_a_group_whole() -> None:
    model = mlp()
    new, section = vote(model, "vote:criteria=l1,sparsity=0.5,round_to=1,protect=fc1")
    assert pruned_rows(new, "w1") == set()
    assert len(pruned_rows(new, "w2")) == 4
    assert [g["producers"] for g in section["groups"]] == [["fc2"]]
    new, _ = vote(model, "vote:criteria=l1,sparsity=0.5,round_to=1,protect=^fc")
    assert pruned_rows(new, "w1") == pruned_rows(new, "w2") == set()


def test_local_vote_follows_l1_by_hand() -> None:
    """One criterion: the lowest-l1 neurons of each group go."""
    model = mlp()
    new, _ = vote(model, "vote:criteria=l1,sparsity=0.5,round_to=1")
    for w in ("w1", "w2"):
        arr = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == w))
        assert pruned_rows(new, w) == set(np.argsort(np.abs(arr).mean(1))[:4].tolist())


# ---------------------------------------------------------------------------------------------
# options and errors


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        return CliRunner()


def _one_line_error(result, *expected: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    err = result.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("Error: ")
    for text in expected:
        assert text in err, err


def test_unknown_criterion_is_a_one_line_option_error(tmp_path: Path) -> None:
    model = mlp()
    with pytest.raises(PassOptionError) as err:
        onnxprune.run(model, ["vote:criteria=l1+nope"])
    assert str(err.value).startswith("pass vote: unknown criterion 'nope'")
    assert "\n" not in str(err.value)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    result = _runner().invoke(
        main, [str(path), "-p", "vote:criteria=l1+nope", "-o", str(tmp_path / "out.onnx")]
    )
    _one_line_error(result, "pass vote", "unknown criterion 'nope'")
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize(
    "spec",
    [
        "vote:sparsity=1.0",
        "vote:quorum=0",
        "vote:round_to=-1",
        "vote:mode=median",
        "vote:scope=world",
        "vote:criteria=+",
    ],
)
def test_bad_options_name_the_pass(spec: str) -> None:
    with pytest.raises(PassOptionError, match=r"^pass vote: "):
        onnxprune.run(mlp(), [spec])


# ---------------------------------------------------------------------------------------------
# ensembles


def _producer_rows(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Producer weight name -> [neurons, fan-in] for the Conv and transB=1 Gemm layers."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            assert node.op_type == "Conv" or any(a.name == "transB" and a.i for a in node.attribute)
            w = inits[node.input[1]]
            out[node.input[1]] = w.reshape(w.shape[0], -1).astype(np.float64)
    return out


def _perturbed(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    other = copy.deepcopy(model)
    rng = np.random.default_rng(seed)
    for i, t in enumerate(other.graph.initializer):
        w = numpy_helper.to_array(t)
        if w.dtype == np.float32:
            noisy = (w * (1 + 0.6 * rng.standard_normal(w.shape))).astype(np.float32)
            other.graph.initializer[i].CopyFrom(numpy_helper.from_array(noisy, t.name))
    return other


def test_ensemble_member_votes_with_its_own_weights(tmp_path: Path) -> None:
    """criteria=l1, quorum 2 without fill: a channel goes when both models rank it low."""
    model = onnxprune.load(DIGITS / "torch_cnn.onnx")
    other = _perturbed(model, 5)
    member = tmp_path / "member.onnx"
    onnx.save(other, member)
    new, section = vote(
        model, f"vote:criteria=l1,sparsity=0.5,round_to=1,quorum=2,fill=false,ensemble={member}"
    )
    mine, theirs, after = _producer_rows(model), _producer_rows(other), _producer_rows(new)

    def low(r: np.ndarray, k: int) -> set[int]:
        return set(np.argsort(np.abs(r).mean(1), kind="stable")[:k].tolist())

    total = 0
    last = list(mine)[-1]  # the classifier reaches the output: pinned
    for name, rows in mine.items():
        zero = set(np.flatnonzero(~after[name].any(axis=1)).tolist())
        if name == last:
            assert zero == set()
            continue
        k = len(rows) // 2
        both = low(rows, k) & low(theirs[name], k)
        assert 0 < len(both) < k, "the perturbation should make the two models disagree"
        assert zero == both, name
        total += len(both)
    assert section["channels_pruned"] == total


def test_ensemble_with_data_criteria(tmp_path: Path) -> None:
    model = onnxprune.load(DIGITS / "torch_cnn.onnx")
    member = tmp_path / "member.onnx"
    onnx.save(_perturbed(model, 9), member)
    _, section = vote(
        model,
        f"vote:sparsity=0.5,round_to=8,ensemble={member}",
        data=DIGITS / "torch_cnn.calib.npz",
    )
    names = set().union(*(g.get("voter_errors", {}) for g in section["groups"]))
    assert names == {"l1", "flap", "wanda", f"l1@{member}", f"flap@{member}", f"wanda@{member}"}
    assert section["channels_pruned"] == 8 + 16 + 16 + 32


def test_mismatched_ensemble_member_is_a_clean_error(tmp_path: Path) -> None:
    model_path = DIGITS / "torch_cnn.onnx"
    model = onnxprune.load(model_path)
    other = copy.deepcopy(model)
    w = next(t for t in other.graph.initializer if t.name == "head.0.weight")
    w.CopyFrom(numpy_helper.from_array(np.zeros((48, 32), np.float32), "head.0.weight"))
    bad = tmp_path / "bad.onnx"
    onnx.save(
        other,
        bad,
    )
    with pytest.raises(OnnxPruneError) as err:
        onnxprune.run(model, [f"vote:ensemble={bad}"])
    msg = str(err.value)
    assert msg.startswith("pass vote: ensemble member") and "head.0.weight" in msg
    assert "\n" not in msg
    with pytest.raises(OnnxPruneError, match="ensemble member"):  # another architecture
        onnxprune.run(model, [f"vote:ensemble={DIGITS / 'keras_cnn.onnx'}"])
    with pytest.raises(OnnxPruneError):  # no such file
        onnxprune.run(model, [f"vote:ensemble={tmp_path / 'missing.onnx'}"])
    result = _runner().invoke(
        main, [str(model_path), "-p", f"vote:ensemble={bad}", "-o", str(tmp_path / "out.onnx")]
    )
    _one_line_error(result, "ensemble member")


# ---------------------------------------------------------------------------------------------
# vote then fold on the fixtures


def _sample(rel: str) -> dict[str, np.ndarray]:
    with np.load(MODELS / f"{rel}.sample.npz") as npz:
        return {k[3:]: npz[k] for k in npz.files if k.startswith("in/")}


def _zeroed_classes_params(model: onnx.ModelProto) -> tuple[int, dict[str, int]]:
    """Classes whose producer slices are all zero, and initializer sizes without them."""
    an = analyse(model, probe(model).shapes)
    roots = an.roots()
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    live: set[int] = set()
    weighted: set[int] = set()
    for m in an.members:
        if m.role != "weight":
            continue
        rows = np.moveaxis(arrays[m.init], m.axis, 0).reshape(len(m.ids), -1)
        for cid, row in zip(m.ids.tolist(), rows, strict=True):
            if cid >= 0:
                weighted.add(int(roots[cid]))
                if row.any():
                    live.add(int(roots[cid]))
    gone = weighted - live - set(an.pinned_roots())
    shapes = {n: list(a.shape) for n, a in arrays.items() if a.dtype == np.float32}
    seen = set()
    for m in an.members:
        if (m.init, m.axis) in seen or m.init not in shapes:
            continue
        seen.add((m.init, m.axis))
        shapes[m.init][m.axis] -= sum(i >= 0 and int(roots[i]) in gone for i in m.ids.tolist())
    return len(gone), {n: int(np.prod(s)) for n, s in shapes.items()}


VOTE_FIXTURES = [
    "digits/torch_cnn",
    "digits/keras_cnn",
    "digits/torch_encoder",
    "torch/cnn_legacy_bn",
    "tf/cnn",
    "mxnet/cnn",
    "paddle/cnn",
]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("rel", VOTE_FIXTURES)
def test_vote_then_fold_is_exact(rel: str) -> None:
    model = onnxprune.run(onnxprune.load(MODELS / f"{rel}.onnx"), ["cleanup"])[0]
    calib = MODELS / f"{rel}.calib.npz"
    voted, report = onnxprune.run(
        model, ["vote:sparsity=0.5"], data=calib if calib.exists() else None
    )
    pruned = report["passes"][0]["channels_pruned"]
    assert pruned > 0
    count, sizes = _zeroed_classes_params(voted)
    assert count == pruned, "every pruned class is zero in all its producers"
    folded, report = onnxprune.run(voted, ["fold"])
    section = report["passes"][0]
    assert section["channels_removed"] == pruned
    after = {
        t.name: int(np.prod(t.dims))
        for t in folded.graph.initializer
        if t.data_type == TensorProto.FLOAT
    }
    assert {n: after[n] for n in sizes if n in after} == {
        n: s for n, s in sizes.items() if n in after
    }
    assert sum(after.values()) == section["parameters_after"]
    assert section["parameters_before"] - section["parameters_after"] == (
        sum(
            int(np.prod(t.dims))
            for t in voted.graph.initializer
            if t.data_type == TensorProto.FLOAT
        )
        - sum(sizes.values())
        - sum(v for n, v in after.items() if n not in sizes)
    )
    feeds = _sample(rel)
    want, got = run_model(voted, feeds), run_model(folded, feeds)
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["torch_cnn", "keras_cnn", "torch_encoder"])
def test_vote_error_never_exceeds_its_best_voter(name: str) -> None:
    model = onnxprune.run(onnxprune.load(DIGITS / f"{name}.onnx"), ["cleanup"])[0]
    checked = 0
    for spec in [
        "vote:sparsity=0.5",
        "vote:sparsity=0.3,criteria=l1+l2+consumer+act_l2,quorum=3",
        "vote:sparsity=0.6,mode=average,criteria=random+l1+apoz+wanda",
    ]:
        _, report = onnxprune.run(model, [spec], data=DIGITS / f"{name}.calib.npz")
        for g in report["passes"][0]["groups"]:
            if "voter_errors" in g:
                assert g["error"] <= min(g["voter_errors"].values()) + 1e-6, g
                checked += 1
    assert checked >= 3


def test_round_to_is_respected_after_fold() -> None:
    model = onnxprune.load(DIGITS / "torch_cnn.onnx")
    _, report = onnxprune.run(
        model, ["vote:sparsity=0.3,round_to=3", "fold"], data=DIGITS / "torch_cnn.calib.npz"
    )
    groups = [g for g in report["passes"][1]["groups"] if g["prunable"]]
    assert [(g["channels"], g["channels_after"]) for g in groups] == [
        (16, 12),
        (32, 24),
        (32, 24),
        (64, 45),
    ]
    assert report["passes"][0]["channels_pruned"] == 4 + 8 + 8 + 19


def test_random_criterion_is_reproducible_through_the_pass() -> None:
    model = onnxprune.load(DIGITS / "torch_cnn.onnx")
    a = _producer_rows(onnxprune.run(model, ["vote:criteria=random"], seed=3)[0])
    b = _producer_rows(onnxprune.run(model, ["vote:criteria=random"], seed=3)[0])
    c = _producer_rows(onnxprune.run(model, ["vote:criteria=random"], seed=4)[0])
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert any(not np.array_equal(a[n], c[n]) for n in a)


def test_random_criterion_draws_independently_per_group() -> None:
    """torch_cnn has two free groups of 32 channels; a random baseline that prunes the same
    16 indices in both (odds 1 in C(32, 16) ~ 6e8 if independent) is one draw, not two."""
    model = onnxprune.load(DIGITS / "torch_cnn.onnx")
    for seed in (0, 3):
        rows = _producer_rows(
            onnxprune.run(model, ["vote:criteria=random,round_to=1"], seed=seed)[0]
        )
        a, b = (
            set(np.flatnonzero(~rows[n].any(axis=1)).tolist())
            for n in ("onnx::Conv_39", "features.7.weight")
        )
        assert len(a) == len(b) == 16
        assert a != b, f"seed {seed}: both groups pruned {sorted(a)}"


def test_select_keeps_the_choice_that_moves_the_outputs_least() -> None:
    """With data, the vote's choice and each voter's own are tried on the whole model; the kept
    one is never worse on the calibration data (accuracy first, then output error)."""
    model = onnxprune.load(DIGITS / "keras_cnn.onnx")
    _, report = onnxprune.run(model, ["vote:sparsity=0.5"], data=DIGITS / "keras_cnn.calib.npz")
    section = report["passes"][0]
    scores = section["selection"]
    assert set(scores) == {"vote", "l1", "flap", "wanda"}
    best = scores[section["selected"]]
    for other in scores.values():
        assert (best["accuracy"], -best["error"]) >= (other["accuracy"], -other["error"])
    _, local = onnxprune.run(
        model, ["vote:sparsity=0.5,select=local"], data=DIGITS / "keras_cnn.calib.npz"
    )
    assert "selected" not in local["passes"][0]


def _mlp_16_64_64_8(rng: np.random.Generator) -> onnx.ModelProto:
    """Gemm MLP fc0 (16 -> 64), fc1 (64 -> 64), fc2 (64 -> 8), weights drawn from ``rng``."""
    sizes = [16, 64, 64, 8]
    return gemm_mlp(
        [
            (rng.standard_normal((a, b)), rng.standard_normal(b))
            for a, b in zip(sizes, sizes[1:], strict=False)
        ]
    )


def test_group_sparsity_gives_chosen_groups_their_own_share() -> None:
    """fc0's 64 hidden neurons lose a quarter, fc1's three quarters; the rest keep sparsity."""
    model = _mlp_16_64_64_8(np.random.default_rng(0))
    spec = "vote:criteria=l1,sparsity=0.5,round_to=1,group_sparsity=fc0:0.25+w2:0.75"
    new, report = onnxprune.run(model, [spec, "fold"])
    widths = {t.name: t.dims for t in new.graph.initializer}
    assert widths["w0"][1] == 48 and widths["w1"][1] == 16
    shares = {tuple(g["producers"]): g["sparsity"] for g in report["passes"][0]["groups"]}
    assert shares == {("fc0",): 0.25, ("fc1",): 0.75}


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("fc0", "expected REGEX:SHARE"),
        ("fc0:1.5", "in [0, 1)"),
        ("fc0:x", "not a number"),
        ("(:0.2", "bad regex"),
    ],
)
def test_group_sparsity_refuses_a_bad_item(value: str, needle: str) -> None:
    with pytest.raises(PassOptionError, match=re.escape(needle)):
        parse_pass_spec(f"vote:group_sparsity={value}")


def test_group_sparsity_bounds_a_group_in_budget_mode(tmp_path: Path) -> None:
    """A MAC target's search prunes fc1's group only: fc0's share of 0 keeps it whole."""
    rng = np.random.default_rng(0)
    model = _mlp_16_64_64_8(rng)
    path = tmp_path / "calib.npz"
    np.savez(path, x=rng.standard_normal((512, 16)).astype(np.float32))
    spec = "vote:max_mac_ratio=0.8,sparsity=0.75,round_to=1,group_sparsity=fc0:0"
    new, _ = onnxprune.run(model, [spec, "fold"], data=path)
    widths = {t.name: t.dims for t in new.graph.initializer}
    assert widths["w0"][1] == 64 and widths["w1"][1] < 64
