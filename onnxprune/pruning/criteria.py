"""Channel criteria: one score per channel class of a group, from weights or activations.

A criterion is a small named function ``(view) -> np.ndarray | None`` that returns one raw
statistic per free class of a group (``None`` when it does not apply there, e.g. ``bn`` on a
group without BatchNormalization). Its ``sign`` says which way is important: ranking uses
``sign * value`` (higher = keep), thresholds (the ``stats`` pass) use the raw value.

New criteria plug in with :func:`register_criterion`, like passes do with ``register_pass``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxprune.analysis.dequant import dequantize
from onnxprune.analysis.labels import Member, Role
from onnxprune.analysis.state import Analysis
from onnxprune.errors import OnnxPruneError, PassOptionError
from onnxprune.pruning.calibrate import ChannelStats

ArrayGetter = Callable[[str], np.ndarray]


@dataclass
class GroupView:
    """What a criterion sees of one group.

    Attributes:
        an: the channel analysis of the model.
        classes: the group's free (unpinned) channel classes, as union-find roots.
        array: initializer name -> value (lets ensemble members vote with their own weights).
        stats: activation statistics of each sink input tensor (empty without calibration).
        seed: for the random baseline.
        workspace: the main model's workspace, for criteria that run the model (``obs``);
            None for ensemble members and outside ``vote``.
    """

    an: Analysis
    classes: np.ndarray
    array: ArrayGetter
    stats: dict[str, ChannelStats] = field(default_factory=dict)
    seed: int = 0
    workspace: Any = None

    def __post_init__(self) -> None:
        self._roots = self.an.roots()
        # slot of every channel id, by its class: one array lookup per position in slots()
        by_root = np.full(len(self._roots), -1, dtype=np.int64)
        classes = np.asarray(self.classes, dtype=np.int64)
        by_root[classes] = np.arange(len(classes))
        self._slot_of_id = by_root[self._roots]

    def slots(self, ids: np.ndarray) -> np.ndarray:
        """Index into ``classes`` of each position's class (-1: not in this group's free set)."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.full(len(ids), -1, dtype=np.int64)
        labelled = ids >= 0
        out[labelled] = self._slot_of_id[ids[labelled]]
        return out

    def average(self, pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray | None:
        """Per-class mean of per-position values, from (ids, values) pairs; None if no position
        of this group occurs (the criterion abstains).

        A class read at several positions (a flattened channel, a residual stream with several
        producers) gets the mean, so values keep their scale for thresholds.
        """
        total = np.zeros(len(self.classes))
        count = np.zeros(len(self.classes))
        for ids, values in pairs:
            slots = self.slots(ids)
            mask = slots >= 0
            np.add.at(total, slots[mask], values[mask])
            np.add.at(count, slots[mask], 1)
        if not count.any():
            return None
        return np.divide(total, count, out=np.zeros_like(total), where=count > 0)

    def members(self, role: Role) -> list[Member]:
        """Members with ``role`` that touch this group's classes."""
        return [m for m in self.an.members if m.role == role and (self.slots(m.ids) >= 0).any()]

    def value(self, name: str) -> np.ndarray:
        """Real value of a weight, as float64: an initializer, or a quantized one read as
        ``scale * (q - zero_point)`` (both by name: the output of its DequantizeLinear, or
        its quantized data), so magnitudes are those the model computes with."""
        d = self.an.dequantized.get(name) or self.an.quantized_data.get(name)
        arr = self.array(name) if d is None else dequantize(d, self.array)
        return np.asarray(arr, dtype=np.float64)

    def rows(self, m: Member) -> np.ndarray:
        """The member's slices (real values, :meth:`value`) as a float64 matrix
        [positions, elements]."""
        arr = self.value(m.init)
        return np.moveaxis(arr, m.axis, 0).reshape(arr.shape[m.axis], -1)


@dataclass(frozen=True)
class Criterion:
    """A named per-channel statistic; ``sign`` +1: larger is more important."""

    name: str
    fn: Callable[[GroupView], np.ndarray | None]
    sign: float = 1.0
    needs_data: bool = False
    summary: str = ""

    def rank_scores(self, view: GroupView) -> np.ndarray | None:
        """Scores where higher means keep, or None when the criterion abstains."""
        raw = self.fn(view)
        return None if raw is None else self.sign * raw


CRITERIA: dict[str, Criterion] = {}


def register_criterion(
    name: str, *, sign: float = 1.0, needs_data: bool = False
) -> Callable[[Callable[[GroupView], np.ndarray | None]], Callable]:
    """Decorator: register ``fn(view) -> per-class values`` as criterion ``name``.

    Raises:
        OnnxPruneError: ``name`` is already registered.
    """

    def wrap(fn: Callable[[GroupView], np.ndarray | None]) -> Callable:
        if name in CRITERIA:
            raise OnnxPruneError(f"criterion {name!r} is registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        CRITERIA[name] = Criterion(name, fn, sign, needs_data, doc[0] if doc else "")
        return fn

    return wrap


def get_criterion(name: str, where: str = "") -> Criterion:
    """The criterion called ``name``.

    Raises:
        PassOptionError: unknown name (the message lists the known ones).
    """
    if name not in CRITERIA:
        prefix = f"{where}: " if where else ""
        raise PassOptionError(
            f"{prefix}unknown criterion {name!r}; known: {', '.join(sorted(CRITERIA))}"
        )
    return CRITERIA[name]


def _weight_stat(view: GroupView, stat: Callable[[np.ndarray], np.ndarray]) -> np.ndarray | None:
    return view.average([(m.ids, stat(view.rows(m))) for m in view.members("weight")])


@register_criterion("l1")
def l1(view: GroupView) -> np.ndarray | None:
    """Mean |w| of each producer filter or neuron (L1 norm normalised by its size)."""
    return _weight_stat(view, lambda r: np.abs(r).mean(axis=1))


@register_criterion("l2")
def l2(view: GroupView) -> np.ndarray | None:
    """Root-mean-square of each producer filter or neuron (L2 norm normalised by its size)."""
    return _weight_stat(view, lambda r: np.sqrt((r * r).mean(axis=1)))


@register_criterion("mean")
def weight_mean(view: GroupView) -> np.ndarray | None:
    """|mean| of each producer filter or neuron's weights."""
    return _weight_stat(view, lambda r: np.abs(r.mean(axis=1)))


@register_criterion("std")
def weight_std(view: GroupView) -> np.ndarray | None:
    """Standard deviation of each producer filter or neuron's weights."""
    return _weight_stat(view, lambda r: r.std(axis=1))


@register_criterion("bn")
def bn_scale(view: GroupView) -> np.ndarray | None:
    """|gamma| of the BatchNormalization after the channel (network slimming)."""
    return view.average([(m.ids, np.abs(view.rows(m)[:, 0])) for m in view.members("scale")])


def _per_class(view: GroupView, ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Sum of per-position ``values`` for each class of this group (0 where absent)."""
    out = np.zeros(len(view.classes))
    slots = view.slots(ids)
    mask = slots >= 0
    np.add.at(out, slots[mask], values[mask])
    return out


def _consumer_norms(view: GroupView, power: float = 2.0) -> dict[str, np.ndarray]:
    """Per sink tensor and class: the L-``power`` norm of all consumer weights reading it."""
    norms: dict[str, np.ndarray] = {}
    for sink in view.an.sinks:
        if not (view.slots(sink.labels.ids) >= 0).any():
            continue
        rows = np.moveaxis(view.value(sink.weight), sink.weight_axis, 0)
        rows = rows.reshape(rows.shape[0], -1)
        powered = _per_class(view, sink.labels.ids, (np.abs(rows) ** power).sum(axis=1))
        norms[sink.tensor] = norms.get(sink.tensor, 0) + powered
    return {t: n ** (1.0 / power) for t, n in norms.items()}


@register_criterion("consumer")
def consumer(view: GroupView) -> np.ndarray | None:
    """L2 norm of the next layer's input weights that read the channel."""
    members = view.members("consumer")
    if not members:
        return None
    per_member = [
        np.sqrt(_per_class(view, m.ids, (view.rows(m) ** 2).sum(axis=1))) for m in members
    ]
    return np.mean(per_member, axis=0)


@register_criterion("random")
def random(view: GroupView) -> np.ndarray | None:
    """Random scores: the baseline every other criterion should beat."""
    first = int(view.classes[0]) if len(view.classes) else 0
    return np.random.default_rng([view.seed, first]).random(len(view.classes))


def _class_stats(view: GroupView, ids: np.ndarray, stats: ChannelStats) -> tuple[np.ndarray, dict]:
    """Merge the per-position statistics of each class of this group (a flattened channel is
    read at several positions of one tensor): its slots and merged moments."""
    slots = view.slots(ids)
    mask = slots >= 0
    k = len(view.classes)
    n = np.zeros(k)
    total = np.zeros(k)
    sumsq = np.zeros(k)
    zeros = np.zeros(k)
    count = np.broadcast_to(np.asarray(stats.count, np.float64), ids.shape)
    np.add.at(n, slots[mask], count[mask])
    np.add.at(total, slots[mask], stats.sum[mask])
    np.add.at(sumsq, slots[mask], stats.sumsq[mask])
    np.add.at(zeros, slots[mask], stats.zeros[mask])
    present = n > 0
    mean = np.divide(total, n, out=np.zeros(k), where=present)
    # Chan: within-position spread plus the spread of position means around the class mean
    spread = np.zeros(k)
    within = stats.var * count
    between = count * (stats.mean - mean[np.maximum(slots, 0)]) ** 2
    np.add.at(spread, slots[mask], (within + between)[mask])
    merged = {
        "mean": mean,
        "var": np.divide(spread, n, out=np.zeros(k), where=present),
        "rms": np.sqrt(np.divide(sumsq, n, out=np.zeros(k), where=present)),
        "apoz": np.divide(zeros, n, out=np.zeros(k), where=present),
    }
    return present, merged


def _activation(
    view: GroupView, per_tensor: Callable[[str, dict], np.ndarray | None]
) -> np.ndarray | None:
    """Mean over the tensors reading each class of ``per_tensor(tensor, merged class stats)``."""
    total = np.zeros(len(view.classes))
    count = np.zeros(len(view.classes))
    for tensor, stats in view.stats.items():
        lab = view.an.labels.get(tensor)
        if lab is None:
            continue
        present, merged = _class_stats(view, lab.ids, stats)
        values = per_tensor(tensor, merged) if present.any() else None
        if values is not None:
            total[present] += values[present]
            count[present] += 1
    if not count.any():
        return None
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0)


@register_criterion("act_mean", needs_data=True)
def act_mean(view: GroupView) -> np.ndarray | None:
    """|mean| activation of the channel where the next layer reads it."""
    return _activation(view, lambda _t, s: np.abs(s["mean"]))


@register_criterion("act_var", needs_data=True)
def act_var(view: GroupView) -> np.ndarray | None:
    """Variance ("fluctuation") of the channel's activation."""
    return _activation(view, lambda _t, s: s["var"])


@register_criterion("act_std", needs_data=True)
def act_std(view: GroupView) -> np.ndarray | None:
    """Standard deviation of the channel's activation."""
    return _activation(view, lambda _t, s: np.sqrt(s["var"]))


@register_criterion("act_l2", needs_data=True)
def act_l2(view: GroupView) -> np.ndarray | None:
    """Root-mean-square of the channel's activation."""
    return _activation(view, lambda _t, s: s["rms"])


@register_criterion("apoz", sign=-1.0, needs_data=True)
def apoz(view: GroupView) -> np.ndarray | None:
    """Share of exact zeros in the channel's activation (after ReLU-like ops); high = prune."""
    return _activation(view, lambda _t, s: s["apoz"])


@register_criterion("flap", needs_data=True)
def flap(view: GroupView) -> np.ndarray | None:
    """FLAP fluctuation: activation variance x squared norm of the consumer weights reading it."""
    norms = _consumer_norms(view)
    return _activation(view, lambda t, s: s["var"] * norms[t] ** 2 if t in norms else None)


@register_criterion("wanda", needs_data=True)
def wanda(view: GroupView) -> np.ndarray | None:
    """Wanda for channels: ||X_j|| x sum of |consumer weights| reading channel j."""
    norms = _consumer_norms(view, power=1.0)
    return _activation(view, lambda t, s: s["rms"] * norms[t] if t in norms else None)


def rank_normalise(scores: np.ndarray) -> np.ndarray:
    """Scores mapped to [0, 1] by rank (ties share their mean rank): scale-free averaging."""
    n = len(scores)
    if n < 2:
        return np.zeros(n)
    order = scores.argsort(kind="stable")
    ordered = scores[order]
    # runs of equal values in sorted order: each gets the mean of its ranks, (first + last) / 2
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], n]
    ranks = np.empty(n)
    ranks[order] = np.repeat((starts + ends - 1) / 2.0, ends - starts)
    return ranks / (n - 1)
