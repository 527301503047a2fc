"""Budget mode: the largest MAC reduction whose outputs stay within a stated budget.

Rules:
    1. A budget is ``max_accuracy_drop`` (needs labels) and/or ``min_cosine`` (the lowest
       output's mean per-sample cosine); ``sparsity`` becomes the most any group may lose.
    2. Calibration (activation statistics, bias compensation) and judging use different
       samples: ``--data`` calibrates and ``--eval-data`` judges when it is given; otherwise
       the first half of ``--data`` calibrates and the second half judges, and the report
       says which rows did which.
    3. Within a group, classes go in the order of the mean of the voters' standardised scores.
       Each group's sensitivity (pruned alone at 25, 50, 75%) is measured first.
    4. The search starts from the better (lower estimated MACs) of two bisections that stay
       within budget: one uniform ratio for every group, and one global threshold on the
       standardised scores (FLAP's allocation). Then it refines greedily: the group whose next
       step saves the most MACs per unit of measured sensitivity grows, when the whole model
       still holds the budget (steps halve on a miss; after a miss of one step, a group tries
       two steps once, since a judged accuracy is noisy, and stops at the next miss).
    5. Every candidate is judged on the whole model: zeroed, compensated, run on the
       evaluation samples. The result never breaks the budget there (an empty choice holds).
    6. ``confidence``: the accuracy drop the budget holds is the upper bound at that level
       from the judging samples lost and gained against the original
       (:mod:`onnxprune.pruning.margin`), not the measured one.
    7. ``max_macs``/``max_mac_ratio`` replace the budget by its dual, the least damage at a
       MAC target (:mod:`onnxprune.pruning.mac_target`); rules 2, 3 and 5 hold as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxprune import progress
from onnxprune.context import Context
from onnxprune.cost import summarize
from onnxprune.data import Dataset
from onnxprune.errors import PassOptionError
from onnxprune.pruning.allocation import (
    bisect,
    curve,
    points,
    threshold_levels,
    uniform_levels,
)
from onnxprune.pruning.decision import GroupDecision
from onnxprune.pruning.mac_target import fit
from onnxprune.pruning.margin import drop_upper
from onnxprune.pruning.sensitivity import Judge, Ladder, MacModel, Measure, ladders, sensitivity
from onnxprune.pruning.workspace import Workspace

EVAL_KEY = "budget:evaluation"  # ctx.cache key of the evaluation data and its description
RATIO_CAP = 0.75  # the largest share the sensitivity table prunes of a group
MAX_EVALUATIONS = 150  # whole-model judgements the search may make, sensitivity included
HELP = {
    "max_accuracy_drop": "budget mode: prune as much as stays within this accuracy drop on "
    "evaluation data (needs labels); sparsity becomes each group's upper bound",
    "min_cosine": "budget mode: prune as much as keeps every output's mean cosine at or above "
    "this on evaluation data; sparsity becomes each group's upper bound",
    "sensitivity": "on: measure each group pruned alone at 0.25, 0.5 and 0.75 of its channels "
    "on evaluation data (a table, the report's 'sensitivity', --plot); always on in budget mode",
    "judge": "budget mode: judge each candidate as zeroed (zeros) or after a refit pass "
    "(refit: for -p vote -p refit; the budget then holds for a refit on the same --data)",
    "confidence": "budget mode, max_accuracy_drop: accept a candidate only when the upper "
    "bound of its accuracy drop at this confidence (from the samples it lost and gained "
    "against the original) is within the budget; 0: the measured drop",
    "max_macs": "budget mode's dual: the least damage (accuracy drop and changed classes, "
    "else cosine) at estimated MACs per sample <= this; sparsity bounds each group",
    "max_mac_ratio": "budget mode's dual: as max_macs, as a share of the model's MACs",
}


@dataclass(frozen=True)
class Budget:
    """The limits a pruned model must hold on evaluation data (None: not set)."""

    max_accuracy_drop: float | None = None
    min_cosine: float | None = None
    confidence: float = 0.0  # > 0: the accuracy drop's upper bound at this level must hold

    def __bool__(self) -> bool:
        return self.max_accuracy_drop is not None or self.min_cosine is not None

    def drop(self, m: Measure) -> float | None:
        """The accuracy drop the budget holds ``m`` to: measured, or its upper confidence
        bound from the paired counts (:mod:`onnxprune.pruning.margin`) when ``confidence``."""
        if m.accuracy_drop is None or not self.confidence or not m.samples:
            return m.accuracy_drop
        return drop_upper(m.lost, m.gained, m.samples, self.confidence)

    def holds(self, m: Measure) -> bool:
        """Whether ``m`` is within every limit that is set."""
        if self.min_cosine is not None and not m.cosine >= self.min_cosine:
            return False
        if self.max_accuracy_drop is not None:
            drop = self.drop(m)
            return drop is not None and drop <= self.max_accuracy_drop + 1e-9
        return True

    def damage(self, m: Measure) -> float:
        """How far ``m`` is from the original (0: untouched): with labels the accuracy drop
        plus half the share of samples whose class changed (less noisy than accuracy alone,
        which a lost and a gained sample cancel in), else 1 - cosine; 0.1 (1 - cosine) breaks
        ties."""
        cos = 1.0 - m.cosine
        if m.accuracy_drop is not None and (self.max_accuracy_drop is not None or not self):
            moved = 0.0 if m.agreement is None else 1.0 - m.agreement
            return max(m.accuracy_drop, 0.0) + 0.5 * moved + 0.1 * cos
        return cos


def budget_of(vote: Any) -> Budget:
    """The budget the vote pass's options set."""
    return Budget(vote.max_accuracy_drop, vote.min_cosine, vote.confidence)


