"""onnxprune: prune ONNX models with pluggable graph passes.

Public API::

    import onnxprune
    model = onnxprune.load("model.onnx")
    new, report = onnxprune.run(model, ["cleanup", "fold"])
    onnxprune.save(new, "model.pruned.onnx")
"""

from __future__ import annotations

from onnxprune.analysis.handlers import register_handler
from onnxprune.analysis.inspect import channel_groups, uncovered_layers
from onnxprune.analysis.labels import ChannelGroup
from onnxprune.context import Context
from onnxprune.cost import summarize
from onnxprune.errors import OnnxPruneError
from onnxprune.fusion.weights import merge_weights
from onnxprune.model import load, save
from onnxprune.passes.base import Pass, PassResult, option
from onnxprune.passes.registry import available_passes, get_pass, register_pass
from onnxprune.pipeline import run
from onnxprune.version import __version__

__all__ = [
    "ChannelGroup",
    "Context",
    "OnnxPruneError",
    "Pass",
    "PassResult",
    "__version__",
    "available_passes",
    "channel_groups",
    "get_pass",
    "load",
    "merge_weights",
    "option",
    "register_handler",
    "register_pass",
    "run",
    "save",
    "summarize",
    "uncovered_layers",
]
