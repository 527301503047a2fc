"""Budget mode's dual: the least damage at estimated MACs at or below a target.

Rules:
    1. The target is ``max_mac_ratio`` and/or ``max_macs`` (per sample, over the model's
       MACs before pruning); the smaller ratio wins. Damage is
       :meth:`onnxprune.pruning.budget.Budget.damage`: with labels the accuracy drop plus half
       the share of samples whose class changed, else 1 - the lowest output cosine.
    2. Three allocations that just reach the target, found from the estimated MACs alone:
       the smallest uniform ratio, the highest global threshold on standardised scores, and a
       greedy one (from nothing pruned, the group whose next step saves the most MACs per unit
       of its measured sensitivity grows). Each is judged; the least damaged is kept.
    3. Then, while evaluations last, each pruned group in turn gives back one step and the
       others (by the same greedy rule) take up the MACs again; the trade is kept when it
       judges less damaged. A pass with no kept trade ends the search.
    4. A target the groups cannot reach within ``sparsity`` is refused (exit 2), naming what
       the most pruning allowed would leave.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from onnxprune import progress
from onnxprune.errors import PassOptionError
from onnxprune.pruning.allocation import curve, points, threshold_levels, uniform_levels
from onnxprune.pruning.sensitivity import Judge, Ladder, MacModel, Measure

Counts = tuple[int, ...]


def fit(
    judge: Judge,
    lads: Sequence[Ladder],
    target: float,
    macs: MacModel,
    table: dict[str, Any],
    damage: Callable[[Measure], float],
    evaluations: int,
) -> dict[str, Any]:
    """Rules 2-4: per-group counts at estimated MAC ratio <= ``target``, least damaged."""
    cache: dict[Counts, Measure] = {}

    def choice(counts: Sequence[int]) -> set[int]:
        return set().union(*(lad.take(k) for lad, k in zip(lads, counts, strict=True)))

    def mac(counts: Sequence[int]) -> float:
        return macs.ratio(choice(counts))

    def judged(counts: Counts) -> Measure:
        if counts not in cache:
            cache[counts] = judge.measure(choice(counts))
        return cache[counts]

    def key(counts: Counts) -> tuple[float, float]:
        return damage(judged(counts)), mac(counts)

    most = tuple(lad.steps[-1] for lad in lads)
    if not lads or mac(most) > target + 1e-9:
        left = mac(most) if lads else 1.0
        raise PassOptionError(
            f"pass vote: the MAC target (ratio {target:.4f}) cannot be reached: pruning every "
            f"group as far as sparsity allows leaves an estimated ratio of {left:.4f}; raise "
            "sparsity (each group's upper bound), lower round_to (kept channel counts are "
            "multiples of it: small layers may not shrink at all), or raise the target"
        )
    curves = [
        curve(points(judge, lad, row), damage)
        for lad, row in zip(lads, table["groups"], strict=True)
    ]
    fits = lambda c: mac(c) <= target + 1e-9  # noqa: E731
    uniform = next((c for c in uniform_levels(lads) if fits(c)), most)
    flap = next((c for c in threshold_levels(lads) if fits(c)), most)
    greedy = _grow(tuple(0 for _ in lads), lads, curves, mac, target, ())
    best = min(dict.fromkeys((uniform, flap, greedy)), key=key)
    phases = {
        name: {"mac_ratio": round(mac(c), 4), **judged(c).to_dict()}
        for name, c in (("uniform", uniform), ("threshold", flap), ("greedy", greedy))
    }
    with progress.task(evaluations, "MAC target search") as advance:
        improved = True
        while improved and judge.evaluations < evaluations:
            improved = False
            for i, lad in enumerate(lads):
                if judge.evaluations >= evaluations:
                    break
                at = lad.steps.index(best[i])
                if at == 0:
                    continue
                back = list(best)
                back[i] = lad.steps[at - 1]
                trade = _grow(tuple(back), lads, curves, mac, target, (i,))
                if trade != best and fits(trade) and key(trade) < key(best):
                    best, improved = trade, True
                advance()
    measured = judged(best)
    phases["refined"] = {"mac_ratio": round(mac(best), 4), **measured.to_dict()}
    return {
        "counts": list(best),
        "measured": measured.to_dict(),
        "mac_ratio": round(mac(best), 4),
        "phases": phases,
    }


def _grow(
    counts: Counts,
    lads: Sequence[Ladder],
    curves: Sequence[Callable[[float], float]],
    mac: Callable[[Sequence[int]], float],
    target: float,
    hold: Sequence[int],
) -> Counts:
    """From ``counts``, grow (one step at a time) the group whose next step saves the most
    MACs per unit of estimated damage, groups in ``hold`` aside, until the target is met."""
    now = list(counts)
    while mac(now) > target + 1e-9:
        best, best_score = -1, -float("inf")
        for i, lad in enumerate(lads):
            at = lad.steps.index(now[i])
            if i in hold or at + 1 >= len(lad.steps):
                continue
            nxt = list(now)
            nxt[i] = lad.steps[at + 1]
            gain = mac(now) - mac(nxt)
            cost = curves[i](nxt[i] / lad.total) - curves[i](now[i] / lad.total)
            score = gain / (max(cost, 0.0) + 1e-4)
            if score > best_score:
                best, best_score = i, score
        if best < 0:
            break
        now[best] = lads[best].steps[lads[best].steps.index(now[best]) + 1]
    return tuple(now)
