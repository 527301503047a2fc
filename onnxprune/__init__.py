"""onnxprune: prune ONNX models with pluggable graph passes.

Public API::

    import onnxprune
    model = onnxprune.load("model.onnx")
    new, report = onnxprune.run(model, ["cleanup", "fold"])
    onnxprune.save(new, "model.pruned.onnx")
"""

from __future__ import annotations

__version__ = "0.1.0"

from onnxprune.context import Context  # noqa: E402
from onnxprune.errors import OnnxPruneError  # noqa: E402
from onnxprune.groups import ChannelGroup, channel_groups  # noqa: E402
from onnxprune.model import load, save  # noqa: E402
from onnxprune.passes.base import Pass, PassResult, option  # noqa: E402
from onnxprune.pipeline import run  # noqa: E402
from onnxprune.registry import available_passes, get_pass, register_pass  # noqa: E402
from onnxprune.summary import summarize  # noqa: E402

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
    "option",
    "register_pass",
    "run",
    "save",
    "summarize",
]
