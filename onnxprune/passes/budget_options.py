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
    confidence: float = option(0.0, HELP["confidence"], low=0, below=1)
    max_macs: int | None = option(None, HELP["max_macs"], low=1)
    max_mac_ratio: float | None = option(None, HELP["max_mac_ratio"], low=0, high=1)

    def measures_sensitivity(self) -> bool:
        """Whether the pass measures the sensitivity table (asked for, or a budget is set)."""
        return (
            self.sensitivity == "on"
            or self.max_accuracy_drop is not None
            or (self.min_cosine is not None)
            or self.targets_macs()
        )

    def targets_macs(self) -> bool:
        """Whether a MAC target is set (budget mode's dual)."""
        return self.max_macs is not None or self.max_mac_ratio is not None

    def check_budget_options(self) -> None:
        """A MAC target and an accuracy/cosine budget exclude each other; ``confidence``
        needs ``max_accuracy_drop``.

        Raises:
            ValueError: either combination.
        """
        if self.targets_macs() and (
            self.max_accuracy_drop is not None or self.min_cosine is not None
        ):
            raise ValueError(
                "max_macs/max_mac_ratio (the least damage at a MAC target) and "
                "max_accuracy_drop/min_cosine (the smallest model within a budget) exclude "
                "each other: give one"
            )
        if self.confidence and self.max_accuracy_drop is None:
            raise ValueError("confidence= is a margin on max_accuracy_drop: give it too")

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
