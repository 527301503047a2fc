"""The ``refit`` pass: least-squares reconstruction of the layers that read pruned channels."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import onnx

from onnxprune import progress
from onnxprune.analysis.labels import State
from onnxprune.graph import get_init, graph_input_names, set_init
from onnxprune.passes.base import Pass, PassResult, option, require_original
from onnxprune.passes.registry import register_pass
from onnxprune.pruning.masks import positions
from onnxprune.pruning.propagate import MAX_SIDE, STEP, ElementwisePaths, pinv_rows
from onnxprune.pruning.reconstruct import RIDGES, solve
from onnxprune.pruning.refit_units import (
    Unit,
    as_rows,
    gemm_alpha,
    linear_outputs,
    output_after_bias,
    patches,
    producer_unit,
    row_split,
    save_weights,
    unit_name,
    unsupported,
    weight_matrix,
    write_solution,
)
from onnxprune.pruning.workspace import Workspace
from onnxprune.runner import exposed_session, run_batches

if TYPE_CHECKING:
    from onnxprune.context import Context


@register_pass
@dataclass
class Refit(Pass):
    """Refit each layer that reads pruned channels so its output matches the original model's.

    Rules:
        1. A layer qualifies when it is linear in its input: Gemm (transA=0), MatMul with a 2-D
           constant weight, or a Conv without groups or dilation (its input taken as patches).
        2. On the calibration data (``--data``; synthetic inputs otherwise) the pass streams the
           layer's inputs in the pruned model and its outputs in the original model; one row in
           four is held out. It solves a ridge least-squares problem on the other rows for the
           weights of the channels that remain (shrunk towards their current values) and the
           bias; the ridge is the one with the lowest held-out error (or ``ridge``). Weights of
           pruned channels become zero, so ``fold`` adds nothing for them.
        3. Only helps: the new weights are kept only when their error on the held-out rows is
           below that of the current weights; otherwise the layer stays as it was (``kept``,
           ``held_before``, ``held_after`` per layer; ``rejected`` counts them). A layer with
           fewer than 4 fit rows per kept input says so in its ``note``.
        4. Layers are refitted in graph order, each on the inputs that the layers refitted
           before it produce (one pass over the data per layer). Padded tokens are left out
           when the model has a padding mask (:mod:`onnxprune.pruning.masks`).
        5. ``layers=all`` refits every qualifying layer that reads a channel group (not a
           graph input), also those that read no pruned channel: each is fitted, in graph order, on the inputs the pruned model
           gives it, to the original's output, so it corrects the error that reaches it from
           the layers before (SparseGPT / OBC-style sequential reconstruction); rule 3 holds
           for each.
        6. ``rounds=N`` then propagates targets over pairs: a Gemm/MatMul whose output reaches a
           refitted layer through elementwise nodes alone (an MLP's Gemm, Relu, Gemm; an FFN's
           up projection, Gelu, down projection). The second layer's remaining error, moved
           back through the ridge pseudo-inverse of its weights, shifts the first one's
           targets; the first is fitted to them on the second's fit rows and the second is
           refitted (:mod:`onnxprune.pruning.propagate`). A step is kept only when the second
           layer's error on its held-out rows, which neither layer fitted, falls; otherwise the
           first layer's weights are put back. Layers after a changed pair are refitted again
           (rule 3). Each round costs two passes over the data per pair; it pays with many
           calibration rows per weight (README).
        7. Run it after a pruning pass and before ``fold``: ``-p vote -p refit -p fold``.
    """

    name: ClassVar[str] = "refit"
    needs_original: ClassVar[bool] = True
    ridge: float | None = option(
        None,
        "ridge strength, relative to the mean input energy [default: the one of "
        f"{', '.join(map(str, RIDGES))} with the lowest error on held-out rows]",
        low=0,
    )
    max_batches: int = option(64, "calibration batches to stream (at most)", low=1)
    max_rows: int = option(4096, "rows (positions) sampled per batch and layer", low=1)
    layers: Literal["pruned", "all"] = option(
        "pruned",
        "refit the layers that read pruned channels, or every linear layer (each on the "
        "pruned model's inputs: corrects the error that reaches it too)",
    )

    rounds: int = option(
        0,
        "rounds of target propagation between refitted layers joined by an activation "
        "(each pair's step kept only when the second layer's held-out error falls)",
        low=0,
    )

    def requires(self, model: onnx.ModelProto, ctx: Context) -> None:
        """The context holds the original model (the targets of the fit)."""
        require_original(ctx, self.name)

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        """Refit every qualifying consumer of a zero or constant channel (``layers=all``:
        every qualifying linear layer)."""
        ws = Workspace.open(model, ctx)
        units, skipped = self._units(ws)
        if not units:
            return PassResult(model, False, {"refitted": 0, "skipped": skipped})
        # in graph order, each layer fitted on the inputs the layers refitted before it give
        report_units = []
        original = exposed_session(
            require_original(ws.ctx, self.name), sorted({u.output for u in units}), ws.ctx.providers
        )
        with progress.task(len(units), "units") as advance:
            for unit in units:
                self._stream(ws, [unit], original)
                report_units.append(self._solve(ws.model.graph, unit))
                advance()
        kept = sum(r["kept"] for r in report_units)
        report = {
            "refitted": kept,
            "rejected": len(report_units) - kept,
            "skipped": skipped,
            "layers": report_units,
        }
        if self.rounds:
            report["propagation"] = self._rounds(ws, units, original)
            kept += sum(
                s["kept"] for r in report["propagation"].get("rounds", []) for s in r["pairs"]
            )
        if ws.mask:
            report["mask_input"] = ws.mask
        return PassResult(ws.model, bool(kept), report)

    def _units(self, ws: Workspace) -> tuple[list[Unit], dict[str, str]]:
        units: list[Unit] = []
        skipped: dict[str, str] = {}
        seen = set()
        for sink in ws.an.sinks:
            node = sink.node
            name = node.name or node.output[0]
            pruned = (sink.labels.state != State.VAR).any()
            if name in seen or not (pruned or self.layers == "all"):
                continue
            seen.add(name)
            why = unsupported(ws, sink)
            if why:
                skipped[name] = why
                continue
            out = output_after_bias(ws.model.graph, node)
            lab = ws.an.labels.get(node.output[0])
            weight = np.asarray(get_init(ws.model.graph, sink.weight), np.float64)
            keep = np.flatnonzero(sink.labels.state == State.VAR)
            w, conv = weight_matrix(sink, weight)
            if conv:
                taps = conv["taps"]
                keep = (keep[:, None] * taps + np.arange(taps)).ravel()
            alpha = gemm_alpha(node)
            streams = row_split(ws.ctx.seed, len(units))
            axis = lab.axis if lab else -1
            units.append(Unit(sink, out, axis, keep, alpha * w, streams, alpha, conv, len(units)))
        return units, skipped

    @staticmethod
    def seed_of(u: Unit) -> int:
        """The sketch's seed for one layer (stable across runs)."""
        return len(u.keep)

    def _stream(self, ws: Workspace, units: list[Unit], old: Any) -> None:
        """One pass over the data, both models side by side, into each unit's equations."""
        wanted = sorted({u.sink.tensor for u in units} | {u.output for u in units})
        new = exposed_session(ws.model, wanted, ws.ctx.providers)
        data = ws.ctx.data(ws.model)
        rng = np.random.default_rng(ws.ctx.seed)
        pairs = run_batches([new, old], ws.model, data, max_batches=self.max_batches)
        for feed, (got, ref) in pairs:
            mask = feed[ws.mask] if ws.mask else None
            for u in units:
                x = got[u.sink.tensor]
                x = patches(x, u.conv) if u.conv else as_rows(x, u.sink.labels.axis)
                target, current = (
                    as_rows(ref[u.output], u.out_axis),
                    as_rows(got[u.output], u.out_axis),
                )
                take = self._take(u, got, ref, mask, rng, len(x))
                u.add(x[take], target[take], current[take])

    def _take(
        self,
        u: Unit,
        got: dict[str, np.ndarray],
        ref: dict[str, np.ndarray],
        mask: np.ndarray | None,
        rng: np.random.Generator,
        n: int,
    ) -> np.ndarray:
        """The rows of this batch that feed ``u``'s fit: real tokens (a padding mask), at most
        ``max_rows`` of them, at random."""
        real = None if u.conv else positions(mask, got[u.sink.tensor], u.sink.labels.axis)
        if real is not None and positions(mask, ref[u.output], u.out_axis) is None:
            real = None  # the output is not laid out by token: fit every row
        take = np.arange(n) if real is None else np.arange(n)[real]
        if len(take) > self.max_rows:  # the same random rows of inputs and outputs
            take = take[rng.choice(len(take), self.max_rows, replace=False)]
        return take

    def _solve(self, graph: onnx.GraphProto, u: Unit) -> dict[str, Any]:
        """Solve ``u``'s streamed rows; write the new weights when they beat the old ones."""
        frozen, dw, db, info = self._fit(u)
        every = u.streams.fit.merged(u.streams.held)
        before = every.now / every.n if every.n else 0.0
        after = every.mse(dw, db) if info["kept"] else before
        node = u.sink.node
        taps = u.conv["taps"] if u.conv else 1
        report = {
            "node": node.name or node.output[0],
            "inputs_kept": int(len(u.keep)) // taps,
            "inputs": int(len(u.w)) // taps,
            "mse_before": before,
            "mse_after": after,
            **info,
        }
        if info["kept"]:
            write_solution(graph, u, dw, db, frozen)
        return report

    def _fit(self, u: Unit) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Outputs that stay (a pruning pass zeroed their weight column), and the solve."""
        frozen = np.asarray(~u.w.any(axis=0))
        dw, db, info = solve(u.streams, self.ridge, frozen, self.seed_of(u))
        return frozen, dw, db, info

    def _current(self, ws: Workspace, u: Unit) -> Unit:
        """``u`` with the weights the model has now and empty sums (the same row split)."""
        w, _ = weight_matrix(
            u.sink, np.asarray(get_init(ws.model.graph, u.sink.weight), np.float64)
        )
        return replace(u, w=u.scale * w, streams=row_split(ws.ctx.seed, u.index))

    def _rounds(self, ws: Workspace, units: list[Unit], old: Any) -> dict[str, Any]:
        """``rounds`` of target propagation over the pairs (:mod:`onnxprune.pruning.propagate`),
        in graph order; the layers after a pair that changed are refitted again."""
        pairs, unpaired = _pairs(ws, units)
        if not pairs:
            return {
                "pairs": 0,
                "note": "no refitted layer feeds another through elementwise "
                "nodes alone: nothing to propagate",
                "unpaired": unpaired,
            }
        firsts = {p.index for p in pairs.values()}
        history = []
        for r in range(self.rounds):
            steps, again, changed = [], 0, False
            for u in units:  # a pair's step at its second layer, both layers' inputs current
                if u.index in pairs:
                    step = self._propagate(ws, pairs[u.index], u, old)
                    steps.append(step)
                    changed = changed or step["kept"]
                elif changed and u.index not in firsts:
                    fresh = self._current(ws, u)
                    self._stream(ws, [fresh], old)
                    again += int(self._solve(ws.model.graph, fresh)["kept"])
            history.append({"round": r + 1, "pairs": steps, "refitted_again": again})
            if not changed:
                break  # the next round would see the same model
        return {"pairs": len(pairs), "rounds": history, "unpaired": unpaired}

    def _propagate(self, ws: Workspace, p: Unit, q: Unit, old: Any) -> dict[str, Any]:
        """One step for the pair ``p -> q``: fit ``p`` to targets moved by ``q``'s remaining
        error, refit ``q``; kept only when ``q``'s held-out error falls."""
        graph = ws.model.graph
        p_now = replace(self._current(ws, p), streams=row_split(ws.ctx.seed, q.index))  # q's rows
        q_now = self._current(ws, q)
        step: dict[str, Any] = {"layers": [unit_name(p), unit_name(q)], "kept": False}
        back = pinv_rows(q_now.w[q.keep]) if min(len(q.keep), q.w.shape[1]) <= MAX_SIDE else None
        if back is None:
            return {**step, "note": f"wider than {MAX_SIDE} on both sides: not propagated"}
        base = row_split(ws.ctx.seed, q.index)  # q's error as it is, on its held-out rows
        inputs = set(graph_input_names(graph))
        wanted = sorted({p.sink.tensor, p.output, q.sink.tensor, q.output} - inputs)
        new = exposed_session(ws.model, wanted, ws.ctx.providers)
        rng = np.random.default_rng(ws.ctx.seed)
        for feed, (got, ref) in run_batches(
            [new, old], ws.model, ws.ctx.data(ws.model), max_batches=self.max_batches
        ):
            miss = as_rows(ref[q.output], q.out_axis) - as_rows(got[q.output], q.out_axis)
            got = {**feed, **got}  # the first layer may read a graph input
            x = as_rows(got[p.sink.tensor], p.sink.labels.axis)
            z = as_rows(got[p.output], p.out_axis)
            if len(x) != len(miss) or len(z) != len(miss):
                return {**step, "note": "the layers' rows do not align: not propagated"}
            take = self._take(q, got, ref, feed[ws.mask] if ws.mask else None, rng, len(miss))
            x, z, miss = x[take], z[take], miss[take]
            moved = z.copy()
            moved[:, q.keep] += STEP * (miss @ back)
            p_now.add(x, moved, z)
            base.add(np.zeros((len(miss), 0)), miss)
        base.flush()
        step["held_before"] = base.held.now / base.held.n if base.held.n else 0.0
        frozen, dw, db, info = self._fit(p_now)
        if not info["kept"]:
            return {**step, "note": f"{unit_name(p)} did not move towards its new targets"}
        saved = save_weights(graph, p)
        write_solution(graph, p_now, dw, db, frozen)
        q_new = self._current(ws, q)
        self._stream(ws, [q_new], old)
        frozen_q, dw_q, db_q, info_q = self._fit(q_new)
        after = info_q["held_after"] if info_q["kept"] else info_q["held_before"]
        step["held_after"] = after
        if after < step["held_before"]:
            if info_q["kept"]:
                write_solution(graph, q_new, dw_q, db_q, frozen_q)
            return {**step, "kept": True}
        for name, value in saved.items():  # back to the weights before the step
            set_init(graph, name, value)
        return step


