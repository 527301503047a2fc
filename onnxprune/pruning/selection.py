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
    5. The candidates share one session (:class:`Trials`): a copy of the model zeroed and
       compensated differs from it in initializer values only, so those initializers (the
       ones the first candidate changed, and every initializer the consumers read) become
       inputs of one session and each candidate feeds its own values. A candidate that
       changes the graph (a bias added as a new node) or other initializers runs in a
       session of its own.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx

from onnxprune import progress
from onnxprune.analysis.groups import keep_one_per_tensor
from onnxprune.data import Dataset
from onnxprune.graph import tensor_array
from onnxprune.pruning.decision import GroupDecision, choice_score
from onnxprune.pruning.workspace import Workspace, zero_and_compensate, zeroed_values
from onnxprune.runner import outputs, plan, run_batches
from onnxprune.runtime import session

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
    readers = {t for sink in ws.an.sinks for t in sink.node.input if t}
    trials = Trials(ws.model, data, ws.ctx.providers, batch, readers)
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
            runs[key] = choice_score(reference, trials.outputs(trial), labels)
            del trial
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
        "selection_caps": {
            "samples": covered,
            "candidates": len(tried),
            "runs": len(runs),
            "sessions": trials.sessions,
        },
    }
    return tried[best], report, after


class Trials:
    """Copies of ``base`` that differ in initializer values, run on ``data`` (rule 5)."""

    def __init__(
        self,
        base: onnx.ModelProto,
        data: Dataset,
        providers: Sequence[str],
        batch: int | None,
        readers: set[str],
    ) -> None:
        self.base, self.data, self.providers, self.batch = base, data, providers, batch
        self.readers = readers  # tensors the consumers read: inputs of the shared session too
        self.shared: tuple[Any, onnx.ModelProto, list[str]] | None = None
        self.sessions = 0

    def outputs(self, trial: onnx.ModelProto) -> list[np.ndarray]:
        """``trial``'s outputs on the data, in graph order (as :func:`runner.outputs`)."""
        changed = changed_initializers(self.base, trial)
        if changed is not None and self.shared is None:
            floats = {t.name for t in self.base.graph.initializer if _is_float(t)}
            self.shared = self._session(sorted(set(changed) | (self.readers & floats)))
        if changed is None or self.shared is None or not set(changed) <= set(self.shared[2]):
            self.sessions += 1
            own = outputs(trial, self.data, self.providers, batch_size=self.batch)
            return list(own.values())
        sess, model, fed = self.shared
        values = {t.name: tensor_array(t) for t in trial.graph.initializer if t.name in fed}
        data = Dataset(
            {**self.data.inputs, **values},
            self.data.labels,
            self.data.source,
            self.data.synthetic,
            self.data.axes,
            self.data.constants | frozenset(values),
        )
        parts: dict[str, list[np.ndarray]] = {o.name: [] for o in sess.get_outputs()}
        for _, (got,) in run_batches([sess], model, data, batch_size=self.batch):
            for name, value in got.items():
                parts[name].append(np.asarray(value))
        return [np.concatenate(p) if p[0].ndim else np.stack(p) for p in parts.values()]

    def _session(self, fed: list[str]) -> tuple[Any, onnx.ModelProto, list[str]]:
        """One session on ``base`` with the initializers ``fed`` turned into inputs."""
        model = onnx.ModelProto()
        model.CopyFrom(self.base)
        graph = model.graph
        inits = {t.name: t for t in self.base.graph.initializer}
        kept = [t for t in graph.initializer if t.name not in fed]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        listed = {i.name for i in graph.input}
        for name in fed:
            if name not in listed:
                t = inits[name]
                graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, t.dims))
        self.sessions += 1
        return session(model, self.providers), model, fed


def changed_initializers(base: onnx.ModelProto, trial: onnx.ModelProto) -> list[str] | None:
    """Names of the main-graph initializers whose values differ between two copies of one
    model; None when anything else differs (nodes, inputs, outputs, which initializers)."""
    a, b = base.graph, trial.graph
    same = (
        list(a.node) == list(b.node)
        and list(a.input) == list(b.input)
        and list(a.output) == list(b.output)
        and [t.name for t in a.initializer] == [t.name for t in b.initializer]
        and list(a.sparse_initializer) == list(b.sparse_initializer)
    )
    if not same:
        return None
    out = []
    for x, y in zip(a.initializer, b.initializer, strict=True):
        if x != y:
            if (x.data_type, list(x.dims)) != (y.data_type, list(y.dims)):
                return None
            out.append(x.name)
    return out


def _is_float(t: onnx.TensorProto) -> bool:
    """A floating-point initializer (what zeroing and compensation change)."""
    return t.data_type in (
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
    )
