"""The pass contract: a configurable step from one model to the next.

A pass is a dataclass whose fields are its options (typed, with defaults); it overrides
:meth:`Pass.run`, and may add a precondition (:meth:`Pass.requires`) or a postcondition
(:meth:`Pass.ensures`). Calling the pass, ``p(model, ctx)``, runs requires -> run -> ensures
and checks what ``run`` returned; the pipeline calls passes that way, and so may anyone else.
``-p NAME:key=value,...`` on the command line, a recipe file and ``Pass.from_options`` all go
through the same typed conversion, so an unknown key or a bad value is one clear error naming
the pass, the key and what is allowed. An option may declare its range
(``option(0.5, "...", low=0, below=1)``) or that it is a regular expression (``regex=True``);
a float option must be finite unless it says ``finite=False``. Those rules hold for options
from the command line, a recipe or a sweep, and again when the pass is called.

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
import math
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
        new_reference: the result is a new function (``fuse``: an ensemble), not a pruned
            copy, so the passes after it compare against it: the pipeline makes it
            ``ctx.original``.

    Calling the pass runs the contract:

    1. ``requires(model, ctx)``; any exception becomes a :class:`PreconditionError`.
    2. ``run(model, ctx)``, which must return a :class:`PassResult` whose model is the one it
       was given exactly when ``in_place`` (else :class:`PassFailedError`).
    3. ``ensures(result, ctx)``; any exception becomes a :class:`PostconditionError`.
    """

    name: ClassVar[str] = ""
    needs_original: ClassVar[bool] = False
    in_place: ClassVar[bool] = True
    new_reference: ClassVar[bool] = False

    def __call__(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        """Run ``requires`` -> ``run`` -> ``ensures`` on ``model``, which the pass may change.

        Raises:
            PassOptionError: an option breaks its declared range (:meth:`check_options`).
            PreconditionError: ``requires`` failed.
            PassFailedError: ``run`` refused the model, returned something other than a
                PassResult, or broke its ``in_place`` declaration.
            PostconditionError: ``ensures`` failed on the result.
        """
        self.check_options()
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
        """(name, type, default, help) of each option, for ``--list-passes``; the help ends with
        the option's range when it declares one."""
        hints = typing.get_type_hints(cls)
        specs = []
        for f in dataclasses.fields(cls):
            default = (
                f.default
                if f.default is not dataclasses.MISSING
                else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            )
            help_text = f.metadata.get("help", "")
            bounds: Bounds = f.metadata.get("bounds", _UNBOUNDED)
            if bounds.bounded():
                help_text += f" [{bounds.describe(f.name)}]"
            specs.append((f.name, _type_name(hints[f.name]), default, help_text))
        return specs

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Pass:
        """Build the pass from raw options (strings from the CLI, or typed TOML values).

        Raises:
            PassOptionError: an unknown key, or a value that does not fit the option's type,
                range or regex.
        """
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
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
                check_value(fields[norm], kwargs[norm])
            except ValueError as exc:
                raise PassOptionError(
                    f"pass {cls.name}: option {key}={raw!r}: {with_range(exc, fields[norm])}"
                ) from exc
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise PassOptionError(f"pass {cls.name}: {exc}") from exc

    def check_options(self) -> None:
        """Every option holds a value its declaration allows (range, finite, regex).

        Raises:
            PassOptionError: naming the pass, the option, the value and what is allowed.
        """
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            try:
                check_value(f, value)
            except ValueError as exc:
                raise PassOptionError(
                    f"pass {self.name}: option {f.name}={value!r}: {with_range(exc, f)}"
                ) from exc

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


@dataclass(frozen=True)
class Bounds:
    """The numbers a numeric option allows: ``low``/``high`` inclusive, ``above``/``below``
    exclusive (None: unbounded); NaN and infinity only when ``finite`` is False."""

    low: float | None = None
    high: float | None = None
    above: float | None = None
    below: float | None = None
    finite: bool = True

    def bounded(self) -> bool:
        """Whether any limit is set."""
        return any(b is not None for b in (self.low, self.high, self.above, self.below))

    def contains(self, value: float) -> bool:
        """``value`` lies within every limit."""
        return not (
            (self.low is not None and not value >= self.low)
            or (self.high is not None and not value <= self.high)
            or (self.above is not None and not value > self.above)
            or (self.below is not None and not value < self.below)
        )

    def describe(self, name: str) -> str:
        """The range as ``0 <= name < 1``, ``name >= 1`` or ``name > 0`` (when bounded)."""
        low = (self.low, "<=") if self.low is not None else (self.above, "<")
        high = (self.high, "<=") if self.high is not None else (self.below, "<")
        if high[0] is None:
            return f"{name} {'>=' if low[1] == '<=' else '>'} {low[0]:g}"
        text = f"{name} {high[1]} {high[0]:g}"
        return f"{low[0]:g} {low[1]} {text}" if low[0] is not None else text


_UNBOUNDED = Bounds()


def option(
    default: Any,
    help: str,  # noqa: A002 - mirrors argparse/click naming
    *,
    low: float | None = None,
    high: float | None = None,
    above: float | None = None,
    below: float | None = None,
    finite: bool = True,
    regex: bool = False,
) -> Any:
    """A dataclass field with help text for ``--list-passes`` and the values it allows.

    ``low``/``high`` are inclusive limits, ``above``/``below`` exclusive ones (for a number, or
    each number of a list); a float must be finite unless ``finite=False``; ``regex=True``
    makes a string option a regular expression that must compile.
    """
    bounds = Bounds(low, high, above, below, finite)
    metadata = {"help": help, "bounds": bounds, "regex": regex}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def check_value(f: dataclasses.Field, value: Any) -> None:
    """``value`` fits option ``f``'s declaration: every number finite (unless declared
    otherwise) and within its bounds, a regex option a valid pattern. None passes.

    Raises:
        ValueError: what is wrong (:func:`with_range` adds the allowed range).
    """
    bounds: Bounds = f.metadata.get("bounds", _UNBOUNDED)
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            if bounds.bounded() and item is not None:
                raise ValueError("expected a number")
            continue
        if isinstance(item, float) and bounds.finite and not math.isfinite(item):
            raise ValueError("expected a finite number")
        if not bounds.contains(item):
            raise ValueError("out of range")
    if f.metadata.get("regex") and isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc})") from None


def with_range(exc: Exception, f: dataclasses.Field) -> str:
    """``exc``'s message, followed by the range option ``f`` allows when it declares one."""
    bounds: Bounds = f.metadata.get("bounds", _UNBOUNDED)
    if bounds.bounded():
        return f"{exc}; allowed: {bounds.describe(f.name)}"
    return str(exc)


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
        if isinstance(raw, (list, tuple, dict, set)):
            raise ValueError(f"expected a single value, not a {type(raw).__name__}")
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
