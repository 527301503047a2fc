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
       the candidates (in the shared session of rule 5, which also outputs the consumer
       inputs) and handed back, so the pass's final zeroing needs no probe of its own.
    5. The candidates share one session (:class:`Trials`): a copy of the model zeroed and
       compensated differs from it in initializer values only, so those initializers (the
       ones the first candidate changed, and every initializer the consumers read) become
       inputs of one session and each candidate feeds its own values. A candidate that
       changes the graph (a bias added as a new node) or other initializers runs in a
       session of its own, and so does every candidate when a fed weight is read by an op of
       :data:`PREPACKED` (a convolution: its fast kernels need the weight constant).
    6. The winner's zeroed and compensated initializers are kept and written into the model
       (:meth:`Selection.apply`): the pass does not zero and compensate it a second time.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxprune import progress
from onnxprune.analysis.groups import keep_one_per_tensor
from onnxprune.data import Dataset, fixed_batch, input_specs
from onnxprune.graph import bias_add_after, tensor_array
from onnxprune.pruning.decision import GroupDecision, choice_score
from onnxprune.pruning.workspace import Workspace, zero_and_compensate, zeroed_values
from onnxprune.pruning.zero import zero_classes
from onnxprune.runner import expose, outputs, plan, run_batches
from onnxprune.runtime import session

