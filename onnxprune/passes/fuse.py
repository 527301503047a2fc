"""The ``fuse`` pass: several models become one ensemble graph, optionally with fewer members."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import onnx

from onnxprune.cost import summarize
from onnxprune.errors import DataError, PassOptionError, UnsupportedModelError
from onnxprune.fusion import select as sel
from onnxprune.fusion.adapters import plan_adapter, show
from onnxprune.fusion.combine import Branch, branch, check_outputs, fused_model
from onnxprune.fusion.members import (
    Member,
    input_dims,
    load_members,
    reconcile,
    single_input,
    unique_names,
)
from onnxprune.fusion.weights import merge_weights
from onnxprune.passes.base import Pass, PassResult, option
from onnxprune.passes.registry import register_pass
from onnxprune.runner import outputs

if TYPE_CHECKING:
    from onnxprune.context import Context
    from onnxprune.data import Dataset

DETECT_SAMPLES = 256  # samples that decide whether a member's outputs are logits


@register_pass
@dataclass
class Fuse(Pass):
    """Fuse models into one ensemble graph (mean, weighted, vote, concat); prune its members.

    Rules:
        1. The model and every member of ``members`` (paths as given, from the working
           directory) become branches of one graph that reads the model's input; a member whose
           input differs only by layout (NCHW vs NHWC, a squeezed channel axis) reads it through
           a Transpose/Squeeze/Unsqueeze adapter (``onnxprune.fusion.adapters``; ``layout=``
           sets one by hand). Names are prefixed per member, opsets brought to the highest one,
           other domains kept (``onnxprune.fusion.members``).
        2. ``combine`` (``onnxprune.fusion.combine``): ``mean`` of probabilities, ``weighted``
           (``weights=`` one per model, the model's first, else fitted on ``--data``'s labels),
           ``vote`` (each class's share of the members' argmax votes; ``label=true`` adds the
           majority class), ``concat`` (raw outputs side by side), ``weights`` (weight-space
           fusion of checkpoints of one architecture: ``onnxprune.fusion.weights``).
        3. A member's outputs are logits unless every row is non-negative and sums to 1 on the
           run's data (``outputs=`` decides by hand); softmax is applied to logits before
           ``mean`` and ``weighted``, and the report says where.
        4. ``select=forward|backward`` keeps the members (and weights) that hold the full
           ensemble's accuracy on ``--eval-data`` (else ``--data``; without labels: agreement
           with the full ensemble), less ``tolerance`` (``onnxprune.fusion.select``); every
           member's marginal contribution is reported, and only the kept ones are in the graph.
           With ``max_macs`` the kept members' MACs per sample sum to at most it, and they are
           chosen by log-likelihood on ``--eval-data`` and ``--data`` together
           (:func:`onnxprune.fusion.select.within_macs`); ``combine=weighted`` without
           ``weights=`` then fits the kept members' weights again on ``--data``.
        5. The fused output takes the model's output name, so ``validate`` compares the
           ensemble with the model alone.
    """

    name: ClassVar[str] = "fuse"
    new_reference: ClassVar[bool] = True  # vote, refit and validate compare with the ensemble
    members: tuple[str, ...] = option(
        (), "the other models (a.onnx+b.onnx), from the working folder"
    )
    combine: Literal["mean", "weighted", "vote", "concat", "weights"] = option(
        "mean", "how the members' outputs are combined"
    )
    weights: tuple[float, ...] = option(
        (),
        "weighted, vote: one weight per model, the model's first (empty: weighted fits them "
        "on --data's labels, vote counts each member once)",
        low=0,
    )
    layout: tuple[str, ...] = option(
        (), "a member's input mapping by hand: MEMBER:nhwc, nchw, same or a perm 0.2.3.1"
    )
    outputs: Literal["auto", "logits", "probabilities"] = option(
        "auto", "what the members output (auto: probabilities when rows are >= 0 and sum to 1)"
    )
    output: int = option(0, "which output of each model is combined", low=0)
    label: bool = option(False, "also output NAME_label, the argmax of the combination")
    select: Literal["none", "forward", "backward"] = option(
        "none", "prune members: greedy forward selection with replacement, or backward elimination"
    )
    rounds: int = option(0, "select=forward: members added (0: twice the number of models)", low=0)
    tolerance: float = option(
        0.0, "select: accuracy the kept members may lose against the full ensemble", low=0, high=1
    )
    max_macs: int | None = option(
        None,
        "select=forward: keep members whose MACs per sample sum to at most this, chosen by "
        "log-likelihood of the labels (per MAC and outright) on --eval-data and --data",
        low=1,
    )
    align: bool = option(True, "combine=weights: align channels before averaging")
    match: Literal["weights", "activations"] = option(
        "weights", "combine=weights: align by weight correlation, or by activations on --data"
    )

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("give the other models: members=b.onnx+c.onnx")
        if self.weights and self.combine not in ("weighted", "vote"):
            raise ValueError(f"weights= is for combine=weighted or vote, not {self.combine}")
        if self.weights and len(self.weights) != 1 + len(self.members):
            raise ValueError(
                f"weights= gives {len(self.weights)} weight(s) for {1 + len(self.members)} "
                "models (the model first, then each member)"
            )
        if self.weights and not sum(self.weights) > 0:
            raise ValueError("weights= must not all be 0")
        if self.label and self.combine in ("concat", "weights"):
            raise ValueError(
                f"label=true is for combine=mean, weighted or vote, not {self.combine}"
            )
        if self.select != "none" and self.combine in ("concat", "weights"):
            raise ValueError(f"select= needs combine=mean, weighted or vote, not {self.combine}")
        if self.max_macs is not None and self.select != "forward":
            raise ValueError("max_macs= is a budget for select=forward: add select=forward")

    def requires(self, model: onnx.ModelProto, ctx: Context) -> None:
        """Ensemble pruning and fitted weights need real data."""
        if self.select != "none" and ctx.data_path is None and ctx.eval_data_path is None:
            raise ValueError("select= needs evaluation data: give --eval-data or --data")
        if self.combine == "weighted" and not self.weights and ctx.data_path is None:
            raise ValueError("combine=weighted without weights= fits them on --data's labels")

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        """Load, reconcile, adapt, detect logits, select, combine (rules 1-5)."""
        loaded = load_members(self.members)
        first = str(ctx.model_path) if ctx.model_path else "model"
        sources = [first, *self.members]
        if self.combine == "weights":
            return self._weights_merge(model, [m for _, m in loaded], sources, ctx)
        names = unique_names(sources)
        members = [Member(names[0], first, model)]
        members += [Member(n, p, m) for n, (p, m) in zip(names[1:], loaded, strict=True)]
        opset, ir, domains = reconcile(members)
        manual = self._manual(members)
        fused_input = copy.deepcopy(single_input(members[0]))
        fused_dims = input_dims(fused_input)
        branches: list[Branch] = []
        for m in members:
            vi = single_input(m)
            if vi.type.tensor_type.elem_type != fused_input.type.tensor_type.elem_type:
                raise UnsupportedModelError(
                    f"pass fuse: member {m.source}: input {vi.name!r} has another element type "
                    f"than the fused input {fused_input.name!r}"
                )
            adapter = plan_adapter(
                m.source, fused_input.name, fused_dims, input_dims(vi), manual.get(m.name)
            )
            branches.append(branch(m, adapter, fused_input, self.output, opset))
        check_outputs(branches, self.combine)
        raw = self._run(branches, ctx.data(model).head(DETECT_SAMPLES), ctx)
        for b, r in zip(branches, raw, strict=True):
            b.logits = self.outputs == "logits" or (
                self.outputs == "auto" and not sel.are_probabilities(r)
            )
        weights, fit = self._base_weights(branches, ctx, model)
        report: dict[str, Any] = {}
        if self.select != "none":
            weights, report = self._select(branches, weights, ctx, model)
        kept = [b for b, w in zip(branches, weights, strict=True) if w > 0]
        fused = fused_model(
            kept,
            self.combine,
            weights[weights > 0],
            model.graph.output[self.output].name,
            label=self.label,
            template=model,
            opset=opset,
            ir_version=ir,
            domains=domains,
        )
        report = self._report(branches, weights, fit, opset, ir) | report
        model.CopyFrom(fused)  # the model given becomes the ensemble (in place, as vote)
        return PassResult(model, True, report)

    def _manual(self, members: list[Member]) -> dict[str, str]:
        """The ``layout`` option as member name -> mapping; a member is named by its path as
        given, its file name or its stem."""
        out = {}
        for item in self.layout:
            key, sep, mapping = item.rpartition(":")
            hits = [
                m for m in members if sep and key in (m.source, m.name, m.source.rsplit("/", 1)[-1])
            ]
            if not hits:
                known = ", ".join(m.source for m in members)
                raise PassOptionError(
                    f"pass fuse: layout={item!r} names no member (give MEMBER:MAPPING with "
                    f"MEMBER one of {known})"
                )
            out[hits[0].name] = mapping
        return out

    def _run(self, branches: list[Branch], data: Dataset, ctx: Context) -> list[np.ndarray]:
        """Each branch's output on ``data``, run on its own."""
        return [outputs(b.model, data, ctx.providers)[b.output.name] for b in branches]

    def _parts(self, branches: list[Branch], raw: list[np.ndarray]) -> list[np.ndarray]:
        """What each branch adds to the combination: probabilities, or a one-hot vote."""
        if self.combine == "vote":
            return [sel.one_hot(r) for r in raw]
        return [
            sel.softmax(r) if b.logits else r.astype(np.float64)
            for b, r in zip(branches, raw, strict=True)
        ]

    def _base_weights(
        self, branches: list[Branch], ctx: Context, model: onnx.ModelProto
    ) -> tuple[np.ndarray, str]:
        """The full ensemble's weights (given, fitted on the labels, or equal) and how."""
        if self.weights:
            w = np.asarray(self.weights, np.float64)
            return w / w.sum(), "given"
        if self.combine != "weighted":
            return np.full(len(branches), 1.0 / len(branches)), "equal"
        data = ctx.data(model)
        if data.labels is None:
            raise DataError(
                f"pass fuse: combine=weighted without weights= fits them on the labels of "
                f"{data.source}, which has none: give weights=... or save labels in the .npz"
            )
        parts = self._parts(branches, self._run(branches, data, ctx))
        labels = data.labels[: len(parts[0])].astype(np.int64)
        return sel.fit_weights(parts, labels), f"fitted on {len(labels)} labels of {data.source}"

    def _select(
        self, branches: list[Branch], full: np.ndarray, ctx: Context, model: onnx.ModelProto
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Rule 4: the kept members' weights, and the selection's report."""
        data = ctx.eval_data(model)
        parts = self._parts(branches, self._run(branches, data, ctx))
        if data.labels is not None:
            scorer = sel.Scorer(data.labels[: len(parts[0])].astype(np.int64), False)
            metric = "accuracy"
        else:
            scorer = sel.Scorer(np.argmax(sel.combine(parts, full), axis=-1), True)
            metric = "agreement with the full ensemble"
        rounds = self.rounds or 2 * len(branches)
        costs = [summarize(b.member.model).macs for b in branches]
        if self.max_macs is not None:
            chosen = self._within(branches, parts, full, costs, scorer, ctx, model)
        elif self.select == "forward":
            chosen = sel.forward(parts, full, scorer, rounds, self.tolerance)
        else:
            chosen = sel.backward(parts, full, scorer, self.tolerance)
        marginal = sel.contributions(parts, full, scorer)
        alone = [scorer(p)[0] for p in parts]
        names = [b.member.name for b in branches]
        for step in chosen.steps:
            for key in ("add", "drop"):
                if key in step:
                    step[key] = names[step[key]]
            if "start" in step:
                step["start"] = [names[i] for i in step["start"]]
        kept = [n for n, w in zip(names, chosen.weights, strict=True) if w > 0]
        kept_score = _score(parts, chosen.weights, scorer)
        budget = {} if self.max_macs is None else {
            "max_macs": self.max_macs,
            "macs_kept": int(sum(c for c, w in zip(costs, chosen.weights, strict=True) if w > 0)),
            "log_likelihood_kept": round(chosen.score, 6),
            "log_likelihood_full": round(chosen.full_score, 6),
        }  # fmt: skip
        report = {
            "select": self.select,
            "metric": metric,
            "eval_data": data.source,
            "score_full": round(_score(parts, full, scorer), 6),
            "score_kept": round(kept_score, 6),
            **budget,
            "kept": "+".join(kept),
            "contributions": ", ".join(
                f"{n} {c:+.4f}" for n, c in zip(names, marginal, strict=True)
            ),
            "selection": {
                "steps": chosen.steps,
                "members": {
                    n: {"alone": round(a, 6), "marginal": c, "weight": float(w), "macs": m}
                    for n, a, c, w, m in zip(
                        names, alone, marginal, chosen.weights, costs, strict=True
                    )
                },
            },
        }
        return chosen.weights, report

    def _within(
        self,
        branches: list[Branch],
        parts: list[np.ndarray],
        full: np.ndarray,
        costs: list[int],
        scorer: sel.Scorer,
        ctx: Context,
        model: onnx.ModelProto,
    ) -> sel.Selection:
        """Rule 4 with ``max_macs``: the selection on the evaluation rows and, when both
        carry labels and differ, ``--data``'s rows too; weighted without ``weights=``: the
        kept members' weights fitted again on ``--data``."""
        reference = scorer.reference
        calib = ctx.data(model)
        both = ctx.eval_data_path is not None and ctx.data_path is not None
        more: list[np.ndarray] = []
        if both and not scorer.agreement and calib.labels is not None:
            more = self._parts(branches, self._run(branches, calib, ctx))
            parts = [np.concatenate([p, q]) for p, q in zip(parts, more, strict=True)]
            reference = np.concatenate([reference, calib.labels[: len(more[0])].astype(np.int64)])
        try:
            chosen = sel.within_macs(parts, full, costs, int(self.max_macs or 0), reference)
        except ValueError as exc:
            raise PassOptionError(f"pass fuse: {exc}") from None
        if self.combine == "weighted" and not self.weights:
            keep = np.flatnonzero(chosen.weights > 0)
            more = more or self._parts(branches, self._run(branches, calib, ctx))
            mine = [more[i] for i in keep]
            if calib.labels is not None:
                fitted = sel.fit_weights(mine, calib.labels[: len(mine[0])].astype(np.int64))
                chosen.weights = np.zeros(len(branches))
                chosen.weights[keep] = fitted
        return chosen

    def _report(
        self, branches: list[Branch], weights: np.ndarray, fit: str, opset: int, ir: int
    ) -> dict[str, Any]:
        soft = [b.member.name for b in branches if b.logits and weights[branches.index(b)] > 0]
        if self.combine in ("mean", "weighted"):
            softmax = f"applied to {', '.join(soft)} (logits)" if soft else "none (probabilities)"
        else:
            softmax = (
                "none ("
                + ("votes read the argmax" if self.combine == "vote" else "raw outputs")
                + ")"
            )
        return {
            "combine": self.combine,
            "models": int((weights > 0).sum()),
            "opset": opset,
            "ir_version": ir,
            "softmax": softmax,
            "adapters": "; ".join(
                f"{b.member.name}: {b.adapter.how}" for b in branches if not b.adapter.empty
            )
            or "none",
            "weights_from": fit if self.select == "none" else f"select={self.select}",
            "members": [
                {
                    "name": b.member.name,
                    "source": b.member.source,
                    "input": show(input_dims(single_input(b.member))),
                    "adapter": b.adapter.how,
                    "outputs": "logits" if b.logits else "probabilities",
                    "weight": float(w),
                    "kept": bool(w > 0),
                    "notes": b.member.notes,
                }
                for b, w in zip(branches, weights, strict=True)
            ],
        }

    def _weights_merge(
        self,
        model: onnx.ModelProto,
        others: list[onnx.ModelProto],
        sources: list[str],
        ctx: Context,
    ) -> PassResult:
        """``combine=weights``: weight-space fusion (:func:`~onnxprune.fusion.weights.merge_weights`);
        with ``--data`` the merge is REPAIRed on it and ``match=activations`` is possible."""
        data = ctx.data(model) if ctx.data_path is not None else None
        if self.match == "activations" and data is None:
            raise PassOptionError("pass fuse: match=activations needs --data (real inputs)")
        merged, section = merge_weights(
            [copy.deepcopy(model), *others], self.align, names=sources, data=data, match=self.match
        )
        model.CopyFrom(merged)
        details = {"combine": "weights", "align": self.align, "match": self.match}
        return PassResult(model, True, details | {"repair": data is not None} | section)


def _score(parts: list[np.ndarray], weights: np.ndarray, scorer: sel.Scorer) -> float:
    """The selection score (accuracy, or agreement) of ``weights``."""
    return scorer(sel.combine(parts, weights))[0]
