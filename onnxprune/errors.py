"""The errors onnxprune raises, and the exit code each one maps to.

Every user-facing failure is an :class:`OnnxPruneError`; the CLI catches that base class once
and prints its one-line message. :class:`InternalError` is deliberately *not* a subclass: it
means a bug in onnxprune itself, and is shown with its traceback.
"""

from __future__ import annotations


class OnnxPruneError(Exception):
    """Base of every error caused by input, options or a failed check (not by a bug)."""

    exit_code = 2


class ModelLoadError(OnnxPruneError):
    """Raised when a model file is missing, unreadable, not ONNX, or rejected by onnx.checker."""


class ModelSaveError(OnnxPruneError):
    """Raised when the output cannot be written, or would overwrite the input model."""


class UnsupportedModelError(OnnxPruneError):
    """Raised when a pass cannot work on a model at all (it says what to do instead)."""


class PassNotFoundError(OnnxPruneError):
    """Raised when a pass name is not registered."""


class PassOptionError(OnnxPruneError):
    """Raised for an unknown pass option or a value of the wrong type or range."""


class DataError(OnnxPruneError):
    """Raised when calibration or test data does not fit the model's inputs."""


class RecipeError(OnnxPruneError):
    """Raised when a recipe file cannot be read or names unknown keys."""


class DeviceError(OnnxPruneError):
    """Raised when the requested execution device is not available."""


class PassFailedError(OnnxPruneError):
    """Raised when a pass fails on a model; the message names the pass and the node."""


class RunFailed(PassFailedError):
    """Raised when onnxruntime cannot run a batch; ``index`` is the failing session's place
    among those run side by side (:func:`onnxprune.runner.run_batches`)."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"onnxruntime could not run the model: {reason}")
        self.index = index
        self.reason = reason


class ValidationFailed(OnnxPruneError):
    """Raised when a validation gate (accuracy drop, cosine, latency ratio) is not met."""

    exit_code = 1


class InternalError(Exception):
    """A bug in onnxprune: an invariant of its own was broken. Please report it."""
