"""Input shapes the user fixes (``--input-shape NAME:d0,d1,...``), the onnxsim/Polygraphy way.

A given shape overrides the declared dims of that input for synthetic data and for costs
(the saved model keeps its declared dims). It must keep the input's rank and every fixed
dim; a symbolic or unknown dim takes the given size. :func:`check_input_shapes` enforces that.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import onnx

from onnxprune.data import input_specs
from onnxprune.errors import ArgumentError, DataError

InputShapes = dict[str, list[int]]
"""Input name -> its fixed shape."""


def parse_input_shape(spec: str) -> tuple[str, list[int]]:
    """``"NAME:d0,d1,..."`` as (name, dims); the name may itself hold ``:`` (the last one splits).

    Raises:
        DataError: no ``:``, no name, or a dim that is not an integer >= 1.
    """
    name, sep, dims = spec.rpartition(":")
    if not sep or not name:
        raise DataError(f"--input-shape {spec!r}: expected NAME:d0,d1,... (e.g. input:1,3,224,224)")
    try:
        sizes = [int(d) for d in dims.split(",")] if dims.strip() else []
    except ValueError:
        raise DataError(
            f"--input-shape {spec!r}: dims must be integers, as in 1,3,224,224"
        ) from None
    if any(d < 1 for d in sizes):
        raise DataError(f"--input-shape {spec!r}: every dim must be >= 1")
    return name, sizes


def parse_input_shapes(specs: Iterable[str]) -> InputShapes:
    """Every ``NAME:dims`` spec; a name given twice is an error."""
    out: InputShapes = {}
    for spec in specs:
        name, dims = parse_input_shape(spec)
        if name in out:
            raise DataError(f"--input-shape {name!r} given twice")
        out[name] = dims
    return out


def as_input_shapes(value: Any, where: str = "onnxprune.run: input_shapes") -> InputShapes:
    """``value`` (None, a mapping name -> dims, or a list of ``NAME:dims`` specs) as a dict.

    Raises:
        ArgumentError: another type, or dims that are not a list of integers.
        DataError: a malformed spec or dim (:func:`parse_input_shape`).
    """
    if value is None:
        return {}
    if isinstance(value, str):
        value = [value]
    if isinstance(value, Mapping):
        out: InputShapes = {}
        for name, dims in value.items():
            if isinstance(dims, str) or not all(
                isinstance(d, int) and not isinstance(d, bool) for d in dims
            ):
                raise ArgumentError(f"{where}[{name!r}] must be a list of integers, got {dims!r}")
            out[str(name)] = [int(d) for d in dims]
            if any(d < 1 for d in out[str(name)]):
                raise DataError(f"{where}[{name!r}]: every dim must be >= 1")
        return out
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return parse_input_shapes(value)
    raise ArgumentError(
        f"{where} must be a dict of name -> dims or a list of 'NAME:d0,d1' specs, got {value!r:.60}"
    )


def check_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, list[int]]) -> None:
    """Each given shape names a real input, keeps its rank and its fixed dims.

    Raises:
        DataError: one line naming the input and its declared shape.
    """
    specs = input_specs(model)
    for name, dims in shapes.items():
        if name not in specs:
            known = ", ".join(repr(n) for n in specs) or "none"
            raise DataError(
                f"--input-shape {name!r}: the model has no such input (inputs: {known})"
            )
        declared = specs[name][0]
        shown = "[" + ", ".join("?" if d is None else str(d) for d in declared) + "]"
        fixed = all(
            not (isinstance(d, int) and d > 0) or d == g
            for d, g in zip(declared, dims, strict=False)
        )
        if len(declared) != len(dims) or not fixed:
            given = ",".join(map(str, dims))
            raise DataError(
                f"--input-shape {name}:{given} does not fit input {name!r}, declared {shown}: "
                "keep its rank and its fixed dims"
            )


def dim_values(model: onnx.ModelProto, shapes: Mapping[str, list[int]]) -> dict[str, int]:
    """The size each symbolic dim name of the inputs takes from ``shapes``."""
    out: dict[str, int] = {}
    for name, (declared, _) in input_specs(model).items():
        for d, size in zip(declared, shapes.get(name, ()), strict=False):
            if isinstance(d, str):
                out.setdefault(d, int(size))
    return out
