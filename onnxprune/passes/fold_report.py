"""Fold's report per group, and why it keeps a class that is zero at its producers.

A class whose producers give 0 (or one constant) in every channel, as vote leaves a pruned
channel, is what fold is there to remove. When some weighted consumer still reads it as a
variable, fold keeps it, and must say why: :func:`lost_zeros` names that consumer and the first
node, in graph order, after which the analysis no longer proves the channel zero (then constant).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from onnxprune.analysis.groups import classes_of
from onnxprune.analysis.labels import ClassId, Labels, State
from onnxprune.analysis.state import Analysis
from onnxprune.graph import node_name

if TYPE_CHECKING:
    from onnxprune.passes.fold import Plan


def _worst(lab: Labels, roots: np.ndarray, index: Mapping[int, object]) -> dict[int, int]:
    """Class -> its least known state (the largest) on ``lab``, for the classes in ``index``."""
    valid = lab.ids >= 0
    classes = roots[lab.ids[valid]]
    states = lab.state[valid]
    picked = np.isin(classes, np.fromiter(index, np.int64, len(index)))
    out: dict[int, int] = {}
    for c, s in zip(classes[picked].tolist(), states[picked].tolist(), strict=True):
        out[c] = max(out.get(c, 0), int(s))
    return out


def _producer_states(an: Analysis, roots: np.ndarray) -> dict[int, int]:
    """Class -> its least known state over the outputs of the producers that open it."""
    outputs = {node_name(n): n.output[0] for n in an.graph.node if n.output}
    out: dict[int, int] = {}
    for space in an.spaces:
        lab = an.labels.get(outputs.get(space.node, ""))
        if lab is None:
            continue
        ids = lab.ids[(lab.ids >= space.start) & (lab.ids < space.start + space.size)]
        st = lab.state[(lab.ids >= space.start) & (lab.ids < space.start + space.size)]
        for c, s in zip(roots[ids].tolist(), st.tolist(), strict=True):
            out[c] = max(out.get(c, 0), int(s))
    return out


def lost_zeros(an: Analysis, roots: np.ndarray, skip: Iterable[ClassId]) -> dict[ClassId, str]:
    """Class -> why it stays, for each class not in ``skip`` that is ZERO or CONST at every
    producer output but VAR at some weighted consumer (sink): names the sink, the node after
    which it is no longer provably zero and the one after which it is a variable."""
    skipped = set(skip)
    start = {
        c: s
        for c, s in _producer_states(an, roots).items()
        if s != State.VAR and ClassId(c) not in skipped
    }
    if not start:
        return {}
    readers: dict[int, str] = {}
    for sink in an.sinks:
        for c, s in _worst(sink.labels, roots, start).items():
            if s == State.VAR:
                readers.setdefault(c, f"{sink.node.op_type} {node_name(sink.node)}")
    if not readers:
        return {}
    not_zero: dict[int, str] = {}
    variable: dict[int, str] = {}
    for node in an.graph.node:
        where = f"{node.op_type} {node_name(node)}"
        for out in node.output:
            lab = an.labels.get(out)
            if lab is None:
                continue
            for c, s in _worst(lab, roots, readers).items():
                if s > State.ZERO:
                    not_zero.setdefault(c, where)
                if s == State.VAR:
                    variable.setdefault(c, where)
    reasons: dict[ClassId, str] = {}
    for c, reader in readers.items():
        lost = variable.get(c, "a node the analysis does not label")
        if start[c] == State.ZERO:
            first = not_zero.get(c, lost)
            how = f"not provably zero after {first}" + (
                f", a variable after {lost}" if first != lost else ""
            )
            head = "zero at its producers"
        else:
            how = f"a variable after {lost}"
            head = "constant (not zero) at its producers"
        reasons[ClassId(c)] = f"{head}, but {reader} reads it as a variable ({how})"
    return reasons


def round_report(an: Analysis, plan: Plan) -> dict[str, Any]:
    """Per group: its description, how many channels go and why the others stay; and one
    shortfall row per group whose zero or constant channels stay, with the reasons."""
    groups, shortfall = [], []
    for g in an.groups():
        classes = classes_of(plan.roots, g.spaces)
        removed = len(classes & plan.removed)
        blocked = Counter(plan.blocked[r] for r in classes if r in plan.blocked)
        groups.append(
            {
                **g.to_dict(),
                "channels_after": g.channels - removed,
                "removed": removed,
                "blocked": dict(blocked),
            }
        )
        held = Counter(plan.held[r] for r in classes if r in plan.held)
        if held:
            shortfall.append(
                {
                    "group": g.index,
                    "layers": ", ".join(s.node for s in g.spaces),
                    "kept": sum(held.values()),
                    "reason": "; ".join(
                        f"{why} ({n})" if len(held) > 1 else why for why, n in held.most_common()
                    ),
                }
            )
    return {"groups": groups, "removed": len(plan.removed), "shortfall": shortfall}


def merge_blocked(rounds: list[dict[str, Any]]) -> dict[str, int]:
    """How many channels each reason blocked, over the groups of the last round."""
    last = rounds[-1]["groups"] if rounds else []
    total: Counter[str] = Counter()
    for g in last:
        total.update(g["blocked"])
    return dict(total)
