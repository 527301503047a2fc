"""The user view of the analysis: a model's channel groups, with the MACs each could save
(:func:`channel_groups`), and the weighted layers in no group, with why (:func:`uncovered_layers`)."""

from __future__ import annotations

import copy
from collections import defaultdict

import numpy as np
import onnx

from onnxprune.analysis.coverage import UncoveredLayer, layers_in_no_group
from onnxprune.analysis.groups import classes_of
from onnxprune.analysis.labels import ChannelGroup, ClassId
from onnxprune.analysis.probe import probe
from onnxprune.analysis.walk import analyse
from onnxprune.cost import node_macs
from onnxprune.data import Dataset
from onnxprune.graph import node_name, prepare_for_pruning


def channel_groups(
    model: onnx.ModelProto,
    seed: int = 0,
    *,
    providers: list[str] | None = None,
    data: Dataset | None = None,
) -> list[ChannelGroup]:
    """The channel groups of ``model`` (not modified), with the MACs of the nodes they touch.

    The probe runs on the first samples of ``data`` when given, else on inputs synthesised
    with ``seed``, with ``providers`` (CPU when None).

    Example::

        for g in onnxprune.channel_groups(onnxprune.load("model.onnx")):
            print(g.channels, g.prunable, g.reasons)
    """
    return inspect_model(model, seed, providers=providers, data=data)[0]


def uncovered_layers(model: onnx.ModelProto, seed: int = 0) -> list[UncoveredLayer]:
    """The weighted layers of ``model`` (not modified) that no channel group covers, each
    with the reason (:mod:`onnxprune.analysis.coverage`).

    Example::

        for layer in onnxprune.uncovered_layers(onnxprune.load("model.onnx")):
            print(layer.layer, layer.reason)
    """
    return inspect_model(model, seed)[1]


def inspect_model(
    model: onnx.ModelProto,
    seed: int = 0,
    *,
    providers: list[str] | None = None,
    data: Dataset | None = None,
) -> tuple[list[ChannelGroup], list[UncoveredLayer]]:
    """:func:`channel_groups` and :func:`uncovered_layers` from one analysis (``--inspect``),
    probed as :func:`channel_groups` says."""
    work = copy.deepcopy(model)
    prepare_for_pruning(work.graph)
    pr = probe(work, seed, providers, data=data)
    an = analyse(work, pr.shapes)
    groups = an.groups()
    macs = {node_name(n): node_macs(n, pr.shapes) for n in work.graph.node}
    sink_nodes: dict[ClassId, set[str]] = defaultdict(set)
    roots = an.roots()
    for sink in an.sinks:
        for cid in np.unique(sink.labels.ids[sink.labels.ids >= 0]).tolist():
            sink_nodes[ClassId(int(roots[cid]))].add(node_name(sink.node))
    for g in groups:
        nodes = {s.node for s in g.spaces}
        for r in classes_of(roots, g.spaces):
            nodes |= sink_nodes.get(r, set())
        g.macs = int(sum(macs.get(n, 0) for n in nodes))
    return groups, layers_in_no_group(an, groups)
