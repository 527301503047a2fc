"""Model I/O: load with checks, save safely (external data past 2 GB), provenance.

Passes work on plain ``onnx.ModelProto`` objects; this module is the only place that reads or
writes model files (through :mod:`onnxprune.outputs`). Everything a user can get wrong (missing
file, not ONNX, checker failure, output equal to an input or to its external data, unwritable
folder) becomes a one-line :class:`~onnxprune.errors.OnnxPruneError`. :func:`load` remembers
the external-data files each model it loads reads, so that :func:`save` never overwrites them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx.external_data_helper import (
    ExternalDataInfo,
    load_external_data_for_tensor,
    uses_external_data,
)

from onnxprune import scratch
from onnxprune.errors import ArgumentError, ModelLoadError, first_line
from onnxprune.graph import iter_graphs, iter_initializers, mapped, tensor_array
from onnxprune.onefile import write_one_file
from onnxprune.outputs import OutputPlan, real_path

# Protobuf cannot serialise a message over 2 GiB; stay clear of the limit.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
LIGHT_CHECK_BYTES = 64 << 20
# A model with more external-data bytes than this is loaded mapped: its tensors of at least
# MAP_TENSOR_BYTES stay in their file (read on demand, never copied whole into memory).
MAP_BYTES = 64 << 20
MAP_TENSOR_BYTES = 64 << 10
# Tensors in an external-data file written here start at multiples of this (onnxruntime and
# numpy then map them in place).
ALIGN = 4096
FLOAT_TYPES = frozenset(
    (
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.BFLOAT16,
    )
)
INT_TYPES = frozenset(
    (
        onnx.TensorProto.INT8,
        onnx.TensorProto.INT16,
        onnx.TensorProto.INT32,
        onnx.TensorProto.INT64,
        onnx.TensorProto.UINT8,
        onnx.TensorProto.UINT16,
        onnx.TensorProto.UINT32,
        onnx.TensorProto.UINT64,
    )
)
PROVENANCE_KEY = "onnxprune"
MODEL_ARGUMENT = "a file path (str or os.PathLike) or an onnx.ModelProto"

# The external-data files of every model loaded in this process, by the model file's real path,
# with the file's (mtime, size) when loaded: a model file changed since is read again.
_LOADED: dict[Path, tuple[tuple[int, int], tuple[Path, ...]]] = {}


def load(path: str | os.PathLike[str] | onnx.ModelProto, *, check: bool = True) -> onnx.ModelProto:
    """Load an ONNX model (with its external data) and check it; a ModelProto is checked and
    returned as it is.

    Raises:
        ArgumentError: ``path`` is neither a path (str or os.PathLike) nor a ModelProto.
        ModelLoadError: the file is missing, not an ONNX model, or rejected by onnx.checker.
    """
    if isinstance(path, onnx.ModelProto):
        _require_parts(path, "model")
        if check:
            check_model(path)
        return path
    if not isinstance(path, (str, os.PathLike)):
        raise wrong_type(path, "onnxprune.load: path", MODEL_ARGUMENT)
    path = Path(path)
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError as exc:  # e.g. a name too long for the file system
        raise ModelLoadError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if not exists:
        raise ModelLoadError(f"{path}: no such file")
    if is_dir:
        raise ModelLoadError(f"{path}: is a folder, not an ONNX model file")
    try:
        model = onnx.load(str(path), load_external_data=False)
        files = external_data_files(model, os.path.dirname(path))
        _load_external_data(model, os.path.dirname(path))
    except DecodeError as exc:
        raise ModelLoadError(f"{path}: not an ONNX model (protobuf parse failed: {exc})") from exc
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        # ValidationError: onnx.load's own check that an external data file exists
        raise ModelLoadError(
            f"{path}: cannot read model or its external data: {first_line(exc)}"
        ) from exc
    _require_parts(model, str(path))
    _remember(path, files)
    if check:
        check_model(model, str(path))
    return model


def _load_external_data(model: onnx.ModelProto, base_dir: str) -> None:
    """Read the external data of ``model``'s tensors, except (past :data:`MAP_BYTES` in all)
    the large ones of the main graph: those keep an absolute location and are read mapped
    (:func:`onnxprune.graph.tensor_array`), so the weights stay where they are.

    Raises:
        OSError, ValueError: a data file is missing or too short.
    """
    external = [t for t in _all_tensors(model) if uses_external_data(t)]
    big = sum(tensor_nbytes(t) for t in external) > MAP_BYTES
    keep = {id(t) for t in model.graph.initializer} if big else set()
    for t in external:
        info = ExternalDataInfo(t)
        where = os.path.join(base_dir, info.location)
        mappable = t.data_type not in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED)
        if id(t) in keep and mappable and tensor_nbytes(t) >= MAP_TENSOR_BYTES:
            size = os.path.getsize(where)
            if int(info.offset or 0) + tensor_nbytes(t) > size:
                raise ValueError(f"{info.location} is too short for tensor {t.name!r}")
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = os.path.abspath(where)
            continue
        load_external_data_for_tensor(t, base_dir)
        t.data_location = onnx.TensorProto.DEFAULT
        del t.external_data[:]


def mapped_nbytes(model: onnx.ModelProto) -> int:
    """Bytes of the tensors that stay in their file (:func:`onnxprune.graph.mapped`)."""
    return sum(tensor_nbytes(t) for t in iter_initializers(model.graph) if mapped(t))


def _require_parts(model: onnx.ModelProto, where: str) -> None:
    if model.ir_version == 0 or not model.HasField("graph") or not model.opset_import:
        raise ModelLoadError(f"{where}: not an ONNX model (no IR version, graph or opset)")


def wrong_type(value: object, argument: str, expected: str) -> ArgumentError:
    """The error for an ``argument`` (``"onnxprune.run: model"``) that is not ``expected``:
    it names what was given, with the fix for the usual mix-ups (bytes, a GraphProto)."""
    got = "None" if value is None else type(value).__name__
    if isinstance(value, (str, bytes)) and len(value) <= 40:
        got += f" {value!r}"
    hint = ""
    if isinstance(value, (bytes, bytearray)):
        hint = "; for a serialised model use onnx.load_model_from_string(data)"
    elif isinstance(value, onnx.GraphProto):
        hint = "; wrap a graph with onnx.helper.make_model(graph, opset_imports=[...])"
    elif isinstance(value, (str, os.PathLike)) and "path" not in expected:
        hint = "; read a file with onnxprune.load(path) first"
    return ArgumentError(f"{argument} must be {expected}, got {got}{hint}")


def check_model(model: onnx.ModelProto, where: str = "model") -> None:
    """Run onnx.checker; raise a one-line :class:`ModelLoadError` naming ``where`` if it fails."""
    try:
        if model_nbytes(model) > LIGHT_CHECK_BYTES or mapped_nbytes(model):
            # large weights are checked for dtype and shape only, not serialised (saves memory
            # and time; serialising also fails past 2 GB)
            onnx.checker.check_model(skeleton(model))
        else:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        # The checker's message spans lines ("... of node: \nname: X OpType: Y\n is not ...")
        # and ends with a "==> Context:" trailer; keep the message, on one line.
        text = str(exc).split("==> Context:")[0]
        line = " ".join(text.split()) or "invalid model"
        raise ModelLoadError(f"{where}: onnx.checker rejects the model: {line}") from exc


SKELETON_LIMIT = 4096


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A light copy for shape inference: large initializers become typed graph inputs.

    Shape inference needs only their shapes; small ones (shape constants) keep their values.
    """
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    src, graph = model.graph, light.graph
    graph.name = src.name
    graph.node.extend(src.node)
    graph.input.extend(src.input)
    graph.output.extend(src.output)
    graph.value_info.extend(src.value_info)
    listed = {i.name for i in src.input}  # MXNet-style models list initializers as inputs too
    for t in src.initializer:  # shapes only for the large ones: no weight is copied
        if np.prod(t.dims, dtype=np.int64) > SKELETON_LIMIT or mapped(t):
            if t.name not in listed:
                graph.input.append(
                    onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                )
        else:
            graph.initializer.append(t)
    return light


