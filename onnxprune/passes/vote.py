"""The ``vote`` pass: several criteria (or ensemble members) vote on which channels to prune."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import onnx

from onnxprune.analysis.state import NOTHING_TO_PRUNE
from onnxprune.data import feeds_for, sample_count
from onnxprune.errors import PassOptionError
from onnxprune.graph import get_init, prepare_for_pruning
from onnxprune.model import load, model_nbytes
from onnxprune.passes.base import Pass, PassResult, option
from onnxprune.passes.registry import register_pass
from onnxprune.pruning.criteria import Criterion, GroupView, get_criterion, rank_normalise
from onnxprune.pruning.decision import GroupDecision
from onnxprune.pruning.workspace import (
    Workspace,
    allowed_count,
    reconstruction_error,
    round_count,
    zero_and_compensate,
)
from onnxprune.pruning.zero import keep_one_per_tensor
from onnxprune.runtime import channel_multiple, session

if TYPE_CHECKING:
    from onnxprune.context import Context


SELECT_LIMIT = 512 << 20  # select=auto compares whole-model copies only below this size
SELECT_SAMPLES = 512  # calibration samples used to compare choices


def _outputs(model: onnx.ModelProto, feeds: list, providers: list[str]) -> list[np.ndarray]:
    """The model's outputs on ``feeds``, concatenated per output along the samples."""
    sess = session(model, providers)
    names = [o.name for o in sess.get_outputs()]
    runs = [sess.run(names, dict(f)) for f in feeds]
    return [np.concatenate([r[i] for r in runs]) for i in range(len(names))]


def _score(
    reference: list[np.ndarray], got: list[np.ndarray], labels: np.ndarray | None
) -> tuple[float, float]:
    """(minus accuracy against the labels, or 0; relative squared output error): lower wins."""
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


@dataclass
class Voter:
    """One criterion applied to one model's weights (the main model or an ensemble member)."""

    name: str
    criterion: Criterion
    view: GroupView