SELECT_LIMIT = 512 << 20  # select=auto compares whole-model copies only below this size
SELECT_SAMPLES = 512  # calibration samples used to compare choices (a cap: the first ones)
# ops whose fast kernels need constant weights (onnxruntime reorders them once: NCHWc
# convolutions, packed recurrent weights): a model whose fed weights reach one keeps a
# session per candidate (rule 5)
PREPACKED = frozenset({"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "LSTM", "GRU", "RNN"})


def candidates(vote: set[int], decisions: list[GroupDecision]) -> dict[str, set[int]]:
    """The vote's choice and each voter's own (rule 1), by name, the vote first."""
    names = sorted({n for d in decisions for n in d.choices})
    out = {"vote": vote}
    for name in names:  # a group without this voter keeps the vote's own pick
        out[name] = set().union(*(d.choices.get(name, d.picked) for d in decisions))
    return out


@dataclass
class Selection:
    """What :func:`select` decided: the winning classes, the report's entries, the zeroed
    channels' values at their consumers (None without compensation) and the winner's zeroed
    and compensated initializers with what zeroing them reported (rule 6; None when the
    winner changed the graph: then the pass zeroes again)."""

    chosen: set[int]
    report: dict[str, Any]
    after: dict[str, np.ndarray] | None
    initializers: list[onnx.TensorProto] | None = None
    applied: dict[str, Any] = field(default_factory=dict)

    def apply(self, ws: Workspace) -> dict[str, Any] | None:
        """Write the winner's initializers into the workspace's model (what zeroing and
        compensating :attr:`chosen` there would write); None when there are none to write."""
        if self.initializers is None:
            return None
        at = {t.name: i for i, t in enumerate(ws.model.graph.initializer)}
        for t in self.initializers:
            ws.model.graph.initializer[at[t.name]].CopyFrom(t)
        return self.applied


def select(
    ws: Workspace, vote: set[int], decisions: list[GroupDecision], compensate: bool
) -> Selection:
    """Rules 1-6 (see the module)."""
    tried = candidates(vote, decisions)
    data = ws.ctx.data(ws.model).head(SELECT_SAMPLES)
    covered = plan(ws.model, data).samples
    batch = ws.batch_size()
    reference = ws.reference(covered)
    if reference is None:
        reference = list(outputs(ws.model, data, ws.ctx.providers, batch_size=batch).values())
    labels = data.labels[:covered] if data.labels is not None else None
    trials = Trials(ws.model, data, ws.ctx.providers, batch, consumer_inputs(ws))
    trials.expose = sorted(ws.sink_tensors())
    after = None
    if compensate:  # rule 4, in the shared session when it can be
        union = onnx.ModelProto()
        union.CopyFrom(ws.model)
        zero_classes(union, ws.an, set().union(*tried.values()))
        after = trials.values(union, fixed_batch(ws.model, data) or min(2, len(data)))
        del union
        if after is None:
            after = zeroed_values(ws, set().union(*tried.values()))
    runs: dict[frozenset[int], tuple[float, float]] = {}  # rule 2: one run per channel set
    distinct = {frozenset(c) for c in tried.values()}
    won: tuple[tuple[float, float, bool], frozenset[int], list[onnx.TensorProto] | None, dict]
    won = ((np.inf, np.inf, True), frozenset(), None, {})
    with progress.task(len(distinct), "selection candidates") as advance:
        for name, classes in tried.items():
            key = frozenset(classes)
            if key in runs:
                continue
            trial = copy.deepcopy(ws.model)
            chosen = keep_one_per_tensor(ws.an, classes)
            applied = zero_and_compensate(ws, chosen, compensate, trial, after)
            runs[key] = score = choice_score(reference, trials.outputs(trial), labels)
            rank = (score[0], score[1], name != "vote")
            if rank < won[0]:  # rule 6: keep the best one's initializers
                won = (rank, key, _changed_copies(ws.model, trial), applied)
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
    kept = won[2] if won[1] == frozenset(tried[best]) else None
    return Selection(tried[best], report, after, kept, won[3])


def consumer_inputs(ws: Workspace) -> set[str]:
    """The initializers compensation may change: every input of a consumer node, and the bias
    of the ``Add`` after a consumer MatMul (:func:`onnxprune.graph.bias_add_after`)."""
    out = set()
    for sink in ws.an.sinks:
        out |= {t for t in sink.node.input if t}
        follower = (
            bias_add_after(ws.model.graph, sink.node) if sink.node.op_type == "MatMul" else None
        )
        if follower is not None:
            out.add(follower[0].input[follower[1]])
    return out


def _changed_copies(base: onnx.ModelProto, trial: onnx.ModelProto) -> list[onnx.TensorProto] | None:
    """Copies of ``trial``'s initializers that differ from ``base``'s (None: the graph differs)."""
    changed = changed_initializers(base, trial)
    if changed is None:
        return None
    names = set(changed)
    copies = []
    for t in trial.graph.initializer:
        if t.name in names:
            kept = onnx.TensorProto()
            kept.CopyFrom(t)
            copies.append(kept)
    return copies


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
        self.expose: list[str] = []  # tensors the shared session also outputs (for values)
        self.shared: tuple[Any, onnx.ModelProto, list[str]] | None = None
        self.apart = False  # a fed initializer is read by a PREPACKED op: no shared session
        self.sessions = 0
        self.fetch = [o.name for o in base.graph.output]

    def values(self, trial: onnx.ModelProto, samples: int) -> dict[str, np.ndarray] | None:
        """The :attr:`expose` tensors of ``trial`` on the first ``samples`` samples, from the
        shared session (None when ``trial`` cannot run there)."""
        fed = self._fed(trial)
        if fed is None or self.shared is None:
            return None
        sess, model, _ = self.shared
        data = self._data(trial, fed, self.data.head(samples))
        names = [n for n in self.expose if n not in set(input_specs(model))]
        for _, (got,) in run_batches([sess], model, data, fetch=names, batch_size=samples):
            return got
        return None

    def _fed(self, trial: onnx.ModelProto) -> list[str] | None:
        """The shared session's fed initializers, when ``trial`` can run there (the session
        is made on the first trial that can)."""
        changed = changed_initializers(self.base, trial)
        if changed is not None and self.shared is None and not self.apart:
            floats = {t.name for t in self.base.graph.initializer if _is_float(t)}
            fed = set(changed) | (self.readers & floats)
            if any(n.op_type in PREPACKED for n in self.base.graph.node if fed & set(n.input)):
                self.apart = True  # their kernels want constant weights: one session each
                return None
            self.shared = self._session(sorted(fed))
        if changed is None or self.shared is None or not set(changed) <= set(self.shared[2]):
            return None
        return self.shared[2]

    def _data(self, trial: onnx.ModelProto, fed: list[str], data: Dataset) -> Dataset:
        """``data`` with ``trial``'s values of the ``fed`` initializers as constant inputs."""
        values = {t.name: tensor_array(t) for t in trial.graph.initializer if t.name in fed}
        return Dataset(
            {**data.inputs, **values},
            data.labels,
            data.source,
            data.synthetic,
            data.axes,
            data.constants | frozenset(values),
        )

    def outputs(self, trial: onnx.ModelProto) -> list[np.ndarray]:
        """``trial``'s outputs on the data, in graph order (as :func:`runner.outputs`)."""
        fed = self._fed(trial)
        if fed is None or self.shared is None:
            self.sessions += 1
            own = outputs(trial, self.data, self.providers, batch_size=self.batch)
            return list(own.values())
        sess, model, _ = self.shared
        data = self._data(trial, fed, self.data)
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.fetch}
        runs = run_batches([sess], model, data, fetch=self.fetch, batch_size=self.batch)
        for _, (got,) in runs:
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
        expose(model, self.expose, copy=False)
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
