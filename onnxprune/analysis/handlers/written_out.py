"""Normalisations written out op by op, named for the reason a reduction pins its channels.

tf2onnx, jax2tf and torch below opset 17 write LayerNormalization, RMSNorm and Softmax as
chains of small ops. A reduction over the channel axis pins the channels either way; when it
belongs to such a chain, the reason says what it is (:func:`written_out`):

* LayerNormalization: ``ReduceMean -> Sub -> Pow|Mul -> ReduceMean [-> Add] -> Sqrt`` then
  ``Div`` or ``Reciprocal -> Mul``;
* RMSNorm: ``Pow|Mul -> ReduceMean [-> Add] -> Sqrt`` then ``Div`` or ``Reciprocal -> Mul``;
* Softmax: ``[ReduceMax -> Sub ->] Exp -> ReduceSum -> Div``.

The match names the pattern only: it changes nothing the analysis decides.
"""

from __future__ import annotations

import onnx

from onnxprune.analysis.state import Analysis


def written_out(an: Analysis, node: onnx.NodeProto) -> str | None:
    """``written-out LayerNormalization over the channel axis (ReduceMean -> ...): channels
    stay`` when the reduction ``node`` is part of a written-out normalisation, else None."""
    found = _match(an, node)
    if found is None:
        return None
    kind, chain = found
    return f"written-out {kind} over the channel axis ({' -> '.join(chain)}): channels stay"


def _match(an: Analysis, node: onnx.NodeProto) -> tuple[str, list[str]] | None:
    x = node.input[0]
    src = _producer(an, x)
    if node.op_type == "ReduceMean":
        chain = _layer_norm(an, x)
        if chain:
            return "LayerNormalization", chain
        if src is not None and _is_square(an, src):
            base = src.input[0]  # the variance of x - mean (LayerNorm), or of x (RMSNorm)
            centred = _producer(an, base)
            if centred is not None and centred.op_type == "Sub":
                chain = _layer_norm(an, centred.input[0])
                if chain:
                    return "LayerNormalization", chain
            chain = _rms_norm(an, base)
            if chain:
                return "RMSNorm", chain
    if node.op_type == "ReduceSum" and src is not None and src.op_type == "Exp":
        chain = _softmax(an, x)
        if chain:
            return "Softmax", chain
    if node.op_type == "ReduceMax":
        for sub in _readers(an, node.output[0], "Sub"):
            if sub.input[0] == x:
                for exp in _readers(an, sub.output[0], "Exp"):
                    chain = _softmax(an, exp.output[0])
                    if chain:
                        return "Softmax", chain
    return None


def _producer(an: Analysis, tensor: str) -> onnx.NodeProto | None:
    return next((n for n in an.graph.node if tensor in n.output), None)


def _readers(an: Analysis, tensor: str, op: str) -> list[onnx.NodeProto]:
    return [n for n in an.consumers(tensor) if n.op_type == op]


def _is_square(an: Analysis, node: onnx.NodeProto) -> bool:
    """``Mul(t, t)`` or ``Pow(t, 2)``."""
    if node.op_type == "Mul":
        return len(node.input) == 2 and node.input[0] == node.input[1]
    if node.op_type == "Pow":
        exponent = an.array(node.input[1])
        return exponent is not None and exponent.size == 1 and float(exponent.reshape(-1)[0]) == 2
    return False


def _squares(an: Analysis, tensor: str) -> list[onnx.NodeProto]:
    return [n for n in an.consumers(tensor) if _is_square(an, n) and n.input[0] == tensor]


def _rsqrt(an: Analysis, var: str) -> list[str] | None:
    """``[Add ->] Sqrt -> Div`` or ``[Add ->] Sqrt -> Reciprocal -> Mul`` after a variance."""
    starts = [(a.output[0], ["Add"]) for a in _readers(an, var, "Add")] + [(var, [])]
    for t, chain in starts:
        for sqrt in _readers(an, t, "Sqrt"):
            s = sqrt.output[0]
            if any(d.input[1] == s for d in _readers(an, s, "Div")):
                return [*chain, "Sqrt", "Div"]
            for rec in _readers(an, s, "Reciprocal"):
                if _readers(an, rec.output[0], "Mul"):
                    return [*chain, "Sqrt", "Reciprocal", "Mul"]
    return None


def _layer_norm(an: Analysis, x: str) -> list[str] | None:
    for mean in _readers(an, x, "ReduceMean"):
        for sub in _readers(an, mean.output[0], "Sub"):
            if sub.input[0] != x:
                continue
            for sq in _squares(an, sub.output[0]):
                for var in _readers(an, sq.output[0], "ReduceMean"):
                    tail = _rsqrt(an, var.output[0])
                    if tail:
                        return ["ReduceMean", "Sub", sq.op_type, "ReduceMean", *tail]
    return None


def _rms_norm(an: Analysis, x: str) -> list[str] | None:
    for sq in _squares(an, x):
        for var in _readers(an, sq.output[0], "ReduceMean"):
            tail = _rsqrt(an, var.output[0])
            if tail:
                return [sq.op_type, "ReduceMean", *tail]
    return None


def _softmax(an: Analysis, e: str) -> list[str] | None:
    """``Exp -> ReduceSum -> Div`` from the Exp's output ``e`` (with the ReduceMax before it)."""
    for total in _readers(an, e, "ReduceSum"):
        if any(d.input[0] == e for d in _readers(an, total.output[0], "Div")):
            exp = _producer(an, e)
            sub = _producer(an, exp.input[0]) if exp is not None else None
            stable = sub is not None and sub.op_type == "Sub"
            top = _producer(an, sub.input[1]) if stable and sub is not None else None
            prefix = ["ReduceMax", "Sub"] if top is not None and top.op_type == "ReduceMax" else []
            return [*prefix, "Exp", "ReduceSum", "Div"]
    return None
