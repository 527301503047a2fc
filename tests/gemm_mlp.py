"""A Gemm + Relu MLP from its layers' weights, for the tests that plant patterns in them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def gemm_mlp(layers: Sequence[tuple[np.ndarray, np.ndarray]], name: str = "mlp") -> onnx.ModelProto:
    """Layer ``i`` is Gemm ``fc{i}`` (weight ``w{i}`` [in, out], bias ``b{i}``, float32), a Relu
    after every layer but the last; input ``x`` [N, in], opset 17, IR 8."""
    nodes, inits, x = [], [], "x"
    for i, (w, b) in enumerate(layers):
        inits += [
            numpy_helper.from_array(np.asarray(w, np.float32), f"w{i}"),
            numpy_helper.from_array(np.asarray(b, np.float32), f"b{i}"),
        ]
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"y{i}"], name=f"fc{i}"))
        x = f"y{i}"
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [x], [f"a{i}"]))
            x = f"a{i}"
    first, last = layers[0][0].shape[0], layers[-1][0].shape[1]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", first])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", last])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
