"""Weight-space fusion: one model whose parameters are the mean of several checkpoints of one
architecture, after each checkpoint's channels are permuted to match the first's.

Channels of a group may be permuted freely when every tensor tied to them moves with them: the
channel analysis lists those tensors (its *members*: producers' output axis, consumers' input
axis, BN and bias vectors), and :mod:`onnxprune.fusion.channels` the classes a permutation may
exchange. Alignment is weight matching (git re-basin): per set of interchangeable classes, the
assignment that maximises the inner product of the members' slices with the first model's,
coordinate ascent over the sets for a few rounds, started from a match of each slice's sorted
values (blind to the other sets' order, so a permuted copy is found at once); or, with data,
activation matching (:mod:`onnxprune.fusion.activations`). Every aligned checkpoint is checked
to compute what it computed before.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.data import Dataset
from onnxprune.errors import ArchitectureMismatch, ArgumentError
from onnxprune.fusion.activations import align_by_activations
from onnxprune.fusion.assignment import BACKEND, best_assignment
from onnxprune.fusion.channels import ClassSet, features, interchangeable_sets, permute
from onnxprune.fusion.repair import repair
from onnxprune.runtime import session
from onnxprune.synthesis import synthesize

ROUNDS = 10
"""Rounds of coordinate ascent over the sets of interchangeable classes (re-basin uses a few)."""

CHECK_SAMPLES = 4
"""Synthetic samples an aligned checkpoint is run on against its unaligned self."""


def merge_weights(
    models: Sequence[onnx.ModelProto],
    align: bool = True,
    *,
    names: Sequence[str] | None = None,
    rounds: int = ROUNDS,
    seed: int = 0,
    data: Dataset | None = None,
    match: Literal["weights", "activations"] = "weights",
    repair_with_data: bool = True,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The first model's graph with every float parameter averaged over ``models`` (none is
    modified), after permuting each checkpoint's channels onto the first's when ``align``.

    The models must share one architecture: the same nodes, inputs and outputs, initializers
    of the same names, shapes and types, and equal non-float initializers (else
    :class:`~onnxprune.errors.ArchitectureMismatch` names the first difference, with ``names``
    for the models when given). Identical checkpoints give back the first exactly. The dict
    has, per set of aligned classes, the mean correlation of matched channels with the first
    model's before and after alignment (one figure per other model), and the sets not aligned
    with why. With ``data``, the merged model's hidden producers are then rescaled on it
    so that their channels' statistics are the members' mean (REPAIR:
    :func:`~onnxprune.fusion.repair.repair`; identical checkpoints then come back to float
    rounding only; ``repair_with_data=False`` skips it). ``match="activations"`` aligns by the correlation of the channels'
    activations on ``data`` instead (:mod:`onnxprune.fusion.activations`; needs ``data``).

    Example::

        merged, stats = merge_weights([onnxprune.load(p) for p in paths])
    """
    if len(models) < 2:
        raise ArgumentError(f"merge_weights: needs at least two models, got {len(models)}")
    labels = list(names) if names is not None else [f"model {i + 1}" for i in range(len(models))]
    if len(labels) != len(models):
        raise ArgumentError(f"merge_weights: {len(labels)} names for {len(models)} models")
    if match not in ("weights", "activations"):
        raise ArgumentError(f"merge_weights: match must be weights or activations, not {match!r}")
    if match == "activations" and data is None:
        raise ArgumentError("merge_weights: match='activations' needs data")
    for i, m in enumerate(models[1:], 1):
        check_same_architecture(models[0], m, labels[0], labels[i])
    arrays = [float_initializers(m) for m in models]
    stats: dict[str, Any] = {"align": align, "models": labels, "sets": [], "not_aligned": []}
    if align:
        stats["match"] = match
    if align:
        sets, skipped = interchangeable_sets(models[0], arrays[0], seed)
        stats["assignment"] = BACKEND
        stats["not_aligned"] = skipped
        stats["sets"] = [
            {
                "group": s.group,
                "channels": len(s.classes),
                "members": sorted({x.init for x in s.slots}),
            }
            for s in sets
        ]
        for s in stats["sets"]:
            s["correlation_before"], s["correlation_after"] = [], []
        stats["verified"] = []
        for b in range(1, len(models)):
            before = [matched_correlation(s, arrays[0], arrays[b]) for s in sets]
            if match == "activations" and data is not None:
                aligned = align_by_activations(models[0], models[b], arrays[b], sets, data)
                used = 1
            else:
                aligned, used = align_to(arrays[0], arrays[b], sets, rounds)
            ok = same_outputs(models[b], aligned, seed)
            if ok:
                arrays[b] = aligned
            after = [matched_correlation(s, arrays[0], arrays[b]) for s in sets]
            for entry, x, y in zip(stats["sets"], before, after, strict=True):
                entry["correlation_before"].append(round(x, 6))
                entry["correlation_after"].append(round(y, 6))
            stats["verified"].append(ok)
            stats.setdefault("rounds", []).append(used)
    merged = copy.deepcopy(models[0])
    for k, t in enumerate(merged.graph.initializer):
        if t.name not in arrays[0]:
            continue
        values = [a[t.name] for a in arrays]
        if all(np.array_equal(values[0], v) for v in values[1:]):
            continue  # the first model's tensor, untouched
        mean = np.mean(np.stack(values).astype(np.float64), axis=0).astype(values[0].dtype)
        merged.graph.initializer[k].CopyFrom(numpy_helper.from_array(mean, t.name))
    if data is not None and repair_with_data:
        checkpoints = [with_params(m, a) for m, a in zip(models, arrays, strict=True)]
        stats["repaired"] = repair(merged, checkpoints, data)
    return merged, stats


