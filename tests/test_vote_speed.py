"""What makes vote with data fast must not change what it computes (issue 11).

Calibration batches (``calibrate.calibration_batch``), the reservoir's rows, the statistics'
channel-last path, the reference outputs kept from the statistics' run, the selection's shared
session (``selection.Trials``) and its one run per distinct candidate, the compensation's
halves and the tied ranks: each is checked against the plain computation it replaces.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.analysis.groups import keep_one_per_tensor
from onnxprune.context import Context
from onnxprune.data import Dataset
from onnxprune.pruning.calibrate import (
    BATCH_BYTES,
    MAX_BATCH,
    calibration_batch,
    collect,
    collect_sample,
)
from onnxprune.pruning.channel_stats import ChannelStats
from onnxprune.pruning.criteria import rank_normalise
from onnxprune.pruning.decision import GroupDecision
from onnxprune.pruning.reservoir import Reservoir
from onnxprune.pruning.selection import SELECT_SAMPLES, Trials, changed_initializers, select
from onnxprune.pruning.workspace import (
    Workspace,
    compensation_helps,
    half_means,
    helps,
    zero_and_compensate,
)
from onnxprune.runner import DEFAULT_BATCH, outputs
from tests.gemm_mlp import gemm_mlp

RNG = np.random.default_rng(7)


def mlp(sizes: list[int], seed: int = 0, rows_alike: bool = False) -> onnx.ModelProto:
    """Gemm + Relu layers; ``rows_alike``: every neuron's weights are one pattern times its own
    scale, so every weight criterion ranks the neurons the same way."""
    rng = np.random.default_rng(seed)
    layers = []
    for n_in, n_out in zip(sizes, sizes[1:], strict=False):
        w = rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)
        if rows_alike:
            w = np.outer(rng.standard_normal(n_in), rng.uniform(0.1, 2.0, n_out))
        layers.append((w, 0.1 * rng.standard_normal(n_out)))
    return gemm_mlp(layers)


def dataset(n: int, width: int, **kw: object) -> Dataset:
    x = RNG.standard_normal((n, width)).astype(np.float32)
    return Dataset({"x": x}, None, "test", **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# calibration batches


def test_calibration_batch_doubles_within_the_byte_budget() -> None:
    assert calibration_batch(1.0) == MAX_BATCH  # tiny activations: the cap
    assert calibration_batch(BATCH_BYTES) == DEFAULT_BATCH  # huge ones: never below the default
    per = BATCH_BYTES / 300  # 256 samples fit, 512 do not
    assert calibration_batch(per) == 256
    assert calibration_batch(BATCH_BYTES / 256) == 256  # exactly the budget still fits


def test_workspace_batch_follows_the_consumer_inputs(tmp_path: Path) -> None:
    model = mlp([16, 32, 8])
    np.savez(tmp_path / "d.npz", x=RNG.standard_normal((40, 16)).astype(np.float32))
    ctx = Context(original=model, data_path=tmp_path / "d.npz")
    ws = Workspace.open(model, ctx)
    assert ws.probe_samples == 2  # the probe ran two samples of the data
    per_sample = 4 * sum(32 if t.startswith("a") else 16 for t in ws.sink_tensors())
    assert ws.batch_size() == calibration_batch(per_sample)


def test_statistics_do_not_depend_on_the_batch() -> None:
    model = mlp([16, 64, 32, 8])
    data = dataset(3000, 16)
    tensors = {"a0": 1, "a1": 1, "x": 1}
    small = collect(model, tensors, data, batch_size=DEFAULT_BATCH)
    large = collect(model, tensors, data, batch_size=MAX_BATCH)
    for name in tensors:
        a, b = small[name], large[name]
        assert a.count == b.count == 3000
        np.testing.assert_array_equal(a.zeros, b.zeros)
        for prop in ("mean", "var", "rms", "min", "max"):
            np.testing.assert_allclose(getattr(a, prop), getattr(b, prop), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# the reservoir and the statistics' channel-last path


@pytest.mark.parametrize("cuts", [[1000], [64] * 15 + [40], [1, 7, 300, 2, 690]])
def test_reservoir_keeps_the_smallest_keys_however_the_stream_is_cut(cuts: list[int]) -> None:
    rows = RNG.standard_normal((sum(cuts), 5)).astype(np.float32)
    pool = Reservoir(128, np.random.default_rng(3))
    start = 0
    for n in cuts:
        pool.add(rows[start : start + n])
        start += n
    keys = np.random.default_rng(3).random(len(rows))  # one key per row, in stream order
    expected = np.sort(np.argsort(keys)[:128])
    np.testing.assert_array_equal(pool.result(), rows[expected].astype(np.float64))


def test_reservoir_smaller_than_its_size_keeps_every_row_in_order() -> None:
    rows = RNG.standard_normal((50, 3))
    pool = Reservoir(128, np.random.default_rng(0))
    pool.add(rows[:20])
    pool.add(rows[20:])
    np.testing.assert_array_equal(pool.result(), rows)


def test_channel_last_and_channel_first_paths_agree() -> None:
    x = (RNG.standard_normal((300, 6)) + 50.0).astype(np.float32)
    x[RNG.random(x.shape) < 0.2] = 0
    where = RNG.random(300) < 0.7
    last, first = ChannelStats.empty(6), ChannelStats.empty(6)
    for piece, mask in zip(np.array_split(x, 7), np.array_split(where, 7), strict=True):
        last.update(piece, 1, mask)  # channel axis last: read in place
        first.update(piece.T.copy(), 0, mask)  # channel axis first: moved and converted
    assert last.count == first.count == int(where.sum())
    for prop in ("zeros", "min", "max"):
        np.testing.assert_array_equal(getattr(last, prop), getattr(first, prop))
    for prop in ("sum", "sumsq", "mean", "var"):
        np.testing.assert_allclose(getattr(last, prop), getattr(first, prop), rtol=1e-12)
    ref = x[where].astype(np.float64)
    np.testing.assert_allclose(last.var, ref.var(axis=0), rtol=1e-9)
    np.testing.assert_allclose(last.sumsq, (ref * ref).sum(axis=0), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# reference outputs from the statistics' run


def test_statistics_run_keeps_the_outputs_of_the_first_samples() -> None:
    model = mlp([16, 32, 8])
    data = dataset(700, 16)
    got = collect_sample(model, {"a0": 1}, data, batch_size=256, outputs=SELECT_SAMPLES)
    assert got.outputs is not None
    ref = outputs(model, data.head(SELECT_SAMPLES))
    assert list(got.outputs) == list(ref)
    for name, value in ref.items():
        assert got.outputs[name].shape == value.shape == (SELECT_SAMPLES, 8)
        np.testing.assert_allclose(got.outputs[name], value, rtol=1e-5, atol=1e-6)


def test_outputs_are_not_kept_when_samples_are_not_on_axis_zero() -> None:
    model = mlp([16, 32, 8])
    data = dataset(100, 16)
    scalar = copy.deepcopy(model)  # an output without a samples axis
    scalar.graph.node.append(helper.make_node("ReduceSum", ["y1"], ["s"], keepdims=0))
    scalar.graph.output.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, []))
    assert collect_sample(scalar, {"a0": 1}, data, outputs=50).outputs is None
    assert collect_sample(model, {"a0": 1}, data, outputs=0).outputs is None
    kept = collect_sample(model, {"a0": 1}, data, batch_size=64, outputs=50).outputs
    assert kept is not None and len(kept["y1"]) == 50


# ---------------------------------------------------------------------------------------------
# the selection: one shared session, one run per distinct candidate


def _zeroed(model: onnx.ModelProto, name: str, columns: list[int]) -> onnx.ModelProto:
    trial = copy.deepcopy(model)
    for i, t in enumerate(trial.graph.initializer):
        if t.name == name:
            arr = numpy_helper.to_array(t).copy()
            arr[..., columns] = 0
            trial.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, name))
    return trial


def test_trials_share_one_session_and_match_their_own_runs() -> None:
    model = mlp([16, 32, 8])
    data = dataset(100, 16)
    trials = Trials(model, data, ["CPUExecutionProvider"], 64, readers={"w1"})
    for name, cols in (("w0", [1, 2, 3]), ("w1", [5]), ("w0", [7, 30])):
        trial = _zeroed(model, name, cols)
        assert changed_initializers(model, trial) == [name]
        got = trials.outputs(trial)
        own = list(outputs(trial, data).values())
        np.testing.assert_allclose(got[0], own[0], rtol=1e-5, atol=1e-6)
    assert trials.sessions == 1  # w0 (the first trial's change) and w1 (read) are fed
    changed_b1 = _zeroed(model, "b1", [0])  # an initializer the shared session holds fixed
    got = trials.outputs(changed_b1)
    np.testing.assert_allclose(got[0], list(outputs(changed_b1, data).values())[0], rtol=1e-5)
    assert trials.sessions == 2  # it ran in a session of its own


def test_a_trial_that_changes_the_graph_runs_alone() -> None:
    model = mlp([16, 32, 8])
    data = dataset(30, 16)
    trials = Trials(model, data, ["CPUExecutionProvider"], 64, readers=set())
    trials.outputs(_zeroed(model, "w0", [0]))
    grown = copy.deepcopy(model)
    grown.graph.node.append(helper.make_node("Relu", ["y1"], ["r"]))
    grown.graph.output[0].name = "r"
    assert changed_initializers(model, grown) is None
    got = trials.outputs(grown)
    assert (got[0] >= 0).all()  # the new node ran
    assert trials.sessions == 2


def _count_sessions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    made: list[int] = []
    real = ort.InferenceSession.__init__

    def counting(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        made.append(1)
        real(self, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "__init__", counting)
    return made


def test_vote_with_data_makes_three_sessions(tmp_path: Path, monkeypatch) -> None:
    """The probe, the statistics (which also give the reference outputs) and one session
    shared by the zeroed values' probe and every candidate: nine before issue 11's changes
    (a second probe, the reference, one per candidate, one more probe to zero the winner)."""
    model = mlp([16, 64, 64, 8])
    np.savez(tmp_path / "d.npz", x=RNG.standard_normal((600, 16)).astype(np.float32))
    made = _count_sessions(monkeypatch)
    _, report = onnxprune.run(model, "vote:sparsity=0.5", data=tmp_path / "d.npz", device="cpu")
    section = report["passes"][0]
    assert section["selected"] in section["selection"]
    caps = section["selection_caps"]
    assert caps == {"samples": SELECT_SAMPLES, "candidates": 4, "runs": caps["runs"], "sessions": 1}
    assert len(made) == 3


def test_the_winner_is_written_as_zeroing_it_again_would(tmp_path: Path) -> None:
    model = mlp([16, 64, 64, 8])
    np.savez(tmp_path / "d.npz", x=RNG.standard_normal((300, 16)).astype(np.float32))
    ws = Workspace.open(copy.deepcopy(model), Context(original=model, data_path=tmp_path / "d.npz"))
    ws.stats(SELECT_SAMPLES)
    rng = np.random.default_rng(0)
    decisions = []
    for g in ws.groups:
        classes = ws.free_classes(g)
        mine = {
            n: set(rng.choice(classes, len(classes) // 2, replace=False).tolist()) for n in "ab"
        }
        decisions.append(GroupDecision(g, {}, mine["a"], mine))
    vote = set().union(*(d.picked for d in decisions))
    picked = select(ws, vote, decisions, compensate=True)
    assert picked.initializers is not None and picked.after is not None
    again = copy.deepcopy(ws.model)
    expected = zero_and_compensate(
        ws, keep_one_per_tensor(ws.an, picked.chosen), True, again, picked.after
    )
    assert picked.apply(ws) == expected
    for mine, theirs in zip(ws.model.graph.initializer, again.graph.initializer, strict=True):
        assert mine == theirs, mine.name


def test_candidates_with_the_same_channels_run_once(tmp_path: Path) -> None:
    model = mlp([16, 64, 64, 8], rows_alike=True)  # l1 and l2 rank every neuron alike
    np.savez(tmp_path / "d.npz", x=RNG.standard_normal((300, 16)).astype(np.float32))
    _, report = onnxprune.run(
        model, "vote:sparsity=0.5,criteria=l1+l2", data=tmp_path / "d.npz", device="cpu"
    )
    section = report["passes"][0]
    scores = section["selection"]
    assert set(scores) == {"vote", "l1", "l2"} and len({s["error"] for s in scores.values()}) == 1
    assert section["selected"] == "vote"  # a tie: the vote wins, as when each ran
    assert section["selection_caps"]["candidates"] == 3
    assert section["selection_caps"]["runs"] == 1


# ---------------------------------------------------------------------------------------------
# compensation's halves and the tied ranks


def test_half_means_give_compensation_helps_on_every_subset() -> None:
    x = RNG.standard_normal((101, 12)) + np.linspace(0, 3, 12)
    m_a, m_b = half_means(x)
    for _ in range(20):
        pos = np.sort(RNG.choice(12, RNG.integers(1, 12), replace=False))
        w = RNG.standard_normal((len(pos), 5))
        now = RNG.standard_normal(len(pos)) * 0.1
        assert helps(m_a[pos], m_b[pos], now, w) == compensation_helps(x[:, pos], now, w)


def test_rank_normalise_gives_tied_scores_their_mean_rank() -> None:
    for _ in range(50):
        scores = RNG.integers(0, 5, RNG.integers(2, 40)).astype(np.float64)
        n = len(scores)
        below = (scores[None, :] < scores[:, None]).sum(axis=1)
        equal = (scores[None, :] == scores[:, None]).sum(axis=1)
        expected = (below + (equal - 1) / 2) / (n - 1)
        np.testing.assert_array_equal(rank_normalise(scores), expected)


def test_weights_of_a_convolution_are_not_fed() -> None:
    """onnxruntime's fast convolutions need their weights constant: each candidate of a
    convolutional model keeps its own session."""
    w = numpy_helper.from_array(RNG.standard_normal((4, 2, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 5, 5])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = Dataset({"x": RNG.standard_normal((6, 2, 5, 5)).astype(np.float32)}, None, "test")
    trials = Trials(model, data, ["CPUExecutionProvider"], 64, readers={"w"})
    for channel in (0, 2):
        trial = copy.deepcopy(model)
        arr = numpy_helper.to_array(trial.graph.initializer[0]).copy()
        arr[channel] = 0
        trial.graph.initializer[0].CopyFrom(numpy_helper.from_array(arr, "w"))
        got = trials.outputs(trial)
        assert not got[0][:, channel].any()
    assert trials.apart and trials.shared is None and trials.sessions == 2
