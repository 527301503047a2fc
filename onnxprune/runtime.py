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

from onnxprune import scratch
from onnxprune.errors import DeviceError, PassFailedError, first_line
from onnxprune.graph import mapped, release_maps, tensor_array
from onnxprune.model import FLOAT_TYPES, SKELETON_LIMIT, model_nbytes, tensor_nbytes

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
_ALIGNED = 64  # a mapped weight at such an address is handed to onnxruntime in place
_TEMP = {"bytes": 0}  # bytes of temporary weight files written by this process


def temp_bytes() -> int:
    """Bytes of temporary weight files this process has written so far: for sessions, and
    scratch files (:mod:`onnxprune.scratch`)."""
    return _TEMP["bytes"] + scratch.written()


def puts_apart(model: onnx.ModelProto, share_weights: bool | None = None) -> bool:
    """Whether a session on ``model`` takes its large weights from files, not inside the
    serialised model (rules 2-3; ``share_weights`` as for :func:`session`): then a pass that
    changes a weight kept in its file writes the new value to a scratch file, not to memory."""
    nbytes = model_nbytes(model)
    share = nbytes > SHARE_WEIGHTS_BYTES if share_weights is None else share_weights
    return bool(share or nbytes > SERIALIZE_LIMIT)


def keep_apart(model: onnx.ModelProto, share_weights: bool | None = None) -> int:
    """Write the large in-memory weights that a session on ``model`` puts apart (rule 2)
    into a scratch file once and point ``model`` at it, so that every later session, and the
    output, reads them in place instead of each session writing its own copy. Returns the
    bytes written (0 when a session would take the weights inside the model)."""
    if not puts_apart(model, share_weights):
        return 0
    before = scratch.written()
    with scratch.Writer() as out:
        for t in model.graph.initializer:
            # the small ones stay: the model's summary keeps them inline (model.skeleton)
            if _big(t, True) and not mapped(t) and np.prod(t.dims) > SKELETON_LIMIT:
                out.put(t, np.frombuffer(t.raw_data, np.uint8))
    return scratch.written() - before


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
        1. Weights that stay in their file (:func:`onnxprune.graph.mapped`: as
           :func:`onnxprune.model.load` leaves a large model's, or a scratch file) are never
           copied: with ``share_weights`` they are handed over as OrtValues over this
           process's one map of each file (onnxruntime uses them in place; concurrent
           sessions share the pages), else onnxruntime maps the files itself. Either way the
           model's external data points at the files, from one folder above them all.
        2. Large weights in memory (``share_weights``) go to a temporary file that onnxruntime
           maps (its size is counted, :func:`temp_bytes`); the file goes with the session.
           :func:`keep_apart` writes them once for every later session instead.
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
            light, folder, names, values, tmpdir = _weights_apart(
                model, in_memory=apart, share=bool(share_weights)
            )
            if folder is not None:
                opts.add_session_config_entry(_FOLDER_KEY, folder)
            for name, value in zip(names, values, strict=True):
                opts.add_initializer(name, value)
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
    model: onnx.ModelProto, *, in_memory: bool, share: bool
) -> tuple[onnx.ModelProto, str | None, list[str], list[ort.OrtValue], str | None]:
    """``model`` with its weights out of the proto (rules 1-2): the light model, the folder
    its external data is read from, the mapped weights handed over in place (names, OrtValues
    over this process's maps of their files, when ``share``) and the temporary folder to
    delete with the session (None when nothing was written)."""
    light = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(light, field, getattr(model, field))
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph = model.graph
    for name in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(light.graph, name).extend(getattr(graph, name))
    light.graph.name = graph.name
    moved = [t for t in graph.initializer if _big(t, in_memory) and not mapped(t)]
    tmpdir = tempfile.mkdtemp(prefix="onnxprune-") if moved else None
    files = {os.path.realpath(ExternalDataInfo(t).location) for t in graph.initializer if mapped(t)}
    dirs = {os.path.dirname(f) for f in files} | ({os.path.realpath(tmpdir)} if tmpdir else set())
    # one folder above every file: onnxruntime reads external data below its folder only
    folder = os.path.commonpath(sorted(dirs)) if dirs else None
    names: list[str] = []
    values: list[ort.OrtValue] = []
    f = open(os.path.join(tmpdir, "weights.bin"), "wb") if tmpdir else None  # noqa: SIM115
    try:
        for t in graph.initializer:
            if mapped(t) and folder is not None:
                info = ExternalDataInfo(t)
                where = os.path.relpath(os.path.realpath(info.location), folder)
                _placeholder(light, t, where, int(info.offset or 0), tensor_nbytes(t))
                arr = tensor_array(t)
                if share and arr.ctypes.data % _ALIGNED == 0:  # read in place, pages shared
                    names.append(t.name)
                    values.append(ort.OrtValue.ortvalue_from_numpy(arr))
            elif f is not None and tmpdir is not None and folder is not None and _big(t, in_memory):
                offset = f.tell()
                offset += f.write(b"\0" * ((-offset) % 4096))  # page-aligned: mapped in place
                length = f.write(t.raw_data)
                where = os.path.relpath(
                    os.path.join(os.path.realpath(tmpdir), "weights.bin"), folder
                )
                _placeholder(light, t, where, offset, length)
            else:
                light.graph.initializer.append(t)
        if f is not None:
            _TEMP["bytes"] += f.tell()
    finally:
        if f is not None:
            f.close()
    return light, folder, names, values, tmpdir


def _big(t: onnx.TensorProto, in_memory: bool) -> bool:
    """A float weight large enough to go apart (integer tensors, such as axes and shapes, feed
    shape inference, which reads them from the model itself)."""
    return bool(
        in_memory
        and t.HasField("raw_data")
        and t.data_type in FLOAT_TYPES
        and np.prod(t.dims, dtype=np.int64) >= _SHARE_MIN_ELEMENTS
    )
