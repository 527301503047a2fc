"""The errors onnxprune raises, and the exit code each one maps to.

Every user-facing failure is an :class:`OnnxPruneError`; the CLI catches that base class once
and prints its one-line message. :class:`InternalError` is deliberately *not* a subclass: it
means a bug in onnxprune itself, and is shown with its traceback. :func:`first_line` is how
an error from another library (onnx, onnxruntime) is quoted in one of those one-line messages.
"""

from __future__ import annotations


class OnnxPruneError(Exception):
    """Base of every error caused by input, options or a failed check (not by a bug)."""

    exit_code = 2


class ArgumentError(OnnxPruneError, TypeError):
    """Raised when a Python API function gets an argument of the wrong type or value; the
    message names the function and the argument (a TypeError too, for API callers)."""


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


class MissingDependency(OnnxPruneError):
    """Raised when an optional feature needs a package that is not installed."""


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


class OutputMismatch(ValidationFailed):
    """Raised when an output of the pruned model is missing or no longer has its shape."""


class InputMismatch(ValidationFailed):
    """Raised when the pruned model cannot take an input that the original model takes."""


class ArchitectureMismatch(OnnxPruneError, ValueError):
    """Raised when models that must share one architecture (weight-space fusion) differ; the
    message names the model and the first difference (a ValueError too, for API callers)."""


class InternalError(Exception):
    """A bug in onnxprune: an invariant of its own was broken. Please report it."""


class PassContractError(PassFailedError):
    """Raised when a pass's contract does not hold; the message names the pass (and, from the
    pipeline, the passes that ran before it)."""

    stage = "contract"

    def __init__(self, pass_name: str, detail: str) -> None:
        super().__init__(pass_name, detail)
        self.pass_name = pass_name
        self.detail = detail
        self.passes_before: str | None = None  # filled in by the pipeline

    def __str__(self) -> str:
        text = f"pass {self.pass_name}: {self.stage} failed: {self.detail}"
        if self.passes_before is not None:
            text += f" (passes before it: {self.passes_before})"
        return text


class PreconditionError(PassContractError):
    """Raised when ``Pass.requires`` fails: the model or context lacks what the pass needs
    (e.g. ``ctx.original``), so the input is at fault (exit 2)."""

    stage = "precondition"


class PostconditionError(PassContractError):
    """Raised when ``Pass.ensures`` fails on the pass's own output (e.g. onnx.checker rejects
    it). From a built-in pass that is a bug in onnxprune (exit 3); from any other pass
    (``builtin=False``), a bug in that pass (exit 2, like any failed pass)."""

    stage = "postcondition"
    exit_code = 3

    def __init__(self, pass_name: str, detail: str, *, builtin: bool = True) -> None:
        super().__init__(pass_name, detail)
        self.builtin = builtin
        if not builtin:
            self.exit_code = PassFailedError.exit_code

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}; a bug in onnxprune, please report it" if self.builtin else text


def first_line(exc: BaseException) -> str:
    """The first non-empty line of ``exc``'s message, stripped; its type's name when empty."""
    return next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
