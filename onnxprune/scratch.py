"""Scratch files: large weights changed in memory, written once and then read mapped.

Rules:
    1. A :class:`Writer` writes tensors one at a time into a new file of this process's
       scratch folder (page-aligned, under the system temp dir), and at its close points each
       TensorProto at its bytes there (an absolute location: :func:`onnxprune.graph.mapped`),
       so the tensor no longer holds its data in memory and every later reader (views,
       onnxruntime sessions, the output writer) reads the file in place.
    2. The bytes written are counted (:func:`written`, part of the report's ``temp_bytes``).
    3. Files live until :func:`collect` finds no model referring to them, or until the process
       ends (the folder is removed at exit).
    4. A file every tensor of which a model saved for the last time reads becomes that
       output's data file (:func:`adopt`: moved there by a hard link, when on the same file
       system), so its bytes are not written a second time; the rest of the output is
       appended after them. The model must not read that file afterwards.
    5. The folder is made under the system temp dir, or under the folder :func:`place` names
       (the CLI names the output's folder, so that rule 4's link stays on one file system).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import BinaryIO

import numpy as np
import onnx
from onnx.external_data_helper import ExternalDataInfo

from onnxprune.graph import forget_map, iter_initializers, mapped, set_init

ALIGN = 4096
_STATE: dict[str, int | str | None] = {"folder": None, "parent": None, "bytes": 0}
_FILES: list[str] = []  # every scratch file made by this process, oldest first
_REGIONS: dict[str, set[tuple[int, int]]] = {}  # file -> (offset, length) of each tensor
_ADOPTED: set[str] = set()  # files an output's data file shares (never adopted twice)
_DATA_FIELDS = (
    "raw_data",
    "float_data",
    "double_data",
    "int32_data",
    "int64_data",
    "uint64_data",
)


def written() -> int:
    """Bytes this process has written into scratch files."""
    return int(_STATE["bytes"] or 0)


def files() -> list[str]:
    """The scratch files made so far (deleted ones included), oldest first."""
    return list(_FILES)


def place(parent: str | os.PathLike[str] | None) -> None:
    """Make the scratch folder under ``parent`` from now on (None: the system temp dir);
    files already written stay where they are (rule 5)."""
    _STATE["parent"] = None if parent is None else os.fspath(parent)
    path = _STATE["folder"]
    if isinstance(path, str) and os.path.isdir(path) and not os.listdir(path):
        shutil.rmtree(path, True)
    _STATE["folder"] = None  # the next file makes a folder at the new place


@contextlib.contextmanager
def placed(parent: str | os.PathLike[str] | None) -> Iterator[None]:
    """:func:`place` for the ``with`` block; the place before it afterwards (an empty
    folder made meanwhile goes)."""
    before = _STATE["parent"]
    place(parent)
    try:
        yield
    finally:
        place(before if isinstance(before, str) else None)


def folder() -> str:
    """This process's scratch folder (made on first use, removed at exit)."""
    path = _STATE["folder"]
    if not isinstance(path, str) or not os.path.isdir(path):
        parent = _STATE["parent"]
        path = None
        if isinstance(parent, str):
            try:
                path = tempfile.mkdtemp(prefix=".onnxprune-scratch-", dir=parent)
            except OSError:  # a folder we may not write into (``-o /dev/stdout``)
                path = None
        if path is None:
            path = tempfile.mkdtemp(prefix="onnxprune-scratch-")
        atexit.register(shutil.rmtree, path, True)
        _STATE["folder"] = path
    return path


