"""What a pruning pass decided for one channel group, kept apart from its report section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxprune.analysis.labels import ChannelGroup


@dataclass
class GroupDecision:
    """One group's decision: the classes picked, each voter's own choice, the report section.

    ``picked`` and ``choices`` are sets of channel classes (union-find roots); they are the
    pass's working state and never reach the report. ``section`` is what the report shows.
    """

    group: ChannelGroup
    section: dict[str, Any]
    picked: set[int] = field(default_factory=set)
    choices: dict[str, set[int]] = field(default_factory=dict)


def choice_score(
    reference: list[np.ndarray], got: list[np.ndarray], labels: np.ndarray | None
) -> tuple[float, float]:
    """How good a candidate choice is, from the whole model's outputs on calibration data:
    (minus accuracy against the labels, or 0; relative squared output error): lower wins."""
    err = float(
        np.mean(
            [
                np.mean((g.astype(np.float64) - r) ** 2)
                / (np.mean(r.astype(np.float64) ** 2) + 1e-12)
                for r, g in zip(reference, got, strict=True)
            ]
        )
    )
    first = got[0]
    if labels is not None and first.ndim == 2 and len(first) == len(labels):
        return -float((first.argmax(1) == labels).mean()), err
    return 0.0, err
