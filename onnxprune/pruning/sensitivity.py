"""How much the whole model's outputs move when channel classes are pruned, judged on data.

A :class:`Judge` holds the original model's outputs on evaluation data and scores a choice of
classes by zeroing (and compensating) them in a copy and running it: the lowest mean
per-sample output cosine over the outputs and, with labels and a classifier-like first
output, the accuracy drop. :func:`sensitivity` is the user's table: each group pruned alone
at :data:`RATIOS` of its channels, everything else intact. :class:`Ladder` is one group's
order of removal (lowest standardised score first) and the counts it may be cut to.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxprune import progress
from onnxprune.analysis.groups import chosen_positions, classes_of, keep_one_per_tensor
from onnxprune.analysis.labels import ChannelGroup
from onnxprune.analysis.probe import probe_run
from onnxprune.cost import infer_shapes, node_macs
from onnxprune.data import Dataset
from onnxprune.graph import node_name
from onnxprune.pruning.free import free_first
from onnxprune.pruning.workspace import Workspace, zero_and_compensate
from onnxprune.runner import outputs, plan
from onnxprune.similarity import cosine_similarity

RATIOS = (0.25, 0.5, 0.75)  # shares of a group pruned alone in the sensitivity table
EVAL_SAMPLES = 2048  # evaluation samples a judge runs on (the first ones)


def per_sample_cosine(ref: np.ndarray, new: np.ndarray) -> np.ndarray:
    """:func:`~onnxprune.similarity.cosine_similarity` of each sample; a sample whose output
    is not finite counts -1, the worst."""
    finite = np.isfinite(ref.reshape(len(ref), -1)).all(1) & np.isfinite(
        new.reshape(len(new), -1)
    ).all(1)
    return np.where(finite, cosine_similarity(ref, new), -1.0)


@dataclass(frozen=True)
class Measure:
    """One judged choice: lowest output cosine, accuracy drop (None without labels); with
    labels also the paired counts against the original (``lost``: samples it got right and the
    choice gets wrong, ``gained``: the reverse, of ``samples``) and, for a classifier-like
    first output, ``agreement`` (share of samples whose argmax is the original's)."""

    cosine: float
    accuracy_drop: float | None
    lost: int = 0
    gained: int = 0
    samples: int = 0
    agreement: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures."""
        drop = None if self.accuracy_drop is None else round(self.accuracy_drop, 4)
        return {"cosine": round(self.cosine, 6), "accuracy_drop": drop}


@dataclass
class Judge:
    """Scores choices of classes on evaluation data against the original's outputs."""

    ws: Workspace
    data: Dataset
    compensate: bool
    reference: list[np.ndarray]
    labels: np.ndarray | None
    accuracy: float | None
    then: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None
    evaluations: int = 0
    seen: dict[frozenset[int], Measure] = field(default_factory=dict)  # choices judged

    @classmethod
    def open(
        cls,
        ws: Workspace,
        data: Dataset,
        compensate: bool,
        then: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None,
    ) -> Judge:
        """Run the (unpruned) workspace model once on ``data`` (its first
        :data:`EVAL_SAMPLES`); ``then`` is applied to every candidate before it is run."""
        data = data.head(EVAL_SAMPLES)
        reference = list(outputs(ws.model, data, ws.ctx.providers).values())
        covered = plan(ws.model, data).samples
        labels = None
        first = reference[0] if reference else None
        if data.labels is not None and first is not None and first.ndim == 2 and first.shape[1] > 1:
            labels = np.asarray(data.labels[:covered])
        acc = None if labels is None else float((reference[0].argmax(1) == labels).mean())
        return cls(ws, data, compensate, reference, labels, acc, then)

    @property
    def samples(self) -> int:
        """Samples each choice is judged on."""
        return len(self.reference[0]) if self.reference else 0

    def measure(self, classes: Collection[int]) -> Measure:
        """Zero ``classes`` in a copy (compensated when the judge is), run it, compare; a
        choice judged before is not run again."""
        key = frozenset(classes)
        if key not in self.seen:
            self.seen[key] = self._measure(classes)
        return self.seen[key]

    def _measure(self, classes: Collection[int]) -> Measure:
        if not classes:
            if self.labels is None:
                return Measure(1.0, None)
            return Measure(1.0, 0.0, 0, 0, len(self.labels), 1.0)
        trial = copy.deepcopy(self.ws.model)
        zero_and_compensate(
            self.ws, keep_one_per_tensor(self.ws.an, classes), self.compensate, trial
        )
        if self.then is not None:
            trial = self.then(trial)
        got = list(outputs(trial, self.data, self.ws.ctx.providers).values())
        self.evaluations += 1
        cosines = [
            float(np.mean(per_sample_cosine(r, g)))
            for r, g in zip(self.reference, got, strict=True)
        ]
        if self.labels is None or self.accuracy is None:
            return Measure(min(cosines), None)
        before, after = self.reference[0].argmax(1), got[0].argmax(1)
        right, now = before == self.labels, after == self.labels
        drop = self.accuracy - float(now.mean())
        lost, gained = int((right & ~now).sum()), int((~right & now).sum())
        agree = float((before == after).mean())
        return Measure(min(cosines), drop, lost, gained, len(self.labels), agree)


@dataclass
class Ladder:
    """One group's classes in order of removal and the counts it may be pruned to."""

    group: ChannelGroup
    order: list[int]  # free classes, lowest standardised score first
    scores: np.ndarray  # their standardised scores, ascending
    total: int  # classes of the group, pinned ones included
    steps: list[int] = field(default_factory=list)  # allowed counts, ascending, from 0

    def count(self, ratio: float) -> int:
        """The largest allowed count that prunes at most ``ratio`` of the group's classes."""
        fit = [k for k in self.steps if k <= ratio * self.total + 1e-9]
        return fit[-1] if fit else 0

    def take(self, count: int) -> set[int]:
        """The first ``count`` classes of the order."""
        return set(self.order[:count])


def ladders(
    ws: Workspace,
    plans: Sequence[Any],
    multiples: dict[int, tuple[int, int]],
    cap: float | Callable[[ChannelGroup], float],
) -> list[Ladder]:
    """Each voted group's :class:`Ladder`: the mean of its voters' standardised scores (as
    ``scope=global`` pools them), and counts that keep a multiple of the group's step and at
    least one step, pruning at most ``cap`` of the group (a share, or the group's share);
    0 (the group whole) is always one."""
    roots = ws.an.roots()
    out = []
    for g, classes, voters, free in plans:
        active = [s for s in (v.criterion.rank_scores(v.view) for v in voters) if s is not None]
        if not active or not len(classes):
            continue
        z = np.mean([(s - s.mean()) / (s.std() + 1e-12) for s in active], axis=0)
        z = free_first(z, free)  # zero or constant channels go first
        idx = np.argsort(z, kind="stable")
        total = len(classes_of(roots, g.spaces))
        step = max(1, multiples[g.index][0])
        share = cap(g) if callable(cap) else cap
        limit = min(len(classes), int(np.floor(share * total + 1e-9)), total - step)
        # 0 (the group whole) is always a step, even when its size is no multiple of the step
        steps = [0, *(k for k in range(1, limit + 1) if (total - k) % step == 0)]
        ladder = Ladder(g, classes[idx].tolist(), z[idx], total, steps)
        out.append(ladder)
    return out


class MacModel:
    """MACs of the weighted layers, estimated for a choice of classes before fold runs.

    A Conv, Gemm or MatMul costs its original MACs times the kept share of its input channels
    (its sinks) times the kept share of its output channels (its spaces); other nodes keep
    their MACs (attention products, for one, are not scaled).
    """

    def __init__(self, ws: Workspace) -> None:
        # per-sample shapes, as onnxprune.cost counts them; the probe's where inference falls
        # short (its shapes mix batch sizes, so it is used whole or not at all)
        nodes, inferred = ws.model.graph.node, infer_shapes(ws.model)
        per_sample = {node_name(n): node_macs(n, inferred) for n in nodes}
        probed = probe_run(ws.model, ws.ctx).shapes
        fallback = {node_name(n): node_macs(n, probed) for n in nodes}
        short = any(fallback[k] and not per_sample[k] for k in per_sample)
        self.roots = ws.an.roots()
        self.macs = fallback if short else per_sample
        self.total = sum(self.macs.values())
        self.sinks = [(node_name(s.node), s.labels.ids) for s in ws.an.sinks]
        self.spaces = [(sp.node, self.roots[sp.start : sp.start + sp.size]) for sp in ws.an.spaces]

    def ratio(self, classes: Collection[int]) -> float:
        """Estimated MACs after pruning ``classes``, over the original MACs."""
        if not self.total:
            return 1.0
        chosen = np.fromiter(classes, np.int64)
        share = dict.fromkeys(self.macs, 1.0)
        for name, ids in self.sinks:
            if name in share and (ids >= 0).any():
                gone = chosen_positions(self.roots, ids, chosen).sum()
                share[name] *= 1.0 - gone / max(int((ids >= 0).sum()), 1)
        for name, ids in self.spaces:
            if name in share and len(ids):
                share[name] *= 1.0 - float(np.isin(ids, chosen).mean())
        return sum(self.macs[n] * share[n] for n in self.macs) / self.total


def sensitivity(
    judge: Judge, ladders_: Sequence[Ladder], ratios: Sequence[float] = RATIOS
) -> dict[str, Any]:
    """Each group pruned alone at each of ``ratios`` (the largest allowed count at or below
    it), the others intact, judged on the judge's data: the JSON-ready sensitivity table."""
    rows = []
    with progress.task(len(ladders_) * len(ratios), "sensitivity") as advance:
        for lad in ladders_:
            points = []
            for r in ratios:
                k = lad.count(r)
                m = judge.measure(lad.take(k))
                points.append(
                    {"asked": r, "ratio": round(k / lad.total, 4), "pruned": k, **m.to_dict()}
                )
                advance()
            rows.append(
                {
                    "group": lad.group.index,
                    "layers": [sp.node for sp in lad.group.spaces],
                    "channels": lad.total,
                    "points": points,
                }
            )
    return {
        "ratios": list(ratios),
        "data": judge.data.source,
        "samples": judge.samples,
        "labels": judge.labels is not None,
        "groups": rows,
    }
