"""Hypothesis strategies for small random float32 ONNX CNNs with known zeroed channels.

Every generated :class:`Case` is a valid opset-17 model ``x[1, C, 8, 8] -> y[1, K]`` built from
random blocks (convolutions, BN, activations, residual blocks, concat/split branches, depthwise
convolutions, an NHWC MatMul round trip, per-channel constants) and a head (global pooling or a
full flatten, then Gemm or MatMul + Add). Some producers (Conv, MatMul, Gemm) get a random proper
subset of their output channels zeroed: weight rows and bias entries set to exactly 0, and the
entries of the per-channel constants that follow (BN scale and shift, Add/Mul constants) as well,
so those channels stay exactly 0 downstream. The case records, per tensor, which channels are
exactly zero (``zero``) or a data-independent constant (``const``): ground truth that
:func:`check_ground_truth` verifies with onnxruntime.

Strategies:

* ``cases()``: the blocks above; ``cases(pin=True)`` puts an op the channel analysis cannot
  follow (Softmax/TopK over channels, Einsum) after the first conv; ``cases(extra=True)`` adds
  pooling, explicit Pad + unpadded conv, channel Slice, Sub/Div, swish/PRelu, ConvTranspose,
  Resize, Clip bounds of shape [1], and Reshape / Reduce heads.
* ``plain_chains()``: Conv -> [BN] -> [act] -> Conv ... -> GAP head, with a structured layer list
  (``Case.layers``) from which a test can compute the parameter count folding must leave.
* ``fc_heads()``: a short conv prefix and one or two hidden Gemm/MatMul layers, dense on the paths
  that fold constants into Gemm biases (every bias shape, alpha/beta, transB) and MatMul + Add.
* ``pinned_cases()``: conv -> unknown op -> conv -> head, to check pins stay local.

Failing examples print as one line per block (``Case.__repr__``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
H = W = 8
ZERO, CONST, VAR = "zero", "const", "var"
ACTIVATIONS = ["Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSwish"]
# activations that keep an exactly-zero channel exactly zero (Sigmoid makes it 0.5)
ZERO_KEEPING = ["Relu", "LeakyRelu", "Tanh", "Clip", "HardSwish"]
PIN_OPS = ["Softmax", "Einsum", "TopK"]


@dataclass
class Act:
    """The current activation: tensor name, per-channel state (ZERO / CONST / VAR)."""

    name: str
    state: list[str]

    @property
    def c(self) -> int:
        return len(self.state)


@dataclass
class Case:
    """A generated model with its ground truth.

    Attributes:
        model: the model (checked with ``full_check``).
        blocks: one line per block, for reading a failing example.
        zeroed: producer node name -> output channels zeroed there.
        states: tensor name -> per-channel state after that tensor (NCHW channel axis, or the
            feature axis of a [1, F] tensor).
        layers: for plain chains only, a structured description (see ``plain_chains``).
        pinned: node names of producers whose output channels feed an op the analysis does not
            understand (their channels must stay).
        pin_ops: "OpType node_name" of each such op.
    """

    model: onnx.ModelProto
    blocks: list[str]
    zeroed: dict[str, list[int]]
    states: dict[str, list[str]]
    layers: list[dict[str, Any]] = field(default_factory=list)
    pinned: list[str] = field(default_factory=list)
    pin_ops: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        lines = "\n    ".join(self.blocks)
        return f"Case(\n    {lines}\n    zeroed={self.zeroed}\n)"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # hypothesis prints failing cases so
        p.text(repr(self))


class Builder:
    """Accumulates nodes and constants; names are unique and readable."""

    def __init__(self, draw: Any, seed: int, constant_nodes: bool) -> None:
        self.draw = draw
        self.rng = np.random.default_rng(seed)
        self.constant_nodes = constant_nodes
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.blocks: list[str] = []
        self.zeroed: dict[str, list[int]] = {}
        self.states: dict[str, list[str]] = {}
        self.layers: list[dict[str, Any]] = []
        self.pinned: list[str] = []
        self.pin_ops: list[str] = []
        self._count: dict[str, int] = {}
        self.output: tuple[str, int] = ("", 0)
        self.hw = H  # current spatial size (square)
        self.extra = False  # set by cases(extra=True): also Clip bounds of shape [1]

    # -- names, constants, nodes -----------------------------------------------------------------
    def uid(self, prefix: str) -> str:
        k = self._count.get(prefix, 0)
        self._count[prefix] = k + 1
        return f"{prefix}{k}"

    def normal(self, *shape: int) -> np.ndarray:
        return self.rng.normal(0.0, 0.5, shape).astype(np.float32)

    def const(self, arr: np.ndarray, name: str, as_node: bool | None = None) -> str:
        """``arr`` as an initializer or (when ``as_node``) a Constant node; returns its name."""
        arr = np.array(arr, copy=True, order="C")  # (ascontiguousarray would make 0-d 1-d)
        if as_node is None:
            as_node = self.constant_nodes and self.draw(st.booleans())
        if as_node:
            self.nodes.append(
                helper.make_node(
                    "Constant",
                    [],
                    [name],
                    name=f"{name}_const",
                    value=numpy_helper.from_array(arr, name),
                )
            )
        else:
            self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def node(
        self, op: str, inputs: list[str], prefix: str, n_out: int = 1, **attrs: Any
    ) -> list[str]:
        name = self.uid(prefix)
        outs = [name] if n_out == 1 else [f"{name}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs

    def subset(self, n: int, avoid_all_of: set[int] | None = None, min_size: int = 0) -> list[int]:
        """A random proper subset of ``range(n)`` (maybe empty) to zero.

        ``avoid_all_of``: channels that are already zero/constant; the result together with them
        never covers every channel.
        """
        taken = avoid_all_of or set()
        free = [i for i in range(n) if i not in taken]
        if len(free) <= 1:
            return []
        picked = self.draw(
            st.lists(
                st.sampled_from(free),
                min_size=min(min_size, len(free) - 1),
                max_size=len(free) - 1,
                unique=True,
            )
        )
        return sorted(picked)

    def record(self, act: Act) -> Act:
        self.states[act.name] = list(act.state)
        return act

    # -- blocks ----------------------------------------------------------------------------------
    def conv(
        self,
        act: Act,
        cout: int | None = None,
        k: int | None = None,
        bias: bool | None = None,
        zero: bool = True,
        paddle: bool | None = None,
        min_zero: int = 0,
    ) -> Act:
        """Conv (1x1 no pad or 3x3 pad 1), bias or not, or paddle style Conv + Add[1,C,1,1]."""
        d = self.draw
        cout = cout if cout is not None else d(st.integers(2, 6))
        k = k if k is not None else d(st.sampled_from([1, 3]))
        paddle = paddle if paddle is not None else d(st.booleans())
        bias = False if paddle else (bias if bias is not None else d(st.booleans()))
        name = self.uid("conv")
        w = self.normal(cout, act.c, k, k)
        b = self.normal(cout)
        zeros = self.subset(cout, min_size=min_zero) if zero else []
        w[zeros] = 0.0
        b[zeros] = 0.0
        inputs = [act.name, self.const(w, f"{name}_W")]
        if bias:
            inputs.append(self.const(b, f"{name}_B"))
        pads = [k // 2] * 4
        out = name + "_y"
        self.nodes.append(
            helper.make_node("Conv", inputs, [out], name=name, kernel_shape=[k, k], pads=pads)
        )
        if zeros:
            self.zeroed[name] = zeros
        state = [ZERO if i in zeros else VAR for i in range(cout)]
        self.layers.append(
            {
                "op": "conv",
                "name": name,
                "input": act.name,
                "cin": act.c,
                "cout": cout,
                "k": k,
                "conv_bias": bias,
                "paddle": paddle,
                "zero": zeros,
                "in_state": list(act.state),
            }
        )
        desc = f"Conv {name} {act.c}->{cout} k{k}{' bias' if bias else ''}"
        if paddle:
            (out,) = self.node(
                "Add", [out, self.const(b.reshape(1, cout, 1, 1), f"{name}_addB")], "paddle_add"
            )
            desc += " + Add bias (paddle)"
        self.blocks.append(desc + (f" zero={zeros}" if zeros else ""))
        return self.record(Act(out, state))

    def batchnorm(self, act: Act, keep_zero: bool | None = None) -> Act:
        """BatchNormalization; zero channels stay zero (scale and B zeroed) or become constants."""
        keep_zero = (
            keep_zero if keep_zero is not None else self.draw(st.sampled_from([True, True, False]))
        )
        c = act.c
        name = self.uid("bn")
        scale, shift = self.normal(c), self.normal(c)
        mean = self.normal(c)
        var = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        zeros = [i for i, s in enumerate(act.state) if s == ZERO]
        if keep_zero:
            scale[zeros] = 0.0
            shift[zeros] = 0.0
        ins = [act.name] + [
            self.const(a, f"{name}_{p}")
            for a, p in ((scale, "scale"), (shift, "B"), (mean, "mean"), (var, "var"))
        ]
        (out,) = self.node("BatchNormalization", ins, "bn")
        state = [CONST if s == ZERO and not keep_zero else s for s in act.state]
        self.layers.append({"op": "bn", "c": c, "keep_zero": keep_zero})
        self.blocks.append(
            f"BatchNormalization {c}{'' if keep_zero or not zeros else ' (shift kept: zero -> const)'}"
        )
        return self.record(Act(out, state))

    def activation(self, act: Act, op: str | None = None, ops: list[str] = ACTIVATIONS) -> Act:
        op = op or self.draw(st.sampled_from(ops))
        if op == "Clip":
            # the spec asks for scalars; [1] is what some exporters write (checker and onnxruntime
            # accept it)
            shape = self.draw(st.sampled_from([(), (1,)])) if self.extra else ()
            lo = self.const(np.zeros(shape, np.float32), self.uid("clip_min"), as_node=False)
            hi = self.const(np.full(shape, 6.0, np.float32), self.uid("clip_max"), as_node=False)
            (out,) = self.node("Clip", [act.name, lo, hi], "clip")
        elif op == "LeakyRelu":
            (out,) = self.node("LeakyRelu", [act.name], "leaky", alpha=0.1)
        else:
            (out,) = self.node(op, [act.name], op.lower())
        state = [CONST if (s == ZERO and op == "Sigmoid") else s for s in act.state]
        self.layers.append({"op": "act", "type": op})
        self.blocks.append(op + (f" (0..6, bounds shape {list(shape)})" if op == "Clip" else ""))
        return self.record(Act(out, state))

    def channel_const(self, act: Act, op: str | None = None) -> Act:
        """Mul by (or Add) a per-channel constant [1, C, 1, 1]; zero channels get 0 entries."""
        op = op or self.draw(st.sampled_from(["Mul", "Add"]))
        c = act.c
        arr = self.normal(c)
        zeros = [i for i, s in enumerate(act.state) if s == ZERO]
        arr[zeros] = 0.0
        name = self.uid(op.lower() + "c")
        (out,) = self.node(
            op, [act.name, self.const(arr.reshape(1, c, 1, 1), f"{name}_C")], op.lower()
        )
        self.layers.append({"op": "chan", "type": op, "c": c})
        self.blocks.append(f"{op} per-channel constant [1,{c},1,1]")
        return self.record(Act(out, list(act.state)))

    def residual(self, act: Act) -> Act:
        """x + Conv2(Relu(Conv1(x))); Conv2 may zero the same channels as x has zero."""
        d = self.draw
        c, mid = act.c, d(st.integers(2, 6))
        self.blocks.append(f"residual {c} (mid {mid}) {{")
        x = act
        h = self.conv(x, cout=mid, paddle=False)
        h = self.activation(h, "Relu")
        # conv2 zeroes a subset; more likely one covering the channels that are zero in x
        name = self.uid("conv")
        k = d(st.sampled_from([1, 3]))
        bias = d(st.booleans())
        w, b = self.normal(c, mid, k, k), self.normal(c)
        zero_x = [i for i, s in enumerate(x.state) if s == ZERO]
        zeros = zero_x if zero_x and d(st.booleans()) else self.subset(c)
        w[zeros] = 0.0
        b[zeros] = 0.0
        inputs = [h.name, self.const(w, f"{name}_W")]
        if bias:
            inputs.append(self.const(b, f"{name}_B"))
        out = name + "_y"
        self.nodes.append(
            helper.make_node(
                "Conv", inputs, [out], name=name, kernel_shape=[k, k], pads=[k // 2] * 4
            )
        )
        if zeros:
            self.zeroed[name] = zeros
        self.blocks.append(
            f"Conv {name} {mid}->{c} k{k}{' bias' if bias else ''}"
            + (f" zero={zeros}" if zeros else "")
        )
        (y,) = self.node("Add", [x.name, out], "res_add")
        state = []
        for i, s in enumerate(x.state):
            branch = ZERO if i in zeros else VAR
            state.append(_add_states(s, branch))
        self.blocks.append("} add")
        return self.record(Act(y, state))

    def concat(self, act: Act) -> Act:
        """Concat(Conv_a(x), Conv_b(x)) along channels."""
        self.blocks.append("concat {")
        a = self.conv(act, paddle=False)
        b = self.conv(act, paddle=False)
        (y,) = self.node("Concat", [a.name, b.name], "concat", axis=1)
        self.blocks.append("} concat axis 1")
        return self.record(Act(y, a.state + b.state))

    def split(self, act: Act) -> Act | None:
        """Split(x, [s, C-s]) -> Conv each -> Concat; each part keeps a variable channel."""
        var = [i for i, s in enumerate(act.state) if s == VAR]
        points = [p for p in range(1, act.c) if var and min(var) < p <= max(var)]
        if not points:
            return None
        p = self.draw(st.sampled_from(points))
        sizes = self.const(
            np.array([p, act.c - p], np.int64), self.uid("split_sizes"), as_node=False
        )
        parts = self.node("Split", [act.name, sizes], "split", n_out=2, axis=1)
        self.blocks.append(f"split [{p}, {act.c - p}] {{")
        branches = []
        for part, st_ in zip(parts, (act.state[:p], act.state[p:]), strict=True):
            branches.append(self.conv(self.record(Act(part, st_)), paddle=False))
        (y,) = self.node("Concat", [b.name for b in branches], "concat", axis=1)
        self.blocks.append("} concat axis 1")
        return self.record(Act(y, branches[0].state + branches[1].state))

    def depthwise(self, act: Act) -> Act:
        """Conv with group = C; zero input channels stay zero, and a few more may be zeroed."""
        d = self.draw
        c = act.c
        k = d(st.sampled_from([1, 3]))
        bias = d(st.booleans())
        name = self.uid("dwconv")
        w, b = self.normal(c, 1, k, k), self.normal(c)
        dead = {i for i, s in enumerate(act.state) if s != VAR}
        more = self.subset(c, dead) if d(st.booleans()) else []
        for i, s in enumerate(act.state):
            if s == ZERO:
                b[i] = 0.0
        w[more] = 0.0
        b[more] = 0.0
        inputs = [act.name, self.const(w, f"{name}_W")]
        if bias:
            inputs.append(self.const(b, f"{name}_B"))
        out = name + "_y"
        self.nodes.append(
            helper.make_node(
                "Conv", inputs, [out], name=name, kernel_shape=[k, k], pads=[k // 2] * 4, group=c
            )
        )
        if more:
            self.zeroed[name] = more
        state = []
        for i, s in enumerate(act.state):
            if i in more or s == ZERO:
                state.append(ZERO)
            elif s == CONST and k == 1:
                state.append(CONST)
            else:
                state.append(VAR)  # a padded 3x3 kernel sees the zero border: not constant
        self.blocks.append(
            f"depthwise Conv {name} {c} k{k}{' bias' if bias else ''}"
            + (f" zero={more}" if more else "")
        )
        return self.record(Act(out, state))

    def nhwc_matmul(self, act: Act) -> Act:
        """Transpose to NHWC, MatMul [C, C2] + Add [C2], Transpose back."""
        d = self.draw
        c, c2 = act.c, d(st.integers(2, 6))
        name = self.uid("matmul")
        w, b = self.normal(c, c2), self.normal(c2)
        zeros = self.subset(c2)
        w[:, zeros] = 0.0
        b[zeros] = 0.0
        (t,) = self.node("Transpose", [act.name], "to_nhwc", perm=[0, 2, 3, 1])
        out = name + "_y"
        self.nodes.append(
            helper.make_node("MatMul", [t, self.const(w, f"{name}_W")], [out], name=name)
        )
        (a,) = self.node("Add", [out, self.const(b, f"{name}_B")], "mm_add")
        (y,) = self.node("Transpose", [a], "to_nchw", perm=[0, 3, 1, 2])
        if zeros:
            self.zeroed[name] = zeros
        self.blocks.append(
            f"NHWC Transpose, MatMul {name} {c}->{c2} + Add, Transpose back"
            + (f" zero={zeros}" if zeros else "")
        )
        return self.record(Act(y, [ZERO if i in zeros else VAR for i in range(c2)]))

    def pin_op(self, act: Act, op: str | None = None) -> Act:
        """An op the channel analysis does not follow on the channel axis: its input stays."""
        op = op or self.draw(st.sampled_from(PIN_OPS))
        if op == "Softmax":
            (y,) = self.node("Softmax", [act.name], "softmax", axis=1)
        elif op == "Einsum":
            (y,) = self.node("Einsum", [act.name], "einsum", equation="nchw->nchw")
        else:
            k = self.const(np.array([act.c], np.int64), self.uid("topk_k"), as_node=False)
            y, _ = self.node("TopK", [act.name, k], "topk", n_out=2, axis=1)
        self.pin_ops.append(f"{op} {self.nodes[-1].name}")
        self.blocks.append(f"{op} over the channel axis (pins its input channels)")
        return self.record(Act(y, [VAR] * act.c))

    def head(self, act: Act, hidden: int | None = None, extra: bool = False) -> None:
        """GAP or full Flatten -> [hidden Gemm/MatMul + Relu]* -> Gemm or MatMul + Add -> [1, K].

        With ``extra`` the features may also come from Reshape [1, F] / [1, -1], or from
        ReduceMean / ReduceMax over H, W without keepdims.
        """
        d = self.draw
        kinds = ["gap", "flatten"] + (["reshape", "reduce"] if extra else [])
        kind = d(st.sampled_from(kinds))
        hw = self.hw * self.hw
        if kind == "gap":
            (p,) = self.node("GlobalAveragePool", [act.name], "gap")
            (f,) = self.node("Flatten", [p], "flatten", axis=1)
            feat = list(act.state)
            self.blocks.append("head: GlobalAveragePool + Flatten")
        elif kind == "reduce":
            op = d(st.sampled_from(["ReduceMean", "ReduceMax"]))
            (f,) = self.node(op, [act.name], op.lower(), axes=[2, 3], keepdims=0)
            feat = list(act.state)
            self.blocks.append(f"head: {op} axes [2, 3] keepdims 0")
        else:
            if kind == "flatten":
                (f,) = self.node("Flatten", [act.name], "flatten", axis=1)
            elif d(st.booleans()):
                target = d(st.sampled_from([act.c * hw, -1]))
                shape = self.const(
                    np.array([1, target], np.int64), self.uid("shape"), as_node=False
                )
                (f,) = self.node("Reshape", [act.name, shape], "reshape")
            else:  # drop the batch axis, then put it back
                shape = self.const(np.array([-1], np.int64), self.uid("shape"), as_node=False)
                (r,) = self.node("Reshape", [act.name, shape], "reshape")
                self.record(Act(r, [s for s in act.state for _ in range(hw)]))
                axes = self.const(np.array([0], np.int64), self.uid("axes"), as_node=False)
                (f,) = self.node("Unsqueeze", [r, axes], "unsqueeze")
                kind = "Reshape [-1] + Unsqueeze"
            # a padded spatial map of a constant channel is still constant: every feature
            feat = [s for s in act.state for _ in range(hw)]
            self.blocks.append(f"head: {kind} [1, {act.c * hw}]")
        cur = self.record(Act(f, feat))
        for _ in range(hidden if hidden is not None else d(st.integers(0, 1))):
            cur = self.fc(cur, d(st.integers(2, 6)), zero=True)
            (r,) = self.node("Relu", [cur.name], "relu")
            cur = self.record(Act(r, cur.state))
            self.blocks.append("Relu")
        k = d(st.integers(2, 5))
        out = self.fc(cur, k, zero=False)
        self.output = (out.name, k)

    def fc(self, act: Act, n: int, zero: bool) -> Act:
        """Gemm or MatMul + Add: [1, F] -> [1, n].

        Gemm: transB, alpha and beta random; its bias C per output ([n] or [1, n]), broadcast
        ([1] or a scalar) or absent. MatMul: the Add's constant is [n], [1, n] or [1]. Zeroed
        columns give exactly 0 unless a broadcast bias (times beta) adds a constant to them.
        """
        d = self.draw
        f = act.c
        w = self.normal(f, n)
        zeros = self.subset(n) if zero else []
        w[:, zeros] = 0.0
        gemm = d(st.booleans())
        bias = d(st.sampled_from(["n", "1n", "1", "scalar"] + (["none"] if gemm else [])))
        b = self.normal(n)
        b[zeros] = 0.0
        if bias == "1n":
            b = b.reshape(1, n)
        elif bias == "1":
            b = self.normal(1)
        elif bias == "scalar":
            b = self.normal(1).reshape(())
        shift = 0.0 if bias in ("n", "1n", "none") else float(b.reshape(-1)[0])
        if gemm:
            name = self.uid("gemm")
            trans_b = d(st.integers(0, 1))
            alpha = d(st.sampled_from([1.0, 0.5]))
            beta = d(st.sampled_from([1.0, 2.0, 0.0])) if bias != "none" else 1.0
            shift *= beta
            ins = [act.name, self.const(w.T.copy() if trans_b else w, f"{name}_W")]
            if bias != "none":
                ins.append(self.const(b, f"{name}_C"))
            out = name + "_y"
            self.nodes.append(
                helper.make_node(
                    "Gemm", ins, [out], name=name, transB=trans_b, alpha=alpha, beta=beta
                )
            )
            self.blocks.append(
                f"Gemm {name} {f}->{n} transB={trans_b} alpha={alpha} beta={beta} "
                f"C={bias}" + (f" zero={zeros}" if zeros else "")
            )
        else:
            name = self.uid("matmul")
            mm = name + "_y"
            self.nodes.append(
                helper.make_node("MatMul", [act.name, self.const(w, f"{name}_W")], [mm], name=name)
            )
            (out,) = self.node("Add", [mm, self.const(b, f"{name}_B")], "fc_add")
            self.blocks.append(
                f"MatMul {name} {f}->{n} + Add B={bias}" + (f" zero={zeros}" if zeros else "")
            )
        if zeros:
            self.zeroed[name] = zeros
        self.layers.append(
            {
                "op": "fc",
                "name": name,
                "input": act.name,
                "kind": "Gemm" if gemm else "MatMul",
                "bias": bias,
                "fin": f,
                "n": n,
                "zero": zeros,
                "in_state": list(act.state),
            }
        )
        dead = CONST if shift else ZERO
        return self.record(Act(out, [dead if i in zeros else VAR for i in range(n)]))

    # -- more ops (``cases(extra=True)``) -------------------------------------------------------
    def pool(self, act: Act) -> Act:
        """MaxPool / AveragePool 3x3 pad 1 (stride 1 or 2; count_include_pad 0 or 1)."""
        d = self.draw
        op = d(st.sampled_from(["MaxPool", "AveragePool"]))
        stride = d(st.sampled_from([1, 2])) if self.hw >= 4 else 1
        attrs: dict[str, Any] = {
            "kernel_shape": [3, 3],
            "pads": [1, 1, 1, 1],
            "strides": [stride] * 2,
        }
        include = op == "AveragePool" and d(st.booleans())
        if op == "AveragePool":
            attrs["count_include_pad"] = int(include)
        (y,) = self.node(op, [act.name], op.lower(), **attrs)
        self.hw = (self.hw - 1) // stride + 1
        # averaging a constant with the zero border is not constant
        state = [VAR if (s == CONST and include) else s for s in act.state]
        self.blocks.append(
            f"{op} 3x3 pad 1 stride {stride}" + (" count_include_pad" if include else "")
        )
        return self.record(Act(y, state))

    def pad_conv(self, act: Act) -> Act:
        """Explicit Pad (constant 0, reflect or edge) by 1, then a 3x3 Conv without padding."""
        d = self.draw
        mode = d(st.sampled_from(["constant", "reflect", "edge"]))
        pads = self.const(
            np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), self.uid("pads"), as_node=False
        )
        (p,) = self.node("Pad", [act.name, pads], "pad", mode=mode)
        state = [VAR if (s == CONST and mode == "constant") else s for s in act.state]
        self.blocks.append(f"Pad 1 mode={mode}")
        self.record(Act(p, state))
        name = self.uid("conv")
        cout = d(st.integers(2, 6))
        w, b = self.normal(cout, act.c, 3, 3), self.normal(cout)
        zeros = self.subset(cout)
        w[zeros] = 0.0
        b[zeros] = 0.0
        out = name + "_y"
        self.nodes.append(
            helper.make_node(
                "Conv",
                [p, self.const(w, f"{name}_W"), self.const(b, f"{name}_B")],
                [out],
                name=name,
                kernel_shape=[3, 3],
            )
        )
        if zeros:
            self.zeroed[name] = zeros
        self.blocks.append(
            f"Conv {name} {act.c}->{cout} k3 no pad bias" + (f" zero={zeros}" if zeros else "")
        )
        return self.record(Act(out, [ZERO if i in zeros else VAR for i in range(cout)]))

    def slice_channels(self, act: Act) -> Act | None:
        """Slice a channel range [a, b) (keeping a variable channel) along axis 1."""
        var = [i for i, s in enumerate(act.state) if s == VAR]
        ranges = [
            (a, b)
            for a in range(act.c)
            for b in range(a + 1, act.c + 1)
            if (a, b) != (0, act.c) and any(a <= v < b for v in var)
        ]
        if not ranges:
            return None
        a, b = self.draw(st.sampled_from(ranges))
        end = b if b < act.c or self.draw(st.booleans()) else 2**62
        ins = [act.name] + [
            self.const(np.array([v], np.int64), self.uid(n), as_node=False)
            for v, n in ((a, "starts"), (end, "ends"), (1, "axes"))
        ]
        (y,) = self.node("Slice", ins, "slice")
        self.blocks.append(f"Slice channels [{a}:{b}]")
        return self.record(Act(y, act.state[a:b]))

    def sub_div(self, act: Act) -> Act:
        """Sub or Div by a per-channel constant (Sub entries of zero channels are 0)."""
        op = self.draw(st.sampled_from(["Sub", "Div"]))
        c = act.c
        if op == "Div":
            arr = (self.rng.uniform(0.5, 1.5, c) * self.rng.choice([-1, 1], c)).astype(np.float32)
        else:
            arr = self.normal(c)
            arr[[i for i, s in enumerate(act.state) if s == ZERO]] = 0.0
        (y,) = self.node(
            op,
            [act.name, self.const(arr.reshape(1, c, 1, 1), self.uid(op.lower() + "c"))],
            op.lower(),
        )
        self.blocks.append(f"{op} per-channel constant [1,{c},1,1]")
        return self.record(Act(y, list(act.state)))

    def swish(self, act: Act) -> Act:
        """x * Sigmoid(x), or PRelu with a per-channel slope."""
        if self.draw(st.booleans()):
            (s,) = self.node("Sigmoid", [act.name], "sigmoid")
            self.record(Act(s, [CONST if x == ZERO else x for x in act.state]))
            (y,) = self.node("Mul", [act.name, s], "swish")
            self.blocks.append("x * Sigmoid(x)")
        else:
            slope = self.const(self.normal(act.c, 1, 1), self.uid("slope"))
            (y,) = self.node("PRelu", [act.name, slope], "prelu")
            self.blocks.append("PRelu per-channel slope")
        return self.record(Act(y, list(act.state)))

    def conv_transpose(self, act: Act) -> Act:
        """ConvTranspose 3x3 stride 1 pad 1 (same size), zeroing some output channels."""
        d = self.draw
        cout = d(st.integers(2, 6))
        bias = d(st.booleans())
        name = self.uid("convT")
        w, b = self.normal(act.c, cout, 3, 3), self.normal(cout)
        zeros = self.subset(cout)
        w[:, zeros] = 0.0
        b[zeros] = 0.0
        ins = [act.name, self.const(w, f"{name}_W")] + (
            [self.const(b, f"{name}_B")] if bias else []
        )
        out = name + "_y"
        self.nodes.append(
            helper.make_node(
                "ConvTranspose", ins, [out], name=name, kernel_shape=[3, 3], pads=[1, 1, 1, 1]
            )
        )
        if zeros:
            self.zeroed[name] = zeros
        self.blocks.append(
            f"ConvTranspose {name} {act.c}->{cout} k3 pad 1{' bias' if bias else ''}"
            + (f" zero={zeros}" if zeros else "")
        )
        return self.record(Act(out, [ZERO if i in zeros else VAR for i in range(cout)]))

    def resize(self, act: Act) -> Act:
        """Resize nearest x2 (only from 8x8 or smaller)."""
        scales = self.const(np.array([1, 1, 2, 2], np.float32), self.uid("scales"), as_node=False)
        (y,) = self.node("Resize", [act.name, "", scales], "resize", mode="nearest")
        self.hw *= 2
        self.blocks.append("Resize nearest x2")
        return self.record(Act(y, list(act.state)))

    # -- the model -------------------------------------------------------------------------------
    def finish(self, c_in: int) -> Case:
        out, k = self.output
        # the last node writes the graph output: rename it "y"
        last = self.nodes[-1]
        assert last.output[0] == out
        last.output[0] = "y"
        self.states["y"] = self.states.pop(out)
        graph = helper.make_graph(
            self.nodes,
            "generated",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, H, W])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, k])],
            initializer=self.inits,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="graphgen"
        )
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model, full_check=True)
        return Case(
            model, self.blocks, self.zeroed, self.states, self.layers, self.pinned, self.pin_ops
        )


def _add_states(a: str, b: str) -> str:
    if VAR in (a, b):
        return VAR
    return ZERO if a == b == ZERO else CONST


BLOCKS = ["conv", "conv", "bn", "act", "chan", "residual", "concat", "split", "depthwise", "nhwc"]
EXTRA_BLOCKS = ["pool", "pad_conv", "slice", "sub_div", "swish", "conv_transpose", "resize"]


@st.composite
def cases(draw: Any, max_blocks: int = 5, pin: bool = False, extra: bool = False) -> Case:
    """A random model; with ``pin``, one block is an op the analysis cannot follow.

    With ``extra`` the blocks also include pooling, explicit Pad + unpadded conv, channel
    Slice, Sub/Div constants, swish/PRelu, ConvTranspose and Resize, and more heads.

    With ``pin`` the model is ``conv(zeroed) -> pin op -> blocks -> head``: the first conv's
    channels are pinned (recorded in ``Case.pinned``), everything after it may still fold.
    """
    seed = draw(st.integers(0, 2**32 - 1))
    b = Builder(draw, seed, constant_nodes=draw(st.booleans()))
    b.extra = extra
    c_in = draw(st.integers(2, 6))
    act = b.record(Act("x", [VAR] * c_in))
    b.blocks.append(f"input [1, {c_in}, {H}, {W}]")
    if pin:
        act = b.conv(act, paddle=False)
        b.pinned.append(next(n.name for n in reversed(b.nodes) if n.op_type == "Conv"))
        act = b.pin_op(act)
    kinds = BLOCKS + EXTRA_BLOCKS if extra else BLOCKS
    for kind in draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=max_blocks)):
        if kind == "conv":
            act = b.conv(act)
        elif kind == "bn":
            act = b.batchnorm(act)
        elif kind == "act":
            act = b.activation(act)
        elif kind == "chan":
            act = b.channel_const(act)
        elif kind == "residual":
            act = b.residual(act)
        elif kind == "concat":
            act = b.concat(act)
        elif kind == "split":
            act = b.split(act) or b.conv(act)
        elif kind == "depthwise":
            act = b.depthwise(act)
        elif kind == "nhwc":
            act = b.nhwc_matmul(act)
        elif kind == "pool":
            act = b.pool(act)
        elif kind == "pad_conv":
            act = b.pad_conv(act)
        elif kind == "slice":
            act = b.slice_channels(act) or b.conv(act)
        elif kind == "sub_div":
            act = b.sub_div(act)
        elif kind == "swish":
            act = b.swish(act)
        elif kind == "conv_transpose":
            act = b.conv_transpose(act)
        elif b.hw <= H:
            act = b.resize(act)
    b.head(act, extra=extra)
    return b.finish(c_in)


@st.composite
def fc_heads(draw: Any) -> Case:
    """Conv(zeroed) -> [BN, shift kept or not] -> [activation] -> head with 1-2 hidden layers.

    Dense on the Gemm / MatMul paths of folding: constants (from BN shifts, Sigmoid, broadcast
    biases) into Gemm biases of every shape, with alpha/beta, transB, and MatMul + new Add.
    """
    seed = draw(st.integers(0, 2**32 - 1))
    b = Builder(draw, seed, constant_nodes=draw(st.booleans()))
    c_in = draw(st.integers(2, 6))
    act = b.record(Act("x", [VAR] * c_in))
    b.blocks.append(f"input [1, {c_in}, {H}, {W}]")
    act = b.conv(act)
    if draw(st.booleans()):
        act = b.batchnorm(act)
    if draw(st.booleans()):
        act = b.activation(act)
    b.head(act, hidden=draw(st.integers(1, 2)))
    return b.finish(c_in)


@st.composite
def pinned_cases(draw: Any) -> Case:
    """Conv(zeroed) -> unknown op on the channel axis -> Conv(zeroed) -> [BN] -> [act] -> head.

    The first conv's channels are pinned (``Case.pinned``); the second conv's zeroed channels
    (``Case.layers[1]``) are free and exactly zero up to the head, so they must go.
    """
    seed = draw(st.integers(0, 2**32 - 1))
    b = Builder(draw, seed, constant_nodes=draw(st.booleans()))
    c_in = draw(st.integers(2, 6))
    act = b.record(Act("x", [VAR] * c_in))
    b.blocks.append(f"input [1, {c_in}, {H}, {W}]")
    act = b.conv(act, paddle=False, min_zero=1)
    b.pinned.append(b.layers[-1]["name"])
    act = b.pin_op(act)
    act = b.conv(act, min_zero=1)
    if draw(st.booleans()):
        act = b.batchnorm(act, keep_zero=True)
    if draw(st.booleans()):
        act = b.activation(act, ops=ZERO_KEEPING)
    b.head(act)
    return b.finish(c_in)


@st.composite
def plain_chains(draw: Any, max_convs: int = 4, consts: bool = True) -> Case:
    """Conv -> [BN] -> [act] -> [Mul/Add const] -> Conv ... -> GAP + Flatten + Gemm/MatMul.

    Zeroed channels stay exactly 0 (BN scale/shift and per-channel constants are zeroed with
    them; Sigmoid is left out), except that with ``consts`` a BN whose next weighted consumer
    does not zero-pad (a 1x1 conv or the head) may keep its shift, making them constants. Either
    way folding must remove every zeroed channel: ``Case.layers`` lets a test compute the
    resulting parameter count by hand.
    """
    seed = draw(st.integers(0, 2**32 - 1))
    b = Builder(draw, seed, constant_nodes=draw(st.booleans()))
    c_in = draw(st.integers(2, 6))
    act = b.record(Act("x", [VAR] * c_in))
    b.blocks.append(f"input [1, {c_in}, {H}, {W}]")
    ks = draw(st.lists(st.sampled_from([1, 3]), min_size=1, max_size=max_convs))
    for i, k in enumerate(ks):
        act = b.conv(act, k=k)
        next_padded = i + 1 < len(ks) and ks[i + 1] == 3
        if draw(st.booleans()):
            act = b.batchnorm(act, keep_zero=True if next_padded or not consts else None)
        if draw(st.booleans()):
            act = b.activation(act, ops=ZERO_KEEPING)
        if draw(st.booleans()):
            act = b.channel_const(act)
    (p,) = b.node("GlobalAveragePool", [act.name], "gap")
    (f,) = b.node("Flatten", [p], "flatten", axis=1)
    b.blocks.append("head: GlobalAveragePool + Flatten")
    out = b.fc(b.record(Act(f, list(act.state))), draw(st.integers(2, 5)), zero=False)
    b.output = (out.name, out.c)
    return b.finish(c_in)


# -- checking the ground truth -------------------------------------------------------------------
def run_all(model: onnx.ModelProto, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """Run ``model`` exposing the tensors ``names`` (and its outputs)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    known = {o.name for o in exposed.graph.output}
    for n in names:
        if n not in known:
            exposed.graph.output.append(onnx.ValueInfoProto(name=n))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(
        exposed.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    outs = [o.name for o in sess.get_outputs()]
    return dict(zip(outs, sess.run(outs, {"x": x}), strict=True))


def check_ground_truth(case: Case, seed: int = 0) -> None:
    """Assert, with onnxruntime on two random inputs, that every recorded state holds."""
    c_in = case.model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    rng = np.random.default_rng(seed)
    runs = [
        run_all(
            case.model,
            rng.standard_normal((1, c_in, H, W)).astype(np.float32),
            [n for n in case.states if n != "x"],
        )
        for _ in range(2)
    ]
    for name, states in case.states.items():
        if name == "x":
            continue
        vals = [r[name] for r in runs]
        axis = 0 if vals[0].ndim == 1 else 1  # a 1-D tensor is all features
        for v in vals:
            assert v.shape[axis] == len(states), (name, v.shape, len(states))
        for ch, s in enumerate(states):
            cols = [np.take(v, ch, axis=axis) for v in vals]
            if s == ZERO:
                for col in cols:
                    assert not col.any(), f"{name}[{ch}] should be exactly 0: {col.ravel()[:4]}"
            elif s == CONST:
                allv = np.concatenate([col.ravel() for col in cols])
                assert np.ptp(allv) <= 1e-6 * (1 + abs(allv[0])), f"{name}[{ch}] not constant"