def calibration_context(vote: Any, model: onnx.ModelProto, ctx: Context) -> Context:
    """The context vote calibrates with (rule 2): ``ctx`` itself, or, in budget mode without
    ``--eval-data``, a copy whose data is the first half of the run's; the evaluation data and
    its description wait in the copy's cache under :data:`EVAL_KEY`.

    Raises:
        PassOptionError: budget mode without real data, or ``max_accuracy_drop`` without labels.
    """
    budget = budget_of(vote)
    try:  # before anything returns: confidence= alone must not be a silent no-op
        vote.check_budget_options()
    except ValueError as exc:
        raise PassOptionError(f"pass vote: {exc}") from None
    if not vote.measures_sensitivity():
        return ctx
    mode = bool(budget) or vote.targets_macs()
    data = ctx.data(model)
    if mode and data.synthetic:
        raise PassOptionError(
            "pass vote: max_accuracy_drop/min_cosine/max_macs/max_mac_ratio need --data (real "
            "samples to calibrate on and to judge the budget by)"
        )
    if ctx.eval_data_path is not None or not mode:
        judged = ctx.eval_data(model)
        where = {"calibration": _describe(data), "evaluation": _describe(judged)}
        out = ctx
    else:
        n = len(data)
        if n < 2:
            raise PassOptionError(
                f"pass vote: {data.source} has {n} sample(s); budget mode needs at least 2 "
                "(half calibrate, half judge) or --eval-data"
            )
        cut = n // 2
        calib, judged = data.rows(0, cut), data.rows(cut, n)
        where = {
            "calibration": {**_describe(calib), "rows": [0, cut]},
            "evaluation": {**_describe(judged), "rows": [cut, n]},
        }
        out = dataclasses.replace(ctx, cache={}, _data=calib)
    if budget.max_accuracy_drop is not None and judged.labels is None:
        raise PassOptionError(
            f"pass vote: max_accuracy_drop needs labels in the evaluation data "
            f"({judged.source} has none); use min_cosine, or add 'labels' to the .npz"
        )
    out.cache[EVAL_KEY] = (judged, where)
    return out


