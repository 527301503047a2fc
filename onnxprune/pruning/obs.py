"""Reconstruction-aware selection: the ``obs`` criterion (structured Optimal Brain Surgeon).

Which input channels of a consumer can go when the remaining weights are re-solved (what
``refit`` does after the vote)? For a linear consumer with input covariance ``H`` (the
calibration inputs, centred: the bias absorbs the mean) and weight rows ``W`` [K, N],
removing the inputs ``B`` and re-solving the others by least squares costs
``tr(W_B' (Hinv_BB)^-1 W_B)`` per row (OBS; ZipLM and OBSPA use it for structured pruning),
and the surviving weights move by ``-Hinv[:, B] (Hinv_BB)^-1 W_B``.

The criterion removes the classes of a group greedily, cheapest first, updating ``Hinv`` and
``P = W W'`` after each round (a rank-|B| update; rounds of ``1/ROUNDS`` of the classes, so
the work is a few matrix products of size K), summing the cost over every consumer that reads
a class (an attention head is the block of its positions). Its score is the removal order:
the first removed scores lowest, so a vote's ``sparsity`` share is the greedy choice.

Rules: the covariance is measured on all the calibration data (real tokens only when the
model has a padding mask), damped by :data:`DAMP` of its mean diagonal; consumers wider than
:data:`MAX_INPUTS` inputs, or inside an If branch, do not count; a Conv's input is taken per
channel (its kernel taps as one vector: a proxy). Without a workspace (ensemble members, the
``stats`` pass), or when a class of the group is read by no consumer that counts, the
criterion abstains.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxprune.analysis.labels import Sink
from onnxprune.pruning.criteria import GroupView, register_criterion
from onnxprune.pruning.fingerprints import fingerprint
from onnxprune.pruning.masks import positions
from onnxprune.pruning.workspace import Workspace
from onnxprune.runner import stream

MAX_INPUTS = 4096  # a wider consumer (a K x K covariance) does not count
DAMP = 1e-2  # damping of the covariance, relative to its mean diagonal
ROUNDS = 128  # classes are removed in rounds of 1/ROUNDS of the group (at least one)
CACHE = "obs.covariances:"


@dataclass
class Moments:
    """Streaming sums of one consumer input: rows, their sum, their Gram matrix."""

    n: int
    total: np.ndarray
    gram: np.ndarray

    def add(self, rows: np.ndarray) -> None:
        """Fold rows [R, K] in."""
        self.n += len(rows)
        self.total += rows.sum(axis=0)
        self.gram += rows.T @ rows

    def covariance(self) -> np.ndarray:
        """The centred covariance [K, K] (zeros without rows)."""
        if not self.n:
            return self.gram
        mean = self.total / self.n
        return self.gram / self.n - np.outer(mean, mean)


def covariances(ws: Workspace) -> dict[str, np.ndarray]:
    """Input covariance of every consumer input of at most :data:`MAX_INPUTS` channels, from
    one pass over the calibration data (cached in the context per model and mask)."""
    key = f"{CACHE}{fingerprint(ws.model)}:{ws.mask}"
    if key in ws.ctx.cache:
        return ws.ctx.cache[key]
    tensors = {
        s.tensor: s.labels.axis
        for s in ws.an.sinks
        if s.tensor in ws.sink_tensors() and len(s.labels.ids) <= MAX_INPUTS
    }
    acc: dict[str, Moments] = {}
    if tensors:
        names = list(tensors) + ([ws.mask] if ws.mask else [])
        for values in stream(ws.model, names, ws.ctx.data(ws.model), ws.ctx.providers):
            mask = values[ws.mask] if ws.mask else None
            for name, axis in tensors.items():
                x = np.asarray(values[name])
                real = positions(mask, x, axis)
                rows = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]).astype(np.float64)
                rows = rows if real is None else rows[real]
                if name not in acc:
                    k = rows.shape[1]
                    acc[name] = Moments(0, np.zeros(k), np.zeros((k, k)))
                acc[name].add(rows)
    out = {name: m.covariance() for name, m in acc.items() if m.n > 1}
    ws.ctx.cache[key] = out
    return out


@dataclass
class Consumer:
    """One consumer's OBS state: ``hinv`` (the damped inverse covariance, shrunk as inputs
    go) and ``p`` (W W' of the current weights), and the positions of each class."""

    hinv: np.ndarray
    p: np.ndarray
    where: list[np.ndarray]  # per class slot: its positions here (empty: not read here)

    @classmethod
    def of(cls, cov: np.ndarray, w: np.ndarray, slots: np.ndarray, n: int) -> Consumer:
        """From the input covariance, the weight rows [K, N] and each position's class slot."""
        k = len(cov)
        damp = DAMP * max(float(np.trace(cov)) / max(k, 1), 1e-12)
        hinv = np.linalg.inv(cov + damp * np.eye(k))
        where = [np.flatnonzero(slots == c) for c in range(n)]
        return cls(hinv, w @ w.T, where)

    def cost(self, c: int) -> float:
        """Output error per row of removing class ``c`` now (0 when it is not read here)."""
        b = self.where[c]
        if not len(b):
            return 0.0
        if len(b) == 1:
            i = int(b[0])
            return float(self.p[i, i] / max(self.hinv[i, i], 1e-30))
        m = self.hinv[np.ix_(b, b)]
        return float(np.trace(np.linalg.lstsq(m, self.p[np.ix_(b, b)], rcond=None)[0]))

    def costs(self, alive: np.ndarray) -> np.ndarray:
        """:meth:`cost` of every class (inf for the removed ones); classes one position wide
        at once."""
        out = np.full(len(self.where), np.inf)
        sizes = np.array([len(b) for b in self.where])
        one = np.flatnonzero(alive & (sizes == 1))
        if len(one):
            i = np.array([self.where[c][0] for c in one])
            out[one] = self.p[i, i] / np.maximum(self.hinv[i, i], 1e-30)
        for c in np.flatnonzero(alive & (sizes != 1)):
            out[c] = self.cost(int(c))
        return out

    def remove(self, classes: list[int]) -> None:
        """Remove ``classes``; the others' weights are re-solved (OBS update)."""
        b = np.concatenate([self.where[c] for c in classes]).astype(np.int64)
        if not len(b):
            return
        m = self.hinv[np.ix_(b, b)]
        u = np.linalg.lstsq(m, self.hinv[b], rcond=None)[0].T  # [K, |B|] = Hinv[:, B] M^-1
        t = u @ self.p[b]
        self.p -= t + t.T - u @ self.p[np.ix_(b, b)] @ u.T
        self.hinv -= u @ self.hinv[b]
        self.hinv[b] = 0.0
        self.hinv[:, b] = 0.0
        self.p[b] = 0.0
        self.p[:, b] = 0.0


def removal_order(consumers: list[Consumer], n: int) -> np.ndarray:
    """Greedy OBS over ``n`` classes: each class's position in the removal order (the last
    one standing scores ``n - 1``)."""
    score = np.full(n, float(n - 1))
    alive = np.ones(n, bool)
    per_round = max(1, n // ROUNDS)
    step = 0
    while alive.sum() > 1:
        cost = np.zeros(n)
        for c in consumers:
            cost += np.where(alive, c.costs(alive), 0.0)
        cost[~alive] = np.inf
        take = min(per_round, int(alive.sum()) - 1)
        gone = [int(i) for i in np.argsort(cost, kind="stable")[:take]]
        for i in gone:
            score[i] = step
            step += 1
        alive[gone] = False
        for c in consumers:
            c.remove(gone)
    return score


def _weight_rows(view: GroupView, sink: Sink) -> np.ndarray:
    w = np.moveaxis(view.value(sink.weight), sink.weight_axis, 0)
    return w.reshape(w.shape[0], -1)


@register_criterion("obs", needs_data=True)
def obs(view: GroupView) -> np.ndarray | None:
    """Greedy OBS order: the classes whose removal costs the consumers least once the other
    inputs are re-solved (ZipLM-style) go first."""
    ws = view.workspace
    if not isinstance(ws, Workspace):
        return None
    covs = covariances(ws)
    consumers = []
    for sink in view.an.sinks:
        slots = view.slots(sink.labels.ids)
        if sink.tensor in covs and (slots >= 0).any() and not sink.scope:
            w = _weight_rows(view, sink)
            consumers.append(Consumer.of(covs[sink.tensor], w, slots, len(view.classes)))
    read = np.zeros(len(view.classes), bool)
    for c in consumers:
        read |= np.array([len(b) > 0 for b in c.where])
    if not consumers or not read.all():  # a class no counted consumer reads: no fair order
        return None
    return removal_order(consumers, len(view.classes))
