"""Per-group pruning shares (vote's ``group_sparsity``), and the names a group answers to.

A group answers to its producers' node names and its members' tensor names (weights and
biases, without the slice): ``protect`` and ``group_sparsity`` match their regexes there.
Items are ``REGEX:SHARE``; the first item whose regex matches one of a group's names gives
its share, any other group gets ``sparsity``.
"""

from __future__ import annotations

import re

from onnxprune.analysis.labels import ChannelGroup

Shares = list[tuple[re.Pattern[str], float]]


def group_names(group: ChannelGroup) -> list[str]:
    """The producers' node names and the members' tensor names of ``group``."""
    return [s.node for s in group.spaces] + [m.split("[")[0] for m in group.members]


def parse_shares(items: tuple[str, ...]) -> Shares:
    """``REGEX:SHARE`` items as (pattern, share) pairs.

    Raises:
        ValueError: an item without ``:``, a share outside [0, 1), or a bad regex (naming the
            item).
    """
    out: Shares = []
    for item in items:
        regex, sep, share = item.rpartition(":")
        if not sep or not regex:
            raise ValueError(f"group_sparsity item {item!r}: expected REGEX:SHARE, e.g. fc1:0.25")
        try:
            value = float(share)
        except ValueError:
            raise ValueError(
                f"group_sparsity item {item!r}: SHARE {share!r} is not a number"
            ) from None
        if not 0.0 <= value < 1.0:
            raise ValueError(f"group_sparsity item {item!r}: SHARE must be in [0, 1)")
        try:
            out.append((re.compile(regex), value))
        except re.error as exc:
            raise ValueError(f"group_sparsity item {item!r}: bad regex ({exc})") from None
    return out


def share_of(group: ChannelGroup, shares: Shares, default: float) -> float:
    """The share ``group`` loses: the first matching item's, else ``default``."""
    names = group_names(group)
    for pattern, share in shares:
        if any(pattern.search(n) for n in names):
            return share
    return default