def _describe(data: Dataset) -> dict[str, Any]:
    return {"source": data.source, "samples": len(data), "labels": data.labels is not None}


def target_ratio(vote: Any, model: onnx.ModelProto) -> float | None:
    """The MAC target as a share of ``model``'s MACs per sample (the smaller of
    ``max_mac_ratio`` and ``max_macs`` over them); None without one."""
    ratios = [] if vote.max_mac_ratio is None else [float(vote.max_mac_ratio)]
    if vote.max_macs is not None:
        ratios.append(vote.max_macs / max(summarize(model).macs, 1))
    return min(ratios) if ratios else None


def margin(budget: Budget, m: Measure) -> dict[str, Any]:
    """The report's ``margin``: the confidence, the result's paired counts on the judging
    rows and the upper bound of its accuracy drop that the budget held."""
    upper = budget.drop(m)
    return {
        "confidence": budget.confidence,
        "lost": m.lost,
        "gained": m.gained,
        "samples": m.samples,
        "drop_upper": None if upper is None else round(upper, 4),
    }


@dataclass
class Outcome:
    """What budget mode or the sensitivity analysis adds to vote: a choice (None: the
    vote decides as usual) and the report keys."""

    chosen: set[int] | None = None
    decisions: list[GroupDecision] | None = None
    report: dict[str, Any] = dataclasses.field(default_factory=dict)


def apply(
    vote: Any,
    ws: Workspace,
    plans: Sequence[Any],
    multiples: dict[int, tuple[int, int]],
    compensate: bool,
) -> Outcome:
    """Budget mode and/or the sensitivity table for the vote pass (nothing when neither is
    asked for): rules 3-5."""
    budget = budget_of(vote)
    if not vote.measures_sensitivity() or EVAL_KEY not in ws.ctx.cache:
        return Outcome()
    judged, where = ws.ctx.cache[EVAL_KEY]
    judge = Judge.open(ws, judged, compensate, vote.judged_after(ws.ctx, ws.model))
    table = sensitivity(judge, ladders(ws, plans, multiples, RATIO_CAP))
    report: dict[str, Any] = {"sensitivity": {**table, **where}}
    if not budget and not vote.targets_macs():
        return Outcome(report=report)
    lads = ladders(ws, plans, multiples, vote.sparsity_of)
    target = target_ratio(vote, ws.model)
    if target is None:
        found = search(judge, lads, budget, MacModel(ws), table)
    else:
        found = fit(judge, lads, target, MacModel(ws), table, budget.damage, MAX_EVALUATIONS)
        found["extra"] = {
            "target": {
                "max_macs": vote.max_macs,
                "max_mac_ratio": vote.max_mac_ratio,
                "mac_ratio": round(target, 4),
                "damage": round(budget.damage(judge.measure(choice_of(lads, found))), 6),
            }
        }
    picked = {lad.group.index: lad.take(found["counts"][i]) for i, lad in enumerate(lads)}
    decisions = []
    for g, *_ in plans:
        mine = picked.get(g.index, set())
        lad = next((x for x in lads if x.group.index == g.index), None)
        section = {
            "group": g.index,
            "channels": g.channels,
            "asked": len(mine),  # budget mode: the search's share of this group
            "ratio": round(len(mine) / lad.total, 4) if lad else 0.0,
            "pruned": len(mine),
            "producers": [s.node for s in g.spaces],
        }
        decisions.append(GroupDecision(g, section, mine))
    chosen = set().union(*picked.values()) if picked else set()
    report["budget"] = {
        "max_accuracy_drop": budget.max_accuracy_drop,
        "min_cosine": budget.min_cosine,
        **where,
        "measured": found["measured"],
        **found["extra"],
        "original_accuracy": None if judge.accuracy is None else round(judge.accuracy, 4),
        "mac_ratio": found["mac_ratio"],
        "phases": found["phases"],
        "evaluations": judge.evaluations,
        "judge": vote.judge,
        "groups": [
            {
                "group": lad.group.index,
                "layers": [sp.node for sp in lad.group.spaces],
                "channels": lad.total,
                "pruned": found["counts"][i],
                "ratio": round(found["counts"][i] / lad.total, 4),
            }
            for i, lad in enumerate(lads)
        ],
    }
    return Outcome(chosen, decisions, report)


