"""Least-squares reconstruction of one linear layer that only helps (the maths of ``refit``).

Rows (the kept inputs ``x`` and ``d = target - current output``) are split as they stream:
one in :data:`HELD` goes to the held-out sums, the rest to the fit sums. The change of the kept
inputs' weights solves a ridge problem on the fit rows, ``(C + lam I) dw = c_xd``, which
shrinks the weights towards their current values, for every ridge on :data:`RIDGES` (times the
mean input energy); the ridge with the lowest error on the held-out rows wins. The bias change
is then the least-squares one over all rows (which lowers the held-out error further). The
result is kept only when its held-out error is below that of no change; otherwise the layer
stays as it was (an exactly reconstructible layer stays exact).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

HELD = 4  # one row in HELD is held out
RIDGES = (1e-8, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # relative to the mean input energy
ROWS_PER_INPUT = 4  # fit rows wanted per kept input; fewer: said in the layer's note
MIN_HELD = 16  # fewer held-out rows than this: nothing is validated, the layer is left alone
SKETCH = 32  # random projections of the outputs the ridge is chosen on
BLOCK = 2048  # rows folded into the sums at a time


@dataclass
class Sums:
    """Streaming sums of rows ``x`` [R, K] and residual targets ``r`` [R, N]."""

    n: int = 0
    sx: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sr: np.ndarray = field(default_factory=lambda: np.zeros(0))
    xtx: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    xtr: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    srr: float = 0.0
    now: float = 0.0  # sum of squared errors of the layer as it is

    def add(self, x: np.ndarray, r: np.ndarray, now: np.ndarray | None = None) -> None:
        """Fold rows into the sums; ``now``: the rows' errors as the layer is (default ``r``)."""
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
        self.now += float((r * r).sum()) if now is None else float((now * now).sum())

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
            self.now + other.now,
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
    """The fit and held-out sums of one layer, with the rule that splits rows between them.

    Rows are buffered and folded in blocks of at least :data:`BLOCK` (one large matrix product
    instead of many thin ones); :meth:`flush` folds the rest (``solve`` calls it)."""

    rng: np.random.Generator
    fit: Sums = field(default_factory=Sums)
    held: Sums = field(default_factory=Sums)
    _buffer: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = field(default_factory=list)
    _buffered: int = 0

    def add(self, x: np.ndarray, r: np.ndarray, now: np.ndarray | None = None) -> None:
        """Queue rows; fold the queue once it holds :data:`BLOCK` rows."""
        self._buffer.append((x, r, now))
        self._buffered += len(x)
        if self._buffered >= BLOCK:
            self.flush()

    def flush(self) -> None:
        """Split the queued rows (one in :data:`HELD` held out, at random) and fold them in."""
        if not self._buffer:
            return
        x = np.concatenate([b[0] for b in self._buffer])
        r = np.concatenate([b[1] for b in self._buffer])
        nows = [b[2] if b[2] is not None else b[1] for b in self._buffer]
        now = np.concatenate(nows) if any(b[2] is not None for b in self._buffer) else None
        self._buffer, self._buffered = [], 0
        out = self.rng.random(len(x)) < 1.0 / HELD
        self.fit.add(x[~out], r[~out], None if now is None else now[~out])
        self.held.add(x[out], r[out], None if now is None else now[out])


def solve(
    streams: Streams,
    ridge: float | None = None,
    frozen: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The change of the kept inputs' weights [K, N] and of the bias [N] that fits the rows'
    ``d`` (``x d_w + d_b``; the layer's target minus its output once the removed inputs' weight
    rows are zero), and what was decided: ``kept`` (whether it
    beats the layer as it is, ``now``, on the held-out rows), the ridge, the held-out errors, a ``note`` when rows
    were short. The ridge shrinks the change towards zero, i.e. the weights towards their
    current values; it is chosen on the held-out rows (on :data:`SKETCH` random projections of
    the outputs; the final comparison is exact), or fixed by ``ridge`` (relative). ``frozen``
    outputs do not change. Rejected: zeros."""
    streams.flush()
    fit, held = streams.fit, streams.held
    n_out = len(fit.sr) if fit.n else len(held.sr)
    frozen = np.zeros(n_out, bool) if frozen is None else frozen
    zero_w, zero_b = np.zeros((len(fit.sx), n_out)), np.zeros(n_out)
    info: dict[str, Any] = {"rows": fit.n, "rows_held": held.n}
    before = held.now / held.n if held.n else 0.0
    info["held_before"] = before
    if held.n < MIN_HELD or fit.n < 2:
        info.update(kept=False, note=f"{held.n} held-out rows: too few to validate, not refitted")
        return zero_w, zero_b, info
    k = len(fit.sx)
    if fit.n < ROWS_PER_INPUT * k:
        info["note"] = (
            f"{fit.n} fit rows for {k} kept inputs (under {ROWS_PER_INPUT} per input): "
            "ridge chosen on held-out rows"
        )
    every = fit.merged(held)
    mean_x, mean_r = fit.sx / fit.n, fit.sr / fit.n
    cov = fit.xtx / fit.n - np.outer(mean_x, mean_x)
    cross = fit.xtr / fit.n - np.outer(mean_x, mean_r)
    cross[:, frozen] = 0.0
    energy = max(float(np.trace(cov)) / max(k, 1), 1e-12)
    values, vectors = np.linalg.eigh(cov)
    values = np.maximum(values, 0.0)
    all_x, all_r = every.sx / every.n, every.sr / every.n
    all_r = np.where(frozen, 0.0, all_r)
    candidates = (ridge,) if ridge is not None else RIDGES
    rel = candidates[0]
    if len(candidates) > 1:  # choose on a sketch of the outputs
        omega = _sketch(n_out, seed)
        base_s = vectors.T @ (cross @ omega)
        h_cov, h_x = held.xtx / held.n, held.sx / held.n
        h_xr, h_r = (held.xtr / held.n) @ omega, (held.sr / held.n) @ omega
        scores = []
        for lam_rel in candidates:
            dw = vectors @ (base_s / (values + lam_rel * energy)[:, None])
            db = all_r @ omega - all_x @ dw
            score = (
                np.einsum("ij,ij->", dw, h_cov @ dw)
                - 2 * np.einsum("ij,ij->", dw, h_xr)
                + 2 * db @ (h_x @ dw)
                - 2 * db @ h_r
                + db @ db
            )
            scores.append(float(score))
        rel = candidates[int(np.argmin(scores))]
    dw = vectors @ ((vectors.T @ cross) / (values + rel * energy)[:, None])
    db = all_r - all_x @ dw
    err = held.mse(dw, db)
    info.update(ridge=rel, held_after=err, kept=bool(err < before))
    if not info["kept"]:
        return zero_w, zero_b, info
    return dw, db, info


def _sketch(n_out: int, seed: int) -> np.ndarray:
    """[N, s] random projections of the outputs (the identity when there are few)."""
    if n_out <= SKETCH:
        return np.eye(n_out)
    return np.random.default_rng(seed).standard_normal((n_out, SKETCH)) / np.sqrt(SKETCH)
