"""Write a model with mapped weights as one file, streamed: one tensor in memory at a time.

``onnx.save_model`` serialises the whole model at once, so every weight that stays in its
file (:func:`onnxprune.graph.mapped`) would first be read into the model and then copied again
into the serialised bytes. Protobuf parsers take a message's fields in any order, so the file
is written as the model without its graph, then the graph field: the graph without its
initializers, then each initializer (a mapped one as its fields, then its ``raw_data`` read
from the map block by block).
"""

from __future__ import annotations

from typing import BinaryIO

import numpy as np
import onnx

from onnxprune.graph import mapped, tensor_array

_LEN = 2  # protobuf wire type of length-delimited fields
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9
_BLOCK = 64 << 20


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(field: int) -> bytes:
    return _varint(field << 3 | _LEN)


def _without(message: onnx.ModelProto | onnx.GraphProto, skip: str) -> bytes:
    """``message`` serialised without field ``skip`` (the message itself is not changed)."""
    copy = type(message)()
    for fd, value in message.ListFields():
        if fd.name == skip:
            continue
        if fd.message_type is not None and not _repeated(fd):
            getattr(copy, fd.name).CopyFrom(value)
        elif _repeated(fd):
            getattr(copy, fd.name).extend(value)
        else:
            setattr(copy, fd.name, value)
    return copy.SerializeToString()


def _repeated(fd: object) -> bool:
    flag = getattr(fd, "is_repeated", None)  # protobuf >= 6; before: the label
    return bool(flag) if flag is not None else getattr(fd, "label", 0) == 3


def _mapped_head(t: onnx.TensorProto) -> tuple[bytes, np.ndarray]:
    """A mapped tensor's fields but its data, up to its ``raw_data`` key and length, and the
    bytes to append after them."""
    head = onnx.TensorProto()
    head.CopyFrom(t)
    del head.external_data[:]
    head.ClearField("data_location")
    flat = tensor_array(t).reshape(-1).view(np.uint8)
    return head.SerializeToString() + _key(_TENSOR_RAW_DATA) + _varint(flat.size), flat


def write_one_file(model: onnx.ModelProto, out: BinaryIO) -> None:
    """Write ``model`` (weights inline, mapped ones read from their files) to ``out``."""
    out.write(_without(model, "graph"))
    graph_head = _without(model.graph, "initializer")
    inits = list(model.graph.initializer)
    heads = {i: _mapped_head(t) for i, t in enumerate(inits) if mapped(t)}
    sizes = [
        len(heads[i][0]) + heads[i][1].size if i in heads else t.ByteSize()
        for i, t in enumerate(inits)
    ]
    total = len(graph_head) + sum(len(_key(_GRAPH_INITIALIZER) + _varint(n)) + n for n in sizes)
    out.write(_key(_MODEL_GRAPH) + _varint(total))
    out.write(graph_head)
    for i, (t, size) in enumerate(zip(inits, sizes, strict=True)):
        out.write(_key(_GRAPH_INITIALIZER) + _varint(size))
        if i not in heads:
            out.write(t.SerializeToString())
            continue
        head, flat = heads[i]
        out.write(head)
        for start in range(0, flat.size, _BLOCK):
            out.write(flat[start : start + _BLOCK].tobytes())
