"""A residual MLP in external-data format, for the large-model tests (limits lowered)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import onnxprune


def residual_mlp(
    folder: Path,
    width: int,
    hidden: int,
    dead: int,
    first: Literal["gemm", "matmul"] = "gemm",
) -> Path:
    """Two residual MLP blocks whose first layers have ``dead`` zero neurons (a Gemm, or
    MatMul + Add), saved with external data as ``folder/mlp.onnx``, with 16 samples of
    input in ``folder/data.npz``."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(2):
        w1 = rng.standard_normal((width, hidden)).astype(np.float32)
        b1 = rng.standard_normal(hidden).astype(np.float32)
        w1[:, -dead:] = 0.0
        b1[-dead:] = 0.0
        w2 = rng.standard_normal((hidden, width)).astype(np.float32)
        b2 = rng.standard_normal(width).astype(np.float32)
        for name, arr in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
            inits.append(numpy_helper.from_array(arr, f"{name}_{i}"))
        if first == "gemm":
            nodes.append(helper.make_node("Gemm", [x, f"w1_{i}", f"b1_{i}"], [f"h_{i}"]))
        else:
            nodes += [
                helper.make_node("MatMul", [x, f"w1_{i}"], [f"m_{i}"]),
                helper.make_node("Add", [f"m_{i}", f"b1_{i}"], [f"h_{i}"]),
            ]
        nodes += [
            helper.make_node("Relu", [f"h_{i}"], [f"a_{i}"]),
            helper.make_node("Gemm", [f"a_{i}", f"w2_{i}", f"b2_{i}"], [f"y_{i}"]),
            helper.make_node("Add", [x, f"y_{i}"], [f"r_{i}"]),
        ]
        x = f"r_{i}"
    g = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["n", width])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = folder / "mlp.onnx"
    onnxprune.save(m, path, external_data=True)
    np.savez(folder / "data.npz", x=rng.standard_normal((16, width)).astype(np.float32))
    return path
