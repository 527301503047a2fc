"""Ensemble pruning and weights, in numpy: which members to keep, how much each one counts.

Rules:
    1. A combination is ``sum_i w_i p_i`` with weights summing to 1: ``p_i`` are the members'
       probabilities (``mean``, ``weighted``) or their one-hot argmax (``vote``: the result is
       each class's share of the votes).
    2. A combination is scored on evaluation data by its accuracy when the data has labels,
       else by its agreement with the full ensemble's argmax; ties between candidates go to
       the higher mean combined value at the reference class (the label, or the full
       ensemble's argmax), then to the earlier member.
    3. ``forward`` (Caruana et al. 2004, greedy selection with replacement and sorted
       initialisation): from an empty bag, and from the n best members alone that score best
       together, add the member that scores best, ``rounds`` times; a member added k times
       weighs k. Of every ensemble tried (the n best for each n, every step of both runs, the
       full ensemble) the best
       score less ``tolerance`` is the target; the one with the fewest members that meets it
       is kept (then the higher score).
    4. ``backward``: start from the full ensemble (its weights); drop, one at a time, the
       member whose removal scores best, while the score stays at least the full ensemble's
       less ``tolerance``; the survivors keep their weights, renormalised.
    5. A member's marginal contribution is the full ensemble's score less the score of the
       full ensemble without it (its weight shared out among the others).
    6. ``fit_weights`` maximises the likelihood of the labels under the mixture
       ``sum_i w_i p_i`` (EM for mixture weights; monotone, stays on the simplex).
    7. ``within_macs`` (a MAC budget): only ensembles whose members' MACs sum to at most the
       budget are tried, each scored by its mean log-likelihood of the reference classes
       (less noisy than accuracy: every sample counts by how sure it is). Two greedy runs
       without replacement add, from an empty bag, the affordable member that raises it most
       per MAC it costs, and most outright; every member alone that fits is tried too. The
       best log-likelihood wins (then fewer MACs); members keep their weights, renormalised.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

EM_STEPS = 500
EM_STOP = 1e-10
FLOOR = 1e-6  # the least probability a log-likelihood counts (a one-hot vote can give 0)


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (float64)."""
    z = np.asarray(x, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def are_probabilities(x: np.ndarray, tol: float = 1e-3) -> bool:
    """Rows already non-negative and summing to 1 (within ``tol``)."""
    x = np.asarray(x, np.float64)
    return (
        bool(x.size)
        and bool((x >= -1e-6).all())
        and bool((np.abs(x.sum(axis=-1) - 1.0) <= tol).all())
    )


def one_hot(x: np.ndarray) -> np.ndarray:
    """Each row's argmax as a one-hot row (the first maximum on ties, as ArgMax)."""
    out = np.zeros(x.shape, np.float64)
    np.put_along_axis(out, np.argmax(x, axis=-1)[..., None], 1.0, axis=-1)
    return out


def combine(parts: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """``sum_i w_i p_i`` with the weights normalised to sum 1 (rule 1)."""
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    out = np.zeros(parts[0].shape, np.float64)
    for wi, p in zip(w, parts, strict=True):
        if wi:
            out += wi * np.asarray(p, np.float64)
    return out


@dataclass
class Scorer:
    """Scores combinations (rule 2) against ``reference`` classes (labels, or the full
    ensemble's argmax when ``agreement``)."""

    reference: np.ndarray
    agreement: bool

    def __call__(self, combined: np.ndarray) -> tuple[float, float]:
        """(accuracy or agreement, mean combined value at the reference class)."""
        hit = float(np.mean(np.argmax(combined, axis=-1) == self.reference))
        at = np.take_along_axis(combined, self.reference[:, None], axis=-1)
        return hit, float(at.mean())


@dataclass
class Selection:
    """What ensemble pruning chose: a weight per member (0: dropped), the scores, the trail."""

    weights: np.ndarray
    score: float
    full_score: float
    metric: str
    steps: list[dict] = field(default_factory=list)
    contributions: list[float] = field(default_factory=list)


def _score(parts: list[np.ndarray], weights: np.ndarray, scorer: Scorer) -> tuple[float, float]:
    return scorer(combine(parts, weights)) if weights.sum() > 0 else (-1.0, -1.0)


def contributions(parts: list[np.ndarray], weights: np.ndarray, scorer: Scorer) -> list[float]:
    """Each member's marginal contribution to the full ensemble (rule 5)."""
    full = _score(parts, weights, scorer)[0]
    out = []
    for i in range(len(parts)):
        rest = weights.copy()
        rest[i] = 0.0
        out.append(round(full - _score(parts, rest, scorer)[0], 6) if rest.sum() > 0 else full)
    return out


Tried = tuple[tuple[float, float], np.ndarray, int]  # (score, weights or counts, members)


def _greedy(
    parts: list[np.ndarray], counts: np.ndarray, scorer: Scorer, rounds: int, run: str
) -> tuple[list[Tried], list[dict]]:
    """``rounds`` greedy additions with replacement from the bag ``counts``."""
    counts = counts.copy()
    tried: list[Tried] = []
    steps: list[dict] = []
    one = np.eye(len(parts))
    for _ in range(rounds):
        best, neg = max((_score(parts, counts + one[i], scorer), -i) for i in range(len(parts)))
        counts[-neg] += 1
        tried.append((best, counts.copy(), int((counts > 0).sum())))
        steps.append({"run": run, "add": -neg, "score": round(best[0], 6)})
    return tried, steps


def forward(
    parts: list[np.ndarray], full: np.ndarray, scorer: Scorer, rounds: int, tolerance: float
) -> Selection:
    """Greedy forward selection with replacement (rule 3), from an empty bag and from the best
    members alone; ``full`` are the full ensemble's weights."""
    tried: list[Tried] = []
    alone = [scorer(p) for p in parts]
    ranked = sorted(range(len(parts)), key=lambda i: (alone[i], -i), reverse=True)
    for n in range(1, len(parts) + 1):  # sorted initialisation: the best n members
        top = np.zeros(len(parts))
        top[ranked[:n]] = 1.0
        tried.append((_score(parts, top, scorer), top, n))
    start = max(tried, key=lambda t: (t[0], -t[2]))
    steps: list[dict] = [
        {
            "run": "best",
            "start": [int(i) for i in np.flatnonzero(start[1])],
            "score": round(start[0][0], 6),
        }
    ]
    for run, counts in (("empty", np.zeros(len(parts))), ("best", start[1])):
        more, trail = _greedy(parts, counts, scorer, rounds, run)
        tried += more
        steps += trail
    full_score = _score(parts, full, scorer)
    tried.append((full_score, full.copy(), int((full > 0).sum())))
    target = max(t[0][0] for t in tried) - tolerance
    meets = [t for t in tried if t[0][0] >= target - 1e-12]
    chosen = min(meets, key=lambda t: (t[2], -t[0][0], -t[0][1], float(t[1].sum())))
    w = chosen[1] / chosen[1].sum()
    return Selection(w, chosen[0][0], full_score[0], "", steps)


def backward(
    parts: list[np.ndarray], full: np.ndarray, scorer: Scorer, tolerance: float
) -> Selection:
    """Backward elimination from the full ensemble (rule 4)."""
    w = full / full.sum()
    full_score = _score(parts, w, scorer)[0]
    steps = []
    while (w > 0).sum() > 1:
        scored = []
        for i in np.flatnonzero(w > 0):
            trial = w.copy()
            trial[i] = 0.0
            scored.append((_score(parts, trial, scorer), -int(i), trial))
        (best, neg, trial) = max(scored, key=lambda t: (t[0], t[1]))
        if best[0] < full_score - tolerance - 1e-12:
            break
        steps.append({"drop": -neg, "score": round(best[0], 6)})
        w = trial / trial.sum()
    return Selection(w, _score(parts, w, scorer)[0], full_score, "", steps)


def fit_weights(parts: list[np.ndarray], labels: np.ndarray) -> np.ndarray:
    """Mixture weights maximising the labels' likelihood (rule 6)."""
    lik = np.stack([np.take_along_axis(p, labels[:, None], axis=-1)[:, 0] for p in parts], 1)
    lik = np.maximum(lik, 1e-300)
    w = np.full(len(parts), 1.0 / len(parts))
    for _ in range(EM_STEPS):
        mix = lik * w
        new = (mix / mix.sum(axis=1, keepdims=True)).mean(axis=0)
        if np.abs(new - w).max() < EM_STOP:
            w = new
            break
        w = new
    return w / w.sum()


def log_likelihood(combined: np.ndarray, reference: np.ndarray) -> float:
    """Mean log of the combined value at each sample's reference class (floored)."""
    at = np.take_along_axis(combined, reference[:, None], axis=-1)[:, 0]
    return float(np.mean(np.log(np.maximum(at, FLOOR))))


def within_macs(
    parts: list[np.ndarray],
    full: np.ndarray,
    costs: list[int],
    max_macs: int,
    reference: np.ndarray,
) -> Selection:
    """The ensemble within ``max_macs`` with the best log-likelihood (rule 7); ``full`` are the
    full ensemble's weights, ``costs`` each member's MACs per sample.

    Raises:
        ValueError: no member fits the budget alone.
    """
    classes = parts[0].shape[-1]

    def score(bag: list[int]) -> float:
        w = np.zeros(len(parts))
        w[bag] = full[bag]
        return log_likelihood(combine(parts, w), reference)

    fits = [i for i in range(len(parts)) if costs[i] <= max_macs and full[i] > 0]
    if not fits:
        raise ValueError(
            f"max_macs={max_macs} is below every member's MACs (the cheapest: {min(costs):,})"
        )
    tried: list[tuple[float, int, tuple[int, ...]]] = [(score([i]), costs[i], (i,)) for i in fits]
    steps: list[dict] = []
    for run in ("per_mac", "outright"):
        bag: list[int] = []
        now = float(np.log(1.0 / classes))  # the empty bag: every class alike
        while True:
            spent = sum(costs[i] for i in bag)
            options = [i for i in fits if i not in bag and spent + costs[i] <= max_macs]
            if not options:
                break
            gains = {i: score([*bag, i]) - now for i in options}
            per = {i: g / max(costs[i], 1) if run == "per_mac" else g for i, g in gains.items()}
            best = max(options, key=lambda i: (per[i], -i))
            if gains[best] <= 0:
                break
            bag.append(best)
            now += gains[best]
            tried.append((now, spent + costs[best], tuple(bag)))
            steps.append({"run": run, "add": best, "log_likelihood": round(now, 6)})
    chosen = max(tried, key=lambda t: (t[0], -t[1], -len(t[2])))
    w = np.zeros(len(parts))
    w[list(chosen[2])] = full[list(chosen[2])]
    return Selection(w / w.sum(), chosen[0], score(list(range(len(parts)))), "", steps)
