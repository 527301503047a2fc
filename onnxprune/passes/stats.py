"""The ``stats`` pass: prune channels whose statistic crosses a threshold (dead, constant, weak)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
import onnx

from onnxprune.analysis.groups import keep_one_per_tensor
from onnxprune.graph import get_init
from onnxprune.passes.base import Pass, PassResult, option
from onnxprune.passes.registry import register_pass
from onnxprune.pruning.criteria import GroupView, get_criterion
from onnxprune.pruning.decision import GroupDecision
from onnxprune.pruning.workspace import Workspace, zero_and_compensate

if TYPE_CHECKING:
    from onnxprune.context import Context


@register_pass
@dataclass
class Stats(Pass):
    """Prune channels whose statistic is below or above a threshold, e.g. dead or constant ones.

    Rules:
        1. ``metric`` is any criterion's raw value (``--list-passes`` of vote shows them;
           e.g. ``std`` of the weights, ``apoz``, ``act_std``).
        2. A free channel goes when its value is ``< below`` or ``> above`` (give one or both).
        3. A group never loses all its channels. With data, each pruned channel's mean moves
           into the next layer's bias (exact for a channel that is constant on the data, except
           at the borders of a consumer that zero-pads its input).

    Examples: ``metric=std,below=0.05``; ``metric=apoz,above=0.9`` (dead neurons);
    ``metric=act_std,below=1e-3`` (constant neurons, folded into the next bias).
    """

    name: ClassVar[str] = "stats"
    metric: str = option("act_std", "criterion whose raw value is compared")
    below: float | None = option(None, "prune channels whose value is below this")
    above: float | None = option(None, "prune channels whose value is above this")
    compensate: Literal["auto", "on", "off"] = option(
        "auto", "move pruned channels' mean into the next bias (auto: when --data is given)"
    )
    protect: str = option("", "regex of node/initializer names whose groups stay whole", regex=True)
    mask_input: str = option("auto", "padding-mask input statistics skip padding by (as vote's)")

    def __post_init__(self) -> None:
        get_criterion(self.metric, f"pass {self.name}")
        if self.below is None and self.above is None:
            raise ValueError("give below=... or above=... (or both)")

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        """Measure, threshold, zero and compensate."""
        ws = Workspace.open(model, ctx, self.protect, self.mask_input, self.name)
        crit = get_criterion(self.metric)
        has_data = not ctx.data(model).synthetic
        compensate = self.compensate == "on" or (self.compensate == "auto" and has_data)
        stats = ws.stats() if (crit.needs_data or compensate) else {}
        chosen: set[int] = set()
        decisions: list[GroupDecision] = []
        for g in ws.groups:
            classes = ws.free_classes(g)
            if not len(classes):
                continue
            view = GroupView(ws.an, classes, lambda n: get_init(model.graph, n), stats, ctx.seed)
            values = crit.fn(view)
            if values is None:
                continue
            hit = np.zeros(len(classes), bool)
            if self.below is not None:
                hit |= values < self.below
            if self.above is not None:
                hit |= values > self.above
            picked = set(classes[hit].tolist())
            chosen |= picked
            section = {
                "group": g.index,
                "channels": g.channels,
                "min": float(values.min()),
                "max": float(values.max()),
            }
            decisions.append(GroupDecision(g, section, picked))
        chosen = keep_one_per_tensor(ws.an, chosen)
        for d in decisions:  # counted after the last-channel guard
            d.section["pruned"] = len(d.picked & chosen)
        applied = zero_and_compensate(ws, chosen, compensate)
        report = {
            "metric": self.metric,
            "channels_pruned": len(chosen),
            "groups": [d.section for d in decisions],
            "compensated": compensate,
            **applied,
        }
        return PassResult(ws.model, bool(chosen), report)
