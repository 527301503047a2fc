"""Least-squares reconstruction of one linear layer that only helps (the maths of ``refit``).

Rows (input vectors ``x`` and target residuals ``r``) are split as they stream: one in
:data:`HELD` goes to the held-out sums, the rest to the fit sums. The new weights of the kept
inputs solve a ridge problem on the fit rows that shrinks them towards their current values,
``(C + lam I) w = c_xr + lam w0``, for every ridge on :data:`RIDGES` (times the mean input
energy); the ridge with the lowest error on the held-out rows wins. The bias is then the
least-squares one over all rows (which lowers the held-out error further). The result is kept
only when its held-out error is below that of the current weights; otherwise the layer stays as
it was (an exactly reconstructible layer stays exact).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

HELD = 4  # one row in HELD is held out
RIDGES = (1e-8, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # relative to the mean input energy
ROWS_PER_INPUT = 4  # fit rows wanted per kept input; fewer: said in the layer's note
MIN_HELD = 16  # fewer held-out rows than this: nothing is validated, the layer is left alone


@dataclass
class Sums:
    """Streaming sums of rows ``x`` [R, K] and residual targets ``r`` [R, N]."""

    n: int = 0
    sx: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sr: np.ndarray = field(default_factory=lambda: np.zeros(0))
    xtx: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    xtr: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    srr: float = 0.0

    def add(self, x: np.ndarray, r: np.ndarray) -> None:
        """Fold rows into the sums."""
        if not len(x):
            return
        if not self.n:
            k, m = x.shape[1], r.shape[1]
            self.sx, self.sr = np.zeros(k), np.zeros(m)
            self.xtx, self.xtr = np.zeros((k, k)), np.zeros((k, m))
        self.n += len(x)
        self.sx += x.sum(0)
        self.sr += r.sum(0)
        self.xtx += x.T @ x
        self.xtr += x.T @ r
        self.srr += float((r * r).sum())

    def merged(self, other: Sums) -> Sums:
        """Both sets of rows together."""
        if not other.n:
            return self
        if not self.n:
            return other
        return Sums(
            self.n + other.n,
            self.sx + other.sx,
            self.sr + other.sr,
            self.xtx + other.xtx,
            self.xtr + other.xtr,
            self.srr + other.srr,
        )

    def restricted(self, keep: np.ndarray) -> Sums:
        """The sums of the inputs ``keep`` only (weights elsewhere zero cost nothing)."""
        if not self.n:
            return self
        return Sums(
            self.n, self.sx[keep], self.sr, self.xtx[np.ix_(keep, keep)], self.xtr[keep], self.srr
        )

    def mse(self, w: np.ndarray, b: np.ndarray) -> float:
        """Mean squared error per row of ``x w + b`` against ``r`` (0 without rows)."""
        if not self.n:
            return 0.0
        cov_x, xr = self.xtx / self.n, self.xtr / self.n
        mean_x, mean_r = self.sx / self.n, self.sr / self.n
        quad = float(np.einsum("ij,ij->", w, cov_x @ w))
        cross = float(np.einsum("ij,ij->", w, xr))
        rr = self.srr / self.n
        return max(
            rr
            + quad
            - 2 * cross
            + 2 * float(b @ (mean_x @ w))
            - 2 * float(b @ mean_r)
            + float(b @ b),
            0.0,
        )


@dataclass
class Streams:
    """The fit and held-out sums of one layer, with the rule that splits rows between them."""

    rng: np.random.Generator
    fit: Sums = field(default_factory=Sums)
    held: Sums = field(default_factory=Sums)

    def add(self, x: np.ndarray, r: np.ndarray) -> None:
        """Split the rows (one in :data:`HELD` held out, at random) and fold them in."""
        out = self.rng.random(len(x)) < 1.0 / HELD
        self.fit.add(x[~out], r[~out])
        self.held.add(x[out], r[out])


def solve(
    streams: Streams,
    keep: np.ndarray,
    w0: np.ndarray,
    ridge: float | None = None,
    frozen: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """New weights [K, N] (rows outside ``keep`` zero) and bias change [N] for one layer, and
    what was decided: ``kept`` (whether they beat the current weights ``w0`` on held-out rows),
    the ridge, the held-out errors, a ``note`` when rows were short. ``ridge`` fixes the ridge
    (relative) instead of choosing it on the held-out rows; ``frozen`` outputs keep ``w0`` and
    no bias change. Rejected: ``w0`` and a zero bias."""
    frozen = np.zeros(w0.shape[1], bool) if frozen is None else frozen
    fit, held = streams.fit, streams.held
    every = fit.merged(held)
    zero_b = np.zeros(w0.shape[1])
    info: dict[str, Any] = {"rows": fit.n, "rows_held": held.n}
    before = held.mse(w0, zero_b)
    if held.n < MIN_HELD or fit.n < 2:
        info.update(kept=False, note=f"{held.n} held-out rows: too few to validate, not refitted")
        return w0, zero_b, info
    if fit.n < ROWS_PER_INPUT * len(keep):
        info["note"] = (
            f"{fit.n} fit rows for {len(keep)} kept inputs (under {ROWS_PER_INPUT} per input): "
            "ridge chosen on held-out rows"
        )
    mean_x, mean_r = fit.sx / fit.n, fit.sr / fit.n
    cov = fit.xtx[np.ix_(keep, keep)] / fit.n - np.outer(mean_x[keep], mean_x[keep])
    cross = fit.xtr[keep] / fit.n - np.outer(mean_x[keep], mean_r)
    energy = max(float(np.trace(cov)) / max(len(keep), 1), 1e-12)
    values, vectors = np.linalg.eigh(cov)
    values = np.maximum(values, 0.0)
    base, pull = vectors.T @ cross, vectors.T @ w0[keep]
    all_mean_x, all_mean_r = every.sx / every.n, every.sr / every.n
    held_keep = held.restricted(keep)
    best: tuple[float, float, np.ndarray, np.ndarray] | None = None
    for rel in (ridge,) if ridge is not None else RIDGES:
        lam = rel * energy
        w_keep = vectors @ ((base + lam * pull) / (values + lam)[:, None])
        w_keep[:, frozen] = w0[keep][:, frozen]
        b = all_mean_r - all_mean_x[keep] @ w_keep
        b[frozen] = 0.0
        err = held_keep.mse(w_keep, b)
        if best is None or err < best[0]:
            best = (err, rel, w_keep, b)
    assert best is not None
    err, rel, w_keep, b = best
    w = np.zeros_like(w0)
    w[keep] = w_keep
    w[:, frozen] = w0[:, frozen]
    info.update(ridge=rel, held_before=before, held_after=err, kept=bool(err < before))
    if not info["kept"]:
        return w0, zero_b, info
    return w, b, info
