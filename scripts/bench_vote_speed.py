"""Benchmark vote's speed: vote with data (and with refit) on generated random MLPs.

    .venv/bin/python scripts/bench_vote_speed.py                  # the table (medians of 3)
    .venv/bin/python scripts/bench_vote_speed.py --repeat 1 --profile vote   # cProfile top 25
    .venv/bin/python scripts/bench_vote_speed.py --profile vote --cpu         # by CPU time
    .venv/bin/python scripts/bench_vote_speed.py --only vote --against /tmp/base --repeat 5

``--against DIR``: an A/B comparison with another checkout of the project (``git archive REV |
tar -x -C DIR``): each round runs every configuration once from DIR and once from here, each
in a fresh process (``PYTHONPATH`` set to the checkout), alternating; medians of wall and CPU
per side.

Models: MLP 512-2048-2048-512 (Gemm + Relu, 6.3M parameters, the peer comparison's model) and
single-hidden-layer MLPs 512-W-512 for W = 2048, 4096, 8192 (the consumer of the pruned layer
reads W inputs: what the least-squares voter check scales with). Calibration: 8192 samples of a
standard normal input (``--samples``). Every configuration runs ``--repeat`` times, interleaved
(round after round over all configurations), in this process; the table shows the median wall
time and CPU time of ``onnxprune.run`` (the pass chain, calibration included; model generation
and data writing excluded).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import onnxprune

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_fold import mlp  # noqa: E402  (scripts/ is not a package)

VOTE = "vote:sparsity=0.5"
CONFIGS: dict[str, tuple[list[int], list[str]]] = {
    "vote": ([512, 2048, 2048, 512], [VOTE]),
    "vote check=off": ([512, 2048, 2048, 512], [VOTE + ",check=off"]),
    "vote + refit": ([512, 2048, 2048, 512], [VOTE, "refit"]),
    "W=2048 vote": ([512, 2048, 512], [VOTE]),
    "W=2048 vote check=off": ([512, 2048, 512], [VOTE + ",check=off"]),
    "W=4096 vote": ([512, 4096, 512], [VOTE]),
    "W=4096 vote check=off": ([512, 4096, 512], [VOTE + ",check=off"]),
    "W=8192 vote": ([512, 8192, 512], [VOTE]),
    "W=8192 vote check=off": ([512, 8192, 512], [VOTE + ",check=off"]),
}


def main() -> None:
    """Run the configurations interleaved and print the medians."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="rounds (median over them)")
    ap.add_argument("--samples", type=int, default=8192, help="calibration samples")
    ap.add_argument("--only", nargs="*", default=None, help="configurations to run (names)")
    ap.add_argument("--profile", default=None, help="cProfile this configuration once")
    ap.add_argument(
        "--cpu", action="store_true", help="profile CPU time (process_time: all threads)"
    )
    ap.add_argument("--lines", type=int, default=25, help="profile lines to print")
    ap.add_argument("--against", default=None, help="A/B against this checkout (see above)")
    args = ap.parse_args()
    if args.against:
        against(Path(args.against), args.only or list(CONFIGS), args.repeat, args.samples)
        return
    names = args.only or list(CONFIGS)
    models = {tuple(CONFIGS[n][0]): mlp(CONFIGS[n][0], "gemm") for n in names}
    rng = np.random.default_rng(1)
    calib = rng.standard_normal((args.samples, 512)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "calib.npz"
        np.savez(data, x=calib)
        if args.profile:
            sizes, passes = CONFIGS[args.profile]
            onnxprune.run(models[tuple(sizes)], passes, data=data, device="cpu")  # warm-up
            prof = cProfile.Profile(time.process_time) if args.cpu else cProfile.Profile()
            t0, c0 = time.perf_counter(), time.process_time()
            prof.enable()
            onnxprune.run(models[tuple(sizes)], passes, data=data, device="cpu")
            prof.disable()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            print(f"{args.profile}: wall {wall:.2f} s, CPU {cpu:.2f} s (profiled)")
            pstats.Stats(prof).sort_stats("cumulative").print_stats(args.lines)
            return
        wall: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(args.repeat):
            for n in names:
                sizes, passes = CONFIGS[n]
                t0, c0 = time.perf_counter(), time.process_time()
                onnxprune.run(models[tuple(sizes)], passes, data=data, device="cpu")
                wall[n].append(time.perf_counter() - t0)
                cpu[n].append(time.process_time() - c0)
                print(f"  {n}: {wall[n][-1]:.2f} s", file=sys.stderr, flush=True)
    print(f"| configuration | chain | wall s (median of {args.repeat}) | CPU s |")
    print("|---|---|---|---|")
    for n in names:
        sizes, passes = CONFIGS[n]
        chain = " ".join(f"-p {p}" for p in passes)
        model = "-".join(map(str, sizes))
        print(
            f"| {n} | MLP {model}: `{chain}` | {statistics.median(wall[n]):.2f} | "
            f"{statistics.median(cpu[n]):.2f} |"
        )


def against(other: Path, names: list[str], repeat: int, samples: int) -> None:
    """Interleaved A/B rounds, one fresh process per run: ``other`` (A), then this checkout."""
    sides = {"A " + str(other): other, "B this checkout": ROOT}
    got: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for _ in range(repeat):
        for n in names:
            for label, root in sides.items():
                cmd = [sys.executable, str(root / "scripts" / "bench_vote_speed.py")]
                cmd += ["--repeat", "1", "--samples", str(samples), "--only", n]
                env = dict(os.environ, PYTHONPATH=str(root))
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                cells = out.stdout.strip().splitlines()[-1].strip("|").split("|")
                got.setdefault((n, label), []).append((float(cells[2]), float(cells[3])))
                print(f"  {label}: {n}: {cells[2].strip()} s, CPU {cells[3].strip()} s",
                      file=sys.stderr, flush=True)  # fmt: skip
    print(f"| configuration | side | wall s (median of {repeat}) | CPU s | runs (wall / CPU) |")
    print("|---|---|---|---|---|")
    for (n, label), runs in got.items():
        walls, cpus = [w for w, _ in runs], [c for _, c in runs]
        each = ", ".join(f"{w:.1f}/{c:.1f}" for w, c in runs)
        print(
            f"| {n} | {label} | {statistics.median(walls):.2f} | "
            f"{statistics.median(cpus):.2f} | {each} |"
        )


if __name__ == "__main__":
    main()
