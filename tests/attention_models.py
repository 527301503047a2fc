"""Multi-head attention models with dynamic batch and sequence, as torch's exporters write them.

The fixtures ``models/torch/encoder_*.onnx`` are fixed-shape exports: their Reshape targets are
constants. With dynamic axes the exporters build the targets at run time, and these builders
write the same node patterns with random weights (d_model 32, 4 heads of 8, input
``[batch, seq, 32]``):

* :func:`legacy_encoder`: ``nn.TransformerEncoderLayer`` (post-norm, FF 64) through the legacy
  exporter, node for node as in ``models/digits/torch_encoder.onnx`` (a real legacy export with
  a dynamic batch), with the sequence dynamic too: ``Shape -> Gather -> Unsqueeze -> Concat``,
  ``bsz * num_heads`` as a ``Mul``, the model width read with ``Shape`` and divided by the head
  count, the ``(3, E)`` unflatten with ``Slice`` bounds from ``Mod``, the scale from
  ``Shape -> Slice -> Cast -> Sqrt``, and Constant nodes;
* :func:`dynamo_encoder`: the same layer through the dynamo exporter, as in
  ``models/torch/encoder_dynamo.onnx`` with symbolic sizes: ``Shape(start, end) -> Squeeze ->
  Reshape [-1] -> Concat`` with ``allowzero=1``, and initializers shared between targets (one
  ``Concat`` for the q, k and v views, ``[32]`` in the unflatten, the merge of the heads and
  the view after the output projection);
* :func:`split_heads`: a hand-written attention, ``view(B, S, H, d)``, ``transpose(1, 2)``
  and back to ``(B, S, H * d)``, then an output projection, in several styles (see there).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INT64_MAX = 9223372036854775807
E, H, D = 32, 4, 8  # model width, heads, head size
FF = 64


class Builder:
    """Accumulates nodes; constants become Constant nodes (legacy) or shared initializers."""

    def __init__(self, seed: int, constant_nodes: bool) -> None:
        self.rng = np.random.default_rng(seed)
        self.constant_nodes = constant_nodes
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.shared: dict[tuple[Any, ...], str] = {}
        self.count = 0

    def name(self, op: str) -> str:
        self.count += 1
        return f"{op}_{self.count}"

    def op(self, op: str, inputs: list[str], **attrs: Any) -> str:
        out = self.name(op) + "_output_0"
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op), **attrs))
        return out

    def const(self, value: Any, dtype: Any = np.int64) -> str:
        arr = np.array(value, dtype=dtype)
        if self.constant_nodes:
            out = self.name("Constant") + "_output_0"
            tensor = numpy_helper.from_array(arr, out)
            self.nodes.append(helper.make_node("Constant", [], [out], value=tensor))
            return out
        key = (arr.dtype.str, arr.shape, tuple(arr.reshape(-1).tolist()))
        if key not in self.shared:
            self.shared[key] = self.init(f"val_{len(self.shared)}", arr)
        return self.shared[key]

    def init(self, name: str, arr: np.ndarray) -> str:
        self.inits[name] = arr
        return name

    def weight(self, name: str, *shape: int) -> str:
        return self.init(name, (0.3 * self.rng.standard_normal(shape)).astype(np.float32))

    def model(self, opset: int, out: str) -> onnx.ModelProto:
        x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "seq", E])
        self.nodes.append(helper.make_node("Identity", [out], ["output"], name="output"))
        y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", "seq", E])
        inits = [numpy_helper.from_array(v, k) for k, v in self.inits.items()]
        graph = helper.make_graph(self.nodes, "attention", [x], [y], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model

    def layer_tail(self, x: str, attn: str) -> str:
        """Residual, LayerNorm, FF (MatMul + Add, Relu), residual, LayerNorm."""
        ln1 = self.op(
            "LayerNormalization",
            [self.op("Add", [x, attn]), self.ln("norm1_w", 1.0), self.ln("norm1_b", 0.0)],
            axis=-1,
        )
        h = self.op(
            "Add",
            [self.weight("linear1_b", FF), self.op("MatMul", [ln1, self.weight("w1", E, FF)])],
        )
        h = self.op("Relu", [h])
        h = self.op(
            "Add", [self.weight("linear2_b", E), self.op("MatMul", [h, self.weight("w2", FF, E)])]
        )
        return self.op(
            "LayerNormalization",
            [self.op("Add", [ln1, h]), self.ln("norm2_w", 1.0), self.ln("norm2_b", 0.0)],
            axis=-1,
        )

    def ln(self, name: str, centre: float) -> str:
        return self.init(name, (centre + 0.1 * self.rng.standard_normal(E)).astype(np.float32))


def legacy_encoder(seed: int = 0) -> onnx.ModelProto:
    """``nn.TransformerEncoderLayer`` through the legacy exporter, batch and sequence dynamic."""
    b = Builder(seed, constant_nodes=True)

    def unsq(t: str) -> str:
        return b.op("Unsqueeze", [t, b.const([0])])

    def size(t: str, axis: int) -> str:
        return b.op("Gather", [b.op("Shape", [t]), b.const(axis)], axis=0)

    x = "input"
    t0 = b.op("Transpose", [x], perm=[1, 0, 2])  # (L, N, E)
    tgt_len, bsz, embed = size(t0, 0), size(t0, 1), size(t0, 2)
    head_dim = b.op("Cast", [b.op("Cast", [b.op("Div", [embed, b.const(H)])], to=7)], to=7)
    last = b.op("Slice", [b.op("Shape", [t0]), b.const([-1]), b.const([INT64_MAX]), b.const([0])])
    e_last = b.op("Squeeze", [last, b.const([0])])
    proj = b.op("MatMul", [t0, b.weight("in_proj_w", E, 3 * E)])
    proj = b.op("Add", [b.weight("in_proj_bias", 3 * E), proj])
    unflat = b.op("Concat", [b.const([3]), unsq(e_last)], axis=0)
    mod = b.op("Mod", [b.const([2]), b.const([3])])
    s4 = b.op("Shape", [proj])
    head = b.op("Slice", [s4, b.const([0]), b.op("Reshape", [mod, b.const([1])])])
    after = b.op("Reshape", [b.op("Add", [mod, b.const([1])]), b.const([1])])
    tail = b.op("Slice", [s4, after, b.const([INT64_MAX])])
    r2 = b.op("Reshape", [proj, b.op("Concat", [head, unflat, tail], axis=0)], allowzero=0)
    t1 = b.op("Transpose", [b.op("Unsqueeze", [r2, b.const([0])])], perm=[3, 1, 2, 0, 4])
    packed = b.op("Squeeze", [t1, b.const([3])])
    q, k, v = (b.op("Gather", [packed, b.const(i)], axis=0) for i in range(3))
    mul = b.op("Mul", [bsz, b.const(H)])  # bsz * num_heads
    views = []
    for t, first in ((q, tgt_len), (k, None), (v, None)):
        first = first or size(t, 0)  # k.shape[0], v.shape[0]
        target = b.op("Concat", [unsq(first), unsq(mul), unsq(head_dim)], axis=0)
        views.append(b.op("Transpose", [b.op("Reshape", [t, target], allowzero=0)], perm=[1, 0, 2]))
    src_len = size(views[1], 1)
    q4, k4, v4 = (
        b.op(
            "Reshape",
            [t, b.op("Concat", [unsq(bsz), b.const([H]), unsq(n), unsq(head_dim)], axis=0)],
            allowzero=0,
        )
        for t, n in zip(views, (tgt_len, src_len, src_len), strict=True)
    )
    d_last = b.op("Slice", [b.op("Shape", [q4]), b.const([-1]), b.const([INT64_MAX])])
    inv = b.op("Div", [b.const([1.0], np.float32), b.op("Sqrt", [b.op("Cast", [d_last], to=1)])])
    scale = b.op("Cast", [inv], to=1)
    kt = b.op("Transpose", [k4], perm=[0, 1, 3, 2])
    qs = b.op("Mul", [q4, b.op("Sqrt", [scale])])
    ks = b.op("Mul", [kt, b.op("Sqrt", [scale])])
    probs = b.op("Softmax", [b.op("MatMul", [qs, ks])], axis=-1)
    ctx = b.op("Transpose", [b.op("MatMul", [probs, v4])], perm=[2, 0, 1, 3])  # (L, N, H, d)
    rows = b.op("Mul", [bsz, tgt_len])
    merged = b.op("Reshape", [ctx, b.op("Concat", [unsq(rows), unsq(embed)], axis=0)], allowzero=0)
    out = b.op("Gemm", [merged, b.weight("out_proj_w", E, E), b.weight("out_proj_b", E)], transB=1)
    back = b.op("Concat", [unsq(tgt_len), unsq(bsz), unsq(size(out, 1))], axis=0)
    attn = b.op("Transpose", [b.op("Reshape", [out, back], allowzero=0)], perm=[1, 0, 2])
    return b.model(17, b.layer_tail(x, attn))


def dynamo_encoder(seed: int = 0) -> onnx.ModelProto:
    """``nn.TransformerEncoderLayer`` through the dynamo exporter, batch and sequence dynamic."""
    b = Builder(seed, constant_nodes=False)

    def flat(t: str) -> str:
        return b.op("Reshape", [t, b.const([-1])])

    x = "input"
    s0 = b.op("Squeeze", [b.op("Shape", [x], start=0, end=1)])  # batch
    s1 = b.op("Squeeze", [b.op("Shape", [x], start=1, end=2)])  # sequence
    t0 = b.op("Transpose", [x], perm=[1, 0, 2])
    linear = b.op(
        "Add", [b.op("MatMul", [t0, b.weight("val_w", E, 3 * E)]), b.weight("in_proj_bias", 3 * E)]
    )
    unflat = b.op("Concat", [flat(s1), flat(s0), b.const([3]), b.const([E])], axis=0)
    view = b.op("Reshape", [linear, unflat], allowzero=1)
    t1 = b.op("Transpose", [b.op("Unsqueeze", [view, b.const([0])])], perm=[3, 1, 2, 0, 4])
    packed = b.op("Squeeze", [t1, b.const([-2])])
    q, k, v = (b.op("Gather", [packed, b.const(i)], axis=0) for i in range(3))
    mul = b.op("Mul", [s0, b.const(H)])
    qkv = b.op("Concat", [flat(s1), flat(mul), b.const([D])], axis=0)  # one target, three views
    tq, tk, tv = (
        b.op("Transpose", [b.op("Reshape", [t, qkv], allowzero=1)], perm=[1, 0, 2])
        for t in (q, k, v)
    )
    four = b.op("Concat", [flat(s0), b.const([H]), flat(s1), b.const([D])], axis=0)
    q4 = b.op("Reshape", [tq, four], allowzero=1)
    v4 = b.op("Reshape", [tv, four], allowzero=1)
    kt = b.op("Transpose", [tk], perm=[0, 2, 1])
    kt4 = b.op(
        "Reshape", [kt, b.op("Concat", [flat(s0), b.const([H]), b.const([D]), flat(s1)], axis=0)]
    )
    scale = b.const([float(D) ** -0.25], np.float32)
    scores = b.op("MatMul", [b.op("Mul", [q4, scale]), b.op("Mul", [kt4, scale])])
    ctx = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v4])
    permute = b.op("Transpose", [ctx], perm=[2, 0, 1, 3])
    rows = b.op("Mul", [s1, s0])
    merged = b.op(
        "Reshape", [permute, b.op("Concat", [flat(rows), b.const([E])], axis=0)], allowzero=1
    )
    out = b.op("Gemm", [merged, b.weight("out_proj_w", E, E), b.weight("out_proj_b", E)], transB=1)
    back = b.op("Concat", [flat(s1), flat(s0), b.const([E])], axis=0)
    attn = b.op("Transpose", [b.op("Reshape", [out, back], allowzero=1)], perm=[1, 0, 2])
    return b.model(18, b.layer_tail(x, attn))


STYLES = ("legacy", "dynamo", "zeros", "mul", "sizes", "head_size_from_width")
"""The target styles of :func:`split_heads`."""


def split_heads(style: str, seed: int = 0) -> onnx.ModelProto:
    """``q = x Wq`` (k, v alike) ``.view(B, S, H, d).transpose(1, 2)``, softmax(q k' / sqrt(d))
    v, ``.transpose(1, 2).reshape(B, S, H * d)``, output projection. Targets by ``style``:

    * ``legacy``: ``Gather(Shape(x))`` sizes, ``Unsqueeze``, ``Concat`` with Constant nodes
      ``[4]``, ``[8]``, and back with ``[32]``;
    * ``dynamo``: ``Shape(start, end) -> Squeeze -> Reshape [-1]``, one shared ``Concat`` for
      q, k and v, shared ``[4]``, ``[8]``; back with ``[32]``;
    * ``zeros``: constant targets ``[0, 0, 4, 8]`` and back ``[0, 0, -1]``;
    * ``mul``: back with ``Mul(4, 8)`` (``H * d`` as a product of constants);
    * ``sizes``: back with ``ctx.size(2) * ctx.size(3)`` read from the tensor (the head count
      read at run time);
    * ``head_size_from_width``: the views use ``x.size(-1) // 4`` of the projection: the head
      size is read from the channel count, so the heads cannot be pruned.
    """
    b = Builder(seed, constant_nodes=style in ("legacy", "mul", "sizes", "head_size_from_width"))
    x = "input"

    def unsq(t: str) -> str:
        return b.op("Unsqueeze", [t, b.const([0])])

    if style == "dynamo":
        bs = [
            b.op(
                "Reshape",
                [b.op("Squeeze", [b.op("Shape", [x], start=a, end=a + 1)]), b.const([-1])],
            )
            for a in (0, 1)
        ]
    else:
        bs = [unsq(b.op("Gather", [b.op("Shape", [x]), b.const(a)], axis=0)) for a in (0, 1)]
    shared = (
        b.op("Concat", [*bs, b.const([H]), b.const([D])], axis=0) if style == "dynamo" else None
    )
    heads = []
    for name, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        lin = b.op(
            "Add", [b.op("MatMul", [x, b.weight(f"w{name}", E, E)]), b.weight(f"b{name}", E)]
        )
        if style == "zeros":
            target = b.const([0, 0, H, D])
        elif style == "head_size_from_width":
            width = b.op("Gather", [b.op("Shape", [lin]), b.const(2)], axis=0)
            target = b.op(
                "Concat", [*bs, b.const([H]), unsq(b.op("Div", [width, b.const(H)]))], axis=0
            )
        else:
            target = shared or b.op("Concat", [*bs, b.const([H]), b.const([D])], axis=0)
        heads.append(b.op("Transpose", [b.op("Reshape", [lin, target])], perm=perm))
    q, kt, v = heads
    scores = b.op("Mul", [b.op("MatMul", [q, kt]), b.const(float(D) ** -0.5, np.float32)])
    ctx = b.op(
        "Transpose", [b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])], perm=[0, 2, 1, 3]
    )
    if style == "zeros":
        back = b.const([0, 0, -1])
    elif style == "mul":
        back = b.op("Concat", [*bs, unsq(b.op("Mul", [b.const(H), b.const(D)]))], axis=0)
    elif style == "sizes":
        s = b.op("Shape", [ctx])
        hd = b.op(
            "Mul",
            [b.op("Gather", [s, b.const(2)], axis=0), b.op("Gather", [s, b.const(3)], axis=0)],
        )
        back = b.op("Concat", [*bs, unsq(hd)], axis=0)
    else:
        back = b.op("Concat", [*bs, b.const([E])], axis=0)
    merged = b.op("Reshape", [ctx, back])
    out = b.op("Add", [b.op("MatMul", [merged, b.weight("wo", E, E)]), b.weight("bo", E)])
    return b.model(17, out)
