"""The ``refit`` pass: least-squares reconstruction of the layers that read pruned channels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import onnx

from onnxprune import progress
from onnxprune.analysis.handlers.recurrent import RECURRENT
from onnxprune.analysis.labels import Sink, State
from onnxprune.graph import add_output_bias, attr, bias_add_after, get_init, set_init
from onnxprune.passes.base import Pass, PassResult, option, require_original
from onnxprune.passes.registry import register_pass
from onnxprune.pruning.masks import positions
from onnxprune.pruning.reconstruct import RIDGES, Streams, solve
from onnxprune.pruning.workspace import Workspace
from onnxprune.runner import exposed_session, run_batches

if TYPE_CHECKING:
    from onnxprune.context import Context


@dataclass
class _Unit:
    """One linear consumer to refit, with its streaming fit and held-out sums."""

    sink: Sink
    output: str  # the unit's output (after its bias), the same tensor in both models
    out_axis: int
    keep: np.ndarray  # positions of the input that stay (not zero/constant)
    w: np.ndarray  # current weight as [K, N]
    streams: Streams
    scale: float = 1.0  # Gemm's alpha: the unit computes x @ (scale * weight)
    conv: dict[str, Any] | None = None  # kernel, pads, strides of a Conv (inputs as patches)

    def add(self, x: np.ndarray, target: np.ndarray, current: np.ndarray) -> None:
        """Accumulate rows: x [R, K] inputs, target/current [R, N] unit outputs; the fit is for
        the layer with the removed inputs' weight rows at zero (a constant input's part, which
        zero padding may vary by row, goes to the fit's target)."""
        now = target - current
        gone = np.setdiff1d(np.arange(len(self.w)), self.keep)
        xs = x[:, gone]
        d = now + xs @ self.w[gone] if xs.any() else now
        self.streams.add(x[:, self.keep], d, now)


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
        6. Run it after a pruning pass and before ``fold``: ``-p vote -p refit -p fold``.
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
        if ws.mask:
            report["mask_input"] = ws.mask
        return PassResult(ws.model, bool(kept), report)

    def _units(self, ws: Workspace) -> tuple[list[_Unit], dict[str, str]]:
        units: list[_Unit] = []
        skipped: dict[str, str] = {}
        seen = set()
        for sink in ws.an.sinks:
            node = sink.node
            name = node.name or node.output[0]
            pruned = (sink.labels.state != State.VAR).any()
            if name in seen or not (pruned or self.layers == "all"):
                continue
            seen.add(name)
            why = _unsupported(ws, sink)
            if why:
                skipped[name] = why
                continue
            out = node.output[0]
            if node.op_type == "MatMul":
                follower = bias_add_after(ws.model.graph, node)
                out = follower[0].output[0] if follower else out
            lab = ws.an.labels.get(node.output[0])
            weight = np.asarray(get_init(ws.model.graph, sink.weight), np.float64)
            keep = np.flatnonzero(sink.labels.state == State.VAR)
            conv = None
            if node.op_type == "Conv":
                w, conv = _conv_matrix(node, weight)
                taps = conv["taps"]
                keep = (keep[:, None] * taps + np.arange(taps)).ravel()
            else:
                w = np.moveaxis(weight, sink.weight_axis, 0)
                w = w.reshape(w.shape[0], -1)
            alpha = float(attr(node, "alpha", 1.0)) if node.op_type == "Gemm" else 1.0
            streams = Streams(np.random.default_rng([ws.ctx.seed, len(units)]))
            axis = lab.axis if lab else -1
            units.append(_Unit(sink, out, axis, keep, alpha * w, streams, alpha, conv))
        return units, skipped

    @staticmethod
    def seed_of(u: _Unit) -> int:
        """The sketch's seed for one layer (stable across runs)."""
        return len(u.keep)

    def _stream(self, ws: Workspace, units: list[_Unit], old: Any) -> None:
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
                real = None if u.conv else positions(mask, x, u.sink.labels.axis)
                if real is not None and positions(mask, ref[u.output], u.out_axis) is None:
                    real = None  # the output is not laid out by token: fit every row
                x = _patches(x, u.conv) if u.conv else _rows(x, u.sink.labels.axis)
                target, current = _rows(ref[u.output], u.out_axis), _rows(got[u.output], u.out_axis)
                if real is not None:
                    x, target, current = x[real], target[real], current[real]
                if len(x) > self.max_rows:  # the same random rows of inputs and outputs
                    pick = rng.choice(len(x), self.max_rows, replace=False)
                    x, target, current = x[pick], target[pick], current[pick]
                u.add(x, target, current)

    def _solve(self, graph: onnx.GraphProto, u: _Unit) -> dict[str, Any]:
        # outputs a pruning pass zeroed (their weight column is all zero) stay as they are
        frozen = np.asarray(~u.w.any(axis=0))
        dw, db, info = solve(u.streams, self.ridge, frozen, self.seed_of(u))
        every = u.streams.fit.merged(u.streams.held)
        before = every.now / every.n if every.n else 0.0
        after = every.mse(dw, db) if info["kept"] else before
        w_new = np.zeros_like(u.w)
        w_new[u.keep] = u.w[u.keep] + dw
        w_new[:, frozen] = u.w[:, frozen]
        bias_new = db  # the zeroed inputs' rows become zero: their constant part is in db
        bias_new[frozen] = 0.0
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
        if not info["kept"]:
            return report
        weight = get_init(graph, u.sink.weight)
        if u.conv:
            stored = _conv_weight(w_new, weight.shape).astype(weight.dtype)
        else:
            moved = np.moveaxis(weight, u.sink.weight_axis, 0)
            stored = np.moveaxis(
                (w_new / u.scale).reshape(moved.shape).astype(weight.dtype), 0, u.sink.weight_axis
            )
        set_init(graph, u.sink.weight, np.ascontiguousarray(stored))
        # Gemm adds alpha * delta to its output; the solve is in output units
        add_output_bias(graph, node, (bias_new / u.scale).astype(weight.dtype))
        return report