class Writer:
    """One new scratch file: :meth:`put` writes a tensor's value; closing re-points them all."""

    def __init__(self, active: bool = True) -> None:
        self.active = active  # False: :meth:`replace` keeps every new value in memory
        self.path = ""
        self._file: BinaryIO | None = None
        self._pending: list[tuple[onnx.TensorProto, int, int, tuple[int, ...]]] = []

    def __enter__(self) -> Writer:
        return self

    def put(
        self, t: onnx.TensorProto, arr: np.ndarray, shape: tuple[int, ...] | None = None
    ) -> None:
        """Write ``arr`` (``t``'s new value, of ``t``'s dtype; ``shape``: its new dims, else
        ``t``'s) into the file now; ``t`` is pointed at it when the writer closes."""
        if self._file is None:
            fd, self.path = tempfile.mkstemp(prefix="w-", suffix=".bin", dir=folder())
            self._file = os.fdopen(fd, "wb")
            _FILES.append(self.path)
        f = self._file
        offset = f.tell()
        offset += f.write(b"\0" * ((-offset) % ALIGN))
        flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        for start in range(0, flat.size, 64 << 20):  # no whole-tensor bytes copy
            f.write(flat[start : start + (64 << 20)].data)
        dims = tuple(int(d) for d in t.dims) if shape is None else shape
        self._pending.append((t, offset, int(flat.size), dims))

    def replace(self, graph: onnx.GraphProto, name: str, arr: np.ndarray) -> None:
        """Initializer ``name`` becomes ``arr``: written here when the writer is active and
        the weight stays in its file now (a large model's), else kept in memory
        (:func:`onnxprune.graph.set_init`)."""
        t = next((t for t in graph.initializer if t.name == name), None)
        if self.active and t is not None and mapped(t):
            self.put(t, arr, tuple(int(d) for d in arr.shape))
        else:
            set_init(graph, name, np.ascontiguousarray(arr))

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        f = self._file
        if f is None:
            return
        _STATE["bytes"] = written() + f.tell()
        f.close()
        if kind is not None:  # nothing was re-pointed: the file is not needed
            os.unlink(self.path)
            return
        _REGIONS[self.path] = {(offset, length) for _, offset, length, _ in self._pending}
        for t, offset, length, dims in self._pending:
            point_at(t, self.path, offset, length)
            del t.dims[:]
            t.dims.extend(dims)
        self._pending.clear()


def point_at(t: onnx.TensorProto, path: str, offset: int, length: int) -> None:
    """Make ``t`` read its data from ``path`` at ``offset`` (its in-memory data dropped)."""
    for name in _DATA_FIELDS:
        t.ClearField(name)
    del t.external_data[:]
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", path), ("offset", str(offset)), ("length", str(length))):
        t.external_data.add(key=key, value=value)


def referenced(models: Iterable[onnx.ModelProto | None]) -> set[str]:
    """The scratch files the mapped tensors of ``models`` read."""
    mine = set(_FILES)
    used: set[str] = set()
    for m in models:
        if m is None:
            continue
        for t in iter_initializers(m.graph):
            if mapped(t):
                location = ExternalDataInfo(t).location
                if location in mine:
                    used.add(location)
    return used


def collect(models: Iterable[onnx.ModelProto | None], since: int = 0) -> int:
    """Delete the scratch files made since index ``since`` of :func:`files` that no model
    of ``models`` reads; returns how many went."""
    used = referenced(models)
    gone = 0
    for path in _FILES[since:]:
        if path not in used and os.path.exists(path):
            forget_map(path)  # its map would keep the disk space
            os.unlink(path)
            gone += 1
    return gone


def adopt(model: onnx.ModelProto, target: str | os.PathLike[str]) -> str | None:
    """Move to ``target`` (a new file: the output's data file) the largest scratch file all
    of whose tensors ``model`` reads, at the places it reads them (rule 4: a hard link, then
    the scratch name goes, so the output has one link as onnx requires); returns the scratch
    path it had, or None (no such file, or another file system: the caller copies)."""
    if os.path.lexists(target):
        return None
    reads: dict[str, set[tuple[int, int]]] = {}
    for t in iter_initializers(model.graph):
        if mapped(t):
            info = ExternalDataInfo(t)
            length = int(info.length) if info.length is not None else -1
            reads.setdefault(info.location, set()).add((int(info.offset or 0), length))
    whole = [
        path
        for path, regions in _REGIONS.items()
        if path not in _ADOPTED and regions and regions <= reads.get(path, set())
    ]
    for path in sorted(whole, key=lambda p: -max(o + n for o, n in _REGIONS[p])):
        try:
            os.link(path, target)
        except OSError:
            continue
        _ADOPTED.add(path)
        forget_map(path)
        os.unlink(path)
        return path
    return None
