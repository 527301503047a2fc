"""Calibration on Ray (``--workers``): shards of whole batches, merged statistics equal to one
process (1e-9 relative), the same channels voted, errors that come back as onnxprune's.

One two-CPU cluster serves the whole session (``ray start --head --block`` in a process group
of its own, stopped by its id at the end); this process joins it once, so its worker
processes serve every in-process test (:class:`Workers` use a Ray that is already initialised
and leave it). One CLI run starts and stops a local cluster of its own (no address), one
joins the session's by ``--ray-address``. The
tests skip when Ray is not installed (``pip install -e ".[test,ray]"``); what happens then is
tests/test_ray_missing.py's.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import build_model, invoke
from onnx import TensorProto, helper

import onnxprune
from onnxprune.context import Context
from onnxprune.data import Dataset, load_npz
from onnxprune.distributed import Workers, pack, shard_ranges, unpack
from onnxprune.errors import DataError
from onnxprune.pruning.calibrate import ChannelStats, activation_stats, collect
from onnxprune.runtime import session
from onnxprune.validation.pair import run_pair
from onnxprune.validation.sharded import sharded_pair

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models/digits/torch_cnn.onnx"
CALIB = ROOT / "models/digits/torch_cnn.calib.npz"
TEST = ROOT / "models/digits/torch_cnn.test.npz"
HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed (onnxprune[ray])")
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
STAT_FIELDS = ("sum", "sumsq", "m2", "min", "max")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def ray_head() -> Iterator[str]:
    """The address of a two-CPU Ray cluster that lives for the test session."""
    if not HAS_RAY:
        pytest.skip("Ray is not installed (onnxprune[ray])")
    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)  # this process joins it too: same (disabled) token auth
    port = _free_port()
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists():  # Ray installed outside this interpreter's folder
        ray_cli = Path(shutil.which("ray") or "ray")
    head = subprocess.Popen(
        [
            str(ray_cli),
            "start",
            "--head",
            f"--port={port}",
            f"--dashboard-port={_free_port()}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
            "--block",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: stopped by that id below
        env={**os.environ, **RAY_ENV},
    )
    address = f"127.0.0.1:{port}"
    try:
        _wait_for(address, head)
        import ray

        # joined once: its worker processes serve every test (Workers use it, leave it)
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        yield address
    finally:
        if HAS_RAY:
            import ray

            ray.shutdown()
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _wait_for(address: str, head: subprocess.Popen) -> None:
    """Return once a driver can join ``address``."""
    import ray

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert head.poll() is None, "ray start --head exited"
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", int(address.rsplit(":", 1)[1])), 1).close()
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            ok = ray.cluster_resources().get("CPU") == 2
            ray.shutdown()
            if ok:
                return
        time.sleep(0.5)
    raise AssertionError(f"no Ray cluster at {address} after 120 s")


def _digits() -> tuple[onnx.ModelProto, Dataset, dict[str, int]]:
    model = onnx.load(DIGITS)
    tensors = {n.output[0]: 1 for n in model.graph.node if n.op_type in ("Conv", "Relu", "Gemm")}
    return model, load_npz(CALIB, model), tensors


def worst_relative(a: Mapping[str, ChannelStats], b: Mapping[str, ChannelStats]) -> float:
    """The largest relative difference of any accumulator (0 where both are 0); counts and
    zero counts must be equal."""
    assert list(a) == list(b)
    worst = 0.0
    for name in a:
        assert a[name].count == b[name].count, name
        np.testing.assert_array_equal(a[name].zeros, b[name].zeros, err_msg=name)
        for field in STAT_FIELDS:
            x, y = getattr(a[name], field), getattr(b[name], field)
            scale = np.maximum(np.abs(x), np.abs(y))
            diff = np.where(scale > 0, np.abs(x - y) / np.where(scale > 0, scale, 1), 0)
            worst = max(worst, float(diff.max()))
    return worst


def zero_masks(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) == 0 for t in model.graph.initializer}


# ---------------------------------------------------------------------------------------------
# without a cluster


@pytest.mark.parametrize(
    ("batches", "size", "samples", "parts"),
    [(4, 64, 256, 2), (4, 64, 250, 3), (5, 4, 20, 2), (3, 8, 20, 8), (1, 64, 10, 4), (7, 1, 7, 7)],
)
def test_shards_are_contiguous_whole_batches(batches, size, samples, parts) -> None:
    ranges = shard_ranges(batches, size, samples, parts)
    assert len(ranges) == min(parts, batches)
    assert ranges[0][0] == 0 and ranges[-1][1] == min(samples, batches * size)
    for (_, stop), (start, _) in zip(ranges, ranges[1:], strict=False):
        assert stop == start and start % size == 0  # contiguous, cut at batch boundaries
    counts = [-(-(b - a) // size) for a, b in ranges]
    assert sum(counts) == batches and max(counts) - min(counts) <= 1 and min(counts) >= 1


def test_pack_keeps_large_weights_out_of_the_skeleton() -> None:
    big = np.arange(3 * 512 * 256, dtype=np.float32).reshape(512, 3 * 256)  # 1.5 MiB
    model = build_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 768])],
        {"w": big, "b": np.ones(768, np.float32)},
    )
    skeleton, weights = pack(model)
    assert list(weights) == ["w"] and len(skeleton) < 64 << 10
    assert unpack((skeleton, weights)).SerializeToString() == model.SerializeToString()


# ---------------------------------------------------------------------------------------------
# on the session's cluster


@needs_ray
@pytest.mark.parametrize("count", [1, 2])
def test_merged_shards_equal_one_process(ray_head: str, count: int) -> None:
    model, data, tensors = _digits()
    alone = collect(model, tensors, data)
    workers = Workers(count, ray_head)
    try:
        parts = workers.map(collect, model, data, tensors=tensors, providers=None)
        merged = workers.merged(collect, model, data, tensors=tensors)  # merged in shard order
    finally:
        workers.close()
    first = next(iter(tensors))
    counts = [part[first].count for part in parts]
    assert len(parts) == count and min(counts) > 0 and sum(counts) == alone[first].count
    backwards = {name: parts[-1][name] for name in tensors}
    for part in parts[-2::-1]:  # the other order: equal to the same tolerance
        backwards = {name: stats.merge(part[name]) for name, stats in backwards.items()}
    assert worst_relative(alone, backwards) <= 1e-9
    assert worst_relative(alone, merged) <= 1e-9


@needs_ray
def test_vote_on_two_workers_chooses_the_same_channels(ray_head: str) -> None:
    spec = "vote:sparsity=0.25"
    alone, rep_alone = onnxprune.run(DIGITS, spec, data=CALIB)
    shared, rep_shared = onnxprune.run(DIGITS, spec, data=CALIB, workers=2, ray_address=ray_head)
    assert (
        rep_alone["passes"][0]["channels_pruned"] == rep_shared["passes"][0]["channels_pruned"] > 0
    )
    masks = zero_masks(shared)
    for name, mask in zero_masks(alone).items():
        np.testing.assert_array_equal(mask, masks[name], err_msg=name)  # same channels zeroed
    for a, b in zip(alone.graph.initializer, shared.graph.initializer, strict=True):
        np.testing.assert_allclose(
            onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b), rtol=1e-6, atol=1e-7
        )


@needs_ray
def test_activation_stats_goes_to_the_workers(ray_head: str) -> None:
    model, data, tensors = _digits()
    ctx = Context(original=model, data_path=CALIB, workers=Workers(2, ray_head))
    try:
        shared = activation_stats(ctx, model, tensors)
    finally:
        ctx.workers.close()
    assert worst_relative(collect(model, tensors, data), shared) <= 1e-9


@needs_ray
def test_fixed_batch_drops_the_tail_once(ray_head: str) -> None:
    rng = np.random.default_rng(1)
    model = build_model(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["r"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3, 5, 5])],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, [4, 6, 3, 3])],
        {"w": rng.standard_normal((6, 3, 3, 3)).astype(np.float32)},
    )
    data = Dataset({"x": rng.standard_normal((18, 3, 5, 5)).astype(np.float32)}, None, "mem")
    tensors = {"c": 1, "r": 1}
    workers = Workers(3, ray_head)  # 4 batches of 4 (2 samples dropped): shards of 2, 1, 1
    try:
        merged = workers.merged(collect, model, data, tensors=tensors)
    finally:
        workers.close()
    alone = collect(model, tensors, data)
    assert alone["c"].count == 16 * 9
    assert worst_relative(alone, merged) <= 1e-9


@needs_ray
@pytest.mark.parametrize(
    ("case", "error", "match"),
    [("data", DataError, "no array for model input"), ("tensor", ValueError, "'nope' is not")],
)
def test_a_task_error_comes_back_as_is(ray_head: str, case: str, error: type, match: str) -> None:
    model, data, tensors = _digits()
    if case == "data":
        data = Dataset({"not_the_input": data.inputs["input"]}, None, "wrong.npz")
    else:
        tensors = {"nope": 1}
    workers = Workers(2, ray_head)
    try:
        with pytest.raises(error, match=match):  # as collect raises it in one process
            workers.map(collect, model, data, tensors=tensors)
    finally:
        workers.close()


@needs_ray
def test_validate_on_two_workers_compares_the_same_outputs(ray_head: str) -> None:
    chain = ["vote:sparsity=0.5,round_to=4", "validate:runs=0"]
    kw = {"data": CALIB, "eval_data": TEST}
    _, alone = onnxprune.run(DIGITS, chain, **kw)
    _, shared = onnxprune.run(DIGITS, chain, **kw, workers=2, ray_address=ray_head)
    a, b = alone["passes"][1], shared["passes"][1]
    assert a["outputs"][0]["max_abs"] > 0 and a["outputs"][0]["shape"][0] == 359
    assert a["outputs"] == b["outputs"] and a["classification"] == b["classification"]
    assert a["gates"] == b["gates"]


@needs_ray
def test_sharded_pair_outputs_equal_one_process(ray_head: str) -> None:
    original, _, _ = _digits()
    pruned, _ = onnxprune.run(original, "vote:sparsity=0.5,round_to=4", data=CALIB)
    data = load_npz(TEST, original)
    ref, new, count = run_pair(session(original), session(pruned), original, data)
    got = sharded_pair(Workers(2, ray_head), original, pruned, data, ["CPUExecutionProvider"])
    assert got[2] == count == 359
    for name in ref:  # the same batches through the same runtime: bit for bit
        np.testing.assert_array_equal(got[0][name], ref[name])
        np.testing.assert_array_equal(got[1][name], new[name])


# ---------------------------------------------------------------------------------------------
# the command line


def _cli(*args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-m", "onnxprune", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**env, **RAY_ENV},
    )


@needs_ray
def test_cli_local_cluster_and_joined_cluster_equal_one_process(
    ray_head: str, tmp_path: Path
) -> None:
    base = [DIGITS, "-p", "vote:sparsity=0.25", "--data", CALIB, "-q"]
    alone, _ = onnxprune.run(DIGITS, "vote:sparsity=0.25", data=CALIB)
    local = _cli(*base, "--workers", 2, "-o", tmp_path / "local.onnx")  # starts its own
    assert local.returncode == 0, local.stderr
    joined = _cli(*base, "--workers", 2, "--ray-address", ray_head, "-o", tmp_path / "joined.onnx")
    assert joined.returncode == 0, joined.stderr
    for out in ("local.onnx", "joined.onnx"):
        masks = zero_masks(onnx.load(tmp_path / out))
        for name, mask in zero_masks(alone).items():
            np.testing.assert_array_equal(mask, masks[name], err_msg=f"{out}: {name}")
    import ray  # the joined cluster is still up

    assert ray.cluster_resources().get("CPU") == 2


@needs_ray
def test_unreachable_address_is_a_quick_one_line_error(tmp_path: Path) -> None:
    start = time.monotonic()
    args = [DIGITS, "-p", "vote", "--data", CALIB, "--workers", 2, "-o", tmp_path / "out.onnx"]
    result = _cli(*args, "--ray-address", f"127.0.0.1:{_free_port()}")
    assert result.returncode == 2
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "--ray-address" in err and "no Ray cluster" in err, err
    assert time.monotonic() - start < 60 and not (tmp_path / "out.onnx").exists()


def test_ray_address_needs_workers(tmp_path: Path) -> None:
    result = invoke(DIGITS, "-p", "vote", "--ray-address", "127.0.0.1:6379")
    assert result.exit_code == 2 and "--ray-address needs --workers" in result.stderr
    with pytest.raises(onnxprune.OnnxPruneError, match="ray_address needs workers"):
        onnxprune.run(DIGITS, "vote", ray_address="127.0.0.1:6379")


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_workers_must_be_a_positive_integer(bad: object) -> None:
    with pytest.raises(onnxprune.OnnxPruneError, match="workers must be an integer >= 1"):
        onnxprune.run(DIGITS, "vote", workers=bad)  # type: ignore[arg-type]
