"""Channel classes at work: the classes of a group, the positions a choice removes, the free
classes, and the guard that never empties a tensor. Pruning passes and fold share these."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from onnxprune.analysis.labels import ClassId, Space

if TYPE_CHECKING:
    from onnxprune.analysis.state import Analysis


def classes_of(roots: np.ndarray, spaces: Iterable[Space]) -> set[ClassId]:
    """The channel classes of the channels ``spaces`` open (``roots`` from ``Analysis.roots``)."""
    return {ClassId(int(r)) for s in spaces for r in roots[s.start : s.start + s.size]}


def chosen_positions(roots: np.ndarray, ids: np.ndarray, chosen: Iterable[int]) -> np.ndarray:
    """Mask of the positions of ``ids`` whose class is in ``chosen``; ``-1`` positions never are."""
    wanted = chosen if isinstance(chosen, np.ndarray) else np.fromiter(chosen, np.int64)
    labelled = ids >= 0
    out = np.zeros(len(ids), bool)
    out[labelled] = np.isin(roots[ids[labelled]], wanted)
    return out


def class_mask(roots: np.ndarray, chosen: Iterable[int]) -> np.ndarray:
    """Per channel id: whether its class is in ``chosen`` (one pass over ``roots``)."""
    wanted = np.zeros(len(roots), bool)
    picked = np.fromiter(chosen, np.int64)
    wanted[picked[(picked >= 0) & (picked < len(roots))]] = True
    return wanted[roots]


def unpinned_classes(an: Analysis) -> list[ClassId]:
    """Every channel class of the model that is not pinned, in id order."""
    return sorted(classes_of(an.roots(), an.spaces) - set(an.pinned_roots()))


def last_channel_classes(an: Analysis, chosen: Iterable[int]) -> set[ClassId]:
    """The classes to take back from ``chosen`` so that no tensor or member loses all its
    channels: for each that would, the class of its first channel (tensors, then members)."""
    roots = an.roots()
    left = np.zeros(len(roots), bool)  # by class root: still chosen
    picked = np.fromiter(chosen, np.int64)
    left[picked[(picked >= 0) & (picked < len(roots))]] = True
    kept: set[ClassId] = set()
    for ids in [lab.ids for lab in an.labels.values()] + [m.ids for m in an.members]:
        if len(ids) and (ids >= 0).all() and left[roots[ids]].all():
            first = ClassId(int(roots[ids[0]]))
            left[first] = False
            kept.add(first)
    return kept


def keep_one_per_tensor(an: Analysis, chosen: Iterable[int]) -> set[int]:
    """``chosen`` less :func:`last_channel_classes`: a choice that never empties a tensor."""
    wanted = {ClassId(int(c)) for c in chosen}
    return set(wanted - last_channel_classes(an, wanted))