@register_pass
@dataclass
class Vote(Pass):
    """Criteria vote on the channels to prune; a quorum decides; the chosen ones are zeroed.

    Rules:
        1. In every prunable group each criterion ranks the free channels and votes for the
           lowest ``sparsity`` share (rounded so kept counts are multiples of ``round_to``).
        2. ``mode=vote``: channels with at least ``quorum`` votes go, most votes first;
           ``mode=average``: the lowest mean of rank-normalised scores go.
        3. With calibration data, each voter's choice is checked by how much of the consumers'
           outputs it loses (``check``: after a least-squares refit, or after bias compensation);
           voters far worse than the best are dropped. Then (``select``) the vote's choice and
           each voter's own choice are tried on the whole model: the one whose outputs move
           least on the calibration data (accuracy first when it has labels) is kept, so the
           vote is never worse there than its best voter.
        4. ``scope=global`` ranks all groups together after per-group normalisation, keeping at
           least ``floor`` of every group.
        5. Pruned channels are zeroed in every member of their group; with data, their mean
           contribution moves into the next layer's bias (``compensate``). Then ``fold``
           removes them for real.
    """

    name: ClassVar[str] = "vote"
    criteria: tuple[str, ...] = option(("l1", "flap", "wanda"), "criteria that vote (a+b+c)")
    sparsity: float = option(0.5, "share of each group's channels to prune")
    quorum: int = option(2, "votes a channel needs to be pruned (mode=vote)")
    mode: Literal["vote", "average"] = option("vote", "quorum vote, or mean of normalised ranks")
    scope: Literal["local", "global"] = option("local", "prune per group, or rank across groups")
    floor: float = option(0.1, "scope=global: keep at least this share of every group")
    round_to: int = option(
        0,
        "keep channel counts a multiple of this; 0: what suits the runtime here (16 on "
        "AVX-512 CPUs, else 8)",
    )
    protect: str = option("", "regex of node/initializer names whose groups stay whole")
    ensemble: tuple[str, ...] = option((), "other models of the same architecture that vote too")
    compensate: Literal["auto", "on", "off"] = option(
        "auto", "move pruned channels' mean into the next bias (auto: when --data is given)"
    )
    check: Literal["lsq", "mean", "off"] = option(
        "lsq",
        "weigh voters by the loss left after a least-squares refit (lsq) or after bias "
        "compensation (mean); needs data",
    )
    fill: bool = option(True, "mode=vote: top up to the target with the next most-voted channels")
    select: Literal["auto", "output", "local"] = option(
        "auto",
        "with data, keep the vote or a single voter's choice, whichever changes the "
        "model's outputs least on the calibration data (output); local: the vote as it is; "
        "auto: output for models under 512 MiB",
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError("sparsity must be in [0, 1)")
        if self.quorum < 1:
            raise ValueError("quorum must be at least 1")
        if self.round_to < 0:
            raise ValueError("round_to must be 0 (auto) or at least 1")
        if not self.criteria:
            raise ValueError("criteria must name at least one criterion")
        for c in self.criteria:
            get_criterion(c, f"pass {self.name}")

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        """Vote, zero the chosen classes, compensate biases; report per group."""
        ws = Workspace.open(model, ctx, self.protect)
        if not ws.groups:  # nothing to vote on: no statistics to gather either
            report = {"channels_pruned": 0, "groups": [], "note": NOTHING_TO_PRUNE}
            return PassResult(ws.model, False, report)
        multiple = self.round_to or channel_multiple(ctx.providers)
        criteria = [get_criterion(c) for c in self.criteria]
        has_data = ctx.data_path is not None
        compensate = self.compensate == "on" or (self.compensate == "auto" and has_data)
        need_stats = any(c.needs_data for c in criteria) or compensate
        stats = ws.stats() if need_stats else {}
        arrays = [("", lambda name: get_init(model.graph, name), stats)]
        arrays += self._ensemble(ws)
        check = self.check if has_data else "off"
        chosen: set[int] = set()
        decisions: list[GroupDecision] = []
        plans = []
        for g in ws.groups:
            classes = ws.free_classes(g)
            if not len(classes):
                continue
            voters = [
                Voter(
                    c.name + (f"@{tag}" if tag else ""),
                    c,
                    GroupView(ws.an, classes, getter, st, ctx.seed),
                )
                for tag, getter, st in arrays
                for c in criteria
            ]
            plans.append((g, classes, voters))
        if self.scope == "global":
            chosen, decisions = self._global(ws, plans, multiple)
        else:
            for g, classes, voters in plans:
                decision = self._local(ws, g, classes, voters, check, multiple)
                chosen |= decision.picked
                decisions.append(decision)
        selection: dict[str, Any] = {}
        if self._selects(ws, has_data, decisions):
            chosen, selection = self._select(ws, chosen, decisions, compensate)
        chosen = keep_one_per_tensor(ws.an, chosen)
        roots = ws.an.roots()
        for d in decisions:  # counted after the last-channel guard
            g = d.group
            mine = {int(r) for s in g.spaces for r in roots[s.start : s.start + s.size]}
            d.section["pruned"] = len(mine & chosen)
        applied = zero_and_compensate(ws, chosen, compensate)
        report: dict[str, Any] = {
            "channels_pruned": len(chosen),
            "groups": [d.section for d in decisions],
            "compensated": compensate,
            "round_to": multiple,
            "data": "synthetic" if not has_data else str(ctx.data_path),
            **selection,
            **applied,
        }
        return PassResult(ws.model, bool(chosen), report)

    def _ensemble(self, ws: Workspace) -> list[tuple[str, Any, dict]]:
        out = []
        names = {m.init for m in ws.an.members}
        shapes = {t.name: list(t.dims) for t in ws.model.graph.initializer if t.name in names}
        for path in self.ensemble:
            other = load(path)
            prepare_for_pruning(other.graph)
            theirs = {t.name: list(t.dims) for t in other.graph.initializer if t.name in shapes}
            if theirs != shapes:
                missing = sorted(set(shapes) - set(theirs)) or sorted(
                    n for n in shapes if theirs.get(n) != shapes[n]
                )
                raise PassOptionError(
                    f"pass vote: ensemble member {path} differs from the model in "
                    f"initializer(s) {missing[:3]}: members must share one architecture"
                )
            stats: dict = {}
            if any(get_criterion(c).needs_data for c in self.criteria):
                from onnxprune.pruning.calibrate import activation_stats

                stats = activation_stats(ws.ctx, other, ws.sink_tensors())
            out.append((str(path), (lambda g: lambda name: get_init(g, name))(other.graph), stats))
        return out

    def _local(
        self,
        ws: Workspace,
        g: Any,
        classes: np.ndarray,
        voters: list[Voter],
        check: str,
        multiple: int,
    ) -> GroupDecision:
        k = round_count(g.channels, len(classes), self.sparsity, multiple)
        section: dict[str, Any] = {
            "group": g.index,
            "channels": g.channels,
            "free": len(classes),
            "target": k,
            "producers": [s.node for s in g.spaces],
        }
        if k == 0:
            section["pruned"] = 0
            return GroupDecision(g, section)
        scores = {v.name: v.criterion.rank_scores(v.view) for v in voters}
        active = {n: s for n, s in scores.items() if s is not None}
        section["abstained"] = sorted(set(scores) - set(active))
        if not active:
            section["pruned"] = 0
            return GroupDecision(g, section)
        choices = {
            n: set(classes[np.argsort(s, kind="stable")[:k]].tolist()) for n, s in active.items()
        }
        if check != "off" and len(active) > 1:
            errors = {n: reconstruction_error(ws, c, check) for n, c in choices.items()}
            best = min(errors.values())
            kept = {n: s for n, s in active.items() if errors[n] <= 1.5 * best + 1e-12}
            section["voter_errors"] = {n: round(e, 6) for n, e in errors.items()}
            section["dropped"] = sorted(set(active) - set(kept))
            active = kept
        picked = self._combine(classes, active, k, g.channels, multiple)
        if check != "off" and len(choices) > 1:
            err = reconstruction_error(ws, picked, check)
            best_name = min(section["voter_errors"], key=section["voter_errors"].get)
            if err > section["voter_errors"][best_name] + 1e-12:
                picked = choices[best_name]
                section["fallback"] = best_name
                err = section["voter_errors"][best_name]
            section["error"] = round(err, 6)
        section["pruned"] = len(picked)
        return GroupDecision(g, section, picked, choices)

    def _selects(self, ws: Workspace, has_data: bool, decisions: list[GroupDecision]) -> bool:
        if not has_data or self.select == "local" or self.scope == "global":
            return False
        if self.select == "auto" and model_nbytes(ws.model) > SELECT_LIMIT:
            return False
        return any(len(d.choices) > 1 for d in decisions)

    def _select(
        self, ws: Workspace, vote: set[int], decisions: list[GroupDecision], compensate: bool
    ) -> tuple[set[int], dict[str, Any]]:
        """Rule 3, end to end: the vote's choice against each voter's own choice (in every
        group), scored by how far the pruned model's outputs move on the calibration data."""
        names = sorted({n for d in decisions for n in d.choices})
        candidates = {"vote": vote}
        for name in names:  # a group without this voter keeps the vote's own pick
            candidates[name] = set().union(*(d.choices.get(name, d.picked) for d in decisions))
        data = ws.ctx.data(ws.model)
        feeds = list(feeds_for(ws.model, data, limit=SELECT_SAMPLES))
        reference = _outputs(ws.model, feeds, ws.ctx.providers)
        labels = (
            data.labels[: sum(sample_count(f) for f in feeds)] if data.labels is not None else None
        )
        scores = {}
        for name, classes in candidates.items():
            trial = copy.deepcopy(ws.model)
            zero_and_compensate(ws, keep_one_per_tensor(ws.an, classes), compensate, trial)
            scores[name] = _score(reference, _outputs(trial, feeds, ws.ctx.providers), labels)
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
        }
        return candidates[best], report

    def _combine(
        self,
        classes: np.ndarray,
        active: dict[str, np.ndarray],
        k: int,
        total: int,
        multiple: int,
    ) -> set[int]:
        mean_rank = np.mean([rank_normalise(s) for s in active.values()], axis=0)
        if self.mode == "average":
            return set(classes[np.argsort(mean_rank, kind="stable")[:k]].tolist())
        votes = np.zeros(len(classes), dtype=np.int64)
        for s in active.values():
            votes[np.argsort(s, kind="stable")[:k]] += 1
        quorum = min(self.quorum, len(active))
        order = np.lexsort((mean_rank, -votes))
        if not self.fill:
            order = order[votes[order] >= quorum]
        count = allowed_count(total, min(k, len(order)), multiple)
        return set(classes[order[:count]].tolist())

    def _global(
        self, ws: Workspace, plans: list, multiple: int
    ) -> tuple[set[int], list[GroupDecision]]:
        pooled = []  # (normalised score, group index, class)
        for g, classes, voters in plans:
            active = [s for s in (v.criterion.rank_scores(v.view) for v in voters) if s is not None]
            if not active:
                continue
            z = np.mean([(s - s.mean()) / (s.std() + 1e-12) for s in active], axis=0)
            pooled += [(float(v), g, int(c)) for v, c in zip(z, classes, strict=True)]
        pooled.sort(key=lambda t: t[0])
        total_free = len(pooled)
        budget = int(self.sparsity * total_free)
        taken: dict[int, list[int]] = {}
        for _, g, c in pooled:
            if budget <= 0:
                break
            mine = taken.setdefault(g.index, [])
            limit = g.channels - max(int(np.ceil(self.floor * g.channels)), 1)
            if len(mine) < limit:
                mine.append(c)
                budget -= 1
        chosen: set[int] = set()
        decisions = []
        for g, _classes, _voters in plans:
            mine = taken.get(g.index, [])
            count = allowed_count(g.channels, len(mine), multiple)
            picked = set(mine[:count])
            chosen |= picked
            section = {
                "group": g.index,
                "channels": g.channels,
                "pruned": count,
                "producers": [s.node for s in g.spaces],
            }
            decisions.append(GroupDecision(g, section, picked))
        return chosen, decisions
