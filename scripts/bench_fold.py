"""Benchmark fold: latency of folded vs zeroed models, and fold's own speed and memory.

    .venv/bin/python scripts/bench_fold.py            # latency table (CNN/MLP fixtures, MLP 512-2048)
    .venv/bin/python scripts/bench_fold.py --big      # also fold a generated ~110M-parameter MLP

Latency: both models in one process, interleaved runs, median of many; onnxruntime CPU with
one intra-op thread. Prints the latency ratio (folded/zeroed) beside the MAC ratio.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

import onnxprune
from onnxprune.analysis.probe import probe
from onnxprune.analysis.walk import analyse
from onnxprune.cost import summarize
from onnxprune.graph import lift_constants
from onnxprune.pruning.zero import random_classes, zero_classes
from onnxprune.runtime import session
from onnxprune.synthesis import synthesize

ROOT = Path(__file__).resolve().parents[1]


def mlp(sizes: list[int], form: str, seed: int = 0) -> onnx.ModelProto:
    """A random MLP: ``gemm`` (Gemm+Relu) or ``matmul`` (raw opset-17 torch: MatMul+Add, Erf GELU)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:], strict=False)):
        w = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
        b = rng.standard_normal(n_out).astype(np.float32) * 0.1
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        y = f"y{i}"
        if form == "gemm":
            nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [y]))
        else:
            nodes += [
                helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
                helper.make_node("Add", [f"m{i}", f"b{i}"], [y]),
            ]
        if i < len(sizes) - 2:
            a = f"a{i}"
            if form == "gemm":
                nodes.append(helper.make_node("Relu", [y], [a]))
            else:  # GELU written out: 0.5 * y * (1 + erf(y / sqrt(2)))
                inits += [
                    numpy_helper.from_array(np.array(v, np.float32), f"c{i}_{k}")
                    for k, v in (("s", np.sqrt(2)), ("1", 1.0), ("h", 0.5))
                ]
                nodes += [
                    helper.make_node("Div", [y, f"c{i}_s"], [f"d{i}"]),
                    helper.make_node("Erf", [f"d{i}"], [f"e{i}"]),
                    helper.make_node("Add", [f"e{i}", f"c{i}_1"], [f"p{i}"]),
                    helper.make_node("Mul", [y, f"p{i}"], [f"q{i}"]),
                    helper.make_node("Mul", [f"q{i}", f"c{i}_h"], [a]),
                ]
            y = a
        x = y
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", sizes[0]])],
        [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, ["N", sizes[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def zero_half(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Zero half the free channels of every group (the bench's stand-in for a pruning pass)."""
    model = copy.deepcopy(model)
    lift_constants(model.graph)
    an = analyse(model, probe(model).shapes)
    zero_classes(model, an, random_classes(an, 0.5, seed))
    return model


def latency_ratio(
    a: onnx.ModelProto, b: onnx.ModelProto, batch: int, runs: int
) -> tuple[float, float, float]:
    """Median latency (ms) of a and b, interleaved, one thread; and b/a."""
    sa, sb = session(a, threads=1), session(b, threads=1)
    feeds = synthesize(a, batch, 0).inputs
    for _ in range(5):
        sa.run(None, feeds)
        sb.run(None, feeds)
    ta, tb = [], []
    for _ in range(runs):
        for s, t in ((sa, ta), (sb, tb)):
            start = time.perf_counter()
            s.run(None, feeds)
            t.append(time.perf_counter() - start)
    ma, mb = statistics.median(ta) * 1e3, statistics.median(tb) * 1e3
    return ma, mb, mb / ma


def bench_latency(runs: int) -> None:
    cases: list[tuple[str, onnx.ModelProto, int]] = [
        ("MLP 512-2048-2048-512 Gemm", mlp([512, 2048, 2048, 512], "gemm"), 32),
        ("MLP 512-2048-2048-512 MatMul+GELU", mlp([512, 2048, 2048, 512], "matmul"), 32),
    ]
    for rel in (
        "torch/cnn_legacy_bn",
        "torch/cnn_dynamo",
        "tf/cnn",
        "mxnet/cnn",
        "paddle/cnn",
        "torch/mlp_legacy",
        "tf/mlp",
        "mxnet/mlp",
        "torch/encoder_legacy",
    ):
        path = ROOT / "models" / f"{rel}.onnx"
        if path.exists():
            model, _ = onnxprune.run(onnxprune.load(path), ["cleanup"])
            cases.append((rel, model, 1))
            if "cnn" in rel:  # the same, zeroed by vote: kept counts multiples of the block
                cases.append((f"{rel} (vote, block counts)", model, -1))
    print(
        f"{'model':44} {'params zeroed->folded':>24} {'MAC ratio':>9} {'zeroed ms':>9} "
        f"{'folded ms':>9} {'lat ratio':>9} {'lat/MAC':>8}"
    )
    for name, model, batch in cases:
        if batch < 0:
            zeroed, batch = onnxprune.run(model, ["vote:sparsity=0.5"], device="cpu")[0], 1
        else:
            zeroed = zero_half(model)
        folded, _ = onnxprune.run(zeroed, ["fold"], device="cpu")
        sz, sf = summarize(zeroed), summarize(folded)
        mac_ratio = sf.macs / sz.macs if sz.macs else 1.0
        mz, mf, ratio = latency_ratio(zeroed, folded, batch, runs)
        print(
            f"{name:44} {sz.parameters:>11,} -> {sf.parameters:>10,} {mac_ratio:>9.3f} {mz:>9.3f} "
            f"{mf:>9.3f} {ratio:>9.3f} {ratio / mac_ratio if mac_ratio else 0:>8.2f}"
        )


def bench_big(folder: Path) -> None:
    """Fold a generated ~110M-parameter MLP loaded from disk in a fresh process: time, peak RSS."""
    path = folder / "mlp110m.onnx"
    onnxprune.save(zero_half(mlp([4096, 7168, 7168, 4096], "gemm")), path, external_data=False)
    code = (
        "import time, onnxprune;"
        "hwm = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))"
        ".split()[1]) * 1024;"
        "base = hwm();"
        f"m = onnxprune.load({str(path)!r});"
        "t = time.perf_counter(); out, r = onnxprune.run(m, ['fold'], device='cpu', inplace=True);"
        "dt = time.perf_counter() - t;"
        "peak = hwm();"
        f"size = {path.stat().st_size};"
        "p = r['passes'][0];"
        'print(f\'model {size/2**20:.0f} MiB, params {p["parameters_before"]:,} -> '
        '{p["parameters_after"]:,}; fold {dt:.1f} s; peak RSS {peak/2**20:.0f} MiB = '
        "{peak/size:.2f}x model ({(peak-base)/size:.2f}x above the interpreter with onnxprune imported)')"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="timed runs per model")
    parser.add_argument("--big", action="store_true", help="also fold a ~110M-parameter model")
    args = parser.parse_args()
    bench_latency(args.runs)
    if args.big:
        with tempfile.TemporaryDirectory() as tmp:
            bench_big(Path(tmp))


if __name__ == "__main__":
    main()
