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
from onnx.external_data_helper import ExternalDataInfo

from onnxprune.errors import DeviceError, PassFailedError, first_line
from onnxprune.graph import mapped, release_maps, tensor_array
from onnxprune.model import FLOAT_TYPES, model_nbytes, tensor_nbytes

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
# Protobuf cannot serialise a message past 2 GiB: a model whose weights come near it is never
# serialised with them (tests lower this to exercise that path on small models).
SERIALIZE_LIMIT = 2**31 - 2**26
_SHARE_MIN_ELEMENTS = 1 << 16
_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
_TEMP = {"bytes": 0}  # bytes of temporary weight files written by this process


def temp_bytes() -> int:
    """Bytes of temporary weight files this process has written for sessions so far."""
    return _TEMP["bytes"]


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

    Rules:
        1. Weights that stay in their file (:func:`onnxprune.graph.mapped`, as
           :func:`onnxprune.model.load` leaves a large model's) are read by onnxruntime from
           that file, mapped in place; when the model also has large weights in memory, or
           its files lie in several folders, they are handed over as OrtValues over the mapped
           arrays (onnxruntime copies them; this process's pages of the maps are dropped).
        2. Large weights in memory (``share_weights``) go to a temporary file that onnxruntime
           maps (its size is counted, :func:`temp_bytes`); the file goes with the session.
        3. A model with more weight bytes than :data:`SERIALIZE_LIMIT` (protobuf's 2 GiB) is
           never serialised with its weights: rule 1 and 2 apply whatever ``share_weights``.

    Args:
        model: the model.
        providers: onnxruntime providers, best first.
        threads: intra-op threads (0: onnxruntime's default).
        optimize: apply onnxruntime's graph optimisations.
        share_weights: rules 1-2 with weight prepacking off (no packed copy: meant for
            analysis runs, not timing); ``None`` decides by size. ``False`` keeps prepacking
            and serialises in-memory weights unless rule 3 applies.
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
    source: bytes
    tmpdir = None
    values: list[ort.OrtValue] = []
    if isinstance(model, bytes):
        source = model
    else:
        nbytes = model_nbytes(model)
        if share_weights is None:
            share_weights = nbytes > SHARE_WEIGHTS_BYTES
        apart = share_weights or nbytes > SERIALIZE_LIMIT
        if apart or any(mapped(t) for t in model.graph.initializer):
            if share_weights:
                opts.add_session_config_entry("session.disable_prepacking", "1")
            light, folder, names, values, tmpdir = _weights_apart(model, in_memory=apart)
            if folder is not None:
                opts.add_session_config_entry(_FOLDER_KEY, folder)
            if names:
                opts.add_external_initializers(names, values)
            source = light.SerializeToString()
        else:
            source = model.SerializeToString()
    try:
        sess = ort.InferenceSession(source, opts, providers=list(providers))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
        raise PassFailedError(f"onnxruntime cannot run the model: {first_line(exc)}") from exc
    if values:
        sess._onnxprune_weights = values  # alive with the session
        release_maps()
    if tmpdir is not None:  # the weights file is mapped: it goes with the session
        weakref.finalize(sess, shutil.rmtree, tmpdir, True)
    return sess


def _placeholder(
    light: onnx.ModelProto, t: onnx.TensorProto, location: str, offset: int, length: int
) -> None:
    ph = light.graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims)
    ph.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        ph.external_data.add(key=key, value=value)


def _weights_apart(
    model: onnx.ModelProto, *, in_memory: bool
) -> tuple[onnx.ModelProto, str | None, list[str], list[ort.OrtValue], str | None]:
    """``model`` with its weights out of the proto (rules 1-2): the light model, the folder
    its external data is read from, the weights handed over as OrtValues (names, values) and
    the temporary folder to delete with the session (None when nothing was written)."""
    light = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(light, field, getattr(model, field))
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph = model.graph
    for name in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(light.graph, name).extend(getattr(graph, name))
    light.graph.name = graph.name

    def big(t: onnx.TensorProto) -> bool:
        # float weights only: integer tensors (axes, shapes) feed shape inference, which
        # reads them from the model itself
        return bool(
            in_memory
            and t.HasField("raw_data")
            and t.data_type in FLOAT_TYPES
            and np.prod(t.dims, dtype=np.int64) >= _SHARE_MIN_ELEMENTS
        )

    maps = [t for t in graph.initializer if mapped(t)]
    folders = {os.path.dirname(ExternalDataInfo(t).location) for t in maps}
    moved = [t for t in graph.initializer if big(t) and not mapped(t)]
    in_place = len(folders) == 1 and not moved  # rule 1: onnxruntime reads the files itself
    folder = folders.pop() if in_place else None
    names: list[str] = []
    values: list[ort.OrtValue] = []
    tmpdir = tempfile.mkdtemp(prefix="onnxprune-") if moved else None
    f = open(os.path.join(tmpdir, "weights.bin"), "wb") if tmpdir else None  # noqa: SIM115
    try:
        for t in graph.initializer:
            if mapped(t):
                info = ExternalDataInfo(t)
                if in_place:
                    length = tensor_nbytes(t)
                    _placeholder(
                        light, t, os.path.basename(info.location), int(info.offset or 0), length
                    )
                else:
                    arr = tensor_array(t)
                    _placeholder(light, t, "onnxprune-in-memory", 0, arr.nbytes)
                    names.append(t.name)
                    values.append(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr)))
            elif f is not None and big(t):
                offset = f.tell()
                offset += f.write(b"\0" * ((-offset) % 4096))  # page-aligned: mapped in place
                length = f.write(t.raw_data)
                _placeholder(light, t, "weights.bin", offset, length)
            else:
                light.graph.initializer.append(t)
        if f is not None:
            _TEMP["bytes"] += f.tell()
    finally:
        if f is not None:
            f.close()
    return light, tmpdir or folder, names, values, tmpdir
