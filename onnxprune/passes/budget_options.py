"""The options of vote's budget mode and sensitivity analysis (:mod:`onnxprune.pruning.budget`).

A mixin of :class:`onnxprune.passes.vote.Vote`, kept apart so that vote's own module stays its
voting rules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import onnx

from onnxprune.passes.base import option
from onnxprune.passes.registry import get_pass
from onnxprune.pruning.budget import HELP

if TYPE_CHECKING:
    from onnxprune.context import Context


@dataclass
class BudgetOptions:
    """``max_accuracy_drop``, ``min_cosine``, ``sensitivity`` and ``judge``."""

    max_accuracy_drop: float | None = option(None, HELP["max_accuracy_drop"], low=0, high=1)
    min_cosine: float | None = option(None, HELP["min_cosine"], low=-1, high=1)
    sensitivity: Literal["off", "on"] = option("off", HELP["sensitivity"])
    judge: Literal["zeros", "refit"] = option("zeros", HELP["judge"])

    def measures_sensitivity(self) -> bool:
        """Whether the pass measures the sensitivity table (asked for, or a budget is set)."""
        return (
            self.sensitivity == "on"
            or self.max_accuracy_drop is not None
            or (self.min_cosine is not None)
        )

    def judged_after(
        self, ctx: Context, original: onnx.ModelProto
    ) -> Callable[[onnx.ModelProto], onnx.ModelProto] | None:
        """``judge=refit``: what each candidate goes through before it is judged (the refit
        pass with its defaults, fitted to ``original`` on the calibration data); else None."""
        if self.judge != "refit":
            return None
        refit = get_pass("refit")()
        # a fresh cache per candidate: refit's statistics are the candidate's own
        return lambda model: (
            refit(model, dataclasses.replace(ctx, original=original, cache={})).model
        )
