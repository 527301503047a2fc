"""What every structured pruning pass shares: analyse, measure, zero, compensate.

A pruning pass decides *which* channel classes go; this module does the rest the same way for
all of them: it prepares the model (Constant weights lifted, initializers unlisted as inputs),
runs the channel analysis, gathers activation statistics at the weighted consumers, zeroes the
chosen classes (:mod:`onnxprune.pruning.zero`) and, with calibration data, compensates each consumer's
bias for the mean contribution the pruned channels had.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxprune.analysis.groups import chosen_positions, classes_of
from onnxprune.analysis.labels import ChannelGroup, Sink
from onnxprune.analysis.probe import probe_run
from onnxprune.analysis.state import Analysis
from onnxprune.analysis.walk import analyse
from onnxprune.context import Context
from onnxprune.data import sample_count
from onnxprune.graph import (
    add_output_bias,
    allow_unlisted_initializers,
    attr,
    get_init,
    prepare_for_pruning,
)
from onnxprune.pruning.calibrate import (
    ChannelStats,
    activation_rows,
    activation_sample,
    calibration_batch,
)
from onnxprune.pruning.group_shares import group_names
from onnxprune.pruning.lsq import CHECK_ROWS, SinkRows
from onnxprune.pruning.masks import AUTO, mask_input
from onnxprune.pruning.zero import zero_classes


@dataclass
class Workspace:
    """A prepared model with its analysis, groups and (lazily) activation data."""

    model: onnx.ModelProto
    an: Analysis
    groups: list[ChannelGroup]
    ctx: Context
    _stats: dict[str, ChannelStats] | None = None
    _rows: dict[str, np.ndarray] | None = None
    protected: set[int] = field(default_factory=set)
    mask: str | None = None  # the padding-mask input statistics skip padding by
    _checks: dict[tuple[str, str], SinkRows | None] = field(default_factory=dict)
    probe_samples: int = 0  # samples of the probe run the analysis' shapes come from
    _reference: dict[str, np.ndarray] | None = None
    errors: dict[tuple[frozenset[int], str], float] = field(default_factory=dict)
    _halves: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    @classmethod
    def open(
        cls,
        model: onnx.ModelProto,
        ctx: Context,
        protect: str = "",
        mask: str = AUTO,
        who: str = "",
    ) -> Workspace:
        """Prepare ``model`` in place and analyse it; ``protect`` is a regex of node or
        initializer names whose groups must stay whole; ``mask`` chooses the padding-mask
        input (:func:`onnxprune.pruning.masks.mask_input`; ``who`` names the pass in its errors)."""
        prepare_for_pruning(model.graph)
        allow_unlisted_initializers(model)  # an IR < 4 model lists them all as inputs
        probe = probe_run(model, ctx)
        an = analyse(model, probe.shapes)
        ws = cls(model, an, an.groups(), ctx, mask=mask_input(model, mask, f"pass {who}"))
        if probe.inputs:  # the run's data (loaded by the probe) knows each input's sample axis
            data = ctx.data(model) if ctx.data_path is not None else None
            ws.probe_samples = (
                data.feed_samples(probe.inputs) if data is not None else sample_count(probe.inputs)
            )
        if protect:
            pattern = re.compile(protect)
            for g in ws.groups:
                if any(pattern.search(n) for n in group_names(g)):
                    ws.protected.add(g.index)
        return ws

    def free_classes(self, group: ChannelGroup) -> np.ndarray:
        """Unpinned classes of ``group`` (empty when it is protected)."""
        if group.index in self.protected:
            return np.zeros(0, dtype=np.int64)
        classes = classes_of(self.an.roots(), group.spaces)
        return np.array(sorted(classes - set(self.an.pinned_roots())), dtype=np.int64)

    def sink_tensors(self) -> dict[str, int]:
        """Consumer input tensors (name -> channel axis) where channels are read."""
        inside = self.an.branch_tensors  # made inside an If branch: no run exposes them
        return {s.tensor: s.labels.axis for s in self.an.sinks if s.tensor not in inside}

    def stats(self, outputs: int = 0) -> dict[str, ChannelStats]:
        """Activation statistics at every consumer input (computed once, shared via ctx; the
        same run samples :data:`~onnxprune.pruning.lsq.CHECK_ROWS` rows for :meth:`rows`
        and, with ``outputs``, keeps the model's outputs on that many first samples for
        :meth:`reference`), on batches of :meth:`batch_size` samples."""
        if self._stats is None:
            got = activation_sample(
                self.ctx,
                self.model,
                self.sink_tensors(),
                progress=True,
                mask=self.mask,
                rows=CHECK_ROWS,
                outputs=outputs,
                batch_size=self.batch_size(),
            )
            self._stats = got.stats
            if got.rows is not None:
                self._rows = got.rows
            self._reference = got.outputs
        return self._stats

    def batch_size(self) -> int | None:
        """Samples per calibration batch: :func:`~onnxprune.pruning.calibrate.calibration_batch`
        of the consumer inputs' bytes per sample (float32, from the probe's shapes); None
        (the runner's default) when the probe gave no samples."""
        if self.probe_samples < 1:
            return None
        shapes = [self.an.shapes.get(t) for t in self.sink_tensors()]
        if any(s is None or any(int(d) < 1 for d in s) for s in shapes):
            return None  # a shape the probe did not give: the runner's default
        elements = sum(int(np.prod(s)) for s in shapes if s is not None)
        return calibration_batch(4 * elements / self.probe_samples)

    def reference(self, samples: int) -> list[np.ndarray] | None:
        """The model's outputs on its first ``samples`` samples, from the statistics' run
        (None when it did not keep them: :func:`~onnxprune.pruning.calibrate.collect_sample`)."""
        got = self._reference
        if got is None or any(len(v) != samples for v in got.values()):
            return None
        return list(got.values())

    def rows(self) -> dict[str, np.ndarray]:
        """Sampled activation vectors [rows, C] at every consumer input."""
        if self._rows is None:
            self._rows = activation_rows(
                self.ctx, self.model, self.sink_tensors(), CHECK_ROWS, mask=self.mask
            )
        return self._rows

    def halves(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """:func:`half_means` of the sampled rows of every consumer input with at least 4 rows
        (computed once: every choice compensated in this workspace uses them)."""
        if self._halves is None:
            self._halves = {t: half_means(x) for t, x in self.rows().items() if len(x) >= 4}
        return self._halves

    def check_rows(self, sink: Sink) -> SinkRows | None:
        """The voter check's rows of one consumer (None without rows or a float weight)."""
        key = (sink.tensor, sink.weight)
        if key not in self._checks:
            rows = self.rows()
            weight = self.an.array(sink.weight)  # a quantized weight: its real value
            check = None
            if sink.tensor in rows and weight is not None:
                w = np.moveaxis(np.asarray(weight, np.float64), sink.weight_axis, 0)
                check = SinkRows.of(rows[sink.tensor], w.reshape(w.shape[0], -1), self.ctx.seed)
            self._checks[key] = check
        return self._checks[key]


def round_count(total: int, free: int, sparsity: float, round_to: int) -> int:
    """How many of ``free`` classes to prune from a group of ``total`` channels.

    The kept count is ``total * (1 - sparsity)`` rounded up to a multiple of ``round_to``
    (never below ``round_to``, never all channels); fewer when not enough classes are free.
    """
    if total <= 1 or free == 0:
        return 0
    r = max(1, round_to)
    kept = int(np.ceil(total * (1.0 - sparsity) / r - 1e-9)) * r
    kept = min(total, max(kept, r, 1))
    k = min(total - kept, free)
    while k > 0 and (total - k) % r:
        k -= 1
    return k


def class_multiples(
    an: Analysis, groups: list[ChannelGroup], round_to: int
) -> dict[int, tuple[int, int]]:
    """Group index -> (classes to prune at a time, channels per class) under ``round_to``.

    ``round_to`` counts channels of the tensors the runtime sees: producer outputs (spaces) and
    weighted consumer inputs (sinks). A class that spans ``w`` channels in every such tensor (an
    attention head of size ``w``, one group of a grouped convolution) keeps those counts
    multiples of ``round_to`` when the kept classes are a multiple of ``round_to / gcd(round_to,
    w)``, the least common multiple over the tensors: a 4-head group of head size 8 can lose
    heads one at a time at ``round_to`` 8, two at a time at 16. A class of uneven width counts
    as one channel (classes at a time = ``round_to``).
    """
    r = max(1, round_to)
    roots = an.roots()
    owner = {int(c): g.index for g in groups for c in classes_of(roots, g.spaces)}
    widths: dict[int, set[int]] = {g.index: set() for g in groups}
    tensors = [roots[s.start : s.start + s.size] for s in an.spaces]
    tensors += [roots[sink.labels.ids[sink.labels.ids >= 0]] for sink in an.sinks]
    for arr in tensors:
        values, counts = np.unique(arr, return_counts=True)
        seen: dict[int, set[int]] = {}
        for v, c in zip(values.tolist(), counts.tolist(), strict=True):
            if v in owner:
                seen.setdefault(owner[v], set()).add(c)
        for index, cs in seen.items():
            widths[index].add(cs.pop() if len(cs) == 1 else 0)  # 0: uneven widths
    out = {}
    for index, ws in widths.items():
        if not ws or 0 in ws or ws == {1}:
            out[index] = (r, 1)
        else:
            out[index] = (math.lcm(*(r // math.gcd(r, w) for w in ws)), min(ws))
    return out


def allowed_count(total: int, k: int, round_to: int) -> int:
    """The largest count <= k whose remainder keeps ``total - count`` a multiple of round_to."""
    r = max(1, round_to)
    while k > 0 and (total - k) % r:
        k -= 1
    return k


def reconstruction_error(ws: Workspace, classes: set[int], mode: str = "lsq") -> float:
    """How much the consumers' outputs change, per row, when ``classes`` are removed: after
    bias compensation (``mean``) or after a least-squares refit of the remaining channels
    measured on held-out rows (``lsq``); :mod:`onnxprune.pruning.lsq` states the rules and
    the caps (rows, sketch). Computed once per choice and mode (``ws.errors``): the vote's
    pick is often one voter's choice."""
    if not classes:
        return 0.0
    key = (frozenset(classes), mode)
    if key in ws.errors:
        return ws.errors[key]
    roots = ws.an.roots()
    chosen = np.array(sorted(classes))
    total = 0.0
    for sink in ws.an.sinks:
        gone = chosen_positions(roots, sink.labels.ids, chosen)
        check = ws.check_rows(sink) if gone.any() else None
        if check is not None:
            total += check.error(gone, mode)
    ws.errors[key] = total
    return total


def zero_and_compensate(
    ws: Workspace,
    classes: Collection[int],
    compensate: bool,
    model: onnx.ModelProto | None = None,
    after: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Zero ``classes`` in ``model`` (default: the workspace's own, or a copy of it); with
    ``compensate``, move their mean contribution into the biases.

    After zeroing, a channel may still be a constant ``c`` at its consumer (a sigmoid of 0); the
    compensation adds ``(mean - c) * W`` so that, after fold moves ``c * W`` too, the consumer
    receives the channel's calibration mean. A consumer is compensated only when that helps on
    rows it was not estimated from (:func:`compensation_helps`); the others are listed in
    ``compensation_rejected``. ``after``: the values the zeroed channels have at their
    consumers (:func:`zeroed_values` of these classes or more), when already known.
    """
    target = ws.model if model is None else model
    if not classes:
        return {"zeroed_entries": 0, "compensated_consumers": 0}
    means: dict[str, np.ndarray] = {}
    halves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if compensate:
        means = {t: s.mean for t, s in ws.stats().items()}
        halves = ws.halves()
    zeroed = zero_classes(target, ws.an, classes)
    done = 0
    rejected: list[str] = []
    if compensate:
        after = probe_run(target, ws.ctx).values if after is None else after
        roots = ws.an.roots()
        chosen = np.array(sorted(classes))
        for sink in ws.an.sinks:
            outcome = _compensate_sink(target.graph, sink, roots, chosen, means, after, halves)
            done += outcome is True
            if outcome is None:
                rejected.append(sink.node.name or sink.node.output[0])
    applied: dict[str, Any] = {"zeroed_entries": zeroed, "compensated_consumers": done}
    if rejected:
        applied["compensation_rejected"] = rejected
    return applied


def zeroed_values(ws: Workspace, classes: Collection[int]) -> dict[str, np.ndarray]:
    """The probe's values of a copy of the model with ``classes`` zeroed: what each zeroed
    channel is at its consumers (0, or a constant such as a sigmoid of 0), for any subset of
    ``classes`` (a zeroed channel's value there depends on its own class only)."""
    trial = onnx.ModelProto()
    trial.CopyFrom(ws.model)
    zero_classes(trial, ws.an, classes)
    return probe_run(trial, ws.ctx).values


def compensation_helps(x: np.ndarray, now: np.ndarray, w: np.ndarray, seed: int = 0) -> bool:
    """Whether moving removed channels' mean into the bias lowers the consumer's error on
    held-out rows: the mean of one half of the sampled rows ``x`` [R, |S|] (the removed
    channels' values) against the constant ``now`` they have after zeroing, judged on the
    other half through the weight rows ``w`` [|S|, outputs]: ``E ||(x - a) W||^2`` there is
    ``||(m_B - a) W||^2`` plus a part that does not depend on ``a``."""
    if len(x) < 4:
        return True
    m_a, m_b = half_means(x, seed)
    return helps(m_a, m_b, now, w)


def half_means(x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel means of the two random halves of the rows ``x`` that
    :func:`compensation_helps` compares (the same halves for every subset of channels)."""
    order = np.random.default_rng(seed).permutation(len(x))
    half = len(x) // 2
    return x[order[:half]].mean(axis=0), x[order[half:]].mean(axis=0)


def helps(m_a: np.ndarray, m_b: np.ndarray, now: np.ndarray, w: np.ndarray) -> bool:
    """:func:`compensation_helps` from the two halves' means (:func:`half_means`)."""
    with_mean = np.linalg.norm((m_b - m_a) @ w)
    without = np.linalg.norm((m_b - now) @ w)
    return bool(with_mean < without)


def _compensate_sink(
    graph: onnx.GraphProto,
    sink: Sink,
    roots: np.ndarray,
    chosen: np.ndarray,
    means: dict[str, np.ndarray],
    after: dict[str, np.ndarray],
    halves: dict[str, tuple[np.ndarray, np.ndarray]],
) -> bool | None:
    """Compensate one consumer: True when done, False when it does not apply, None when the
    held-out check rejected it."""
    ids = sink.labels.ids
    pos = np.flatnonzero(chosen_positions(roots, ids, chosen))
    if (
        not len(pos)
        or sink.tensor not in means
        or bool(sink.scope)  # inside an If branch: its bias stays as it is
        or sink.node.op_type not in ("Conv", "Gemm", "MatMul")
        or not any(t.name == sink.weight for t in graph.initializer)  # quantized: not exact
    ):
        return False
    now = np.zeros(len(pos))
    if sink.tensor in after:
        flat = np.moveaxis(after[sink.tensor], sink.labels.axis, 0).reshape(len(ids), -1)
        now = flat[pos, 0].astype(np.float64)
    shift = means[sink.tensor][pos] - now
    if not np.any(shift):
        return False
    w = get_init(graph, sink.weight)
    wk = np.moveaxis(np.take(w, pos, axis=sink.weight_axis).astype(np.float64), sink.weight_axis, 0)
    delta = np.tensordot(shift, wk, axes=(0, 0))
    if sink.node.op_type == "Conv":
        delta = delta.reshape(delta.shape[0], -1).sum(axis=1)
    if sink.node.op_type == "Gemm" and attr(sink.node, "transA", 0):
        return False
    if sink.node.op_type == "MatMul" and w.ndim > 2:
        return False  # a batched weight would need a per-batch bias
    if sink.tensor in halves:  # the held-out check (compensation_helps) on these channels
        m_a, m_b = halves[sink.tensor]
        if not helps(m_a[pos], m_b[pos], now, wk.reshape(len(pos), -1)):
            return None
    # the sink's node in ``graph`` (which may be a copy of the analysed model)
    node = next(n for n in graph.node if n.output[0] == sink.node.output[0])
    add_output_bias(graph, node, delta.astype(w.dtype))
    return True
