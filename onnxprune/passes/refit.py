"""The ``refit`` pass: least-squares reconstruction of the layers that read pruned channels."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import onnx

from onnxprune import progress
from onnxprune.analysis.handlers.recurrent import RECURRENT
from onnxprune.analysis.labels import Sink, State
from onnxprune.graph import add_output_bias, attr, bias_add_after, get_init, set_init
from onnxprune.passes.base import Pass, PassResult, option, require_original
from onnxprune.passes.registry import register_pass
from onnxprune.pruning.workspace import Workspace
from onnxprune.runner import exposed_session, run_batches

if TYPE_CHECKING:
    from onnxprune.context import Context


@dataclass
class _Unit:
    """One linear consumer to refit, with its streaming normal equations."""

    sink: Sink
    output: str  # the unit's output (after its bias), the same tensor in both models
    out_axis: int
    keep: np.ndarray  # positions of the input that stay (not zero/constant)
    w: np.ndarray  # current weight as [K, N]
    scale: float = 1.0  # Gemm's alpha: the unit computes x @ (scale * weight)
    conv: dict[str, Any] | None = None  # kernel, pads, strides of a Conv (inputs as patches)
    n: int = 0
    srr: float = 0.0
    # the streaming sums; empty until the first rows arrive
    sx: np.ndarray = field(default_factory=lambda: np.zeros(0))
    xtx: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    xtr: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    sr: np.ndarray = field(default_factory=lambda: np.zeros(0))
    notes: list[str] = field(default_factory=list)

    def add(self, x: np.ndarray, target: np.ndarray, current: np.ndarray) -> None:
        """Accumulate rows: x [R, K] inputs, target/current [R, N] unit outputs."""
        resid = target - current + x @ self.w  # = target - (current bias), per row
        if not self.n:
            k, m = x.shape[1], resid.shape[1]
            self.sx, self.sr = np.zeros(k), np.zeros(m)
            self.xtx, self.xtr = np.zeros((k, k)), np.zeros((k, m))
        self.n += len(x)
        self.sx += x.sum(0)
        self.sr += resid.sum(0)
        self.xtx += x.T @ x
        self.xtr += x.T @ resid
        self.srr += float((resid * resid).sum())


@register_pass
@dataclass
class Refit(Pass):
    """Refit each layer that reads pruned channels so its output matches the original model's.

    Rules:
        1. A layer qualifies when it is linear in its input: Gemm (transA=0), MatMul with a 2-D
           constant weight, or a Conv without groups or dilation (its input taken as patches).
        2. On the calibration data (``--data``; synthetic inputs otherwise) the pass streams the
           layer's inputs in the pruned model and its outputs in the original model, and solves
           a ridge least-squares problem for the weights of the channels that remain and for the
           bias. Weights of pruned channels become zero, so ``fold`` adds nothing for them.
        3. Layers are refitted in graph order, each on the inputs that the layers refitted
           before it produce (one pass over the data per layer).
        4. Run it after a pruning pass and before ``fold``: ``-p vote -p refit -p fold``.
    """

    name: ClassVar[str] = "refit"
    needs_original: ClassVar[bool] = True
    ridge: float = option(0.1, "ridge strength, relative to the mean input energy", low=0)
    max_batches: int = option(64, "calibration batches to stream (at most)", low=1)
    max_rows: int = option(4096, "rows (positions) sampled per batch and layer", low=1)

    def requires(self, model: onnx.ModelProto, ctx: Context) -> None:
        """The context holds the original model (the targets of the fit)."""
        require_original(ctx, self.name)

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        """Refit every qualifying consumer of a zero or constant channel."""
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
        return PassResult(
            ws.model, True, {"refitted": len(units), "skipped": skipped, "layers": report_units}
        )

    def _units(self, ws: Workspace) -> tuple[list[_Unit], dict[str, str]]:
        units, skipped = [], {}
        seen = set()
        for sink in ws.an.sinks:
            node = sink.node
            name = node.name or node.output[0]
            if name in seen or not (sink.labels.state != State.VAR).any():
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
            units.append(_Unit(sink, out, lab.axis if lab else -1, keep, alpha * w, alpha, conv))
        return units, skipped

    def _stream(self, ws: Workspace, units: list[_Unit], old: Any) -> None:
        """One pass over the data, both models side by side, into each unit's equations."""
        wanted = sorted({u.sink.tensor for u in units} | {u.output for u in units})
        new = exposed_session(ws.model, wanted, ws.ctx.providers)
        data = ws.ctx.data(ws.model)
        rng = np.random.default_rng(ws.ctx.seed)
        pairs = run_batches([new, old], ws.model, data, max_batches=self.max_batches)
        for _, (got, ref) in pairs:
            for u in units:
                x = got[u.sink.tensor]
                x = _patches(x, u.conv) if u.conv else _rows(x, u.sink.labels.axis)
                target, current = _rows(ref[u.output], u.out_axis), _rows(got[u.output], u.out_axis)
                if len(x) > self.max_rows:  # the same random rows of inputs and outputs
                    pick = rng.choice(len(x), self.max_rows, replace=False)
                    x, target, current = x[pick], target[pick], current[pick]
                u.add(x, target, current)

    def _solve(self, graph: onnx.GraphProto, u: _Unit) -> dict[str, Any]:
        keep = u.keep
        mean_x = u.sx / u.n
        mean_r = u.sr / u.n
        cov = u.xtx / u.n - np.outer(mean_x, mean_x)
        cross = u.xtr / u.n - np.outer(mean_x, mean_r)
        ck = cov[np.ix_(keep, keep)]
        lam = self.ridge * max(float(np.trace(ck)) / max(len(keep), 1), 1e-12)
        w_keep = np.linalg.solve(ck + lam * np.eye(len(keep)), cross[keep])
        w_new = np.zeros_like(u.w)
        w_new[keep] = w_keep
        # the residual rows already exclude the current bias: what is solved for here is the
        # change to add to it
        bias_new = mean_r - mean_x[keep] @ w_keep
        # outputs a pruning pass zeroed (their weight column is all zero) stay as they are
        dead = ~u.w.any(axis=0)
        w_new[:, dead] = u.w[:, dead]
        bias_new[dead] = 0.0
        before = _mse(u, u.w, np.zeros_like(bias_new))
        after = _mse(u, w_new, bias_new)
        node = u.sink.node
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
        taps = u.conv["taps"] if u.conv else 1
        return {
            "node": node.name or node.output[0],
            "inputs_kept": int(len(keep)) // taps,
            "inputs": int(len(u.w)) // taps,
            "rows": u.n,
            "mse_before": before,
            "mse_after": after,
        }


def _mse(u: _Unit, w: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error per row of ``x w + b`` against the targets, from the stored sums."""
    cov_x = u.xtx / u.n
    xr = u.xtr / u.n
    mean_x, mean_r = u.sx / u.n, u.sr / u.n
    quad = float(np.einsum("ij,ik,kj->", w, cov_x, w))
    cross = float(np.einsum("ij,ij->", w, xr))
    rr = u.srr / u.n
    return (
        rr + quad - 2 * cross + 2 * float(b @ (mean_x @ w)) - 2 * float(b @ mean_r) + float(b @ b)
    )


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
