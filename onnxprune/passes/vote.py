"""The ``vote`` pass: several criteria (or ensemble members) vote on which channels to prune."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import onnx

from onnxprune.analysis.groups import classes_of, keep_one_per_tensor
from onnxprune.analysis.labels import ChannelGroup
from onnxprune.analysis.state import NOTHING_TO_PRUNE
from onnxprune.graph import get_init
from onnxprune.model import model_nbytes
from onnxprune.passes.base import Pass, PassResult, option
from onnxprune.passes.budget_options import BudgetOptions
from onnxprune.passes.registry import register_pass
from onnxprune.pruning import budget, obs  # noqa: F401 - obs registers its criterion
from onnxprune.pruning.criteria import Criterion, GroupView, get_criterion, rank_normalise
from onnxprune.pruning.decision import GroupDecision
from onnxprune.pruning.ensemble import ensemble_arrays
from onnxprune.pruning.free import free_first, free_mask
from onnxprune.pruning.group_shares import parse_shares, share_of
from onnxprune.pruning.lsq import check_caps
from onnxprune.pruning.masks import AUTO
from onnxprune.pruning.selection import SELECT_LIMIT, SELECT_SAMPLES, select
from onnxprune.pruning.shortfall import (
    LAST_CHANNEL,
    asked_count,
    hold_reason,
    join_reasons,
    rounding_reason,
    shortfall_rows,
    uncovered_layers,
)
from onnxprune.pruning.workspace import (
    Workspace,
    allowed_count,
    class_multiples,
    reconstruction_error,
    round_count,
    zero_and_compensate,
)
from onnxprune.runtime import channel_multiple

if TYPE_CHECKING:
    from onnxprune.context import Context


QUORUM = 2  # votes a channel needs when no quorum is given (or every voter, when fewer)


@dataclass
class Voter:
    """One criterion applied to one model's weights (the main model or an ensemble member)."""

    name: str
    criterion: Criterion
    view: GroupView