def check_same_architecture(
    first: onnx.ModelProto, other: onnx.ModelProto, first_name: str, name: str
) -> None:
    """Raise :class:`ArchitectureMismatch` at the first difference between the two graphs
    that averaging parameters cannot bridge."""
    a, b = first.graph, other.graph

    def fail(what: str) -> None:
        raise ArchitectureMismatch(
            f"merge_weights: {name} is not the architecture of {first_name}: {what}"
        )

    for kind, xs, ys in (("input", a.input, b.input), ("output", a.output, b.output)):
        if [x.name for x in xs] != [y.name for y in ys]:
            fail(f"graph {kind}s {[y.name for y in ys]} != {[x.name for x in xs]}")
    if len(a.node) != len(b.node):
        fail(f"{len(b.node)} nodes, {first_name} has {len(a.node)}")
    for i, (x, y) in enumerate(zip(a.node, b.node, strict=True)):
        label = f"node {i} ({x.name or x.op_type})"
        if (x.op_type, x.domain) != (y.op_type, y.domain):
            fail(f"{label} is {y.op_type}, not {x.op_type}")
        if list(x.input) != list(y.input) or list(x.output) != list(y.output):
            fail(
                f"{label} reads {list(y.input)} -> {list(y.output)}, not {list(x.input)} -> {list(x.output)}"
            )
        xa = {t.name: t.SerializeToString() for t in x.attribute}
        ya = {t.name: t.SerializeToString() for t in y.attribute}
        if xa != ya:
            diff = sorted(k for k in set(xa) | set(ya) if xa.get(k) != ya.get(k))
            fail(f"{label} attribute {diff[0]!r} differs (lift Constant weights with -p cleanup)")
    xi = {t.name: t for t in a.initializer}
    yi = {t.name: t for t in b.initializer}
    if set(xi) != set(yi):
        odd = sorted(set(xi) ^ set(yi))[0]
        fail(f"initializer {odd!r} is in only one of them")
    for n, t in xi.items():
        u = yi[n]
        if list(t.dims) != list(u.dims) or t.data_type != u.data_type:
            fail(
                f"initializer {n!r} is {onnx.helper.tensor_dtype_to_np_dtype(u.data_type)}"
                f"{list(u.dims)}, not {onnx.helper.tensor_dtype_to_np_dtype(t.data_type)}{list(t.dims)}"
            )
        x_arr = numpy_helper.to_array(t)
        if not np.issubdtype(x_arr.dtype, np.floating) and not np.array_equal(
            x_arr, numpy_helper.to_array(u)
        ):
            fail(f"non-float initializer {n!r} has other values")


