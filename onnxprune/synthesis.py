"""Synthetic inputs that fit the model, for runs without ``--data``, and the run's data.

:func:`load_data` is what a run feeds onnxruntime: the user's .npz when given (checked by
:func:`onnxprune.data.load_npz`), else :func:`synthesize`. Synthesis reads what the graph says
about its inputs (:mod:`onnxprune.input_hints`): a symbolic dim takes the size its consumer
needs, integer indices stay inside the table they index, strings come from a vocabulary.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxprune.data import Dataset, declared_dims, fixed_batch, load_npz, unwrap_type
from onnxprune.errors import DataError, PassFailedError
from onnxprune.graph import graph_input_names
from onnxprune.input_hints import InputHints, input_hints
from onnxprune.model import FLOAT_TYPES, INT_TYPES
from onnxprune.runner import run_model
from onnxprune.runtime import session

SYNTH_DIM = 16
SYNTH_SAMPLES = 32
SEQUENCE_LENGTH = 2
INT_HIGH = 10
_WORDS = ("the", "a", "model", "input", "text", "value", "zero", "one")
_SYNTHESISABLE = FLOAT_TYPES | INT_TYPES | {onnx.TensorProto.BOOL, onnx.TensorProto.STRING}


def load_data(
    path: str | os.PathLike[str] | None,
    model: onnx.ModelProto,
    *,
    samples: int = SYNTH_SAMPLES,
    seed: int = 0,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> Dataset:
    """The .npz at ``path`` checked against ``model`` (:func:`load_npz`), or, when ``path`` is
    None, ``samples`` inputs synthesised from ``model`` with ``seed`` and the shapes the user
    fixed, ``input_shapes`` (:func:`synthesize`).

    Raises:
        DataError: as :func:`load_npz`, or an input dtype that cannot be synthesised.
    """
    if path is not None:
        return load_npz(path, model)
    return synthesize(model, samples, seed, input_shapes)


def synthesize(
    model: onnx.ModelProto,
    samples: int = 8,
    seed: int = 0,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> Dataset:
    """Random inputs that fit the model: floats ~ N(0, 1), integers in [0, 10) (and below the
    size of a table they index), bools, strings (from a consumer's vocabulary, if it has one);
    a sequence input holds :data:`SEQUENCE_LENGTH` such tensors, an optional input one.

    Sizes: ``samples`` on axis 0 (a model with a fixed batch is fed slices of it); fixed dims
    as declared; the other dims of an input in ``input_shapes`` (``--input-shape``, checked
    by :func:`onnxprune.input_shapes.check_input_shapes`) as given; a symbolic one what the
    graph needs (:mod:`onnxprune.input_hints`), else
    :data:`SYNTH_DIM`, or 1 when onnxruntime rejects :data:`SYNTH_DIM` (one trial run on one
    batch, made only when such dims exist).

    Raises:
        DataError: an input of a type that cannot be synthesised, or symbolic dims that no
            trial size fits; the message names the input and says to pass --data.
    """
    plan = _SynthesisPlan.make(model, input_shapes or {})
    fill = _fitting_fill(model, plan, seed) if plan.free else SYNTH_DIM
    return Dataset(plan.inputs(samples, seed, fill), None, "synthetic", synthetic=True)


@dataclass
class _SynthesisPlan:
    """The real inputs' types, declared dims and what the graph tells about them."""

    types: dict[str, tuple[str, int, list[int | str | None]]]  # name -> (kind, elem type, dims)
    hints: InputHints
    named: dict[str, int]  # dim name -> size the graph needs
    free: dict[str, list[str]]  # input -> its symbolic dims nothing determines

    @classmethod
    def make(
        cls, model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]
    ) -> _SynthesisPlan:
        """Read the inputs (dims the user fixed replace the declared ones); raise DataError
        for one whose type cannot be synthesised."""
        types = {}
        real = set(graph_input_names(model.graph))
        for vi in model.graph.input:
            if vi.name not in real:
                continue
            kind, tensor = unwrap_type(vi.type)
            if tensor is None or tensor.elem_type not in _SYNTHESISABLE:
                what = kind if tensor is None else onnx.TensorProto.DataType.Name(tensor.elem_type)
                raise DataError(f"input {vi.name!r}: cannot synthesise a {what} value; pass --data")
            dims = declared_dims(tensor)
            given = input_shapes.get(vi.name)
            if given is not None and len(given) == len(dims):
                dims = [int(d) for d in given]
            types[vi.name] = (kind, tensor.elem_type, dims)
        hints = input_hints(model, {n: len(d) for n, (_, _, d) in types.items()})
        named: dict[str, int] = {}
        for name, (_, _, dims) in types.items():
            for axis, size in hints.dims.get(name, {}).items():
                dim = dims[axis]
                if axis and isinstance(dim, str):
                    named.setdefault(dim, size)
        free = {}
        for name, (_, _, dims) in types.items():
            open_dims = [
                str(d)
                for axis, d in enumerate(dims)
                if axis
                and not (isinstance(d, int) and d > 0)
                and axis not in hints.dims.get(name, {})
                and d not in named
            ]
            if open_dims:
                free[name] = open_dims
        return cls(types, hints, named, free)

    def shape(self, name: str, samples: int, fill: int) -> list[int]:
        """The synthetic shape of input ``name``."""
        dims = self.types[name][2]
        given = self.hints.dims.get(name, {})
        out = []
        for axis, d in enumerate(dims):
            if axis == 0:
                out.append(samples)  # the samples axis, even where the batch is fixed
            elif isinstance(d, int) and d > 0:
                out.append(d)
            else:
                out.append(given.get(axis) or self.named.get(str(d or ""), fill))
        return out

    def inputs(self, samples: int, seed: int, fill: int) -> dict[str, Any]:
        """One random value per input (a list of tensors for a sequence input)."""
        rng = np.random.default_rng(seed)
        out: dict[str, Any] = {}
        for name, (kind, elem, _) in self.types.items():
            shape = self.shape(name, samples, fill)
            count = SEQUENCE_LENGTH if kind == "sequence" else 1
            values = [self._random(rng, name, elem, shape) for _ in range(count)]
            out[name] = values if kind == "sequence" else values[0]
        return out

    def _random(self, rng: np.random.Generator, name: str, elem: int, shape: list[int]) -> Any:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
        if elem in FLOAT_TYPES:
            return rng.standard_normal(shape).astype(dtype)
        if elem == onnx.TensorProto.BOOL:
            return rng.integers(0, 2, shape).astype(bool)
        if elem == onnx.TensorProto.STRING:
            words = self.hints.strings.get(name) or _WORDS
            return np.array(words, dtype=object)[rng.integers(0, len(words), shape)]
        high = min(INT_HIGH, self.hints.int_high.get(name, INT_HIGH))
        return rng.integers(0, max(high, 1), shape).astype(dtype)


