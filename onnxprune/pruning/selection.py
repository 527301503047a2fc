"""Output-based selection: the vote's choice against each voter's own, on the whole model.

Rules:
    1. The candidates are the vote's choice and, per voter, that voter's own choice in every
       group (a group without it keeps the vote's pick). Each is zeroed (and compensated, as
       the pass would) in a copy of the model, which runs on the first :data:`SELECT_SAMPLES`
       calibration samples; the one whose outputs move least from the model's own wins
       (accuracy first when the data has labels; the vote on ties).
    2. Candidates with the same channels are one candidate: zeroed and run once, each name
       reported with its score (a tie, which the vote wins, as before).
    3. The model's own outputs come from the statistics' run when it kept them
       (:meth:`Workspace.reference`), else from one more run. Runs use the workspace's
       calibration batch (:meth:`Workspace.batch_size`).
    4. The values zeroed channels take at their consumers are probed once for the union of
       the candidates and handed back, so the pass's final zeroing needs no probe of its own.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from onnxprune import progress
from onnxprune.analysis.groups import keep_one_per_tensor
from onnxprune.pruning.decision import GroupDecision, choice_score
from onnxprune.pruning.workspace import Workspace, zero_and_compensate, zeroed_values
from onnxprune.runner import outputs, plan

SELECT_LIMIT = 512 << 20  # select=auto compares whole-model copies only below this size
SELECT_SAMPLES = 512  # calibration samples used to compare choices (a cap: the first ones)


def candidates(vote: set[int], decisions: list[GroupDecision]) -> dict[str, set[int]]:
    """The vote's choice and each voter's own (rule 1), by name, the vote first."""
    names = sorted({n for d in decisions for n in d.choices})
    out = {"vote": vote}
    for name in names:  # a group without this voter keeps the vote's own pick
        out[name] = set().union(*(d.choices.get(name, d.picked) for d in decisions))
    return out


def select(
    ws: Workspace, vote: set[int], decisions: list[GroupDecision], compensate: bool
) -> tuple[set[int], dict[str, Any], dict[str, np.ndarray] | None]:
    """Rule 1-4: the winning classes, the report's ``selected``/``selection`` entries, and the
    zeroed channels' values at their consumers (None without ``compensate``)."""
    tried = candidates(vote, decisions)
    data = ws.ctx.data(ws.model).head(SELECT_SAMPLES)
    covered = plan(ws.model, data).samples
    batch = ws.batch_size()
    reference = ws.reference(covered)
    if reference is None:
        reference = list(outputs(ws.model, data, ws.ctx.providers, batch_size=batch).values())
    labels = data.labels[:covered] if data.labels is not None else None
    after = zeroed_values(ws, set().union(*tried.values())) if compensate else None
    runs: dict[frozenset[int], tuple[float, float]] = {}  # rule 2: one run per channel set
    distinct = {frozenset(c) for c in tried.values()}
    with progress.task(len(distinct), "selection candidates") as advance:
        for classes in tried.values():
            key = frozenset(classes)
            if key in runs:
                continue
            trial = copy.deepcopy(ws.model)
            chosen = keep_one_per_tensor(ws.an, classes)
            zero_and_compensate(ws, chosen, compensate, trial, after)
            got = outputs(trial, data, ws.ctx.providers, batch_size=batch)
            runs[key] = choice_score(reference, list(got.values()), labels)
            del trial, got
            advance()
    scores = {name: runs[frozenset(c)] for name, c in tried.items()}
    best = min(scores, key=lambda n: (scores[n][0], scores[n][1], n != "vote"))
    report = {
        "selected": best,
        "selection": {
            n: {
                "error": round(e, 6),
                **({"accuracy": round(-a, 4)} if a <= 0 and labels is not None else {}),
            }
            for n, (a, e) in scores.items()
        },
        "selection_caps": {"samples": covered, "candidates": len(tried), "runs": len(runs)},
    }
    return tried[best], report, after
