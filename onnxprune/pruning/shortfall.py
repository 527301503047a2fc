"""Why a pruning pass removes fewer channels than it was asked to: one reason per group, in words.

A pass that prunes less than ``sparsity`` asks must say why, group by group, in its report and
so on the terminal (:func:`onnxprune.report.shortfall_table`). The reasons, in the order they
bind: the group is protected or pinned (all or some channels), rounding the kept count to
``round_to`` leaves fewer to prune, no criterion could score it, too few channels reached the
quorum, or the last channel of a tensor is kept. Layers with weights that are in no group at all
(the weight is computed, not stored; a recurrent layer; a subgraph) get a row too
(:func:`uncovered_layers`, the rows of :mod:`onnxprune.analysis.coverage`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import onnx

from onnxprune.analysis.coverage import layers_in_no_group
from onnxprune.analysis.labels import ChannelGroup
from onnxprune.analysis.state import Analysis
from onnxprune.pruning.workspace import round_count

LAST_CHANNEL = "the last channel of a tensor is kept"


def asked_count(total: int, sparsity: float) -> int:
    """Channels ``sparsity`` asks of a group of ``total``: as many as leave ``ceil(total * (1 -
    sparsity))`` kept, never all (round_count without rounding or pins)."""
    return round_count(total, total, sparsity, 1)


def hold_reason(group: ChannelGroup, free: int, protect: str = "") -> str | None:
    """Why some or all of ``group``'s channels are not free to prune (None: all are free)."""
    if protect and free == 0 and group.pinned < group.channels:
        return f"protected: protect={protect!r} matches a node or weight of the group"
    held = group.channels - free
    if not held:
        return None
    why = group.reasons[0] if group.reasons else "pinned by the channel analysis"
    if len(group.reasons) > 1:
        why += f" (and {len(group.reasons) - 1} more reasons)"
    if free == 0:
        return f"pinned: {why}"
    return f"{held} of {group.channels} channels pinned: {why}"


def rounding_reason(total: int, k: int, round_to: int, per: int, width: int) -> str:
    """``rounding to a multiple of 16 leaves 0 of 16 channels to prune (lower round_to)``;
    for classes ``width`` channels wide (heads), counted in classes."""
    if width == 1:
        return (
            f"rounding to a multiple of {round_to} leaves {k} of {total} channels to prune "
            "(lower round_to)"
        )
    return (
        f"rounding to a multiple of {round_to} channels leaves {k} of {total} to prune: each "
        f"spans {width} channels (a head, a convolution group), so they go {per} at a time "
        "(lower round_to)"
    )


def join_reasons(reasons: Iterable[str | None]) -> str:
    """The reasons that apply, in order, as one line."""
    return "; ".join(r for r in reasons if r)


def shortfall_rows(sections: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per group section that pruned less than it asked: group, layers, asked,
    pruned, reason."""
    return [
        {
            "group": s["group"],
            "layers": ", ".join(s["producers"]),
            "asked": s["asked"],
            "pruned": s["pruned"],
            "reason": s.get("reason") or "not known",
        }
        for s in sections
        if s["pruned"] < s["asked"]
    ]


def uncovered_layers(
    model: onnx.ModelProto, an: Analysis, groups: Sequence[ChannelGroup], sparsity: float
) -> list[dict[str, Any]]:
    """Rows for the weighted layers of ``model`` (analysed as ``an``) that no channel group
    covers (:func:`~onnxprune.analysis.coverage.layers_in_no_group`, with why): nothing of
    theirs is pruned."""
    return [
        {
            "group": None,
            "layers": layer.layer,
            "asked": asked_count(layer.channels, sparsity) if layer.channels else None,
            "pruned": 0,
            "reason": layer.reason,
        }
        for layer in layers_in_no_group(an, groups)
    ]