def choice_of(lads: Sequence[Ladder], found: dict[str, Any]) -> set[int]:
    """The classes a search's ``counts`` prune."""
    return set().union(*(lad.take(k) for lad, k in zip(lads, found["counts"], strict=True)))


def search(
    judge: Judge,
    lads: Sequence[Ladder],
    budget: Budget,
    macs: MacModel,
    table: dict[str, Any],
) -> dict[str, Any]:
    """Rule 4: per-group counts (indices into each ladder's order) within ``budget``."""
    cache: dict[tuple[int, ...], Measure] = {}

    def judged(counts: tuple[int, ...]) -> Measure:
        if counts not in cache:
            cache[counts] = judge.measure(choice(counts))
        return cache[counts]

    def choice(counts: Sequence[int]) -> set[int]:
        return set().union(*(lad.take(k) for lad, k in zip(lads, counts, strict=True)))

    def mac(counts: Sequence[int]) -> float:
        return macs.ratio(choice(counts))

    def holds(counts: tuple[int, ...]) -> bool:
        return judge.evaluations < MAX_EVALUATIONS and budget.holds(judged(counts))

    uniform = bisect(uniform_levels(lads), holds)
    flap = bisect(threshold_levels(lads), holds)
    start = min((uniform, flap), key=mac)
    counts = list(start)
    pos = [lad.steps.index(k) for lad, k in zip(lads, counts, strict=True)]
    jump = [max(1, (len(lad.steps) - 1 - p) // 4) for lad, p in zip(lads, pos, strict=True)]
    frozen = [p >= len(lad.steps) - 1 for lad, p in zip(lads, pos, strict=True)]
    leapt = [False] * len(lads)
    curves = [
        curve(points(judge, lad, row), budget.damage)
        for lad, row in zip(lads, table["groups"], strict=True)
    ]
    with progress.task(MAX_EVALUATIONS, "budget search") as advance:
        while not all(frozen) and judge.evaluations < MAX_EVALUATIONS:
            now = mac(counts)
            best, best_score, best_next = -1, -np.inf, counts
            for i, lad in enumerate(lads):
                if frozen[i]:
                    continue
                nxt = list(counts)
                nxt[i] = lad.steps[min(pos[i] + jump[i], len(lad.steps) - 1)]
                gain = now - mac(nxt)
                cost = curves[i](nxt[i] / lad.total) - curves[i](counts[i] / lad.total)
                score = gain / (max(cost, 0.0) + 1e-4)
                if score > best_score:
                    best, best_score, best_next = i, score, nxt
            if holds(tuple(best_next)):
                counts = best_next
                pos[best] = lads[best].steps.index(counts[best])
                frozen[best] = pos[best] >= len(lads[best].steps) - 1
            elif jump[best] > 1 and not leapt[best]:
                jump[best] //= 2
            elif not leapt[best] and pos[best] + 2 < len(lads[best].steps):
                jump[best], leapt[best] = 2, True  # a noisy metric: one leap over a miss
            else:
                frozen[best] = True
            advance()
    final = tuple(counts)
    measured = judged(final)
    return {
        "counts": list(final),
        "measured": measured.to_dict(),
        "extra": {"margin": margin(budget, measured)} if budget.confidence else {},
        "mac_ratio": round(mac(final), 4),
        "phases": {
            "uniform": {"mac_ratio": round(mac(uniform), 4), **judged(uniform).to_dict()},
            "threshold": {"mac_ratio": round(mac(flap), 4), **judged(flap).to_dict()},
            "refined": {"mac_ratio": round(mac(final), 4), **measured.to_dict()},
        },
    }