@register_pass
@dataclass
class Vote(Pass, BudgetOptions):
    """Criteria vote on the channels to prune; a quorum decides; the chosen ones are zeroed.

    Rules:
        1. In every prunable group each criterion ranks the free channels and votes for the
           lowest ``sparsity`` share (rounded so kept counts are multiples of ``round_to``;
           a class several channels wide, such as an attention head, counts its channels:
           ``workspace.class_multiples``). ``group_sparsity`` gives chosen groups a share of
           their own (:mod:`onnxprune.pruning.group_shares`; in budget mode, their bound).
        2. ``mode=vote``: channels with at least ``quorum`` votes go, most votes first
           (default :data:`QUORUM`; a quorum above the number of voters is refused, and one
           above the voters that did not abstain in a group is lowered to them);
           ``mode=average``: the lowest mean of rank-normalised scores go.
        3. With calibration data, each voter's choice is checked by how much of the consumers'
           outputs it loses (``check``: after a least-squares refit, or after bias compensation);
           voters far worse than the best are dropped. Then (``select``) the vote's choice and
           each voter's own choice are tried on the whole model: the one whose outputs move
           least on the calibration data (accuracy first when it has labels) is kept, so the
           vote is never worse there than its best voter.
        4. Free first: channels exactly zero or constant wherever they are read (proved from
           the weights, or constant on the calibration data) go before any live channel, in
           every voter's ranking (``zero_or_constant`` counts them per group).
        5. Statistics over token positions skip padding when the model has a padding-mask
           input (``mask_input``: detected by name and type, named, or ``none``).
        6. ``scope=global`` ranks all groups together after per-group normalisation, keeping at
           least ``floor`` of every group.
        7. Pruned channels are zeroed in every member of their group; with data, their mean
           contribution moves into the next layer's bias (``compensate``) where that lowers
           the error on held-out rows. Then ``fold`` removes them for real.
        8. Every group that gives less than ``sparsity`` asks says why: a row in ``shortfall``
           (group, layers, asked, pruned, reason), pinned and protected groups included, and
           ``asked``/``reason`` in its ``groups`` section when it was voted on; layers no group
           covers get a row too (``shortfall.uncovered_layers``).
        7. Budget mode (``max_accuracy_drop``, ``min_cosine``) replaces rules 1-4 by a search
           within the budget, and ``sensitivity`` adds a table: :mod:`onnxprune.pruning.budget`.
    """

    name: ClassVar[str] = "vote"
    criteria: tuple[str, ...] = option(("l1", "flap", "wanda"), "criteria that vote (a+b+c)")
    sparsity: float = option(0.5, "share of each group's channels to prune", low=0, below=1)
    group_sparsity: tuple[str, ...] = option(
        (),
        "shares of chosen groups, REGEX:SHARE items (a+b): a group with a producer node or a "
        "weight whose name matches REGEX (the first item that does) loses SHARE instead",
    )
    quorum: int | None = option(
        None,
        "votes a channel needs to be pruned (mode=vote), at most the number of voters "
        "[default: 2, or every voter when fewer]",
        low=1,
    )
    mode: Literal["vote", "average"] = option("vote", "quorum vote, or mean of normalised ranks")
    scope: Literal["local", "global"] = option("local", "prune per group, or rank across groups")
    floor: float = option(
        0.1, "scope=global: keep at least this share of every group", low=0, high=1
    )
    round_to: int = option(
        0,
        "keep channel counts a multiple of this; 0: what suits the runtime here (16 on "
        "AVX-512 CPUs, else 8)",
        low=0,
    )
    protect: str = option("", "regex of node/initializer names whose groups stay whole", regex=True)
    ensemble: tuple[str, ...] = option((), "other models of the same architecture that vote too")
    compensate: Literal["auto", "on", "off"] = option(
        "auto", "move pruned channels' mean into the next bias (auto: when --data is given)"
    )
    check: Literal["lsq", "mean", "off"] = option(
        "lsq",
        "weigh voters by the loss left after a least-squares refit (lsq) or after bias "
        "compensation (mean); needs data",
    )
    mask_input: str = option(
        AUTO,
        "padding-mask input [batch, sequence] whose zeros statistics skip (auto: an integer "
        "or bool input named like *mask*; none: off)",
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
        parse_shares(self.group_sparsity)
        if self.group_sparsity and self.scope == "global":
            raise ValueError(
                "group_sparsity sets each group's share and scope=global ranks all groups by "
                "one: give one"
            )
        if self.round_to < 0:
            raise ValueError("round_to must be 0 (auto) or at least 1")
        if not self.criteria:
            raise ValueError("criteria must name at least one criterion")
        for c in self.criteria:
            get_criterion(c, f"pass {self.name}")
        voters = self.voters()
        if self.quorum is not None and not 1 <= self.quorum <= voters:
            raise ValueError(
                f"quorum={self.quorum} but there are {voters} voter(s) ({len(self.criteria)} "
                f"criteria x {1 + len(self.ensemble)} model(s)); allowed: 1 <= quorum <= {voters}"
            )

    def sparsity_of(self, group: ChannelGroup) -> float:
        """The share ``group`` loses: its ``group_sparsity`` item's, else ``sparsity``."""
        return share_of(group, parse_shares(self.group_sparsity), self.sparsity)

    def voters(self) -> int:
        """How many vote: every criterion on the model and on each ensemble member."""
        return len(self.criteria) * (1 + len(self.ensemble))

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        """Vote, zero the chosen classes, compensate biases; report per group."""
        ctx = budget.calibration_context(self, model, ctx)  # budget mode: rows that calibrate
        ws = Workspace.open(model, ctx, self.protect, self.mask_input, self.name)
        if not ws.groups:  # nothing to vote on: no statistics to gather either
            nothing = {"channels_pruned": 0, "groups": [], "note": NOTHING_TO_PRUNE}
            return PassResult(ws.model, False, nothing)
        multiple = self.round_to or channel_multiple(ctx.providers)
        multiples = class_multiples(ws.an, ws.groups, multiple)
        criteria = [get_criterion(c) for c in self.criteria]
        data = ctx.data(model)
        has_data = not data.synthetic
        compensate = self.compensate == "on" or (self.compensate == "auto" and has_data)
        need_stats = any(c.needs_data for c in criteria) or compensate
        keep = SELECT_SAMPLES if self._may_select(ws, has_data) else 0  # reference outputs
        stats = ws.stats(keep) if need_stats else {}
        arrays = [("", lambda name: get_init(model.graph, name), stats)]
        arrays += ensemble_arrays(ws, self.ensemble, criteria)
        check = self.check if has_data else "off"
        chosen: set[int] = set()
        decisions: list[GroupDecision] = []
        plans = []
        held: list[dict[str, Any]] = []  # sections of the groups with no free channel
        for g in ws.groups:
            classes = ws.free_classes(g)
            if not len(classes):
                held.append(self._held(g, ws))
                continue
            voters = [
                Voter(
                    c.name + (f"@{tag}" if tag else ""),
                    c,
                    GroupView(ws.an, classes, getter, st, ctx.seed, None if tag else ws),
                )
                for tag, getter, st in arrays
                for c in criteria
            ]
            free = free_mask(ws.an, classes, stats if has_data else None)
            plans.append((g, classes, voters, free))
        outcome = budget.apply(self, ws, plans, multiples, compensate)
        if outcome.decisions is not None and outcome.chosen is not None:
            chosen, decisions = outcome.chosen, outcome.decisions
        elif self.scope == "global":
            chosen, decisions = self._global(ws, plans, multiple, multiples)
        else:
            for g, classes, voters, dead in plans:
                step = multiples[g.index]
                decision = self._local(ws, g, classes, voters, dead, check, multiple, step)
                chosen |= decision.picked
                decisions.append(decision)
        selection: dict[str, Any] = {}
        picked = None  # the selection's outcome: its winner is zeroed already
        if self._selects(ws, has_data, decisions):
            picked = select(ws, chosen, decisions, compensate)
            chosen, selection = picked.chosen, picked.report
        chosen = keep_one_per_tensor(ws.an, chosen)
        roots = ws.an.roots()
        for d in decisions:  # counted after the last-channel guard
            g = d.group
            mine = classes_of(roots, g.spaces)
            d.section["pruned"] = len(mine & chosen)
            if d.section["pruned"] < len(d.picked):
                d.section["reason"] = join_reasons([d.section.get("reason"), LAST_CHANNEL])
        applied = picked.apply(ws) if picked is not None else None
        if applied is None:
            after = picked.after if picked is not None else None
            applied = zero_and_compensate(ws, chosen, compensate, after=after)
        sections = [d.section for d in decisions]  # the groups voted on; held ones: shortfall
        every = sorted(sections + held, key=lambda s: s["group"])
        uncovered = uncovered_layers(ws.model, ws.an, ws.groups, self.sparsity)
        asked = sum(s["asked"] for s in every) + sum(r["asked"] or 0 for r in uncovered)
        report: dict[str, Any] = {
            "channels_pruned": len(chosen),
            "channels_asked": asked,
            "groups": sections,
            "shortfall": shortfall_rows(every) + uncovered,
            "compensated": compensate,
            "round_to": multiple,
            "data": data.source,
            **({"mask_input": ws.mask} if ws.mask else {}),
            **({"check_caps": check_caps()} if check != "off" else {}),
            **selection,
            **applied,
            **outcome.report,
        }
        if asked and not chosen:
            report["warnings"] = [
                f"vote pruned none of the {asked} channels asked for; the 'vote: less than "
                "asked' table says why, group by group"
            ]
        return PassResult(ws.model, bool(chosen), report)

    def _held(self, g: Any, ws: Workspace) -> dict[str, Any]:
        """A group with no free channel, as a section: nothing pruned, and why (for the
        shortfall rows only: ``groups`` lists the groups voted on)."""
        return {
            "group": g.index,
            "channels": g.channels,
            "free": 0,
            "asked": asked_count(g.channels, self.sparsity_of(g)),
            "target": 0,
            "producers": [sp.node for sp in g.spaces],
            "pruned": 0,
            "reason": hold_reason(g, 0, self.protect if g.index in ws.protected else ""),
        }

    def _local(
        self,
        ws: Workspace,
        g: Any,
        classes: np.ndarray,
        voters: list[Voter],
        dead: np.ndarray,
        check: str,
        multiple: int,
        per: tuple[int, int],
    ) -> GroupDecision:
        step, width = per  # classes pruned at a time, channels per class
        free = len(classes)
        share = self.sparsity_of(g)
        k = round_count(g.channels, free, share, step)
        asked = asked_count(g.channels, share)
        section: dict[str, Any] = {
            "group": g.index,
            "channels": g.channels,
            "free": free,
            "asked": asked,
            "target": k,
            "producers": [s.node for s in g.spaces],
        }
        if self.group_sparsity:
            section["sparsity"] = share
        reasons = [hold_reason(g, free) if free < asked else None]
        if k < round_count(g.channels, free, share, 1):
            reasons.append(rounding_reason(g.channels, k, multiple, step, width))
        if k < asked:
            section["reason"] = join_reasons(reasons)
        if k == 0:
            section["pruned"] = 0
            return GroupDecision(g, section)
        scores = {v.name: v.criterion.rank_scores(v.view) for v in voters}
        active = {n: free_first(s, dead) for n, s in scores.items() if s is not None}
        if dead.any():
            section["zero_or_constant"] = int(dead.sum())
        section["abstained"] = sorted(set(scores) - set(active))
        if not active:
            section["pruned"] = 0
            section["reason"] = join_reasons(
                [*reasons, f"no criterion could score it ({', '.join(sorted(scores))} abstained)"]
            )
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
        picked = self._combine(classes, active, k, g.channels, step)
        if len(picked) < k:  # fill=false: fewer reached the quorum
            section["reason"] = join_reasons(
                [
                    *reasons,
                    f"{len(picked)} channels reached the quorum of "
                    f"{self._quorum(len(active))} votes (fill=false)",
                ]
            )
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

    def _may_select(self, ws: Workspace, has_data: bool) -> bool:
        if not has_data or self.select == "local" or self.scope == "global":
            return False
        return self.select != "auto" or model_nbytes(ws.model) <= SELECT_LIMIT

    def _selects(self, ws: Workspace, has_data: bool, decisions: list[GroupDecision]) -> bool:
        return self._may_select(ws, has_data) and any(len(d.choices) > 1 for d in decisions)

    def _quorum(self, voters: int) -> int:
        """Votes a channel needs among ``voters`` that voted: the ``quorum`` option (default
        :data:`QUORUM`), lowered to the voters there are."""
        return min(self.quorum if self.quorum is not None else QUORUM, voters)

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
        # voters that abstained (no data) or were dropped (rule 3) lower the quorum
        quorum = self._quorum(len(active))
        order = np.lexsort((mean_rank, -votes))
        if not self.fill:
            order = order[votes[order] >= quorum]
        count = allowed_count(total, min(k, len(order)), multiple)
        return set(classes[order[:count]].tolist())

    def _global(
        self, ws: Workspace, plans: list, multiple: int, multiples: dict[int, tuple[int, int]]
    ) -> tuple[set[int], list[GroupDecision]]:
        pooled = []  # (normalised score, group index, class)
        for g, classes, voters, dead in plans:
            active = [s for s in (v.criterion.rank_scores(v.view) for v in voters) if s is not None]
            if not active:
                continue
            z = np.mean([(s - s.mean()) / (s.std() + 1e-12) for s in active], axis=0)
            z = np.where(dead, -np.inf, z)  # free channels first, across groups too
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
        for g, _classes, _voters, _dead in plans:
            mine = taken.get(g.index, [])
            step, width = multiples[g.index]
            count = allowed_count(g.channels, len(mine), step)
            picked = set(mine[:count])
            chosen |= picked
            section = {
                "group": g.index,
                "channels": g.channels,
                "asked": len(mine),  # the global ranking's share of this group
                "pruned": count,
                "producers": [s.node for s in g.spaces],
            }
            if count < len(mine):
                section["reason"] = rounding_reason(g.channels, count, multiple, step, width)
            decisions.append(GroupDecision(g, section, picked))
        return chosen, decisions