def _rows(x: np.ndarray, axis: int) -> np.ndarray:
    """Activation ``x`` as rows [positions, channels] (channel axis last), float64."""
    return np.moveaxis(np.asarray(x, np.float64), axis, -1).reshape(-1, x.shape[axis])


def _conv_matrix(node: onnx.NodeProto, weight: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """A Conv weight [O, C, k...] as a matrix [C * taps, O], and its geometry."""
    kernel = list(weight.shape[2:])
    nd = len(kernel)
    pads = list(attr(node, "pads", [0] * 2 * nd))
    strides = list(attr(node, "strides", [1] * nd))
    order = [1, *range(2, 2 + nd), 0]
    taps = int(np.prod(kernel, dtype=np.int64))
    matrix = weight.transpose(order).reshape(weight.shape[1] * taps, weight.shape[0])
    return matrix, {"kernel": kernel, "pads": pads, "strides": strides, "taps": taps}


def _conv_weight(matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`_conv_matrix`: [C * taps, O] back to [O, C, k...]."""
    nd = len(shape) - 2
    return matrix.reshape(shape[1], *shape[2:], shape[0]).transpose([nd + 1, 0, *range(1, nd + 1)])


def _patches(x: np.ndarray, conv: dict[str, Any]) -> np.ndarray:
    """Conv input [N, C, spatial...] as rows [N * out positions, C * taps] (im2col)."""
    nd = len(conv["kernel"])
    pads = conv["pads"]
    width = [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)]
    xp = np.pad(np.asarray(x, np.float64), width)
    win = np.lib.stride_tricks.sliding_window_view(xp, conv["kernel"], axis=tuple(range(2, 2 + nd)))
    win = win[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in conv["strides"])]
    # [N, C, out..., k...] -> [N, out..., C, k...]
    order = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    win = win.transpose(order)
    return win.reshape(-1, x.shape[1] * int(np.prod(conv["kernel"], dtype=np.int64)))


def _unsupported(ws: Workspace, sink: Sink) -> str:
    node = sink.node
    if sink.weight in ws.an.dequantized:
        return "quantized weight (QDQ): not refitted"
    if sink.scope:
        return f"inside {sink.scope}: not refitted"
    if node.op_type == "Gemm":
        return "Gemm with transA" if attr(node, "transA", 0) else ""
    if node.op_type == "MatMul":
        w = get_init(ws.model.graph, sink.weight)
        return "" if w.ndim == 2 else "batched MatMul weight"
    if node.op_type == "Conv":
        if attr(node, "group", 1) != 1 or any(d != 1 for d in attr(node, "dilations", [])):
            return "grouped or dilated convolutions are not refitted"
        if sink.labels.axis != 1:
            return "channel axis is not axis 1"
        auto = attr(node, "auto_pad", b"NOTSET")
        return "" if auto in (b"NOTSET", "NOTSET") else "auto_pad convolutions are not refitted"
    if node.op_type in RECURRENT:
        why = "its output is not linear in X (gates and a recurrent state)"
        return f"{node.op_type} is not refitted: {why}"
    return f"{node.op_type} is not refitted"
