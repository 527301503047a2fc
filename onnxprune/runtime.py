"""onnxruntime sessions: pick the CUDA provider when it really works, the CPU one otherwise.

``onnxruntime-gpu`` lists ``CUDAExecutionProvider`` even on a host without a GPU (and then
falls back to the CPU with an error in the log), so availability is judged by what a real
session ends up using, not by ``get_available_providers()`` or ``get_device()``.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.errors import DeviceError, PassFailedError, first_line
from onnxprune.model import FLOAT_TYPES, model_nbytes

Device = Literal["auto", "cpu", "cuda"]
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@functools.cache
def cuda_works() -> bool:
    """Whether a CUDA session can actually be created here (probed once on a tiny model)."""
    if CUDA not in ort.get_available_providers():
        return False
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    probe = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    probe.ir_version = 8
    try:
        sess = session(probe, [CUDA, CPU], log_level=4)
    except PassFailedError:  # any failure means "no usable CUDA"
        return False
    return sess.get_providers()[0] == CUDA


@functools.cache
def cpu_has_avx512() -> bool:
    """Whether this CPU has AVX-512 (Linux /proc/cpuinfo; False where unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(" avx512f" in line for line in f if line.startswith("flags"))
    except OSError:
        return False


def channel_multiple(providers: Sequence[str] = (CPU,)) -> int:
    """Channel counts that keep onnxruntime's fast kernels: its CPU convolutions use a blocked
    (NCHWc) layout of 16 channels on AVX-512 and 8 elsewhere; CUDA's tensor cores want 8."""
    if providers and providers[0] == CUDA:
        return 8
    return 16 if cpu_has_avx512() else 8


def providers_for(device: Device = "auto") -> list[str]:
    """The provider list for ``device``; ``cuda`` without a usable GPU is an error, not a fallback.

    Raises:
        DeviceError: ``device`` is ``cuda`` and no CUDA session can be created.
    """
    if device == "cpu":
        return [CPU]
    if device == "cuda":
        if not cuda_works():
            raise DeviceError(
                "--device cuda: onnxruntime cannot use CUDA here (no GPU, or onnxruntime-gpu "
                "and its CUDA/cuDNN libraries are not installed); use --device auto or cpu"
            )
        return [CUDA, CPU]
    if device == "auto":
        return [CUDA, CPU] if cuda_works() else [CPU]
    raise DeviceError(f"unknown device {device!r}: use auto, cpu or cuda")


SHARE_WEIGHTS_BYTES = 64 << 20
_SHARE_MIN_ELEMENTS = 1 << 16


def session(
    model: onnx.ModelProto | bytes,
    providers: Sequence[str] = (CPU,),
    *,
    threads: int = 0,
    optimize: bool = True,
    share_weights: bool | None = None,
    log_level: int = 4,
) -> ort.InferenceSession:
    """An InferenceSession on ``model`` (a ModelProto or serialised bytes): the one place
    onnxprune creates them.

    Args:
        model: the model.
        providers: onnxruntime providers, best first.
        threads: intra-op threads (0: onnxruntime's default).
        optimize: apply onnxruntime's graph optimisations.
        share_weights: give onnxruntime the large weights through a temporary external-data
            file that it maps into memory, instead of serialising them (saves two copies of
            the weights); ``None`` decides by size. Weight prepacking is then off: meant for
            analysis runs, not timing.
        log_level: onnxruntime's log severity (4, the default: fatal only; errors come back
            as exceptions, so no raw log line reaches stderr).

    Raises:
        PassFailedError: onnxruntime refuses the model (the message is its first line).
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = log_level
    if threads:
        opts.intra_op_num_threads = threads
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source: bytes | str
    tmpdir = None
    if isinstance(model, bytes):
        source = model
    else:
        if share_weights is None:
            share_weights = model_nbytes(model) > SHARE_WEIGHTS_BYTES
        if share_weights:
            tmpdir = tempfile.mkdtemp(prefix="onnxprune-")
            source = _write_light_model(model, tmpdir)
            opts.add_session_config_entry("session.disable_prepacking", "1")
        else:
            source = model.SerializeToString()
    try:
        sess = ort.InferenceSession(source, opts, providers=list(providers))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
        raise PassFailedError(f"onnxruntime cannot run the model: {first_line(exc)}") from exc
    if tmpdir is not None:  # the weights file is mapped: it goes with the session
        weakref.finalize(sess, shutil.rmtree, tmpdir, True)
    return sess


def _write_light_model(model: onnx.ModelProto, folder: str) -> str:
    """Save ``model`` into ``folder`` with its large float weights in one external data file.

    onnxruntime maps that file into memory instead of copying the weights, so a session over a
    large model costs little more than the model itself. Returns the model file's path.
    """
    light = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(light, field, getattr(model, field))
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph = model.graph
    for name in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(light.graph, name).extend(getattr(graph, name))
    light.graph.name = graph.name
    with open(os.path.join(folder, "weights.bin"), "wb") as f:
        for t in graph.initializer:
            # float weights only: integer tensors (axes, shapes) feed shape inference, which
            # reads them from the model itself
            big = (
                t.HasField("raw_data")
                and t.data_type in FLOAT_TYPES
                and np.prod(t.dims, dtype=np.int64) >= _SHARE_MIN_ELEMENTS
            )
            if not big:
                light.graph.initializer.append(t)
                continue
            offset = f.tell()
            offset += f.write(b"\0" * ((-offset) % 4096))  # page-aligned: mapped in place
            raw = t.raw_data
            f.write(raw)
            ph = light.graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims)
            ph.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (
                ("location", "weights.bin"),
                ("offset", str(offset)),
                ("length", str(len(raw))),
            ):
                ph.external_data.add(key=key, value=value)
            del raw
    path = os.path.join(folder, "model.onnx")
    with open(path, "wb") as f:
        f.write(light.SerializeToString())
    return path
