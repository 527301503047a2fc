"""The pass contract: a configurable step from one model to the next.

A pass is a dataclass whose fields are its options (typed, with defaults); it overrides
:meth:`Pass.run`, and may add a precondition (:meth:`Pass.requires`) or a postcondition
(:meth:`Pass.ensures`). Calling the pass, ``p(model, ctx)``, runs requires -> run -> ensures
and checks what ``run`` returned; the pipeline calls passes that way, and so may anyone else.
``-p NAME:key=value,...`` on the command line, a recipe file and ``Pass.from_options`` all go
through the same typed conversion, so an unknown key or a bad value is one clear error naming
the pass, the key and what is allowed.

Example::

    @register_pass
    @dataclass
    class DropIdentity(Pass):
        '''Remove Identity nodes.'''
        name: ClassVar[str] = "drop-identity"
        def run(self, model, ctx):
            ...
            return PassResult(model, modified=True, report={"removed": n})
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import onnx

from onnxprune.errors import (
    InternalError,
    OnnxPruneError,
    PassContractError,
    PassFailedError,
    PassOptionError,
    PostconditionError,
    PreconditionError,
)
from onnxprune.model import check_model

if TYPE_CHECKING:
    from onnxprune.context import Context

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
LIST_SEPARATOR = "+"


@dataclass
class PassResult:
    """What a pass gives back: the new model, whether it changed, and its report section."""

    model: onnx.ModelProto
    modified: bool
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class Pass:
    """Base class of every pass. Subclasses are dataclasses; their fields are the options.

    Class attributes:
        name: what ``-p`` calls the pass.
        needs_original: the pass reads ``ctx.original`` (the model before any pass), so a
            copy is kept even when the pipeline runs in place.
        in_place: ``run`` changes the model it is given and returns that same object (True),
            or returns a new model (False). :meth:`__call__` checks it.

    Calling the pass runs the contract:

    1. ``requires(model, ctx)``; any exception becomes a :class:`PreconditionError`.
    2. ``run(model, ctx)``, which must return a :class:`PassResult` whose model is the one it
       was given exactly when ``in_place`` (else :class:`PassFailedError`).
    3. ``ensures(result, ctx)``; any exception becomes a :class:`PostconditionError`.
    """

    name: ClassVar[str] = ""
    needs_original: ClassVar[bool] = False
    in_place: ClassVar[bool] = True

    def __call__(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        """Run ``requires`` -> ``run`` -> ``ensures`` on ``model``, which the pass may change.

        Raises:
            PreconditionError: ``requires`` failed.
            PassFailedError: ``run`` refused the model, returned something other than a
                PassResult, or broke its ``in_place`` declaration.
            PostconditionError: ``ensures`` failed on the result.
        """
        try:
            self.requires(model, ctx)
        except PassContractError:
            raise
        except Exception as exc:
            raise PreconditionError(self.name, _describe(exc)) from exc
        result = self.run(model, ctx)
        self._check_result(model, result)
        try:
            self.ensures(result, ctx)
        except PassContractError:
            raise
        except Exception as exc:
            raise PostconditionError(
                self.name, _describe(exc), builtin=type(self).__module__.startswith("onnxprune.")
            ) from exc
        return result

    def requires(self, model: onnx.ModelProto, ctx: Context) -> None:
        """Raise if ``model`` or ``ctx`` lacks what :meth:`run` needs (default: nothing)."""

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        """Transform ``model`` (a private copy the pass may change in place)."""
        raise NotImplementedError

    def ensures(self, result: PassResult, ctx: Context) -> None:
        """Raise if ``result`` breaks a guarantee of the pass (default: onnx.checker passes)."""
        check_model(result.model, f"output of pass {self.name}")

    def _check_result(self, model: onnx.ModelProto, result: Any) -> None:
        """What ``run`` returned fits the contract: a PassResult, honouring ``in_place``."""
        if not isinstance(result, PassResult):
            raise PassFailedError(
                f"pass {self.name} returned {type(result).__name__}, not a PassResult"
            )
        if self.in_place and result.model is not model:
            raise PassFailedError(
                f"pass {self.name} declares in_place=True but returned a new model (pass "
                "developer: return the model it was given, or declare in_place = False)"
            )
        if not self.in_place and result.model is model:
            raise PassFailedError(
                f"pass {self.name} declares in_place=False but returned the model it was given "
                "(pass developer: declare in_place = True, or return a new model)"
            )

    @classmethod
    def summary(cls) -> str:
        """First line of the docstring: the one-line description ``--list-passes`` shows."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    @classmethod
    def option_specs(cls) -> list[tuple[str, str, Any, str]]:
        """(name, type, default, help) of each option, for ``--list-passes``."""
        hints = typing.get_type_hints(cls)
        specs = []
        for f in dataclasses.fields(cls):
            default = (
                f.default
                if f.default is not dataclasses.MISSING
                else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            )
            specs.append((f.name, _type_name(hints[f.name]), default, f.metadata.get("help", "")))
        return specs

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Pass:
        """Build the pass from raw options (strings from the CLI, or typed TOML values).

        Raises:
            PassOptionError: an unknown key, or a value that does not fit the option's type.
        """
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, raw in options.items():
            norm = key.replace("-", "_")
            if norm not in fields:
                allowed = ", ".join(sorted(fields)) or "none"
                raise PassOptionError(
                    f"pass {cls.name}: unknown option {key!r} (options: {allowed})"
                )
            try:
                kwargs[norm] = coerce(raw, hints[norm])
            except ValueError as exc:
                raise PassOptionError(f"pass {cls.name}: option {key}={raw!r}: {exc}") from exc
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise PassOptionError(f"pass {cls.name}: {exc}") from exc

    def options(self) -> dict[str, Any]:
        """The options as set, JSON-ready (for reports and provenance)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


def require_original(ctx: Context, pass_name: str) -> onnx.ModelProto:
    """``ctx.original``, the model before any pass.

    Raises:
        PreconditionError: the context has none (a hand-made ``Context(original=None)``).
    """
    if ctx.original is None:
        raise PreconditionError(
            pass_name,
            "ctx.original is missing: the pass compares with the model before any pass "
            "(onnxprune.run keeps one for a pass that declares needs_original; "
            "a Context made by hand needs original=...)",
        )
    return ctx.original


def option(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse/click naming
    """A dataclass field with help text for ``--list-passes``."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def coerce(raw: Any, tp: Any) -> Any:
    """Convert ``raw`` to type ``tp`` (bool, int, float, str, Literal, tuple/list, Optional).

    A string for a tuple/list option is split on ``+`` and ``,``.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        is_none = raw is None or (isinstance(raw, str) and raw.lower() in ("none", ""))
        if is_none and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(raw, arg)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors))
    if origin is Literal:
        value = str(raw)
        if value not in [str(a) for a in args]:
            raise ValueError(f"expected one of {', '.join(map(str, args))}")
        return next(a for a in args if str(a) == value)
    if origin in (tuple, list):
        # '+' or ',' (what `-p name:key=a,b` continuation produces) separate the items
        if isinstance(raw, str):
            items = [i.strip() for i in re.split(r"[+,]", raw) if i.strip()]
        else:  # a TOML array (of any item type), or a single value
            items = list(raw) if isinstance(raw, (list, tuple)) else [raw]
        inner = args[0] if args else str
        return origin(coerce(i, inner) for i in items)
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in _TRUE:
            return True
        if str(raw).lower() in _FALSE:
            return False
        raise ValueError("expected true or false")
    if tp is int:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError("expected an integer")
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise ValueError("expected an integer") from None
    if tp is float:
        if isinstance(raw, bool):
            raise ValueError("expected a number")
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ValueError("expected a number") from None
    if tp is str:
        return str(raw)
    raise ValueError(f"unsupported option type {tp}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return "|".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + "?"
    if origin in (tuple, list):
        return f"{_type_name(args[0]) if args else 'str'}{LIST_SEPARATOR}..."
    return getattr(tp, "__name__", str(tp))


def _describe(exc: BaseException) -> str:
    """An exception as one message: onnxprune's own errors as they are, others with their type."""
    if isinstance(exc, (OnnxPruneError, InternalError)) and str(exc):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value
