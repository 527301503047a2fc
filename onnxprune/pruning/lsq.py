"""The voter check: how much of the consumers' outputs a choice of channels loses.

Everything runs on sampled rows (at most :data:`CHECK_ROWS` activation vectors per consumer
input) and on a sketch of the consumer's outputs (:data:`SKETCH` random projections of its
weight), so the cost is that of a few matrix products on the rows: ``O(rows^2 * inputs)`` per
choice, linear in the layer's width, never a dense covariance of the inputs.

* ``mean``: ``E || (X_S - mean_S) W_S ||^2`` -- what is lost when only the mean of the removed
  channels is kept (bias compensation);
* ``lsq``: the same after the remaining channels are refitted by ridge least squares on three
  quarters of the rows, measured on the other quarter (held-out): the part of the removed
  channels that the others cannot predict. The fit is solved in row space (kernel form,
  ``(X_K X_K' + lambda I)^-1``), so a layer wider than the rows costs no more than the rows.

Kernel taps of a spatial convolution are treated as one vector: a cheap local proxy, used to
weigh voters, not a prediction of accuracy; so it runs in float32 (the rows are float32
activations; float64 cost a quarter of vote's time on the 6.3M MLP and chose the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHECK_ROWS = 1024  # rows sampled per consumer input for the check
SKETCH = 64  # random projections of a consumer's outputs (all outputs when it has fewer)
RIDGE = 1e-2  # ridge of the held-out refit, relative to the mean row energy
HELD = 4  # one row in HELD is held out


def check_caps() -> dict[str, object]:
    """The caps of the check, as the pass reports them."""
    return {
        "rows": CHECK_ROWS,
        "held_out": f"1 in {HELD}",
        "sketch": SKETCH,
        "ridge": RIDGE,
        "cost": "O(rows^2 x inputs) per choice and consumer, no input covariance",
    }


@dataclass
class SinkRows:
    """One consumer input, ready for the check: centred rows and the sketched weight."""

    fit: np.ndarray  # [R1, K] rows the refit sees, centred by their mean
    held: np.ndarray  # [R2, K] held-out rows, centred by the fit rows' mean
    every: np.ndarray  # [R, K] all rows, centred by their mean (mode mean)
    weight: np.ndarray  # [K, s] the consumer's weight rows times the sketch
    gram: np.ndarray  # [R1, R1] fit @ fit.T

    @classmethod
    def of(cls, x: np.ndarray, w_rows: np.ndarray, seed: int) -> SinkRows:
        """From sampled rows ``x`` [R, K] and weight rows ``w_rows`` [K, outputs]."""
        rng = np.random.default_rng(seed)
        x = np.asarray(x, np.float32)
        if len(x) > CHECK_ROWS:
            x = x[np.sort(rng.choice(len(x), CHECK_ROWS, replace=False))]
        order = rng.permutation(len(x))
        held_n = len(x) // HELD if len(x) >= 2 * HELD else 0
        fit, held = x[order[held_n:]], x[order[:held_n]]
        mean = fit.mean(axis=0)
        outputs = w_rows.shape[1]
        if outputs > SKETCH:
            omega = rng.standard_normal((outputs, SKETCH)) / np.sqrt(SKETCH)
            weight = (w_rows @ omega).astype(np.float32)
        else:
            weight = np.asarray(w_rows, np.float32)
        fit = fit - mean
        return cls(fit, held - mean, x - x.mean(axis=0), weight, fit @ fit.T)

    def error(self, gone: np.ndarray, mode: str) -> float:
        """Output energy lost per row when the positions ``gone`` (bool [K]) are removed."""
        ws = self.weight[gone]
        if mode != "lsq" or gone.all() or not len(self.held):
            y = self.every[:, gone] @ ws
            return float((y * y).sum() / max(len(y), 1))
        keep = ~gone
        s1 = self.fit[:, gone]
        y1, y2 = s1 @ ws, self.held[:, gone] @ ws
        k1 = self.fit[:, keep]
        g = self.gram - s1 @ s1.T if gone.sum() < keep.sum() else k1 @ k1.T  # the smaller
        lam = RIDGE * max(float(np.trace(g)) / len(g), 1e-12)
        g[np.diag_indices_from(g)] += lam
        try:
            alpha = np.linalg.solve(g, y1)
        except np.linalg.LinAlgError:
            alpha = np.linalg.lstsq(g, y1, rcond=None)[0]
        resid = y2 - self.held[:, keep] @ (k1.T @ alpha)
        return float((resid * resid).sum() / len(resid))
