"""Where passes are found: built-ins, ``register_pass``, and the ``onnxprune.passes`` entry points.

This module imports no pass: each built-in registers itself with ``@register_pass`` when
:mod:`onnxprune.passes` imports it. A third-party distribution exposes a pass by declaring, in its pyproject.toml::

    [project.entry-points."onnxprune.passes"]
    my-pass = "my_package.module:MyPass"

A plugin that fails to import is listed by ``--list-passes`` as unavailable with the reason,
instead of breaking every run.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points

from onnxprune.errors import OnnxPruneError, PassNotFoundError, PassOptionError
from onnxprune.passes.base import Pass

ENTRY_POINT_GROUP = "onnxprune.passes"

_REGISTRY: dict[str, type[Pass]] = {}
_ORIGIN: dict[str, str] = {}


@dataclass
class Unavailable:
    """A plugin pass that could not be loaded, and why."""

    name: str
    origin: str
    reason: str


_UNAVAILABLE: dict[str, Unavailable] = {}
_loaded = False


def register_pass(cls: type[Pass], *, origin: str = "") -> type[Pass]:
    """Register a Pass subclass under ``cls.name`` (usable as a class decorator).

    Raises:
        OnnxPruneError: the name is empty or already taken by another class.
    """
    if not cls.name:
        raise OnnxPruneError(f"{cls.__qualname__}: a pass needs a non-empty `name`")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise OnnxPruneError(
            f"pass name {cls.name!r} is registered twice: {_ORIGIN[cls.name]} and "
            f"{origin or cls.__module__}; uninstall or rename one"
        )
    _REGISTRY[cls.name] = cls
    _ORIGIN[cls.name] = origin or cls.__module__
    return cls


def _load_all() -> None:
    """Register the built-ins and then the entry-point plugins, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    # The built-ins are registered already: importing this module ran onnxprune/passes/__init__,
    # which imports each of them.
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        origin = f"{ep.dist.name if ep.dist else '?'} ({ep.value})"
        try:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Pass)):
                raise TypeError(f"{ep.value} is not a onnxprune.Pass subclass")
            if cls.name != ep.name:
                raise TypeError(f"entry point {ep.name!r} names a pass called {cls.name!r}")
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the tool
            _UNAVAILABLE[ep.name] = Unavailable(ep.name, origin, f"{type(exc).__name__}: {exc}")
            continue
        register_pass(cls, origin=origin)


def available_passes() -> dict[str, type[Pass]]:
    """All registered passes by name (built-ins and plugins), sorted."""
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def unavailable_passes() -> list[Unavailable]:
    """Plugins that failed to load."""
    _load_all()
    return list(_UNAVAILABLE.values())


def pass_origin(name: str) -> str:
    """Module or distribution that provides pass ``name``."""
    _load_all()
    return _ORIGIN.get(name, "?")


def get_pass(name: str) -> type[Pass]:
    """The pass class called ``name``.

    Raises:
        PassNotFoundError: no such pass (the message lists the known ones).
    """
    passes = available_passes()
    if name in passes:
        return passes[name]
    if name in _UNAVAILABLE:
        u = _UNAVAILABLE[name]
        raise PassNotFoundError(f"pass {name!r} from {u.origin} failed to load: {u.reason}")
    raise PassNotFoundError(f"unknown pass {name!r}; known passes: {', '.join(passes)}")


def parse_pass_spec(spec: str) -> Pass:
    """Build a pass from ``NAME[:key=value,...]``.

    A comma-separated item without ``=`` continues the previous value, so list options can
    use commas too (``ensemble=a.onnx,b.onnx``).

    Raises:
        PassNotFoundError: unknown pass name.
        PassOptionError: a malformed item, an unknown key or a bad value.
    """
    name, _, rest = spec.partition(":")
    name = name.strip()
    cls = get_pass(name)
    options: dict[str, str] = {}
    last = None
    for item in rest.split(",") if rest.strip() else []:
        if "=" in item:
            key, _, value = item.partition("=")
            key = key.strip()
            if not key:
                raise PassOptionError(f"pass {name}: empty option name in {spec!r}")
            options[key] = value.strip()
            last = key
        elif last is not None:
            options[last] += "," + item.strip()
        else:
            raise PassOptionError(f"pass {name}: expected key=value, got {item!r} in {spec!r}")
    return cls.from_options(options)
