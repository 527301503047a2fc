"""What training would add on issue 11's random MLP: the ceiling the no-training target sits under.

``python scripts/mlp_ceiling.py`` starts from onnxprune's best no-training result on the MLP
512-2048-2048-512 at half its hidden neurons (``vote:sparsity=0.5,compensate=on``, ``refit``,
``fold``; 8192 calibration rows) and fits every kept weight jointly by gradient descent (Adam,
numpy, squared error against the original's outputs), which is training and outside the
target's rules. Two runs: on the 8192 calibration rows only (the data the passes had) and on
fresh rows drawn at every step (unlimited data). Each prints the held-out cosine (mean and
lowest over the benchmark's 512 held-out rows, which no step sees) every ``--every`` steps.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

import onnxprune
from onnxprune.runtime import session

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_fold import mlp  # noqa: E402
from bench_targets import cosines  # noqa: E402

BATCH = 2048


def forward(p: list[np.ndarray], x: np.ndarray) -> tuple[np.ndarray, ...]:
    """Gemm, Relu, Gemm, Relu, Gemm; every intermediate for the backward pass."""
    h1 = np.maximum(x @ p[0] + p[1], 0)
    h2 = np.maximum(h1 @ p[2] + p[3], 0)
    return h1, h2, h2 @ p[4] + p[5]


def gradients(p: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """Gradients of the mean squared error against ``y``."""
    h1, h2, out = forward(p, x)
    d = 2 * (out - y) / out.size
    g4, g5 = h2.T @ d, d.sum(0)
    d = (d @ p[4].T) * (h2 > 0)
    g2, g3 = h1.T @ d, d.sum(0)
    d = (d @ p[2].T) * (h1 > 0)
    return [x.T @ d, d.sum(0), g2, g3, g4, g5]


def fit(
    start: list[np.ndarray],
    rows: np.ndarray | None,
    original: list[np.ndarray],
    held: np.ndarray,
    ref: np.ndarray,
    steps: int,
    every: int,
    label: str,
) -> None:
    """Adam from ``start``; ``rows``: a fixed set of inputs (minibatches), None: fresh ones."""
    p = [a.copy() for a in start]
    m = [np.zeros_like(a) for a in p]
    v = [np.zeros_like(a) for a in p]
    rng, t0 = np.random.default_rng(7), time.time()
    lr, b1, b2 = 2e-4, 0.9, 0.999
    for step in range(steps + 1):
        if step % every == 0:
            mean, low = cosines(ref, forward(p, held)[2])
            print(f"{label}: step {step}: cosine {mean:.4f}, lowest {low:.4f} "
                  f"({time.time() - t0:.0f} s)", flush=True)  # fmt: skip
        if rows is None:
            x = rng.standard_normal((BATCH, held.shape[1]), dtype=np.float32)
        else:
            x = rows[rng.choice(len(rows), BATCH, replace=False)]
        for i, g in enumerate(gradients(p, x, forward(original, x)[2])):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            hat_m, hat_v = m[i] / (1 - b1 ** (step + 1)), v[i] / (1 - b2 ** (step + 1))
            p[i] -= (lr * hat_m / (np.sqrt(hat_v) + 1e-8)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=100)
    args = parser.parse_args()
    model = mlp([512, 2048, 2048, 512], "gemm")
    rng = np.random.default_rng(1)  # the benchmark's draws (bench_targets.mlp)
    calib = rng.standard_normal((8192, 512)).astype(np.float32)
    held = rng.standard_normal((512, 512)).astype(np.float32)
    ref = session(model).run(None, {"x": held})[0]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "calib.npz"
        np.savez(data, x=calib)
        chain = ["vote:sparsity=0.5,compensate=on", "refit:max_batches=1000", "fold"]
        pruned, _ = onnxprune.run(model, chain, data=data, device="cpu")

    def weights(m: onnx.ModelProto) -> list[np.ndarray]:
        arrays = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
        return [arrays[f"{k}{i}"] for i in range(3) for k in ("w", "b")]

    start, original = weights(pruned), weights(model)
    print(f"widths {[w.shape[1] for w in start[::2]]}", flush=True)
    fit(start, calib, original, held, ref, args.steps, args.every, "8192 calibration rows")
    fit(start, None, original, held, ref, args.steps, args.every, "fresh rows every step")


if __name__ == "__main__":
    main()