def _pairs(ws: Workspace, units: list[Unit]) -> tuple[dict[int, Unit], dict[str, str]]:
    """The pairs, the first layer by the second's index, and why each other layer is no
    pair's second. The first layer is a refitted layer or any Gemm/MatMul refit could fit
    (an FFN's first layer, which reads no pruned channel); a pair's first layer is no pair's
    second (its targets are the moved ones, not the original's), so pairs are taken from the
    graph's end."""
    graph = ws.model.graph
    paths = ElementwisePaths(graph)
    by_output = {u.output: u for u in units if not u.conv}
    linear = linear_outputs(graph)
    stops = set(by_output) | set(linear)
    pairs: dict[int, Unit] = {}
    unpaired: dict[str, str] = {}
    firsts: set[str] = set()
    for q in reversed(units):
        if q.conv:
            unpaired[unit_name(q)] = "a convolution (its rows are patches): not propagated"
            continue
        if q.output in firsts:
            unpaired[unit_name(q)] = "the first layer of a pair after it"
            continue
        src, why = paths.source(q.sink.tensor, q.sink.node, stops)
        p = by_output.get(src or "")
        if p is None and src in linear:
            p, why = producer_unit(ws, linear[src], src, len(units) + len(pairs))
        if p is None:
            made = paths.producer.get(src or "")
            what = f"{made.op_type} {made.name or src}" if made is not None else "a graph input"
            unpaired[unit_name(q)] = why or f"{src} comes from {what}, not from a Gemm or MatMul"
        elif p.w.shape[1] != len(q.w):
            unpaired[unit_name(q)] = f"{unit_name(p)}'s outputs do not line up with its inputs"
        else:
            pairs[q.index] = p
            firsts.add(p.output)
    return pairs, unpaired
