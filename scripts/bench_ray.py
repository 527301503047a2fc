"""Benchmark calibration on Ray: throughput with 1 and 2 workers against one process, and how
far the merged statistics are from the single-process ones.

    .venv/bin/pip install -e ".[ray]"
    .venv/bin/python scripts/bench_ray.py                  # 4096 samples, 5 rounds
    .venv/bin/python scripts/bench_ray.py --samples 8192 --rounds 3 --workers 1,2,4

Two models: the committed digits CNN (models/digits/torch_cnn.onnx, 8x8 images: tiny work per
sample, so Ray's per-call cost shows) and a CNN generated here (3x16x16 inputs, three 3x3
convolutions of 32-64 channels: about 4 MFLOP per sample). Statistics of every Conv, Relu and
Gemm output, as vote and stats collect them (:func:`onnxprune.pruning.calibrate.collect`).
The samples: the digits CNN's calibration file tiled with small noise, random normal inputs
for the generated CNN (fixed seed). One local cluster is started once (its start-up time is
printed apart); every round runs each configuration once, in turn (interleaved), after one
warm-up round that starts the workers; the figures are medians. A Ray call includes shipping
the model and the shards and each task's own onnxruntime session.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxprune.data import Dataset, load_npz
from onnxprune.distributed import Workers
from onnxprune.pruning.calibrate import ChannelStats, collect

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("sum", "sumsq", "m2", "min", "max")


def generated_cnn(seed: int = 0) -> onnx.ModelProto:
    """x[N,3,16,16] -> 3x(Conv 3x3 pad 1 + Relu), 32-64-64 channels, the last two stride 2."""
    rng = np.random.default_rng(seed)
    nodes, inits, x, c_in = [], [], "x", 3
    for i, (c_out, stride) in enumerate([(32, 1), (64, 2), (64, 2)]):
        w = (rng.standard_normal((c_out, c_in, 3, 3)) / np.sqrt(9 * c_in)).astype(np.float32)
        b = (rng.standard_normal(c_out) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [
            helper.make_node(
                "Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1] * 4, strides=[stride] * 2
            ),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
        ]
        x, c_in = f"r{i}", c_out
    graph = helper.make_graph(
        nodes,
        "bench_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 64, 4, 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def digits(samples: int, seed: int = 0) -> tuple[onnx.ModelProto, Dataset]:
    """The digits CNN and ``samples`` inputs: its calibration file tiled, plus small noise."""
    model = onnx.load(ROOT / "models/digits/torch_cnn.onnx")
    base = load_npz(ROOT / "models/digits/torch_cnn.calib.npz", model).inputs["input"]
    tiled = np.concatenate([base] * (-(-samples // len(base))))[:samples]
    noise = np.random.default_rng(seed).normal(0, 0.01, tiled.shape).astype(np.float32)
    return model, Dataset({"input": tiled + noise}, None, "digits calib, tiled")


def tensors_of(model: onnx.ModelProto) -> dict[str, int]:
    return {n.output[0]: 1 for n in model.graph.node if n.op_type in ("Conv", "Relu", "Gemm")}


def worst_relative(a: Mapping[str, ChannelStats], b: Mapping[str, ChannelStats]) -> float:
    """The largest relative difference of any accumulator; counts and zeros must be equal."""
    worst = 0.0
    for name in a:
        assert a[name].count == b[name].count and np.array_equal(a[name].zeros, b[name].zeros)
        for field in FIELDS:
            x, y = getattr(a[name], field), getattr(b[name], field)
            scale = np.maximum(np.abs(x), np.abs(y))
            diff = np.where(scale > 0, np.abs(x - y) / np.where(scale > 0, scale, 1), 0)
            worst = max(worst, float(diff.max()))
    return worst


def bench(
    name: str,
    model: onnx.ModelProto,
    data: Dataset,
    pools: Mapping[int, Workers],
    rounds: int,
) -> list[str]:
    """Table rows for one model: each configuration's median time, samples/s, difference."""
    tensors = tensors_of(model)
    runs: dict[str, Callable[[], dict[str, ChannelStats]]] = {
        "1 process": lambda: collect(model, tensors, data)
    }
    for count, pool in pools.items():
        runs[f"{count} worker{'s' * (count > 1)}"] = lambda pool=pool: pool.merged(
            collect, model, data, tensors=tensors
        )
    times: dict[str, list[float]] = {label: [] for label in runs}
    results: dict[str, dict[str, ChannelStats]] = {}
    for round_ in range(rounds + 1):  # round 0 warms up: worker processes, sessions
        for label, fn in runs.items():
            start = time.perf_counter()
            results[label] = fn()
            if round_:
                times[label].append(time.perf_counter() - start)
    rows = []
    for label in runs:
        median = statistics.median(times[label])
        diff = worst_relative(results["1 process"], results[label])
        rows.append(f"| {name} | {label} | {median:.3f} | {len(data) / median:,.0f} | {diff:.1e} |")
    return rows


def machine() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    avx = next((f for f in flags.split() if f.startswith("avx512")), "no avx512")
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {avx}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", default="1,2", help="worker counts, comma-separated")
    args = parser.parse_args()
    counts = [int(c) for c in args.workers.split(",")]
    import ray  # noqa: PLC0415 - the benchmark needs the extra

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    start = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=max(counts),
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
    started = time.perf_counter() - start
    pools = {count: Workers(count) for count in counts}  # share the cluster started above
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.samples, 3, 16, 16)).astype(np.float32)
    cases = [
        ("digits CNN", *digits(args.samples)),
        ("CNN 3x16x16", generated_cnn(), Dataset({"x": images}, None, "random normal")),
    ]
    print(f"machine: {machine()}; ray {ray.__version__}; local cluster of {max(counts)} CPUs")
    print(f"cluster start: {started:.1f} s; {args.samples} samples, median of {args.rounds}")
    print()
    print("| model | run | seconds | samples/s | max relative difference |")
    print("|---|---|---|---|---|")
    for name, model, data in cases:
        for row in bench(name, model, data, pools, args.rounds):
            print(row, flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