def _fitting_fill(model: onnx.ModelProto, plan: _SynthesisPlan, seed: int) -> int:
    """:data:`SYNTH_DIM` for the dims nothing determines, or 1 if only that runs.

    A model onnxruntime cannot load at all is not a matter of sizes: :data:`SYNTH_DIM` then,
    and the caller reports onnxruntime's error when it runs the model itself.
    """
    try:
        sess = session(model, optimize=False)
    except PassFailedError:
        return SYNTH_DIM
    error = ""
    samples = fixed_batch(model) or 1
    for fill in dict.fromkeys((SYNTH_DIM, 1)):
        try:
            run_model(sess, plan.inputs(samples, seed, fill))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises untyped errors
            error = error or _reason(exc)
            continue
        return fill
    which = ", ".join(f"{n!r} (dims {d})" for n, d in plan.free.items())
    raise DataError(
        f"input {which}: synthetic values do not fit the model with those dims set to "
        f"{SYNTH_DIM} or 1 (onnxruntime: {error}); pass --data with real inputs"
    )


def _reason(exc: Exception, limit: int = 200) -> str:
    """onnxruntime's message in short, on one line: the node it failed on and why."""
    text = " ".join(str(exc).split())
    node = re.search(r"running (\w+) node\. Name:'([^']*)'", text)
    text = text.rsplit("Status Message: ", 1)[-1]
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"\S+\.(h|cc|cpp):\d+ ", "", text)  # source file and line
    text = re.sub(r"onnxruntime::[\w:]+\([^)]*\) ", "", text)  # the C++ function
    if node:
        text = f"{' '.join(n for n in (node[1], node[2]) if n)}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
