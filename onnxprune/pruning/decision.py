"""What a pruning pass decided for one channel group, kept apart from its report section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
