"""Channels a permutation may exchange: per channel group of the analysis, the classes that
sit in the same tensors the same number of times (so a Split or a Slice never swaps channels
between its parts), none pinned, with every member slice that moves with them, and a
weighted consumer's input where their activations can be read."""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxprune.analysis.labels import ClassId
from onnxprune.analysis.probe import probe
from onnxprune.analysis.state import Analysis
from onnxprune.analysis.walk import analyse
from onnxprune.graph import prepare_for_pruning


@dataclass
class Slot:
    """One member of a set of interchangeable classes: ``positions[c]`` are the positions of
    class ``c`` (in the set's order) along ``axis`` of initializer ``init``."""

    init: str
    axis: int
    positions: np.ndarray  # [classes, positions per class]


@dataclass
class ClassSet:
    """Interchangeable channel classes of one group, and the members that carry them."""

    group: int
    classes: list[ClassId]
    slots: list[Slot]
    activation: Slot | None = None  # a consumer's input tensor (not an initializer) with them


def interchangeable_sets(
    model: onnx.ModelProto, params: dict[str, np.ndarray], seed: int = 0
) -> tuple[list[ClassSet], list[dict[str, Any]]]:
    """The sets of classes a permutation may exchange, per group of ``model``, and the groups
    left as they are (with the reason)."""
    work = copy.deepcopy(model)
    prepare_for_pruning(work.graph)
    an = analyse(work, probe(work, seed).shapes)
    roots = an.roots()
    pinned = set(an.pinned_roots())
    sets: list[ClassSet] = []
    skipped: list[dict[str, Any]] = []
    for g in an.groups():
        classes = sorted(
            {ClassId(int(roots[i])) for s in g.spaces for i in range(s.start, s.start + s.size)}
            - pinned
        )
        if len(classes) < 2:
            skipped.append({"group": g.index, "reason": "fewer than two free channels"})
            continue
        found, reason = class_sets(an, roots, g.index, classes, params)
        if reason:
            skipped.append({"group": g.index, "reason": reason})
        for cset in found:
            cset.activation = activation_slot(an, roots, cset.classes)
        sets.extend(found)
    return sets, skipped


def activation_slot(an: Analysis, roots: np.ndarray, classes: list[ClassId]) -> Slot | None:
    """The first weighted consumer's input that holds every one of ``classes`` equally often,
    as a :class:`Slot` on that tensor; None when there is none."""
    for sink in an.sinks:
        if sink.tensor in an.branch_tensors:  # inside an If branch: no run exposes it
            continue
        ids = sink.labels.ids
        of = np.where(ids >= 0, roots[np.maximum(ids, 0)], -1)
        positions = [np.flatnonzero(of == c) for c in classes]
        if len({len(p) for p in positions}) == 1 and len(positions[0]):
            return Slot(sink.tensor, sink.labels.axis, np.stack(positions))
    return None


def class_sets(
    an: Analysis,
    roots: np.ndarray,
    group: int,
    classes: list[ClassId],
    params: dict[str, np.ndarray],
) -> tuple[list[ClassSet], str]:
    """Split ``classes`` by where they occur (members and labelled tensors, with counts): each
    part of two or more is a :class:`ClassSet`. Returns the reason when none can be aligned."""
    wanted = set(classes)
    where: dict[ClassId, list[tuple[str, int]]] = defaultdict(list)
    member_positions: dict[tuple[str, int], dict[ClassId, np.ndarray]] = {}
    carriers = [(f"m:{m.init}:{m.axis}", m.ids) for m in an.members]
    carriers += [(f"t:{name}", lab.ids) for name, lab in an.labels.items()]
    seen: set[str] = set()
    for key, ids in carriers:
        if key in seen:
            continue
        seen.add(key)
        of = np.where(ids >= 0, roots[np.maximum(ids, 0)], -1)
        by_class: dict[ClassId, np.ndarray] = {}
        for c in set(of.tolist()) & wanted:
            by_class[ClassId(c)] = np.flatnonzero(of == c)
            where[ClassId(c)].append((key, len(by_class[ClassId(c)])))
        if key.startswith("m:") and by_class:
            init, axis = key[2:].rsplit(":", 1)
            member_positions[(init, int(axis))] = by_class
    bad = sorted({init for (init, _a) in member_positions if init not in params})
    if bad:
        return [], f"member {bad[0]!r} is not a float initializer of the model"
    parts: dict[tuple[tuple[str, int], ...], list[ClassId]] = defaultdict(list)
    for c in classes:
        parts[tuple(sorted(where[c]))].append(c)
    sets = []
    for sig, cs in parts.items():
        if len(cs) < 2:
            continue
        keys = {k for k, _n in sig if k.startswith("m:")}
        slots = [
            Slot(init, axis, np.stack([pos[c] for c in cs]))
            for (init, axis), pos in member_positions.items()
            if f"m:{init}:{axis}" in keys
        ]
        if slots:
            sets.append(ClassSet(group, cs, slots))
    return sets, "" if sets else "no two free channels sit in the same tensors alike"


def features(arr: np.ndarray, slot: Slot) -> np.ndarray:
    """Rows of ``arr`` per class of ``slot``: [classes, everything else], as float64."""
    moved = np.moveaxis(arr, slot.axis, 0)[slot.positions]
    return moved.reshape(slot.positions.shape[0], -1).astype(np.float64)


def permute(arrays: dict[str, np.ndarray], cset: ClassSet, perm: np.ndarray) -> None:
    """In ``arrays``, class ``i`` of ``cset`` takes the values of class ``perm[i]``."""
    for slot in cset.slots:
        arr = arrays[slot.init].copy()
        dst: list[Any] = [slice(None)] * arr.ndim
        src: list[Any] = [slice(None)] * arr.ndim
        dst[slot.axis] = slot.positions.ravel()
        src[slot.axis] = slot.positions[perm].ravel()
        arr[tuple(dst)] = arrays[slot.init][tuple(src)]
        arrays[slot.init] = arr
