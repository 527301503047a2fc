"""Target propagation between two refitted layers (the maths of ``refit:rounds``).

A pair is a linear layer ``P`` whose output reaches a linear layer ``Q`` through elementwise
nodes only (an activation: Relu, Gelu written out as Erf and Mul, ...), and nowhere else. After
``Q`` is refitted, what it still misses, ``R = target - output`` [rows, N], is moved back to
``P``: ``P``'s outputs that ``Q`` reads get the targets ``z + STEP * R A``, with ``A`` the ridge
pseudo-inverse of ``Q``'s kept weight rows (the smallest change of ``Q``'s inputs that explains
``R``; the activation counts as the identity, its slope where it passes values). ``P`` is
fitted to those targets, then ``Q`` is refitted on ``P``'s new outputs; the pair keeps the new
weights only when ``Q``'s error on rows that neither layer fitted falls (``refit`` does the
bookkeeping).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection

import numpy as np
import onnx

STEP = 0.7  # share of the pseudo-inverse correction moved to P's targets per round
RIDGE = 1e-2  # ridge of the pseudo-inverse, relative to the mean eigenvalue of Q's Gram matrix
MAX_SIDE = 8192  # a pseudo-inverse needs a min(K, N)-square solve; wider pairs are skipped

# nodes that act on every value alone (with scalar constants): the channel at a position stays
# a function of the same channel at that position
ELEMENTWISE = frozenset(
    (
        "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid", "HardSigmoid", "Tanh",
        "Softplus", "Softsign", "HardSwish", "Mish", "Erf", "Clip", "Identity", "Neg", "Abs",
        "Sqrt", "Exp", "Add", "Sub", "Mul", "Div", "Pow",
    )
)  # fmt: skip


class ElementwisePaths:
    """Which tensor a consumer's input is an elementwise function of, in one graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.producer = {out: n for n in graph.node for out in n.output}
        self.readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in graph.node:
            for name in set(n.input):
                self.readers[name].append(n)
        self.scalars = {
            t.name for t in graph.initializer if int(np.prod(t.dims, dtype=np.int64)) == 1
        }
        self.outputs = {o.name for o in graph.output}

    def source(
        self, dst: str, consumer: onnx.NodeProto, stops: Collection[str] = ()
    ) -> tuple[str | None, str]:
        """The one tensor that ``dst`` (read by ``consumer``) is computed from by elementwise
        nodes and scalar constants, with nothing but those nodes and ``consumer`` reading it or
        the tensors between; else None and why. The walk back ends at ``stops`` (the layers'
        outputs, after their bias)."""
        path: list[onnx.NodeProto] = []
        tensors, todo, origins = {dst}, [dst], set()
        while todo:
            name = todo.pop()
            node = self.producer.get(name)
            if node is None or node.op_type not in ELEMENTWISE or name in stops:
                origins.add(name)
                continue
            if any(node is p for p in path):
                continue
            path.append(node)
            for inp in node.input:
                if inp and inp not in tensors and inp not in self.scalars:
                    tensors.add(inp)
                    todo.append(inp)
        if len(origins) != 1:
            return (
                None,
                f"{dst} is computed from {len(origins)} tensors ({', '.join(sorted(origins))})",
            )
        for name in tensors:
            if name in self.outputs:
                return None, f"{name} is a graph output"
            allowed = [consumer] if name == dst else path
            if any(all(r is not a for a in allowed) for r in self.readers[name]):
                return None, f"{name} is read by another node as well"
        return origins.pop(), ""


def pinv_rows(w: np.ndarray) -> np.ndarray:
    """The ridge pseudo-inverse [N, K] of ``w`` [K, N]: ``delta @ w`` is closest to ``r`` for
    ``delta = r @ pinv_rows(w)`` among small changes (ridge :data:`RIDGE`)."""
    k, n = w.shape
    if n <= k:
        gram = w.T @ w
        lam = RIDGE * max(float(np.trace(gram)) / n, 1e-12)
        return np.linalg.solve(gram + lam * np.eye(n), w.T)
    gram = w @ w.T
    lam = RIDGE * max(float(np.trace(gram)) / k, 1e-12)
    return np.linalg.solve(gram + lam * np.eye(k), w).T
