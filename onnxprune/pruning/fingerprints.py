"""A digest of everything that decides a model's activations: the key of cached statistics."""

from __future__ import annotations

import hashlib

import onnx


def fingerprint(model: onnx.ModelProto) -> str:
    """A digest of everything that decides a model's activations, weight values included.

    Hashes nodes (subgraphs included), inputs, outputs, initializers (all bytes: a sample could
    miss a zeroed channel and serve stale statistics), functions and opsets, part by part so no
    serialised copy of the whole model is made. BLAKE2 hashes over 1 GB/s, far below the cost
    of the runs it saves.
    """
    digest = hashlib.blake2b(digest_size=20)
    graph = model.graph
    parts = (
        graph.node,
        graph.input,
        graph.output,
        graph.initializer,
        graph.sparse_initializer,
        model.functions,
        model.opset_import,
    )
    for group in parts:
        digest.update(len(group).to_bytes(8, "little"))
        for item in group:
            blob = item.SerializeToString()
            digest.update(len(blob).to_bytes(8, "little"))
            digest.update(blob)
    return digest.hexdigest()