def model_nbytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data held by initializers (all graphs), for the 2 GB decision."""
    return sum(tensor_nbytes(t) for t in iter_initializers(model.graph))


def tensor_nbytes(t: onnx.TensorProto) -> int:
    """Size from dims and dtype (reading ``raw_data`` would copy the bytes)."""
    if t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return t.ByteSize()
    n = int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    return n * itemsize


def save(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    protect: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = None,
) -> Path:
    """Write ``model`` to ``path`` safely: staged beside it, then renamed into place.

    Never overwrites ``protect``, its external-data files, or the external-data files of any
    model :func:`load` read in this process (unless ``path`` is that model itself).

    Args:
        model: the model to write.
        path: the output file.
        external_data: store tensors in ``<name>.data`` beside the model; ``None`` decides by
            size (over about 2 GB must be external).
        protect: the input model (or several paths) that must not be overwritten.

    Raises:
        ArgumentError: ``model`` is not a ModelProto, or ``path`` not a str or os.PathLike.
        ModelSaveError: the output is a protected file or cannot be written.
    """
    if not isinstance(model, onnx.ModelProto):
        raise wrong_type(model, "onnxprune.save: model", "an onnx.ModelProto")
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentError(f"onnxprune.save: path must be a str or os.PathLike, got {path!r}")
    path = Path(path)
    plan = OutputPlan()
    if protect is not None:
        paths = [protect] if isinstance(protect, (str, os.PathLike)) else list(protect)
        for p in paths:
            plan.add_input("the input model", p)
            for f in model_data_files(p):
                plan.add_input("the input model's external data", f)
    for reader, files in loaded_data_files().items():
        if reader != real_path(path):
            for f in files:
                plan.add_input(f"the external data of {reader}", f)
    target = plan.add_model("", path, external_data)
    with plan:
        plan.write(target, lambda file: write_model(model, file, external_data))
    _LOADED.pop(real_path(path), None)  # what it read before is no longer what it reads
    return path


def write_model(
    model: onnx.ModelProto,
    file: Path,
    external_data: bool | None = None,
    *,
    last_use: bool = False,
) -> None:
    """Write ``model`` to ``file`` (a staged path), tensors in ``<file>.data`` when external.

    Tensors that stay in their input file (mapped) are copied from there into the output, one
    block at a time; external tensors start at multiples of :data:`ALIGN`. The caller's model
    is left as it was. :func:`save` and the CLI's plan call this. ``last_use``: the model is
    not read after this (the CLI's run): a scratch file of its tensors becomes the data file
    itself instead of being copied (:func:`onnxprune.scratch.adopt`).
    """
    if external_data is None:
        external_data = model_nbytes(model) > EXTERNAL_DATA_THRESHOLD
    if not external_data:
        if mapped_nbytes(model):  # weights read from their files into the one file, streamed
            with open(file, "wb") as f:
                write_one_file(model, f)
        else:
            onnx.save_model(model, str(file))
        return
    _write_external(model, file, last_use)


def _write_external(model: onnx.ModelProto, file: Path, last_use: bool = False) -> None:
    """Every tensor of at least 1 KiB into ``<file>.data`` (page-aligned), then the model; a
    scratch file of this model's tensors becomes the start of ``<file>.data`` when the model
    is not used again (:func:`onnxprune.scratch.adopt`), the other tensors follow it."""
    location = f"{file.name}.data"
    moved: list[tuple[onnx.TensorProto, list[onnx.StringStringEntryProto], Any]] = []
    out: BinaryIO | None = None
    # a scratch file holding only tensors of this model is the data file's start (not copied)
    adopted = scratch.adopt(model, file.parent / location) if last_use else None
    try:
        if adopted is not None:
            out = open(file.parent / location, "r+b")  # noqa: SIM115 - closed below
            out.seek(0, os.SEEK_END)
        for t in _all_tensors(model):
            if t.data_type == onnx.TensorProto.STRING or not (
                mapped(t) or (t.HasField("raw_data") and len(t.raw_data) >= 1024)
            ):
                continue
            if out is None:  # no data file when no tensor goes there
                out = open(file.parent / location, "wb")  # noqa: SIM115 - closed below
            if mapped(t) and ExternalDataInfo(t).location == adopted:
                # already in the data file, where the scratch file has it
                offset, length = int(ExternalDataInfo(t).offset or 0), tensor_nbytes(t)
            else:
                offset = out.tell()
                offset += out.write(b"\0" * ((-offset) % ALIGN))
                if mapped(t):
                    flat = tensor_array(t).reshape(-1).view(np.uint8)
                    for start in range(0, flat.size, 64 << 20):
                        out.write(flat[start : start + (64 << 20)].tobytes())
                    length = flat.size
                else:
                    length = out.write(t.raw_data)
            where = t.data_location if t.HasField("data_location") else None
            entries = [
                onnx.StringStringEntryProto(key=e.key, value=e.value) for e in t.external_data
            ]
            moved.append((t, entries, where))
            del t.external_data[:]
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", offset), ("length", length)):
                t.external_data.add(key=key, value=str(value))
        if out is not None:
            out.flush()
        with open(file, "wb") as f:
            f.write(model.SerializeToString())
    finally:  # the caller's model as it was: in-memory tensors read back, mapped ones re-pointed
        if out is not None:
            out.close()
        for t, entries, where in moved:
            if where == onnx.TensorProto.EXTERNAL:
                del t.external_data[:]
                t.external_data.extend(entries)
            else:
                load_external_data_for_tensor(t, str(file.parent))
                del t.external_data[:]
                t.ClearField("data_location")
                if where is not None:
                    t.data_location = where


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Initializers and attribute tensors (Constant values...) of every graph and function."""
    graphs = list(iter_graphs(model.graph))
    for g in graphs:
        yield from g.initializer
    for node in [n for g in graphs for n in g.node] + [n for f in model.functions for n in f.node]:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors


def external_data_files(model: onnx.ModelProto, base_dir: str | os.PathLike[str]) -> list[Path]:
    """The files ``model``'s tensors read (their ``external_data`` locations, from ``base_dir``)."""
    files: dict[Path, None] = {}
    for t in _all_tensors(model):
        if uses_external_data(t):
            files[Path(base_dir) / ExternalDataInfo(t).location] = None
    return list(files)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def _remember(path: Path, files: list[Path]) -> None:
    stamp = _stamp(path)
    if stamp is not None:
        _LOADED[real_path(path)] = (stamp, tuple(files))


def loaded_data_files() -> dict[Path, tuple[Path, ...]]:
    """The external-data files of the models loaded in this process (and unchanged since)."""
    return {m: files for m, (stamp, files) in _LOADED.items() if files and _stamp(m) == stamp}


def model_data_files(path: str | os.PathLike[str]) -> list[Path]:
    """The external-data files the model file ``path`` reads (as :func:`load` found them, or
    read now without the weights); none when it cannot be read."""
    path = Path(path)
    known = _LOADED.get(real_path(path))
    if known is not None and known[0] == _stamp(path):
        return list(known[1])
    try:
        light = onnx.load(str(path), load_external_data=False)
    except (OSError, ValueError, DecodeError):
        return []
    return external_data_files(light, os.path.dirname(path))


def add_provenance(model: onnx.ModelProto, entry: dict[str, Any]) -> None:
    """Append ``entry`` (version, passes and options run) to the model's ``onnxprune`` metadata."""
    history: list[dict[str, Any]] = []
    for prop in model.metadata_props:
        if prop.key == PROVENANCE_KEY:
            try:
                history = list(json.loads(prop.value))
            except (ValueError, TypeError):
                history = []
    history.append(entry)
    kept = [p for p in model.metadata_props if p.key != PROVENANCE_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=PROVENANCE_KEY, value=json.dumps(history, sort_keys=True))


def provenance(model: onnx.ModelProto) -> list[dict[str, Any]]:
    """The list of onnxprune runs recorded in the model's metadata (oldest first)."""
    for prop in model.metadata_props:
        if prop.key == PROVENANCE_KEY:
            return list(json.loads(prop.value))
    return []