def float_initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every floating-point initializer of the main graph, by name."""
    out = {}
    for t in model.graph.initializer:
        arr = numpy_helper.to_array(t)
        if np.issubdtype(arr.dtype, np.floating):
            out[t.name] = arr
    return out


def similarity(
    ref: dict[str, np.ndarray], other: dict[str, np.ndarray], cset: ClassSet, *, sort: bool
) -> np.ndarray:
    """[classes, classes]: summed inner products of the members' slices (of their sorted
    values with ``sort``), ``ref``'s classes by rows, ``other``'s by columns."""
    n = len(cset.classes)
    out = np.zeros((n, n))
    for slot in cset.slots:
        a, b = features(ref[slot.init], slot), features(other[slot.init], slot)
        if sort:
            a, b = np.sort(a, axis=1), np.sort(b, axis=1)
        out += a @ b.T
    return out


def align_to(
    ref: dict[str, np.ndarray],
    other: dict[str, np.ndarray],
    sets: list[ClassSet],
    rounds: int = ROUNDS,
) -> tuple[dict[str, np.ndarray], int]:
    """``other``'s parameters with each set's classes permuted to match ``ref``'s, and the
    rounds used: coordinate ascent from the order as it is and from a match of sorted values,
    whichever ends with the larger summed similarity."""
    best: tuple[float, dict[str, np.ndarray], int] | None = None
    for sort_first in (False, True):
        out, used = ascend(ref, other, sets, rounds, sort_first)
        total = sum(float(np.trace(similarity(ref, out, c, sort=False))) for c in sets)
        if best is None or total > best[0] * (1 + 1e-12) + 1e-12:
            best = (total, out, used)
    assert best is not None
    return best[1], best[2]


def ascend(
    ref: dict[str, np.ndarray],
    other: dict[str, np.ndarray],
    sets: list[ClassSet],
    rounds: int,
    sort_first: bool,
) -> tuple[dict[str, np.ndarray], int]:
    """Weight matching, one set at a time, until a round changes nothing (at most
    ``rounds``); with ``sort_first``, a first round on sorted values. A permutation is taken
    only when it raises the set's matched similarity."""
    out = dict(other)
    used = 0
    for r in range(rounds + int(sort_first)):
        changed = False
        for cset in sets:
            sim = similarity(ref, out, cset, sort=sort_first and r == 0)
            perm = best_assignment(sim)
            gain = float(sim[np.arange(len(perm)), perm].sum() - np.trace(sim))
            if gain > 1e-9 * (1.0 + float(np.abs(sim).sum())):
                permute(out, cset, perm)
                changed = True
        used = r + 1
        if not changed and not (sort_first and r == 0):
            break
    return out, used


def matched_correlation(
    cset: ClassSet, ref: dict[str, np.ndarray], other: dict[str, np.ndarray]
) -> float:
    """Mean over the set's classes of the Pearson correlation of a class's member values in
    ``other`` with the same class's in ``ref``."""
    a = np.concatenate([features(ref[s.init], s) for s in cset.slots], axis=1)
    b = np.concatenate([features(other[s.init], s) for s in cset.slots], axis=1)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    corr = np.where(norms > 0, (a * b).sum(axis=1) / np.where(norms > 0, norms, 1), 0.0)
    return float(corr.mean())


def with_params(model: onnx.ModelProto, params: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` with the initializers in ``params`` replaced."""
    out = copy.deepcopy(model)
    for k, t in enumerate(out.graph.initializer):
        if t.name in params:
            out.graph.initializer[k].CopyFrom(numpy_helper.from_array(params[t.name], t.name))
    return out


def same_outputs(model: onnx.ModelProto, params: dict[str, np.ndarray], seed: int = 0) -> bool:
    """Whether ``model`` with ``params`` computes what ``model`` does, on synthetic inputs (to
    float rounding: a permutation changes the order of sums)."""
    feeds = synthesize(model, CHECK_SAMPLES, seed).inputs
    before = session(model, optimize=False).run(None, feeds)
    after = session(with_params(model, params), optimize=False).run(None, feeds)
    for x, y in zip(before, after, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape:
            return False
        if np.issubdtype(x.dtype, np.floating):
            scale = 1.0 + float(np.abs(x).max(initial=0.0))
            if float(np.abs(x - y).max(initial=0.0)) > 1e-4 * scale:
                return False
        elif not np.array_equal(x, y):
            return False
    return True
